"""The rules behind RobustEarlyStopping that keep no reference to a model.

`Smoother` gives the value decisions are made on (raw, mean of the last N,
or an exponential moving average). `TimeBudget` counts training time across
fits and, with several workers, decides "time is up" at the same step on
every worker by voting in collectives that become rarer while the budget is
far away.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from keras_callbacks_plus import distribute
from keras_callbacks_plus._validate import invalid, is_int

# Workers vote on "time is up" (a collective) every `stride` batches; the
# stride doubles while every worker saw less than this between votes, and
# drops to 1 once any worker expects the budget to run out before the next vote.
VOTE_INTERVAL_S = 1.0
MAX_STRIDE = 4096


def check_smoothing(value: Any) -> int | float | None:
    if value is None:
        return None
    if is_int(value, 1):
        return int(value)
    if isinstance(value, (float, np.floating)) and 0.0 < value < 1.0:
        return float(value)
    raise invalid("smoothing", "None, an int >= 1 (mean of the last N values) or a float in "
                  "(0, 1) (weight of the newest value in an exponential moving average)", value)


class Smoother:
    """The value decisions are made on: raw, mean of the last N, or an EMA."""

    def __init__(self, smoothing: int | float | None):
        self.smoothing = smoothing
        self.window: list[float] = []
        self.ema: float | None = None

    def update(self, value: float) -> float:
        if self.smoothing is None:
            return value
        if isinstance(self.smoothing, int):
            self.window = (self.window + [value])[-self.smoothing :]
            return sum(self.window) / len(self.window)
        alpha = self.smoothing
        self.ema = value if self.ema is None else alpha * value + (1.0 - alpha) * self.ema
        return self.ema

    def state(self) -> dict[str, Any]:
        return {"window": list(self.window), "ema": self.ema}

    def load(self, state: dict[str, Any]) -> None:
        self.window = [float(v) for v in state.get("window", [])]
        self.ema = state.get("ema")


class TimeBudget:
    """Seconds of training used (this fit's plus `before`), and whether `max_time` is spent.

    Args:
        max_time: the budget in seconds, or None.
        clock: seconds on a monotonic clock.
    """

    def __init__(self, max_time: float | None, clock: Callable[[], float]):
        self.max_time = max_time
        self.clock = clock
        self.before = 0.0
        self.start: float | None = None

    def begin(self) -> None:
        """At train begin: the clock runs; the voting schedule starts over."""
        self.start = self._last_vote = self.clock()
        self._workers = distribute.num_workers() if self.max_time is not None else 1
        self._stride = self._until_vote = 1
        self._near = False

    def end(self) -> None:
        if self.start is not None:
            self.before, self.start = self.elapsed(), None

    def elapsed(self) -> float:
        return self.before + (0.0 if self.start is None else self.clock() - self.start)

    def is_up(self, epoch_end: bool = False) -> bool:
        """Whether the budget is spent, the same answer on every worker.

        With several workers a collective: every worker reaches each vote at
        the same step, because the schedule only changes on agreed outcomes.
        """
        now = self.clock()
        elapsed = self.before + now - self.start
        spent = elapsed >= self.max_time
        if self._workers <= 1:
            return spent
        if not epoch_end:
            self._until_vote -= 1
            if self._until_vote > 0:
                return False
        if distribute.any_worker(spent):
            return True
        if epoch_end or self._near:
            return False
        interval = now - self._last_vote
        if distribute.any_worker(elapsed + 2.0 * interval >= self.max_time):
            self._near, self._stride = True, 1
        elif not distribute.any_worker(interval >= VOTE_INTERVAL_S):
            self._stride = min(2 * self._stride, MAX_STRIDE)
        self._until_vote, self._last_vote = self._stride, now
        return False

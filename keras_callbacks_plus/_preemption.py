"""Noticing preemption: signal handlers that only set a flag, restored and chained.

Spot instances, SLURM time limits and Kubernetes evictions end a job with
SIGTERM and a grace period of seconds. The handler here records the signal
and calls the handler that was installed before it (a user's or a
launcher's), so that work happens later, at a batch end, on the training
thread. Python installs signal handlers only from the main thread.
"""

from __future__ import annotations

import logging
import signal
import threading
import warnings
from typing import Any, Callable, Sequence

logger = logging.getLogger(__name__)

#: The exit status for a job that stopped because it was preempted: 128 + SIGTERM
#: (15), what the shell reports for a process ended by SIGTERM. Schedulers and
#: retry policies that treat "killed by SIGTERM" as preemption (Kubernetes
#: `podFailurePolicy` on exit code 143, SLURM requeue scripts) treat this job
#: the same, although it exited cleanly after saving.
PREEMPTED_EXIT_CODE = 128 + signal.SIGTERM

_UNCATCHABLE = {getattr(signal, name) for name in ("SIGKILL", "SIGSTOP") if hasattr(signal, name)}
_warned_not_main_thread = False


def check_signals(signals: Any, owner: str, argument: str = "preemption_signals") -> tuple:
    """Checks a list of signals that can be caught; returns it as a tuple.

    Raises:
        ValueError: an entry is not a signal, or cannot be caught (SIGKILL, SIGSTOP).
    """
    items = (signals,) if isinstance(signals, (int, signal.Signals)) else tuple(signals or ())
    valid = signal.valid_signals()
    for item in items:
        if isinstance(item, bool) or not isinstance(item, int) or item not in valid:
            raise ValueError(
                f"Invalid value for argument {argument}. Expected signals such as "
                f"signal.SIGTERM or signal.SIGUSR1. Received: {argument}={signals!r}"
            )
        if item in _UNCATCHABLE:
            raise ValueError(
                f"Invalid value for argument {argument}. {signal.Signals(item).name} cannot "
                f"be caught, so {owner} cannot save when it arrives (a checkpoint saved every "
                f"few minutes with save_freq='10min' bounds what it loses). Received: "
                f"{argument}={signals!r}"
            )
    return tuple(signal.Signals(item) for item in items)


class SignalFlag:
    """While installed, the given signals only set `received` (then call the previous handler).

    Args:
        signals: the signals to catch.
        owner: the name used in the warning when handlers cannot be installed.
    """

    def __init__(self, signals: Sequence[int], owner: str):
        self.signals = tuple(signals)
        self.owner = owner
        self.received: int | None = None
        self.count = 0
        self._previous: dict[int, Any] = {}

    def install(self) -> bool:
        """Installs the handlers; on a thread other than the main one, warns once and does not."""
        global _warned_not_main_thread
        self.received, self.count = None, 0
        if not self.signals:
            return False
        if threading.current_thread() is not threading.main_thread():
            if not _warned_not_main_thread:
                warnings.warn(
                    f"{self.owner}: fit() runs outside the main thread, where Python cannot "
                    "install signal handlers: no checkpoint will be saved on preemption "
                    f"({', '.join(s.name for s in self.signals)}).",
                    stacklevel=3,
                )
                _warned_not_main_thread = True
            return False
        for signum in self.signals:
            self._previous[signum] = signal.signal(signum, self._handle)
        return True

    def uninstall(self) -> None:
        """Restores each previous handler, unless someone replaced ours meanwhile."""
        for signum, previous in self._previous.items():
            if signal.getsignal(signum) == self._handle:
                signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}

    def _handle(self, signum: int, frame) -> None:
        # Only record: the checkpoint is written at the next batch end.
        if self.received is None:
            self.received = signum
        self.count += 1
        previous: Callable | Any = self._previous.get(signum)
        if callable(previous):
            previous(signum, frame)

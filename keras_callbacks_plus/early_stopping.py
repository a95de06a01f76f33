"""RobustEarlyStopping: early stopping that survives noise, NaNs, divergence, time limits, restarts.

Keras's `EarlyStopping` restores the best weights and knows a baseline;
Lightning's adds goal and divergence thresholds, a finite check and a
resumable state. This callback has both, plus smoothing of noisy values, a
wall-time budget, a stop inside the epoch where the loss turns NaN, and the
same decision on every worker.

Batch-level checks (`check_finite`, `max_time`) need `on_train_batch_end`,
and a callback that defines it turns off Keras's asynchronous batch-end
dispatch unless it declares itself `async_safe`. So the hook is registered
only when one of those checks is on (`PlusCallback._use_batch_hook`), and is
async-safe in a single process.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
import uuid
from typing import Any, Mapping

import numpy as np

from keras_callbacks_plus import distribute
from keras_callbacks_plus._base import PlusCallback
from keras_callbacks_plus._monitor import Monitor, MonitorOp
from keras_callbacks_plus._stopping import Smoother, TimeBudget, check_smoothing
from keras_callbacks_plus._validate import check_int, check_number

logger = logging.getLogger(__name__)

STOP_REASONS = ("patience", "stopping_threshold", "divergence", "non_finite", "max_time")
_STATE_VERSION = 1
_BATCH_STOP_LOCK = threading.Lock()


def _clock() -> float:
    """Seconds on a monotonic clock (a module function so tests can replace it)."""
    return time.monotonic()


class RobustEarlyStopping(MonitorOp, PlusCallback):
    """Stops training when the monitored value stops improving, goes bad, or time is up.

    Arguments shared with `keras.callbacks.EarlyStopping` mean the same:
    every epoch without improvement (by more than `min_delta`) adds one to
    `wait`, and training stops once `wait` reaches `patience` (at least one
    such epoch). An epoch that improves on the best but not on `baseline`
    does not reset `wait`. Epochs before `start_from_epoch` are ignored.

    Stop reasons, in `stop_reason` after `fit`: `"patience"`,
    `"stopping_threshold"` (goal met), `"divergence"` (worse than
    `divergence_threshold`), `"non_finite"` (NaN or infinite training loss,
    seen after the batch that produced it, or monitored value) and
    `"max_time"`; `None` if this callback did not stop training.
    `stopped_epoch` is the (0-based) epoch of the stop, 0 without one, as in
    Keras; `stopped_batch` the batch of a stop inside an epoch, else `None`.
    `best` and `best_epoch` describe the best (smoothed) value.

    With `smoothing`, improvement, patience and both thresholds use the
    smoothed value, so one noisy epoch neither stops nor rescues training.
    Non-finite values (with `check_finite=False`) count as epochs without
    improvement and stay out of the smoothing. An epoch cut short by a
    batch-level stop is not evaluated.

    Best weights are a host-memory copy, taken only when the value improves,
    and restored at the end of `fit` whether or not this callback stopped it.
    With a `data_parallel` twin they go to every replica. A non-finite stop
    never leaves non-finite weights: if no epoch improved before it, the
    weights at the start of this `fit` come back (one host copy taken at
    train begin, dropped at the first improvement). `restored_weights` says
    which came back: `"best"`, `"fit_start"` or `None`.

    With `mode="auto"` the direction is decided at the first epoch end, as
    in Keras (on TensorFlow compiled metrics do not exist before the first
    step); `monitor_op` is then `keras.ops.less` or `keras.ops.greater`.

    The batch-level checks (`check_finite`, `max_time`) read the training
    loss and the clock after each batch. In one process the callback is
    `async_safe`: when no other callback needs batch ends in order (e.g.
    `verbose=0`), Keras's JAX trainer keeps dispatching steps while they are
    checked on its background threads instead of waiting for each loss, and
    the stop then takes effect one or a few steps after the batch it reports
    (`stopped_batch` is still the first bad batch, and the best weights are
    restored as always). Otherwise, as on TensorFlow, no step runs after it.

    On several workers every worker stops at the same step: epoch decisions
    use the globally reduced logs, and workers vote on `max_time` through
    `distribute.any_worker` (every batch once the budget is near, rarer
    before).

    Args:
        monitor: key of the epoch logs to watch. Defaults to `"val_loss"`.
        min_delta: how much better than the best a value must be to count as
            an improvement. Defaults to `0.0`.
        relative_delta: if True, `min_delta` is a fraction of the best
            value's magnitude. Defaults to `False`.
        patience: epochs without improvement before stopping. Defaults to `0`.
        mode: `"min"`, `"max"`, or `"auto"` (from the metric). Defaults to
            `"auto"`.
        baseline: a value to beat; epochs that do not beat it count against
            patience even when they improve on the best. Defaults to `None`.
        start_from_epoch: epochs of warm-up that are not monitored. Defaults
            to `0`.
        restore_best_weights: restore the best epoch's weights at the end of
            `fit`. Defaults to `True`.
        smoothing: `None`, an int N (mean of the last N values) or a float α
            in (0, 1) (exponential moving average, `s = α·x + (1-α)·s`).
            Defaults to `None`.
        stopping_threshold: stop as soon as the value is at least this good.
            Defaults to `None`.
        divergence_threshold: stop as soon as the value is worse than this.
            Defaults to `None`.
        check_finite: stop at the batch where the training loss becomes NaN
            or infinite, or at the epoch whose monitored value is. Defaults to
            `True`.
        max_time: seconds of training (from the start of `fit`, plus the time
            recorded in a state passed to `set_state`); training stops at the
            first batch or epoch end after it. Defaults to `None`.
        reset_patience_on_unfreeze: restart patience when ProgressiveUnfreezing
            starts a new stage. Defaults to `True`.
        strict: raise `KeyError` if `monitor` is missing from the logs, instead
            of warning once. Defaults to `False`.
        verbose: 1 to print why training stopped and which epoch was
            restored. Defaults to `0`.

    Raises:
        ValueError: an argument is out of range, or the thresholds contradict
            `mode` (checked at the first epoch end when `mode="auto"`), or
            `mode="auto"` cannot tell the direction of `monitor` (then too).

    Example:

    ```python
    import keras
    import numpy as np
    from keras_callbacks_plus.early_stopping import RobustEarlyStopping

    x = np.random.rand(512, 8).astype("float32")
    y = (x[:, 0] > 0.5).astype("int32")
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(2, activation="softmax")])
    model.compile(keras.optimizers.Adam(0.05), loss="sparse_categorical_crossentropy")
    stopper = RobustEarlyStopping("val_loss", patience=3, smoothing=2,
                                  divergence_threshold=10.0, max_time=600)
    model.fit(x, y, validation_split=0.25, epochs=100, verbose=0, callbacks=[stopper])
    print(stopper.stop_reason, stopper.best_epoch + 1, stopper.best)
    ```
    """

    def __init__(
        self,
        monitor: str = "val_loss",
        *,
        min_delta: float = 0.0,
        relative_delta: bool = False,
        patience: int = 0,
        mode: str = "auto",
        baseline: float | None = None,
        start_from_epoch: int = 0,
        restore_best_weights: bool = True,
        smoothing: int | float | None = None,
        stopping_threshold: float | None = None,
        divergence_threshold: float | None = None,
        check_finite: bool = True,
        max_time: float | None = None,
        reset_patience_on_unfreeze: bool = True,
        strict: bool = False,
        verbose: int = 0,
    ):
        super().__init__(verbose=verbose)
        self._monitor = Monitor(
            monitor, mode, min_delta, relative_delta, owner="RobustEarlyStopping"
        )
        self.monitor = monitor
        self.mode = mode
        self.min_delta = self._monitor.min_delta
        self.relative_delta = relative_delta
        self.patience = check_int("patience", patience, 0)
        self.start_from_epoch = check_int("start_from_epoch", start_from_epoch, 0)
        self.baseline = check_number("baseline", baseline, allow_none=True)
        self.restore_best_weights = bool(restore_best_weights)
        self.smoothing = check_smoothing(smoothing)
        self.stopping_threshold = check_number("stopping_threshold", stopping_threshold,
                                               allow_none=True)
        self.divergence_threshold = check_number("divergence_threshold", divergence_threshold,
                                                 allow_none=True)
        self.check_finite = bool(check_finite)
        self.max_time = check_number("max_time", max_time, above=0.0, allow_none=True,
                                     expected="a number of seconds > 0 or None")
        self.reset_patience_on_unfreeze = bool(reset_patience_on_unfreeze)
        self.strict = bool(strict)
        if mode != "auto":
            self._check_thresholds(mode)
        # Names one copy of the best weights: a new one whenever they change.
        self._weights_version = f"{uuid.uuid4().hex[:8]}-0"
        self._reset()
        self._resumed = False
        if self.check_finite or self.max_time is not None:
            self._use_batch_hook(self._on_train_batch_end, async_safe=True)

    # ----------------------------------------------------------------- state
    def _reset(self) -> None:
        # As Keras's EarlyStopping after on_train_begin.
        self.best: float | None = None
        self.best_epoch = 0
        self.best_weights: list[np.ndarray] | None = None
        self.wait = 0
        self.restored_weights: str | None = None
        self._smoother = Smoother(self.smoothing)
        self._time = TimeBudget(self.max_time, lambda: _clock())
        self._clear_stop()

    def _clear_stop(self) -> None:
        self.stop_reason: str | None = None
        self.stopped_epoch = 0
        self.stopped_batch: int | None = None
        self._stop_value: float | None = None
        self._epoch = 0

    def _check_thresholds(self, direction: str) -> None:
        better = "lower" if direction == "min" else "higher"
        stop, diverge = self.stopping_threshold, self.divergence_threshold
        if diverge is None:
            return
        if stop is not None and (stop >= diverge if direction == "min" else stop <= diverge):
            raise ValueError(
                "Invalid value for argument stopping_threshold. Expected a value better than "
                f"divergence_threshold={diverge!r} with mode={direction!r} ({better} is "
                f"better). Received: stopping_threshold={stop!r}"
            )
        base = self.baseline
        if base is not None and (base > diverge if direction == "min" else base < diverge):
            raise ValueError(
                "Invalid value for argument baseline. Expected a value no worse than "
                f"divergence_threshold={diverge!r} with mode={direction!r} ({better} is "
                f"better). Received: baseline={base!r}"
            )

    def _state_key_extra(self) -> str:
        return self._state_key_of(monitor=self.monitor, mode=self.mode)

    def get_state(self) -> dict[str, Any]:
        """Returns the decision state as a JSON-able dict (no side effects).

        Returns:
            Best value and epoch, wait counter, smoothing state, stop
            information and training time used. The best weights are
            `state_arrays()`: a checkpoint saves them beside itself, rewritten
            only when they change.
        """
        return {
            "version": _STATE_VERSION,
            "monitor": self.monitor,
            "best": self.best,
            "best_epoch": self.best_epoch,
            "wait": self.wait,
            "smoothing": self._smoother.state(),
            "stop_reason": self.stop_reason,
            "stopped_epoch": self.stopped_epoch,
            "stopped_batch": self.stopped_batch,
            "elapsed": self._time.elapsed(),
        }

    def state_arrays(self) -> dict[str, tuple[str, list[np.ndarray]]]:
        """The best weights (with `restore_best_weights`), named by their version."""
        if self.best_weights is None or not self.restore_best_weights:
            return {}
        return {"best_weights": (self._weights_version, self.best_weights)}

    def set_state(self, state: dict[str, Any], arrays: Mapping[str, list] | None = None,
                  directory: str | None = None) -> None:
        """Restores a state from `get_state()`; the next `fit` continues from it.

        Args:
            state: the dict `get_state()` returned.
            arrays: `{"best_weights": [...]}` as `state_arrays()` gave them.
                Defaults to `None`.
            directory: for states written by version 0.1.0.dev0 of this
                package, which name a best-weights file relative to it.
                Defaults to `None`.

        Raises:
            ValueError: the state names a weights file but `directory` is None.
            FileNotFoundError: the weights file is missing.
        """
        self._reset()
        self.best = state.get("best")
        self.best_epoch = int(state.get("best_epoch") or 0)
        self.wait = int(state.get("wait", 0))
        self._smoother.load(state.get("smoothing") or {})
        self.stop_reason = state.get("stop_reason")
        self.stopped_epoch = int(state.get("stopped_epoch") or 0)
        self.stopped_batch = state.get("stopped_batch")
        self._time.before = float(state.get("elapsed", 0.0))
        weights = (arrays or {}).get("best_weights")
        legacy_file = state.get("best_weights")  # an earlier version's .npz
        if weights is None and legacy_file and self.restore_best_weights:
            if directory is None:
                raise ValueError(
                    f"This RobustEarlyStopping state refers to best weights in {legacy_file!r}; "
                    "pass the checkpoint's directory as set_state(state, directory=...)."
                )
            path = os.path.abspath(os.path.join(directory, legacy_file))
            if not os.path.exists(path):
                raise FileNotFoundError(
                    f"This RobustEarlyStopping state refers to best weights {path!r}, "
                    "which do not exist."
                )
            with np.load(path, allow_pickle=False) as stored:
                weights = [stored[f"arr_{i}"] for i in range(len(stored.files))]
        if weights is not None and self.restore_best_weights:
            self.best_weights = list(weights)
            self._bump_weights_version()
        self._resumed = True

    def _bump_weights_version(self) -> None:
        run, _, count = self._weights_version.rpartition("-")
        self._weights_version = f"{run}-{int(count) + 1}"

    # ----------------------------------------------------------------- hooks
    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        self._monitor.bind(self.model)
        if self._resumed:
            self._resumed = False
            self._clear_stop()
        else:
            self._reset()
        self.restored_weights = None
        # What a non-finite stop before the first improvement restores.
        self._start_weights = None
        if self.restore_best_weights and self.check_finite and self.best_weights is None:
            self._start_weights = distribute.host_copy(self.model.weights)
        self._time.begin()
        self._steps = (self.params or {}).get("steps")

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if self.stop_reason is not None or self.preempted:
            return  # stopped inside this epoch: its logs describe part of it
        if self._monitor.direction is None:
            # Keras decides mode="auto" here too: the compiled metrics exist now.
            self._check_thresholds(self._monitor.resolve(self.model))
        self._epoch = epoch
        self._decide(epoch, logs)
        if self.stop_reason is None and self.max_time is not None and self._time.is_up(True):
            self._stop("max_time")

    def on_train_end(self, logs=None):
        self._time.end()
        if self.stop_reason is not None:
            self._say(self._stop_message())
        if self.preempted:
            # Training is suspended, not finished: the model keeps the state
            # the preemption checkpoint holds.
            pass
        elif self.restore_best_weights and self.best_weights is not None:
            self._say(
                "Restoring model weights from the end of the best epoch: "
                f"{self.best_epoch + 1}."
            )
            self.model.set_weights(self.best_weights)
            self.restored_weights = "best"
        elif self.restore_best_weights and self.stop_reason == "non_finite" and (
            self._start_weights is not None
        ):
            self._say(
                "Restoring model weights from the start of this fit: no epoch improved on "
                f"{self.monitor} before the non-finite value."
            )
            self.model.set_weights(self._start_weights)
            self.restored_weights = "fit_start"
        elif self.restore_best_weights and self.stop_reason is not None:
            logger.warning(
                "RobustEarlyStopping stopped training (%s) before any epoch improved on "
                "%r: there are no best weights to restore.", self.stop_reason, self.monitor,
            )
        self._start_weights = None
        super().on_train_end(logs)

    def on_unfreeze_stage(self, stage: int, epoch: int, layers: list[str]) -> None:
        if self.reset_patience_on_unfreeze:
            self.wait = 0

    # ------------------------------------------------------------- decisions
    def _decide(self, epoch: int, logs) -> None:
        value = self._monitor.get(logs, self.strict)
        if value is None or epoch < self.start_from_epoch:
            return
        smoothed = None
        if math.isfinite(value):
            smoothed = self._smoother.update(value)
        elif self.check_finite:
            self._stop("non_finite", value=value)
            return
        improved = smoothed is not None and self._monitor.is_improvement(smoothed, self.best)
        self.wait += 1
        if improved:
            self.best, self.best_epoch = smoothed, epoch
            if self.restore_best_weights:
                self.best_weights = distribute.host_copy(self.model.weights)
                self._bump_weights_version()
                self._start_weights = None  # finite best weights exist from now on
            if self.baseline is None or self._monitor.is_improvement(smoothed, self.baseline):
                self.wait = 0
        if smoothed is not None and self.stopping_threshold is not None and (
            self._monitor.reaches(smoothed, self.stopping_threshold)
        ):
            self._stop("stopping_threshold", value=smoothed)
        elif smoothed is not None and self.divergence_threshold is not None and not (
            self._monitor.reaches(smoothed, self.divergence_threshold)
        ):
            self._stop("divergence", value=smoothed)
        elif not improved and self.wait >= max(self.patience, 1):
            self._stop("patience")

    def _stop(self, reason: str, batch: int | None = None, value: float | None = None) -> None:
        self.stop_reason = reason
        self.stopped_epoch = self._epoch
        self.stopped_batch = batch
        self._stop_value = value
        # `_model`, not `model`: on JAX reading `model` copies the training
        # state back into the variables, which a batch hook must not pay for.
        self._model.stop_training = True

    def _on_train_batch_end(self, batch, logs=None):
        """The batch checks (`check_finite`, `max_time`); registered only when one is on.

        Async-safe in one process: when no other callback needs batch ends in
        order, Keras's JAX trainer keeps dispatching steps while they run on
        its background threads, and the stop takes effect a step or two after
        the batch it names. With several workers every one must stop at the
        same step (and `max_time` votes in collectives), so there the hook
        runs in order, after each step.
        """
        reason = value = None
        if self.check_finite and logs:
            loss = logs.get("loss")
            if loss is not None and not math.isfinite(loss):
                reason, value = "non_finite", float(loss)
        # After an epoch's last batch the epoch-end check comes next: it
        # evaluates the complete epoch first.
        if reason is None and (
            self.max_time is not None and batch + 1 != self._steps and self._time.is_up()
        ):
            reason = "max_time"
        if reason is None:
            return
        # Hooks on Keras's threads may finish out of order: the first batch wins.
        with _BATCH_STOP_LOCK:
            if self.stopped_batch is None or batch < self.stopped_batch:
                self._stop(reason, batch, value)

    def _stop_message(self) -> str:
        where = f"Epoch {self.stopped_epoch + 1}"
        if self.stopped_batch is not None:
            where += f", batch {self.stopped_batch + 1}"
        value, reason = self._stop_value, self.stop_reason
        if reason == "patience":
            why = f"{self.monitor} did not improve for {self.wait} epochs"
            if self.best is not None:
                why += f" (best {self.best:.6g} at epoch {self.best_epoch + 1})"
        elif reason == "stopping_threshold":
            why = (
                f"{self.monitor} = {value:.6g} reached "
                f"stopping_threshold={self.stopping_threshold:g}"
            )
        elif reason == "divergence":
            why = (
                f"{self.monitor} = {value:.6g} is worse than "
                f"divergence_threshold={self.divergence_threshold:g}"
            )
        elif reason == "non_finite":
            what = "the training loss" if self.stopped_batch is not None else self.monitor
            why = f"{what} is {value}"
        else:
            why = f"max_time={self.max_time:g}s of training time used"
        return f"{where}: early stopping: {why}."

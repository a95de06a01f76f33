"""Which logged value to watch, and when it counts as an improvement.

Shared by ParallelModelCheckpoint and RobustEarlyStopping so that `monitor`,
`mode` and `min_delta` mean the same in both, as in Keras's MonitorCallback.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import keras
import numpy as np

from keras_callbacks_plus._validate import check_choice, check_number

_MODES = ("auto", "min", "max")
# Metric names (without "val_") that grow when the model gets better.
_UP_NAMES = (
    "acc",
    "accuracy",
    "auc",
    "precision",
    "recall",
    "f1_score",
    "fbeta_score",
    "r2_score",
    "iou",
    "top_k",
)


def check_mode(mode: str) -> str:
    return check_choice("mode", mode, _MODES)


class Monitor:
    """The monitored quantity, its direction and the improvement rule.

    With `mode="auto"` the direction is decided when the callback first
    needs it (`resolve()`, at the first monitored value), as Keras's
    `MonitorCallback` decides at the first epoch end: on TensorFlow a
    model's compiled metrics do not exist before its first step.

    Args:
        monitor: key of the epoch `logs` to watch.
        mode: `"min"`, `"max"` or `"auto"` (decided from the model's metrics
            and the name when `resolve()` is called).
        min_delta: how much better than the reference a value must be.
        relative_delta: if True, `min_delta` is a fraction of the
            reference's magnitude.
        owner: the callback's class name, for messages.
    """

    def __init__(
        self,
        monitor: str,
        mode: str = "auto",
        min_delta: float = 0.0,
        relative_delta: bool = False,
        owner: str = "Callback",
    ):
        self.monitor = monitor
        self.mode = check_mode(mode)
        self.min_delta = check_number("min_delta", min_delta, at_least=0.0)
        self.relative_delta = relative_delta
        self.owner = owner
        self.direction = mode if mode != "auto" else None
        self._model = None
        self._warned_missing = False

    def bind(self, model) -> None:
        """The model whose metrics `resolve()` consults (called at train begin)."""
        self._model = model
        self._warned_missing = False

    @property
    def op(self):
        """The comparison in use, as Keras's `monitor_op`: `keras.ops.less` or
        `keras.ops.greater`; `None` until the direction is decided."""
        if self.direction is None:
            return None
        return keras.ops.less if self.direction == "min" else keras.ops.greater

    def resolve(self, model=None) -> str:
        """Decides `"min"` or `"max"` for `mode="auto"` (once); returns it.

        Raises:
            ValueError: neither the model's metrics nor the name tell.
        """
        if self.direction is not None:
            return self.direction
        name = self.monitor.removeprefix("val_")
        for metric in _model_metrics(model if model is not None else self._model):
            if metric.name == name and getattr(metric, "_direction", None) in ("up", "down"):
                self.direction = "max" if metric._direction == "up" else "min"
                return self.direction
        if name == "loss" or name.endswith(("loss", "error", "crossentropy")):
            self.direction = "min"
        elif name.startswith(_UP_NAMES) or name.endswith(_UP_NAMES):
            self.direction = "max"
        else:
            raise ValueError(
                f"{self.owner} callback received monitor={self.monitor!r}, but "
                "cannot tell whether that metric should be maximized or "
                "minimized. Pass mode='max' to keep the highest value, or "
                "mode='min' to keep the lowest."
            )
        return self.direction

    @property
    def worst(self) -> float:
        """The value every real value improves on."""
        return math.inf if self.resolve() == "min" else -math.inf

    def is_improvement(self, current: float, reference: float | None) -> bool:
        """Whether `current` beats `reference` by more than `min_delta`."""
        if current is None or not math.isfinite(current):
            return False
        if reference is None:
            return True
        if math.isinf(reference):
            return reference == self.worst
        delta = self.min_delta * abs(reference) if self.relative_delta else self.min_delta
        if self.resolve() == "min":
            return current < reference - delta
        return current > reference + delta

    def reaches(self, current: float, threshold: float) -> bool:
        """Whether `current` is at least as good as `threshold` (no delta)."""
        return current <= threshold if self.resolve() == "min" else current >= threshold

    def get(
        self, logs: dict[str, Any] | None, strict: bool = False, note: str = ""
    ) -> float | None:
        """The monitored value in `logs` as a float, or None if absent.

        A missing value warns once per fit, listing the keys that exist, then
        `note`; with `strict=True` it raises `KeyError` instead.
        """
        logs = logs or {}
        if self.monitor not in logs:
            message = (
                f"{self.owner} is monitoring {self.monitor!r}, which is not in the "
                f"logs. Available keys: {', '.join(sorted(logs)) or '(none)'}."
            )
            if strict:
                raise KeyError(message)
            if not self._warned_missing:
                warnings.warn(message + note, stacklevel=3)
                self._warned_missing = True
            return None
        value = np.asarray(logs[self.monitor])
        if value.size != 1:
            raise ValueError(
                f"{self.owner} is monitoring {self.monitor!r}, which is not a single "
                f"number: its value has shape {value.shape}. Monitor a scalar metric "
                "(for example an average over classes)."
            )
        return float(value.reshape(()))  # F1Score and others log shape (1,)


def _model_metrics(model):
    if model is None:
        return []
    found = []
    for metric in getattr(model, "metrics", []) or []:
        found.append(metric)
        found.extend(getattr(metric, "metrics", []) or [])
    return found


class MonitorOp:
    """Mixin: Keras's `monitor_op`, read-only, for a callback whose `Monitor` is `_monitor`."""

    @property
    def monitor_op(self):
        """`keras.ops.less` or `keras.ops.greater` once `mode` is decided, else `None` (as in Keras)."""
        return self._monitor.op

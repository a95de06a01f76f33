"""When ParallelModelCheckpoint saves (`save_freq`) and which of its files it keeps (`Keep`).

Both are plain data and pure functions, so the callback's decisions can be
tested without training.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import re
from typing import Any, Sequence

from keras_callbacks_plus._validate import check_int

_UNITS = {
    "s": 1.0, "sec": 1.0, "secs": 1.0, "second": 1.0, "seconds": 1.0,
    "m": 60.0, "min": 60.0, "mins": 60.0, "minute": 60.0, "minutes": 60.0,
    "h": 3600.0, "hr": 3600.0, "hrs": 3600.0, "hour": 3600.0, "hours": 3600.0,
    "d": 86400.0, "day": 86400.0, "days": 86400.0,
}
_TERM = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]+)\s*", re.IGNORECASE)


def _save_freq_error(save_freq: Any) -> ValueError:
    return ValueError(
        "Invalid value for argument save_freq. Expected 'epoch', a positive int (a number "
        "of batches), a positive duration such as '30min', '1h', '90s' or '1h30min', or a "
        f"datetime.timedelta. Received: save_freq={save_freq!r}"
    )


def parse_duration(text: str) -> float | None:
    """Seconds of a duration such as `"30min"`, `"1h"`, `"1.5 hours"`, `"1h30min"`; None if not one."""
    position, seconds = 0, 0.0
    while position < len(text):
        match = _TERM.match(text, position)
        if match is None or match.group(2).lower() not in _UNITS:
            return None
        seconds += float(match.group(1)) * _UNITS[match.group(2).lower()]
        position = match.end()
    return seconds if position else None


@dataclasses.dataclass(frozen=True)
class SaveFreq:
    """A parsed `save_freq`: `kind` is `"epoch"`, `"batches"` or `"seconds"`."""

    kind: str
    every: float | int | None = None

    @classmethod
    def parse(cls, save_freq: Any) -> "SaveFreq":
        """Checks `save_freq` (`"epoch"`, batches, a duration string or a timedelta).

        Raises:
            ValueError: anything else, or a duration that is not positive.
        """
        if save_freq == "epoch":
            return cls("epoch")
        if isinstance(save_freq, int) and not isinstance(save_freq, bool):
            if save_freq > 0:
                return cls("batches", save_freq)
            raise _save_freq_error(save_freq)
        if isinstance(save_freq, datetime.timedelta):
            seconds = save_freq.total_seconds()
        elif isinstance(save_freq, str):
            seconds = parse_duration(save_freq)
        else:
            seconds = None
        if seconds is None or not math.isfinite(seconds) or seconds <= 0:
            raise _save_freq_error(save_freq)
        return cls("seconds", seconds)


@dataclasses.dataclass(frozen=True)
class Keep:
    """Which of its checkpoints ParallelModelCheckpoint keeps: the union of three rules.

    A file is deleted only after a newer checkpoint is complete, and only if
    no rule keeps it. Only files the callback wrote (or a resumed run kept)
    are ever deleted. `Keep()` keeps everything.

    `max_to_keep=N` is `Keep(latest=N)`; with `save_best_only=True` it is
    `Keep(best=N)` (and files are only written when `monitor` improves).

    Args:
        latest: keep the N newest checkpoints. Defaults to `None`.
        best: keep the k checkpoints with the best `monitor` values (the
            callback's `monitor` and `mode`). Defaults to `None`.
        every_n_epochs: keep the checkpoints written at the end of every
            n-th epoch (epochs counted from 1) forever. Defaults to `None`.

    Example:

    ```python
    ParallelModelCheckpoint("ckpt/m_{epoch:03d}.keras", monitor="val_loss",
                            keep=Keep(latest=3, best=2, every_n_epochs=10))
    ```
    """

    latest: int | None = None
    best: int | None = None
    every_n_epochs: int | None = None

    def __post_init__(self):
        for field in dataclasses.fields(self):
            check_int(field.name, getattr(self, field.name), 1, allow_none=True, of="Keep")

    @property
    def keeps_all(self) -> bool:
        return self.latest is None and self.best is None and self.every_n_epochs is None

    def select(self, saved: Sequence[dict[str, Any]], direction: str | None) -> list[dict]:
        """The entries of `saved` (oldest first) that this policy keeps, in the same order.

        Each entry has `value` (the monitored value, or None), `epoch` (epochs
        completed) and `batch` (None for an epoch-end checkpoint).
        `direction` is `"min"` or `"max"`; needed with `best`.
        """
        if self.keeps_all:
            return list(saved)
        keep = set()
        if self.latest is not None:
            keep.update(range(max(len(saved) - self.latest, 0), len(saved)))
        if self.best is not None:
            sign = 1.0 if direction == "min" else -1.0
            ranked = sorted(
                range(len(saved)),
                key=lambda i: (saved[i]["value"] is None, sign * (saved[i]["value"] or 0.0), -i),
            )
            keep.update(ranked[: self.best])
        if self.every_n_epochs is not None:
            keep.update(i for i, entry in enumerate(saved)
                        if entry.get("batch") is None and entry["epoch"]
                        and entry["epoch"] % self.every_n_epochs == 0)
        return [entry for i, entry in enumerate(saved) if i in keep]


class Ledger:
    """The files one ParallelModelCheckpoint wrote and keeps, as the policy decides.

    Entries (oldest first) record each checkpoint kept and the state-array
    files its sidecar refers to; `last_arrays` those of `last.keras`;
    `doomed` what the latest save decided to delete (saved with it, so that a
    run interrupted before deleting is finished by the next one); `written`
    the state-array files already written (each is written once).
    """

    def __init__(self, keep: Keep):
        self.keep = keep
        self.entries: list[dict[str, Any]] = []
        self.last_arrays: list[str] = []
        self.written: set[str] = set()
        self.doomed: tuple[list[str], list[str]] = ([], [])

    def add(self, path: str, value: float | None, epoch: int, batch: int | None,
            direction: str | None) -> tuple[list[str], dict[str, Any]]:
        """Records a new checkpoint; returns the checkpoints the policy drops and its entry."""
        self.entries = [e for e in self.entries if e["path"] != path]
        entry = {"path": path, "value": value, "epoch": epoch, "batch": batch, "arrays": []}
        self.entries.append(entry)
        kept = self.keep.select(self.entries, direction)
        doomed = [e["path"] for e in self.entries if e not in kept]
        self.entries = kept
        return doomed, entry

    def referenced(self) -> set[str]:
        """State-array files a kept checkpoint (or `last`) refers to."""
        return {path for entry in self.entries for path in entry["arrays"]} | set(self.last_arrays)

    def state(self) -> dict[str, Any]:
        return {"kept": [dict(e) for e in self.entries], "last_arrays": list(self.last_arrays),
                "doomed": list(self.doomed[0]), "doomed_arrays": list(self.doomed[1])}

    def load(self, state: dict[str, Any]) -> None:
        self.entries = [{"arrays": [], "batch": None, **e} for e in state.get("kept", [])]
        self.last_arrays = list(state.get("last_arrays", []))
        self.written = self.referenced()
        self.doomed = ([], [])

"""ParallelModelCheckpoint: what to save, when, where, and what to keep.

The decisions are made here, on the training thread and the same on every
worker. The state is copied by `_snapshot`, written by `_writer` (on a
background thread), into a store of `_storage` (a local folder or an object
store); `_retention` parses `save_freq` and holds the `Keep` policy,
`_preemption` the signal handlers, `_resume` the way back (`resume()`).
"""

from __future__ import annotations

import fnmatch
import os
import signal
import string
import time
from typing import Any, Mapping, Sequence

import keras
import numpy as np

from keras_callbacks_plus import _commit, _resume, _storage, distribute
from keras_callbacks_plus._base import PlusCallback, callbacks_of
from keras_callbacks_plus._monitor import Monitor, MonitorOp
from keras_callbacks_plus._preemption import SignalFlag, check_signals
from keras_callbacks_plus._retention import Keep, Ledger, SaveFreq
from keras_callbacks_plus._saver import Saver
from keras_callbacks_plus._validate import check_int, invalid
from keras_callbacks_plus._resume import resume  # noqa: F401 (public here too)

__all__ = ["Keep", "ParallelModelCheckpoint", "resume"]

_OWNER = "ParallelModelCheckpoint"


def _numbers(logs: Mapping[str, Any]) -> dict[str, float]:
    """The numeric scalars of `logs`, as floats (what a sidecar records)."""
    found = {}
    for key, value in logs.items():
        try:
            found[key] = float(np.asarray(value).reshape(()))
        except (TypeError, ValueError):
            continue
    return found


def _clock() -> float:
    """Seconds on a monotonic clock (a module function so tests can replace it)."""
    return time.monotonic()


class ParallelModelCheckpoint(MonitorOp, PlusCallback):
    """Saves the model (or its single-device template) during training; survives preemption.

    The successor of the Keras 2 recipe that saved the template of a
    `multi_gpu_model`, and of `keras.callbacks.ModelCheckpoint`:

    * What is saved: `template_model` when given (the trained weights are
      copied into it too; the data-parallel twin itself is never saved),
      else the trained model. A `.keras` file holds architecture, weights and
      optimizer state and loads with `keras.saving.load_model` on one device,
      no strategy needed; a `.weights.h5` file holds the weights. Both are the
      files Keras's own saving writes, serialized directly from a host copy.
    * Atomic, on local folders and object stores (`s3://`, `gs://`, any
      fsspec URL): a crash leaves the previous file or the new one, never a
      torn one; a checkpoint counts once its sidecar (`<file>.json`) is written.
    * Asynchronous (default): training blocks only while weights and
      optimizer variables are copied to host memory; one background thread
      writes. A writer failure is raised on the training thread at the next
      save or at the end of training.
    * Chief-only with several workers: one worker writes, all take the same
      decisions.
    * Resumable at the batch: the sidecar holds the epoch, the batches done,
      the best value and the state of every callback of this package in the
      `fit`; `resume()` continues as if training had never stopped.
    * Preemption: SIGTERM (and `preemption_signals`) make it save the state of
      the next batch end synchronously and stop training cleanly (`preempted`
      is then True; exit with `keras_callbacks_plus.PREEMPTED_EXIT_CODE`).

    Args:
        filepath: where to save, ending in `.keras` (or `.weights.h5` with
            `save_weights_only=True`); a local path or an fsspec URL. May
            contain format keys filled from the epoch (`{epoch:02d}`, counted
            from 1), the batch (`{batch}`, with batch or time `save_freq`) and
            any key of the logs (`{val_loss:.4f}`). The seeds' call form
            `ParallelModelCheckpoint(template_model, filepath, ...)` works too.
        template_model: the single-device model to save in place of the
            trained one. Defaults to `None`: save the trained model.
        monitor: the logs key compared by `save_best_only` and `Keep(best=)`.
            Defaults to `"val_loss"`.
        mode: `"auto"`, `"min"` or `"max"`; `"auto"` is decided at the first
            save that compares values, as Keras decides at the first epoch
            end. Defaults to `"auto"`.
        save_best_only: save only when `monitor` improves. When `monitor` is
            missing from the logs, warn once (listing the keys there are) and
            save, as `keras.callbacks.ModelCheckpoint` does. Defaults to
            `False`.
        save_weights_only: save the weights only (`.weights.h5`). Defaults to
            `False`.
        save_freq: `"epoch"`; a number of batches; or a duration (`"30min"`,
            `"1h"`, `"90s"`, a `datetime.timedelta`): then the save happens at
            the first batch end after it, the same step on every worker.
            Defaults to `"epoch"`.
        initial_value_threshold: with `save_best_only`, the value to beat at
            the first save. Defaults to `None`.
        max_to_keep: keep only the newest (with `save_best_only`, the best)
            this many files: `Keep(latest=N)` (`Keep(best=N)`). Defaults to
            `None`: all.
        keep: a `Keep` policy (newest N, best k, every n-th epoch, at once)
            instead of `max_to_keep`. Defaults to `None`.
        save_last: also keep `last.keras` (or `last.weights.h5`) beside them,
            always the newest state. Defaults to `False`.
        async_save: write in a background thread. Defaults to `True`.
        save_on_preemption: save and stop when a preemption signal arrives.
            Defaults to `True`.
        preemption_signals: the signals that mean preemption (add
            `signal.SIGUSR1` for SLURM's `--signal`). Defaults to
            `(signal.SIGTERM,)`.
        storage_options: options for an fsspec URL's file system (for
            example `{"client_kwargs": {"endpoint_url": ...}}`). Defaults to
            `None`.
        strict: with `save_best_only`, raise `KeyError` when `monitor` is
            missing from the logs instead of warning and saving. Defaults to
            `False`.
        verbose: 1 prints a line per save. Defaults to `0`.

    Example:

    ```python
    model = make_model()
    parallel_model = data_parallel(model)
    parallel_model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    checkpoint = ParallelModelCheckpoint(
        "ckpt/model_{epoch:02d}.keras", template_model=model, max_to_keep=3, save_last=True
    )
    parallel_model.fit(x, y, validation_split=0.1, epochs=10, callbacks=[checkpoint])
    restored = keras.saving.load_model("ckpt/last.keras")
    ```
    """

    def __init__(
        self,
        filepath: str | os.PathLike | keras.Model,
        *positional: Any,
        template_model: keras.Model | None = None,
        monitor: str = "val_loss",
        mode: str = "auto",
        save_best_only: bool = False,
        save_weights_only: bool = False,
        save_freq: Any = "epoch",
        initial_value_threshold: float | None = None,
        max_to_keep: int | None = None,
        keep: Keep | None = None,
        save_last: bool = False,
        async_save: bool = True,
        save_on_preemption: bool = True,
        preemption_signals: Sequence[int] = (signal.SIGTERM,),
        storage_options: Mapping[str, Any] | None = None,
        strict: bool = False,
        verbose: int = 0,
    ):
        super().__init__(verbose=verbose)
        if isinstance(filepath, keras.Model):  # the seeds' (template_model, filepath)
            if template_model is not None or len(positional) != 1:
                raise TypeError(
                    "ParallelModelCheckpoint(template_model, filepath, ...) takes the "
                    "template and the filepath as its two positional arguments; pass "
                    "everything else by keyword."
                )
            template_model, filepath = filepath, positional[0]
        elif positional:
            raise TypeError(
                "ParallelModelCheckpoint takes filepath as its only positional "
                f"argument; pass the others by keyword. Received: {positional!r}"
            )
        self.filepath = os.fspath(filepath)
        expected = ".weights.h5" if save_weights_only else ".keras"
        if not self.filepath.endswith(expected):
            raise ValueError(
                f"Invalid value for argument filepath. With save_weights_only="
                f"{save_weights_only}, it must end in `{expected}`. "
                f"Received: filepath={self.filepath}"
            )
        if template_model is not None and not isinstance(template_model, keras.Model):
            raise ValueError(
                "Invalid value for argument template_model. Expected a keras.Model. "
                f"Received: template_model={template_model!r}"
            )
        self._save_freq = SaveFreq.parse(save_freq)
        check_int("max_to_keep", max_to_keep, 1, allow_none=True)
        if keep is not None and not isinstance(keep, Keep):
            raise invalid("keep", "a Keep", keep)
        if keep is not None and max_to_keep is not None:
            raise ValueError(
                "Arguments keep and max_to_keep cannot be used together: max_to_keep=N is "
                f"Keep(latest=N). Received: keep={keep!r}, max_to_keep={max_to_keep!r}"
            )
        if keep is None:
            keep = Keep(best=max_to_keep) if save_best_only else Keep(latest=max_to_keep)
        if keep.best is not None and not (isinstance(monitor, str) and monitor):
            raise ValueError(
                f"Invalid value for argument keep. Keep(best={keep.best}) ranks checkpoints by "
                f"`monitor`, which must name a logs key. Received: monitor={monitor!r}"
            )
        self._signals = check_signals(preemption_signals, _OWNER) if save_on_preemption else ()
        self._storage = _storage.open_storage(self.filepath, storage_options, owner=_OWNER)
        self.template_model = template_model
        self.monitor = monitor
        self._monitor = Monitor(monitor, mode, owner=_OWNER)
        self.save_best_only = save_best_only
        self.save_weights_only = save_weights_only
        self.save_freq = save_freq
        self.initial_value_threshold = initial_value_threshold
        self.max_to_keep = max_to_keep
        self.keep = keep
        self.save_last = save_last
        self.async_save = async_save
        self.save_on_preemption = bool(save_on_preemption)
        self.strict = bool(strict)
        self._suffix = expected
        self._saver = Saver(self._storage, save_weights_only, template_model, async_save, _OWNER)
        self._writer, self._job_writer = self._saver.writer, self._saver.jobs
        self._flag = SignalFlag(self._signals, _OWNER)
        self._restored: dict[str, Any] | None = None
        self._resume_at: dict[str, Any] | None = None
        self._to_refresh: tuple | None = None
        self._keys_checked = False
        if self._save_freq.kind != "epoch" or self._signals:
            # Only then does Keras see a batch hook. Watching for a signal alone
            # is async-safe: the save then happens at the next main-thread hook.
            self._use_batch_hook(self._on_train_batch_end,
                                 async_safe=self._save_freq.kind == "epoch")
        self._reset()

    def _reset(self) -> None:
        self.best: float | None = self.initial_value_threshold
        self.best_path: str | None = None
        self._ledger = Ledger(self.keep)
        self._save_index = 0
        self._epoch = 0
        self._batches_seen = 0

    def _state_key_extra(self) -> str:
        return self._state_key_of(filepath=self.filepath, monitor=self.monitor)

    @property
    def directory(self) -> str:
        """The folder (or prefix) the checkpoints go to."""
        return self._storage.parent(self._absolute(self.filepath))

    @property
    def last_path(self) -> str:
        return self._storage.join(self.directory, f"last{self._suffix}")

    def _absolute(self, path: str) -> str:
        return os.path.abspath(path) if isinstance(self._storage, _storage.LocalStorage) else path

    # -- training hooks --------------------------------------------------------

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        if self._restored is None:
            self._reset()
        restored, self._restored = self._restored or {}, None
        self._keys_checked = False
        self._monitor.bind(self.model)
        if self.template_model is not None:
            try:
                distribute.check_same_architecture(
                    self.template_model, self.model, roles=("the template", "the trained model")
                )
            except ValueError as error:
                raise ValueError(f"Invalid value for argument template_model: {error}") from None
        self._logs: dict[str, Any] = {}
        self.preemption_save_seconds: float | None = None
        if distribute.is_chief():
            self._saver.prepare(self.model)
            self._storage.check_writable(self.directory)
            _commit.remove_leftovers(self._storage, self.directory, self._is_ours)
            # Deletions the interrupted run decided but may not have done.
            for path in restored.get("doomed", []):
                _commit.remove_checkpoint(self._storage, path)
            for path in restored.get("doomed_arrays", []):
                self._storage.delete(path)
        self._last_save = _clock()
        self._flag.install()

    def _is_ours(self, name: str) -> bool:
        """Whether a file name is one this callback's `filepath` (or `last`) can give."""
        pattern = _commit.template_glob(self._storage.name(self.filepath))
        return fnmatch.fnmatchcase(name, pattern) or name == f"last{self._suffix}"

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        model = self.model
        optimizer = getattr(model, "optimizer", None)
        self._epoch_start_step = (
            int(keras.ops.convert_to_numpy(optimizer.iterations)) if optimizer is not None else 0)
        if self._resume_at is not None:
            if self._resume_at.begin_epoch(model, epoch):
                # The optimizer counted the interrupted run's batches of this epoch already.
                self._epoch_start_step -= self._resume_at.batches_done
            elif self._resume_at.epoch == epoch:
                self._resume_at = None
        # Keras's data adapters shuffle with these after this hook: a checkpoint
        # inside this epoch records them, so a resume reads its batches in order.
        self._epoch_rng = _resume.random_states()
        self._saver.refresh_states(self.last_path)

    def on_train_batch_begin(self, batch, logs=None):
        if self._resume_at is not None and self._resume_at.epoch == self._epoch:
            self._resume_at.begin_batch(self.model)

    def _on_train_batch_end(self, batch, logs=None):
        self._logs = logs or {}
        if self._resume_at is not None and self._resume_at.epoch == self._epoch:
            if self._resume_at.skips(self._epoch, batch):
                return  # a batch of the interrupted run, skipped
            self._resume_at = None
        preempted = self._flag.received is not None
        if self._batch_hook_async_safe and distribute.num_workers() == 1:
            if preempted and not self.preempted:
                # On Keras's background thread: stop; the save follows on the
                # training thread (validation begin or epoch end).
                self._notice_preemption(batch)
            return
        self._batches_seen += 1
        if self._signals and distribute.num_workers() > 1:
            preempted = distribute.any_worker(preempted)
        if preempted:
            self._notice_preemption(batch)
            self._save_on_preemption(logs or {}, batch)
            return
        kind, every = self._save_freq.kind, self._save_freq.every
        if kind == "batches":
            due = self._batches_seen % every == 0
        elif kind == "seconds":
            due = distribute.any_worker(_clock() - self._last_save >= every)
        else:
            return
        if due:
            self._save(logs or {}, self._epoch, batch)

    def _notice_preemption(self, batch: int) -> None:
        self._preempted_batch = batch
        for callback in callbacks_of(self._model) or [self]:
            callback.on_preemption(self._epoch, batch)
        self._model.stop_training = True

    def on_test_begin(self, logs=None):
        if self.preempted:
            if self._pending_preemption_save():
                self._save_on_preemption(self._logs, None)
            self.model.stop_evaluating = True  # no validation of an epoch cut short

    def on_epoch_end(self, epoch, logs=None):
        self._resume_at = None  # a resumed epoch ends here at the latest
        if self.preempted:
            if self._pending_preemption_save():
                self._save_on_preemption(self._logs, None)
            return
        if self._save_freq.kind == "epoch":
            self._save(logs or {}, epoch=epoch, batch=None)

    def on_train_end(self, logs=None):
        try:
            if self.preempted and self._pending_preemption_save():
                self._save_on_preemption(self._logs, None)
            self._saver.refresh_states(self.last_path)
            self._writer.wait_until_finished()
        finally:
            self._flag.uninstall()
            self._resume_at = None
            super().on_train_end(logs)

    def _pending_preemption_save(self) -> bool:
        return self.preemption_save_seconds is None

    # -- saving ----------------------------------------------------------------

    def _format_path(self, logs: dict[str, Any], epoch: int, batch: int | None,
                     strict: bool = True) -> str | None:
        fields = {"epoch": epoch + 1, **logs}
        if batch is not None:
            fields["batch"] = batch + 1
        if not self._keys_checked or not strict:
            names = {f.split(".")[0].split("[")[0]
                     for _, f, _, _ in string.Formatter().parse(self.filepath) if f}
            missing = sorted(names - set(fields))
            if missing:
                if not strict:
                    return None
                raise ValueError(
                    f"Invalid value for argument filepath: key {missing[0]!r} of "
                    f"filepath={self.filepath} is not in the logs. Available keys: "
                    f"{', '.join(sorted(fields))}."
                )
            self._keys_checked = strict or self._keys_checked
        return self._absolute(self.filepath.format(**fields))

    def _save(self, logs: dict[str, Any], epoch: int, batch: int | None) -> None:
        self._saver.raise_failure(_OWNER)
        target = self._format_path(logs, epoch, batch)
        value = None
        if self.save_best_only or self.keep.best is not None:
            # mode="auto" is decided now, before anything is written.
            self._monitor.resolve(self.model)
        if self.save_best_only:
            value = self._monitor.get(
                logs, self.strict, note=" Saving anyway, as keras.callbacks.ModelCheckpoint does."
            )
        elif self.monitor in logs:
            value = self._monitor.get(logs)
        improved = self.save_best_only and self._monitor.is_improvement(value, self.best)
        # Without a value to compare, save_best_only saves, as in Keras.
        write_main = not self.save_best_only or value is None or improved
        if not write_main:
            previous = self._monitor.worst if self.best is None else self.best
            self._say(f"\nEpoch {epoch + 1}: {self.monitor} did not improve from {previous:.5f}")
            if not self.save_last:
                return
        if improved:
            previous = self._monitor.worst if self.best is None else self.best
            self._say(
                f"\nEpoch {epoch + 1}: {self.monitor} improved from {previous:.5f} to "
                f"{value:.5f}, saving model to {target}"
            )
            self.best = value
            self.best_path = target
        elif write_main:
            self._say(f"\nEpoch {epoch + 1}: saving model to {target}")
        main = target if write_main else None
        self._submit(main, self.last_path if self.save_last else None, logs, value, epoch, batch)

    def _save_on_preemption(self, logs: dict[str, Any], batch: int | None) -> None:
        """Saves this exact step synchronously: the grace period after a signal is short."""
        start = _clock()
        self._saver.raise_failure(_OWNER)
        if batch is None:  # noticed off the training thread: count what was trained
            batch = self._steps_this_epoch() - 1
        target = None if self.save_best_only else self._format_path(logs, self._epoch, batch,
                                                                     strict=False)
        if target is None:
            # A best file must not hold a state that did not improve.
            target, last = self.last_path, None
        else:
            last = self.last_path if self.save_last else None
        waited = self._submit(target, last, logs, None, self._epoch, batch, preemption=True)
        seconds = _clock() - start
        self.preemption_save_seconds = seconds
        name = signal.Signals(self._flag.received).name if self._flag.received else "signal"
        self._say(
            f"\nEpoch {self._epoch + 1}: preempted ({name}): saved {target} in {seconds:.2f}s"
            + (f" ({waited:.2f}s of it waiting for the previous save)" if waited else "")
            + "; training stops."
        )

    def _submit(self, target: str | None, last: str | None, logs: dict[str, Any],
                value: float | None, epoch: int, batch: int | None,
                preemption: bool = False) -> float:
        """Snapshots the model and hands the write to the writer; returns seconds spent waiting."""
        optimizer = getattr(self.model, "optimizer", None)
        step = int(keras.ops.convert_to_numpy(optimizer.iterations)) if optimizer is not None else None
        done = 0 if batch is None else batch + 1
        self._save_index += 1
        record = {
            "epoch": epoch + 1 if batch is None else epoch,
            "batch": None if batch is None else batch + 1,
            "batches_done": done,
            "step": step,
            "monitor": self.monitor,
            "value": value,
            "best": self.best,
            "logs": _numbers(logs),
            "save_index": self._save_index,
            "saved_at": time.time(),
            "preemption": preemption,
            "backend": keras.backend.backend(),
            "keras": keras.version(),
        }
        doomed, entry, arrays_before = [], None, self._ledger.referenced()
        if target is not None and target != self.last_path:
            direction = self._monitor.direction if self.keep.best is not None else None
            doomed, entry = self._ledger.add(target, value, record["epoch"], record["batch"],
                                             direction)
        # In the sidecar's state: a resumed run deletes them if this one could not.
        self._ledger.doomed = (doomed, [])
        self._last_save = _clock()
        return self._saver.save(
            self.model, self._ledger, record, target=target, last=last,
            writes_last=last is not None or target == self.last_path, directory=self.directory,
            entry=entry, doomed=doomed, arrays_before=arrays_before, epoch_rng=self._epoch_rng,
            preemption=preemption)

    def _steps_this_epoch(self) -> int:
        """Training steps of the current epoch so far, from the optimizer's count."""
        optimizer = getattr(self.model, "optimizer", None)
        if optimizer is None:
            return 0
        return int(keras.ops.convert_to_numpy(optimizer.iterations)) - self._epoch_start_step

    # -- state -----------------------------------------------------------------

    def get_state(self) -> dict[str, Any]:
        return {
            "best": self.best,
            "best_path": self.best_path,
            **self._ledger.state(),
            "save_index": self._save_index,
            "batches_seen": self._batches_seen,
        }

    def set_state(self, state: dict[str, Any], arrays: Mapping[str, list] | None = None,
                  directory: str | None = None) -> None:
        self._reset()
        self.best = state.get("best", self.initial_value_threshold)
        self.best_path = state.get("best_path")
        self._ledger.load(state)
        self._save_index = state.get("save_index", 0)
        self._batches_seen = state.get("batches_seen", 0)
        self._restored = state

    def _resume_from(self, record: dict[str, Any], batches_done: int) -> None:
        """Called by `resume()`: the next fit continues epoch `record["epoch"]` after `batches_done`."""
        self._resume_at = _resume.ResumePoint(record, batches_done)

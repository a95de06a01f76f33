"""ParallelModelCheckpoint: atomic, asynchronous, chief-only checkpoints of (data-parallel) training."""

from __future__ import annotations

import os
import string
import time
from pathlib import Path
from typing import Any, Sequence

import keras
import numpy as np

from keras_callbacks_plus import _files, _optimizers, distribute
from keras_callbacks_plus._async import AsyncWriter
from keras_callbacks_plus._base import PlusCallback, callbacks_of
from keras_callbacks_plus._monitor import Monitor

__all__ = ["ParallelModelCheckpoint", "resume"]


def _state_keys(callbacks: Sequence[Any]) -> list[str]:
    """`ClassName`, then `ClassName#2`, ... for repeated classes."""
    seen: dict[str, int] = {}
    keys = []
    for callback in callbacks:
        name = type(callback).__name__
        seen[name] = seen.get(name, 0) + 1
        keys.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
    return keys


class ParallelModelCheckpoint(PlusCallback):
    """Saves the model (or its single-device template) during training.

    The successor of the Keras 2 recipe that saved the template of a
    `multi_gpu_model`, and of `keras.callbacks.ModelCheckpoint`:

    * What is saved: `template_model` when given (the trained weights are
      copied into it first; the data-parallel twin itself is never saved),
      else the trained model. A `.keras` file holds architecture, weights and
      optimizer state and loads with `keras.saving.load_model` on one device,
      no strategy needed; a `.weights.h5` file holds the weights.
    * Atomic: each file is written under a temporary name in the same folder,
      fsynced, then renamed over the target. A crash leaves the previous file
      or the new one, never a torn one; leftovers go at the next start.
    * Asynchronous (default): training blocks only while weights and
      optimizer variables are copied to host memory; one background thread
      writes. A writer failure is raised on the training thread at the next
      save or at the end of training.
    * Chief-only with several workers: one worker writes, all take the same
      decisions.
    * Resumable: each checkpoint has a JSON sidecar (`<file>.json`) with the
      epoch, step, best value and the `get_state()` of every callback of this
      package in the same `fit`; see `resume()`.

    Args:
        filepath: where to save, ending in `.keras` (or `.weights.h5` with
            `save_weights_only=True`). May contain format keys filled from
            the epoch (`{epoch:02d}`, counted from 1), the batch (`{batch}`,
            with an int `save_freq`) and any key of the logs
            (`{val_loss:.4f}`). The seeds' call form
            `ParallelModelCheckpoint(template_model, filepath, ...)` works too.
        template_model: the single-device model to save in place of the
            trained one. Defaults to `None`: save the trained model.
        monitor: the logs key compared with `save_best_only`. Defaults to
            `"val_loss"`.
        mode: `"auto"`, `"min"` or `"max"`. Defaults to `"auto"`.
        save_best_only: save only when `monitor` improves. Defaults to `False`.
        save_weights_only: save the weights only (`.weights.h5`). Defaults to
            `False`.
        save_freq: `"epoch"`, or save every this many batches. Defaults to
            `"epoch"`.
        initial_value_threshold: with `save_best_only`, the value to beat at
            the first save. Defaults to `None`.
        max_to_keep: keep only the newest (with `save_best_only`, the best)
            this many files written by this callback. Defaults to `None`: all.
        save_last: also keep `last.keras` (or `last.weights.h5`) beside them,
            always the newest state. Defaults to `False`.
        async_save: write in a background thread. Defaults to `True`.
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
        save_freq: str | int = "epoch",
        initial_value_threshold: float | None = None,
        max_to_keep: int | None = None,
        save_last: bool = False,
        async_save: bool = True,
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
        if save_freq != "epoch" and not (
            isinstance(save_freq, int) and not isinstance(save_freq, bool) and save_freq > 0
        ):
            raise ValueError(
                "Invalid value for argument save_freq. Expected 'epoch' or a "
                f"positive int. Received: save_freq={save_freq!r}"
            )
        if max_to_keep is not None and not (isinstance(max_to_keep, int) and max_to_keep >= 1):
            raise ValueError(
                "Invalid value for argument max_to_keep. Expected None or an int "
                f">= 1. Received: max_to_keep={max_to_keep!r}"
            )
        self.template_model = template_model
        self.monitor = monitor
        self._monitor = Monitor(monitor, mode, owner="ParallelModelCheckpoint")
        self.save_best_only = save_best_only
        self.save_weights_only = save_weights_only
        self.save_freq = save_freq
        self.initial_value_threshold = initial_value_threshold
        self.max_to_keep = max_to_keep
        self.save_last = save_last
        self.async_save = async_save
        self._suffix = expected
        self._writer = AsyncWriter("ParallelModelCheckpoint-writer", enabled=async_save)
        self._restored: dict[str, Any] | None = None
        self._shadow: keras.Model | None = None
        self._shadow_recipe: tuple[dict, dict | None] | None = None
        self._to_refresh: tuple | None = None
        self._buffers: dict[str, list[np.ndarray]] = {}
        self._keys_checked = False
        if save_freq != "epoch":
            # Only then does Keras see a batch hook (and give up async dispatch).
            self.on_train_batch_end = self._on_train_batch_end
        self._reset()

    def _reset(self) -> None:
        self.best: float | None = self.initial_value_threshold
        self.best_path: str | None = None
        self._kept: list[dict[str, Any]] = []
        self._save_index = 0
        self._epoch = 0
        self._batches_seen = 0

    @property
    def directory(self) -> Path:
        return Path(self.filepath).resolve().parent

    @property
    def last_path(self) -> Path:
        return self.directory / f"last{self._suffix}"

    # -- training hooks --------------------------------------------------------

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        if self._restored is None:
            self._reset()
        self._restored = None
        self._keys_checked = False
        if self.save_best_only:
            self._monitor.resolve(self.model)
        source = self.model
        if self.template_model is not None:
            try:
                distribute.check_same_architecture(
                    self.template_model, source, roles=("the template", "the trained model")
                )
            except ValueError as error:
                raise ValueError(f"Invalid value for argument template_model: {error}") from None
        self._shadow = None
        self._shadow_recipe = None
        self._to_refresh = None
        if distribute.is_chief():
            self._check_writable()

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        self._refresh_states()

    def _on_train_batch_end(self, batch, logs=None):
        self._batches_seen += 1
        if self._batches_seen % self.save_freq == 0:
            self._save(logs or {}, epoch=self._epoch, batch=batch)

    def on_epoch_end(self, epoch, logs=None):
        if self.save_freq == "epoch":
            self._save(logs or {}, epoch=epoch, batch=None)

    def on_train_end(self, logs=None):
        try:
            self._refresh_states()
            self._writer.wait_until_finished()
        finally:
            super().on_train_end(logs)

    # -- saving ----------------------------------------------------------------

    def _check_writable(self) -> None:
        directory = self.directory
        try:
            directory.mkdir(parents=True, exist_ok=True)
            probe = _files.temporary_path(directory / "probe.tmp")
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as error:
            raise PermissionError(
                f"ParallelModelCheckpoint cannot write to {directory} "
                f"(from filepath={self.filepath}): {error}"
            ) from error
        _files.remove_leftovers(directory)

    def _format_path(self, logs: dict[str, Any], epoch: int, batch: int | None) -> Path:
        fields = {"epoch": epoch + 1, **logs}
        if batch is not None:
            fields["batch"] = batch + 1
        if not self._keys_checked:
            names = {f.split(".")[0].split("[")[0]
                     for _, f, _, _ in string.Formatter().parse(self.filepath) if f}
            missing = sorted(names - set(fields))
            if missing:
                raise ValueError(
                    f"Invalid value for argument filepath: key {missing[0]!r} of "
                    f"filepath={self.filepath} is not in the logs. Available keys: "
                    f"{', '.join(sorted(fields))}."
                )
            self._keys_checked = True
        return Path(self.filepath.format(**fields)).resolve()

    def _save(self, logs: dict[str, Any], epoch: int, batch: int | None) -> None:
        # A failure of the previous write surfaces here, on every worker.
        failed = distribute.any_worker(self._writer.failed)
        if failed:
            self._writer.wait_until_finished()
            raise RuntimeError("ParallelModelCheckpoint: the chief's checkpoint writer failed.")
        target = self._format_path(logs, epoch, batch)
        value = self._monitor.get(logs) if (self.save_best_only or self.monitor in logs) else None
        improved = False
        if self.save_best_only:
            if value is None:
                if not self.save_last:
                    return
            else:
                improved = self._monitor.is_improvement(value, self.best)
        previous = self._monitor.worst if self.best is None else self.best
        if self.save_best_only and not improved:
            self._say(f"\nEpoch {epoch + 1}: {self.monitor} did not improve from {previous:.5f}")
            if not self.save_last:
                return
        write_main = not self.save_best_only or improved
        if improved:
            self._say(
                f"\nEpoch {epoch + 1}: {self.monitor} improved from {previous:.5f} to "
                f"{value:.5f}, saving model to {target}"
            )
            self.best = value
            self.best_path = str(target)
        elif write_main:
            self._say(f"\nEpoch {epoch + 1}: saving model to {target}")
        self._save_index += 1
        done_epochs = epoch + 1 if batch is None else epoch
        model = self.model
        record = {
            "epoch": done_epochs,
            "batch": None if batch is None else batch + 1,
            "step": int(keras.ops.convert_to_numpy(model.optimizer.iterations))
            if getattr(model, "optimizer", None) is not None
            else None,
            "monitor": self.monitor,
            "value": value,
            "best": self.best,
            "logs": {k: float(v) for k, v in logs.items() if np.ndim(v) == 0},
            "save_index": self._save_index,
            "saved_at": time.time(),
            "backend": keras.backend.backend(),
            "keras": keras.version(),
        }
        doomed = self._keep(target, value, done_epochs) if write_main else []
        # The previous write must be done before its host buffers are reused.
        self._writer.wait_until_finished()
        weights = distribute.host_copy(model.weights, out=self._buffers.get("weights"))
        self._buffers["weights"] = weights
        if not distribute.is_chief():
            # Every worker's template holds the trained weights; only the chief writes.
            if self.template_model is not None:
                self.template_model.set_weights(weights)
            return
        record["trainable"] = _optimizers.trainable_flags(model)
        # Before its first step an optimizer holds nothing a fresh one lacks.
        optimizer = None
        if not self.save_weights_only and getattr(model, "optimizer", None) is not None:
            if model.optimizer.built:
                values = distribute.host_copy(
                    model.optimizer.variables, out=self._buffers.get("optimizer")
                )
                self._buffers["optimizer"] = values
                optimizer = dict(zip(_optimizers.state_keys(model.optimizer, model), values))
        if self._shadow is None and self._shadow_recipe is None:
            # The writer thread must not touch the trained model (on JAX,
            # reading it syncs or races with the training state), so it gets
            # configurations to build its own copy from.
            compiled = not self.save_weights_only and getattr(model, "optimizer", None) is not None
            self._shadow_recipe = (
                keras.saving.serialize_keras_object(self.template_model or model),
                model.get_compile_config() if compiled else None,
            )
        siblings = callbacks_of(model)  # all registered by now, none gone yet
        record["callbacks"] = self._sibling_states(siblings)
        written: list[tuple[Path, os.stat_result]] = []
        main = target if write_main else None
        self._writer.submit(
            lambda: written.extend(self._write(main, weights, optimizer, dict(record), doomed))
        )
        if batch is None:
            # Callbacks listed after this one have not seen this epoch's end yet;
            # their new states go into the sidecar at the next epoch or train end.
            self._to_refresh = (written, record, siblings)

    def _sibling_states(self, siblings: list[PlusCallback]) -> dict[str, Any]:
        return dict(zip(_state_keys(siblings), (cb.get_state(str(self.directory)) for cb in siblings)))

    def _refresh_states(self) -> None:
        """Rewrites the last epoch's sidecars if a callback's state changed since the save."""
        if self._to_refresh is None:
            return
        written, record, siblings = self._to_refresh
        self._to_refresh = None
        states = self._sibling_states(siblings)
        if states == record["callbacks"]:
            return
        updated = {**record, "callbacks": states}
        self._writer.submit(
            lambda: [_files.write_sidecar(path, stat, updated) for path, stat in written]
        )

    def _keep(self, target: Path, value: float | None, epoch: int) -> list[str]:
        """Records a new file; returns those beyond `max_to_keep`, to delete once it is complete."""
        self._kept = [k for k in self._kept if k["path"] != str(target)]
        self._kept.append({"path": str(target), "value": value, "epoch": epoch})
        if self.max_to_keep is None or len(self._kept) <= self.max_to_keep:
            return []
        if self.save_best_only:
            direction = self._monitor.resolve()
            ranked = sorted(
                self._kept,
                key=lambda k: (k["value"] is None, k["value"] if direction == "min" else -k["value"]),
            )
            keep = ranked[: self.max_to_keep]
        else:
            keep = self._kept[-self.max_to_keep :]
        doomed = [k["path"] for k in self._kept if k not in keep]
        self._kept = [k for k in self._kept if k in keep]
        return doomed

    def _write(self, target, weights, optimizer, record, doomed) -> list[tuple[Path, os.stat_result]]:
        """Runs on the writer thread, where no strategy scope is active; returns what it wrote."""
        # Private copies: Keras may keep a view of what it is given, and the
        # host buffers are refilled by the next save.
        weights = [np.array(w) for w in weights]
        if optimizer is not None:
            optimizer = {k: np.array(v) for k, v in optimizer.items()}
        shadow = self._shadow_model(record["trainable"], optimizer)
        shadow.set_weights(weights)
        if optimizer is not None:
            _optimizers.restore_optimizer_state(shadow, optimizer)
        if self.template_model is not None:
            self.template_model.set_weights(weights)
        save = shadow.save_weights if self.save_weights_only else shadow.save
        written = []
        if target is not None:
            target.parent.mkdir(parents=True, exist_ok=True)
            written.append((target, _files.write_atomic(target, lambda tmp: save(str(tmp)))))
        if self.save_last:
            last = self.last_path
            if target is not None:
                written.append((last, _files.link_atomic(target, last)))
            else:
                written.append((last, _files.write_atomic(last, lambda tmp: save(str(tmp)))))
        for path, stat in written:
            _files.write_sidecar(path, stat, record)
        for path in doomed:
            _files.remove_checkpoint(path)
        return written

    def _shadow_model(self, trainable: list[bool], optimizer: dict | None) -> keras.Model:
        """The CPU model that is written: a copy of the template (or the trained model).

        It is compiled like the trained model and made trainable where the
        trained one is now (ProgressiveUnfreezing changes that), so that a
        `.keras` file carries the optimizer state as it is.
        """
        if self._shadow is None:
            model_config, compile_config = self._shadow_recipe
            shadow = distribute.single_device_copy(model_config)
            if compile_config is not None:
                shadow.compile_from_config(compile_config)
            self._shadow = shadow
        if trainable != _optimizers.trainable_flags(self._shadow):
            _optimizers.apply_trainable_flags(self._shadow, trainable)
        return self._shadow

    # -- state -----------------------------------------------------------------

    def get_state(self, directory: str | None = None) -> dict[str, Any]:
        return {
            "best": self.best,
            "best_path": self.best_path,
            "kept": [dict(k) for k in self._kept],
            "save_index": self._save_index,
            "batches_seen": self._batches_seen,
        }

    def set_state(self, state: dict[str, Any], directory: str | None = None) -> None:
        self._reset()
        self.best = state.get("best", self.initial_value_threshold)
        self.best_path = state.get("best_path")
        self._kept = [dict(k) for k in state.get("kept", [])]
        self._save_index = state.get("save_index", 0)
        self._batches_seen = state.get("batches_seen", 0)
        self._restored = state


def resume(
    model: keras.Model,
    path_or_directory: str | os.PathLike,
    callbacks: Sequence[Any] = (),
) -> int:
    """Restores a checkpoint into `model` and `callbacks`; returns the epoch to resume at.

    Restores the weights, the optimizer state (iteration count, slots,
    learning rate) and the state of each callback of this package that was in
    the checkpointed `fit` (matched by class, in order), so that
    `model.fit(..., initial_epoch=resume(...), callbacks=callbacks)` continues
    as if never interrupted. A restored ParallelModelCheckpoint remembers its
    best value, so `save_best_only` does not overwrite a better file after a
    restart (keras-team/keras#17012).

    Args:
        model: the compiled model to train further (a data-parallel twin or
            not), with the architecture of the checkpoint.
        path_or_directory: a checkpoint file, or a folder: then its latest
            complete checkpoint is used.
        callbacks: the callbacks of the resumed `fit`. Defaults to `()`.

    Returns:
        The number of completed epochs: pass it as `fit(initial_epoch=...)`.

    Raises:
        FileNotFoundError: no complete checkpoint at `path_or_directory`.
        ValueError: the checkpoint does not match `model`.
    """
    path = Path(path_or_directory)
    if path.is_dir():
        found = _files.complete_checkpoints(path)
        if not found:
            raise FileNotFoundError(f"No complete checkpoint of keras_callbacks_plus in {path}.")
        path, record = found[-1]
    else:
        record = _files.read_sidecar(path)
        if record is None:
            raise FileNotFoundError(
                f"{path} is not a complete checkpoint of keras_callbacks_plus "
                f"(missing or mismatching sidecar {_files.sidecar_path(path).name})."
            )
    if str(path).endswith(".keras"):
        saved = keras.saving.load_model(path)
        distribute.copy_weights(saved, model)
        if record.get("trainable") is not None:
            _optimizers.apply_trainable_flags(model, record["trainable"])
        saved_optimizer = getattr(saved, "optimizer", None)
        if saved_optimizer is not None and saved_optimizer.built:
            if getattr(model, "optimizer", None) is None:
                raise ValueError(
                    f"resume() restores optimizer state, but model {model.name!r} is not "
                    "compiled. Compile it (as for training) before resume()."
                )
            saved_state = _optimizers.optimizer_state(saved_optimizer, saved)
            _optimizers.restore_optimizer_state(
                model, {k: keras.ops.convert_to_numpy(v) for k, v in saved_state.items()}
            )
    else:
        model.load_weights(path)
    states = record.get("callbacks", {})
    for key, callback in zip(_state_keys(callbacks), callbacks):
        if key in states and hasattr(callback, "set_state"):
            callback.set_state(states[key], str(path.parent))
    return int(record.get("epoch", 0))

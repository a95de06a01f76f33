"""The checkpoint write job: one snapshot to the model file, `last`, state arrays, sidecars.

`CheckpointWriter.write` runs on the background writer thread (or inline
with `async_save=False`). It never touches the trained model: it gets a host
snapshot and configurations. The model file is serialized directly from the
snapshot's buffers in Keras's layout (`_keras_format`), learned once per
trainable set from a single-device copy of the template that is never
assigned values (the layout model). On a Keras version the layout was not
tested on, or for a model that stores something a snapshot does not hold,
the writer falls back to assigning the snapshot into that copy and calling
`Model.save` (one warning says why).

The commit order is what makes a crash harmless: the model file (atomic per
store), then the state arrays it refers to, then its sidecar (the commit
marker), and only then deletions of files the retention policy dropped.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import re
import warnings
from typing import Any, Callable

import keras
import numpy as np

from keras_callbacks_plus import _commit, _compat, _keras_format, _optimizers, _storage, distribute
from keras_callbacks_plus._snapshot import Snapshot

logger = logging.getLogger(__name__)

STATE_ARRAYS_PREFIX = "kcp_state."


def state_arrays_name(state_key: str, name: str, version: str) -> str:
    """The file a callback's state arrays are saved in, beside the checkpoints."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{state_key}.{name}.{version}")
    return f"{STATE_ARRAYS_PREFIX}{safe}.npz"


@dataclasses.dataclass
class WriteJob:
    """Everything one save writes, decided on the training thread.

    Attributes:
        target: the checkpoint file, or None when only `last` is written.
        last: the `last.keras` path with `save_last`, else None.
        snapshot: the state to write.
        record: the sidecar record (callback states included).
        arrays: `{file path: arrays}` of state arrays to write beside the
            checkpoint (those not written by an earlier save).
        optimizer_config: the optimizer serialized as it is now (its config
            in `config.json`), or None.
        doomed: checkpoint paths to delete once this one is committed.
        doomed_arrays: state-array paths no kept checkpoint refers to any more.
    """

    target: str | None
    last: str | None
    snapshot: Snapshot
    record: dict[str, Any]
    arrays: dict[str, list[np.ndarray]]
    optimizer_config: dict | None
    doomed: list[str]
    doomed_arrays: list[str]


class CheckpointWriter:
    """Writes checkpoint jobs of one callback; keeps the layout model between saves.

    Args:
        storage: where the files go.
        weights_only: `.weights.h5` files (weights and optimizer state, no config).
        template_model: the single-device template to update after each
            save, or None.
        owner: the callback's name, for messages.
    """

    def __init__(self, storage: _storage.Storage, weights_only: bool,
                 template_model: keras.Model | None, owner: str):
        self.storage = storage
        self.weights_only = weights_only
        self.template_model = template_model
        self.owner = owner
        self._model: keras.Model | None = None
        self._layout: tuple[tuple, _keras_format.Layout | None, list[int] | None] | None = None
        self._warned = False

    def prepare(self, model_config: dict, compile_config: dict | None) -> None:
        """Builds the layout model: a single-device copy of the template, compiled like the
        trained model. At train begin, while the training thread waits: building a model
        draws seeds from Python's global `random` (see `_resume.preserving_random_states`)."""
        model = distribute.single_device_copy(model_config)
        if compile_config is not None:
            model.compile_from_config(compile_config)
        self._model, self._layout = model, None

    # -- the layout model ---------------------------------------------------------

    def _layout_model(self, trainable: list[bool]) -> keras.Model:
        """The layout model, trainable like the trained model now."""
        if trainable != _optimizers.trainable_flags(self._model):
            _optimizers.apply_trainable_flags(self._model, trainable)
        return self._model

    def _prepare(self, snapshot: Snapshot) -> tuple[keras.Model, _keras_format.Layout | None,
                                                     list[int] | None]:
        """The layout model, its file layout (None: full save) and the optimizer order."""
        key = (tuple(snapshot.trainable), tuple(snapshot.optimizer_keys or ()))
        if self._layout is not None and self._layout[0] == key:
            return self._model, self._layout[1], self._layout[2]
        model = self._layout_model(snapshot.trainable)
        order = None
        if snapshot.optimizer is not None and model.optimizer is not None:
            order = self._optimizer_order(model, snapshot.optimizer_keys,
                                          snapshot.optimizer_built)
        layout = None
        if not _compat.saving_layout_supported():
            self._warn(f"Keras {_compat.keras_version()} is not among the versions its fast "
                       f"path was tested on ({', '.join(_compat.SAVING_TESTED_KERAS)})")
        else:
            try:
                layout = _keras_format.learn_layout(model, with_config=not self.weights_only)
            except _keras_format.UnsupportedLayout as error:
                self._warn(str(error))
        self._layout = (key, layout, order)
        return model, layout, order

    def _optimizer_order(self, model: keras.Model, keys: list[str], built: bool) -> list[int]:
        """For each variable of the layout model's optimizer, its index in the snapshot."""
        optimizer = model.optimizer
        if set(keys) != set(_optimizers.state_keys(optimizer, model)):
            if built:
                # A file holds exactly the slots of the trainable set (load_model
                # skips the whole optimizer state otherwise).
                optimizer = _optimizers.rebuild_optimizer(model)
            else:  # before its first step, as Model.save writes it: no slots
                optimizer = optimizer.__class__.from_config(optimizer.get_config())
                model.optimizer = optimizer
        index = {key: i for i, key in enumerate(keys)}
        mine = _optimizers.state_keys(optimizer, model)
        missing = [key for key in mine if key not in index]
        if missing or len(mine) != len(keys):
            raise ValueError(
                f"{self.owner}: the saved optimizer state does not fit the optimizer of "
                f"model {model.name!r}: no variable for {sorted(set(keys) ^ set(mine))[:3]}."
            )
        return [index[key] for key in mine]

    def _warn(self, reason: str) -> None:
        if not self._warned:
            warnings.warn(
                f"{self.owner} writes checkpoints with Model.save, which costs more than its "
                f"direct write: {reason}.",
                stacklevel=2,
            )
            self._warned = True

    # -- writing ------------------------------------------------------------------

    def write(self, job: WriteJob) -> list[tuple[str, _storage.FileInfo]]:
        """Writes `job`; returns the checkpoint files written with their `FileInfo`."""
        snapshot = job.snapshot
        model, layout, order = self._prepare(snapshot)
        optimizer = [snapshot.optimizer[i] for i in order] if order is not None else ()
        serialize = self._serializer(model, layout, snapshot, optimizer, job.optimizer_config)
        written = []
        if job.target is not None:
            written.append((job.target, self._commit(job.target, serialize)))
        if job.last is not None:
            info = (self.storage.copy(job.target, job.last) if job.target is not None
                    else self._commit(job.last, serialize))
            written.append((job.last, info))
        if self.template_model is not None:
            self.template_model.set_weights(snapshot.weights)
        self.write_sidecars(written, job.record, job.arrays, job.doomed_arrays, job.doomed)
        return written

    def write_sidecars(self, written: list[tuple[str, _storage.FileInfo]], record: dict,
                       arrays: dict[str, list[np.ndarray]], doomed_arrays: list[str] = (),
                       doomed: list[str] = ()) -> None:
        """Commits `written` (state arrays first, then sidecars), then deletes what is dropped."""
        for path, values in arrays.items():
            self.storage.write_with(path, lambda local, a=values: _save_npz(local, a))
        for path, info in written:
            _storage.crash_point("committed")
            _commit.write_sidecar(self.storage, path, info, record)
        _storage.crash_point("sidecar_written")
        for path in doomed:
            _commit.remove_checkpoint(self.storage, path)
        for path in doomed_arrays:
            self.storage.delete(path)

    def _commit(self, target: str, serialize: Callable[[str], None]) -> _storage.FileInfo:
        def write(local: str) -> None:
            serialize(local)
            _storage.crash_point("half_written", local)

        return self.storage.write_with(target, write)

    def _serializer(self, model, layout, snapshot, optimizer, optimizer_config):
        if layout is None:
            return lambda local: self._full_save(model, snapshot, local)
        if self.weights_only:
            # As Model.save_weights: the optimizer's state too, for a compiled model.
            return lambda local: _keras_format.write_h5(local, layout, snapshot.weights, optimizer)
        config = _keras_format.config_json(layout, optimizer_config)
        return lambda local: _keras_format.write_keras(local, layout, config, snapshot.weights,
                                                       optimizer)

    def _full_save(self, model: keras.Model, snapshot: Snapshot, local: str) -> None:
        """The fallback: the snapshot assigned into the layout model, then `Model.save`."""
        # Private copies: Keras may keep a view of what it is given.
        model.set_weights([np.array(w) for w in snapshot.weights])
        if snapshot.optimizer_built:
            values = {k: np.array(v) for k, v in zip(snapshot.optimizer_keys, snapshot.optimizer)}
            _optimizers.restore_optimizer_state(model, values)
            self._layout = None  # restoring may rebuild the optimizer
        (model.save_weights if self.weights_only else model.save)(local)


def _save_npz(path: str, arrays: list[np.ndarray]) -> None:
    with open(path, "wb") as f:
        np.savez(f, *arrays)


def load_npz(storage: _storage.Storage, path: str) -> list[np.ndarray]:
    """The arrays of a state-arrays file written by `CheckpointWriter`, in order."""
    with np.load(io.BytesIO(storage.read_bytes(path)), allow_pickle=False) as stored:
        return [stored[f"arr_{i}"] for i in range(len(stored.files))]

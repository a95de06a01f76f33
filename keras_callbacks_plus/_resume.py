"""`resume()`: back to where a checkpoint left off: weights, optimizer, callbacks, the batch.

A checkpoint written inside an epoch records how many of its batches were
done. `resume()` restores the state and tells the `ParallelModelCheckpoint`
of the resumed `fit` to skip those batches (read, not trained), with the
running metrics, the data order and the seed states of the interruption,
so the resumed `fit(initial_epoch=...)` continues as if never stopped.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import warnings
from typing import Any, Sequence

import keras
import numpy as np

from keras_callbacks_plus import _commit, _optimizers, _storage, _validate, _writer, distribute
from keras_callbacks_plus._base import distribution_scope, legacy_state_keys, state_keys

logger = logging.getLogger(__name__)

#: What `resume(data=...)` can position at a batch; see `resume`.
SUPPORTED_DATA = (
    "arrays (shuffle=False, or shuffled with a seed set by keras.utils.set_random_seed), "
    "HDF5Sequence with a seed, and any keras.utils.PyDataset whose order depends only on "
    "its epoch and seed and that has set_epoch(epoch)"
)


def arrays_to_record(arrays: Sequence[np.ndarray]) -> list[dict[str, Any]]:
    """Small arrays as JSON-able dicts (dtype, shape, values)."""
    return [{"dtype": a.dtype.str, "shape": list(a.shape), "data": a.ravel().tolist()}
            for a in arrays]


def arrays_from_record(record: list[dict[str, Any]] | None) -> list[np.ndarray]:
    return [np.asarray(r["data"], np.dtype(r["dtype"])).reshape(r["shape"])
            for r in record or []]


def random_states() -> dict[str, list]:
    """The global random states Keras's data adapters shuffle with, as JSON-able lists.

    NumPy's orders arrays on the JAX and NumPy paths; Python's `random` orders
    the batches of a `PyDataset` (`fit(shuffle=True)`).
    """
    kind, keys, position, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {"numpy": [kind, np.asarray(keys).tolist(), int(position), int(has_gauss),
                      float(cached)],
            "python": [version, list(internal), gauss]}


def set_random_states(states: dict[str, list]) -> None:
    """Restores what `random_states()` returned."""
    kind, keys, position, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, np.asarray(keys, np.uint32), position, has_gauss, cached))
    if "python" in states:
        version, internal, gauss = states["python"]
        random.setstate((version, tuple(internal), gauss))


@contextlib.contextmanager
def preserving_random_states():
    """Leaves the global random states as they were: building a model draws seeds from
    Python's `random` (Keras's `make_default_seed`), which also orders a PyDataset's batches."""
    states = random_states()
    try:
        yield
    finally:
        set_random_states(states)


def resume_record(snapshot, batches_done: int, rng: dict[str, list]) -> dict[str, Any]:
    """What resuming needs besides the model file: small, so it goes into the sidecar.

    `rng` holds the global random states (`random_states()`) at the start of
    the epoch the resumed `fit` starts with; `metrics` the running totals of
    the compiled metrics (for a checkpoint inside an epoch); `seeds` the seed
    generators' states.
    """
    return {
        "rng": rng,
        "metrics": arrays_to_record(snapshot.extra["metrics"]) if batches_done else None,
        "seeds": arrays_to_record(snapshot.extra["seeds"]),
    }


def _positionable(data: Any) -> bool:
    if data is None or hasattr(data, "set_epoch"):
        return True
    leaves = keras.tree.flatten(data) if isinstance(data, (list, tuple, dict)) else [data]
    return bool(leaves) and all(isinstance(leaf, np.ndarray) or hasattr(leaf, "__array__")
                                and not hasattr(leaf, "element_spec") for leaf in leaves)


def resume(
    model: keras.Model,
    path_or_directory: str | os.PathLike,
    callbacks: Sequence[Any] = (),
    *,
    data: Any = None,
    storage_options: dict[str, Any] | None = None,
    missing_ok: bool = False,
) -> int:
    """Restores a checkpoint into `model` and `callbacks`; returns the epoch to resume at.

    Restores the weights, the optimizer state (iteration count, slots,
    learning rate), the seed generators and the state of each callback of
    this package that was in the checkpointed `fit` (matched by `state_key`),
    so that `model.fit(..., initial_epoch=resume(...), callbacks=callbacks)`
    continues as if never interrupted. A restored ParallelModelCheckpoint
    remembers its best value, so `save_best_only` does not overwrite a better
    file after a restart (keras-team/keras#17012).

    A checkpoint written inside an epoch (batch or time `save_freq`, or on
    preemption) resumes at its batch: the ParallelModelCheckpoint passed in
    `callbacks` (and to the resumed `fit`) skips the batches already trained.
    That needs the same data order as the interrupted run: supported are
    arrays (`shuffle=False`, or shuffled with a seed set by
    `keras.utils.set_random_seed`), `HDF5Sequence` with a `seed`, and any
    `keras.utils.PyDataset` whose order depends only on its epoch and seed and
    that has `set_epoch(epoch)`. Pass such a dataset as `data`. For other
    data (a `tf.data` pipeline with its own shuffling, a generator) a warning
    says so and training resumes at the start of the epoch.

    Args:
        model: the compiled model to train further (a data-parallel twin or
            not), with the architecture of the checkpoint.
        path_or_directory: a checkpoint file, or a folder (local or an fsspec
            URL): then its latest complete checkpoint is used.
        callbacks: the callbacks of the resumed `fit`. Defaults to `()`.
        data: what the resumed `fit` trains on, when it is not arrays (a
            `PyDataset` is set to the resumed epoch). Defaults to `None`.
        storage_options: options of an fsspec URL's file system. Defaults to
            `None`.
        missing_ok: a folder without any complete checkpoint is a fresh
            start: return 0 and restore nothing (the first run of a job that
            may be requeued). Defaults to `False`: raise.

    Returns:
        The epoch to pass as `fit(initial_epoch=...)`: the number of complete
        epochs (the epoch in progress, for a checkpoint inside one).

    Raises:
        FileNotFoundError: no complete checkpoint at `path_or_directory`.
        ValueError: the checkpoint does not match `model`.
    """
    missing_ok = _validate.check_bool("missing_ok", missing_ok)
    storage = _storage.open_storage(path_or_directory, storage_options, owner="resume()",
                                    argument="path_or_directory")
    path = os.fspath(path_or_directory)
    if isinstance(storage, _storage.LocalStorage):
        path = os.path.abspath(path)
    if _storage.checkpoint_suffix(path) and storage.info(path) is not None:
        record = _commit.read_sidecar(storage, path)
        if record is None:
            raise FileNotFoundError(
                f"{path} is not a complete checkpoint of keras_callbacks_plus "
                f"(missing or mismatching sidecar {storage.name(_commit.sidecar_path(path))})."
            )
    else:
        found = _commit.complete_checkpoints(storage, path)
        if not found:
            if missing_ok:
                return 0
            raise FileNotFoundError(f"No complete checkpoint of keras_callbacks_plus in {path}.")
        path, record = found[-1]
    _load_model_state(storage, path, record, model)
    directory = storage.parent(path)
    _load_callback_states(storage, directory, record, callbacks)

    epoch = int(record.get("epoch", 0))
    batches_done = int(record.get("batches_done") or 0)
    checkpoint = next((c for c in callbacks if hasattr(c, "_resume_from")), None)
    if batches_done and not _positionable(data):
        warnings.warn(
            f"resume(): {path} was written after {batches_done} batches of epoch {epoch + 1}, "
            f"but data of type {type(data).__name__} cannot be positioned at a batch; training "
            f"resumes at the start of epoch {epoch + 1} and repeats those batches. Exact "
            f"mid-epoch resume supports {SUPPORTED_DATA}.",
            stacklevel=2,
        )
        batches_done = 0
    elif batches_done and checkpoint is None:
        warnings.warn(
            f"resume(): {path} was written after {batches_done} batches of epoch {epoch + 1}; "
            "pass its ParallelModelCheckpoint in callbacks (and to fit) to continue at that "
            f"batch. Training resumes at the start of epoch {epoch + 1}.",
            stacklevel=2,
        )
    if hasattr(data, "set_epoch"):
        data.set_epoch(epoch)
    if checkpoint is not None:
        checkpoint._resume_from(record, batches_done)
    return epoch


def _load_model_state(storage, path: str, record: dict[str, Any], model: keras.Model) -> None:
    with storage.local_copy(path) as local:
        if not path.endswith(".keras"):
            # As Model.save_weights wrote it: the optimizer's state too, which
            # loads into an optimizer built over the same trainable set.
            if record.get("trainable") is not None:
                _optimizers.apply_trainable_flags(model, record["trainable"])
            optimizer = getattr(model, "optimizer", None)
            if optimizer is not None and not optimizer.built:
                with distribution_scope(model):
                    optimizer.build(model.trainable_variables)
            model.load_weights(local)
        else:
            saved = keras.saving.load_model(local)
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
    in_weights = {id(v) for v in model.weights}
    seeds = [v for v in model.variables if id(v) not in in_weights]
    saved_seeds = arrays_from_record((record.get("resume") or {}).get("seeds"))
    if len(saved_seeds) == len(seeds) and all(
        tuple(s.shape) == tuple(v.shape) for s, v in zip(saved_seeds, seeds)
    ):
        for variable, value in zip(seeds, saved_seeds):
            variable.assign(value)


def _load_callback_states(storage, directory: str, record: dict[str, Any],
                          callbacks: Sequence[Any]) -> None:
    states = record.get("callbacks", {})
    keys = state_keys(callbacks)
    if not any(key in states for key in keys):
        keys = legacy_state_keys(callbacks)  # written before state_key
    local_directory = directory if isinstance(storage, _storage.LocalStorage) else None
    for key, callback in zip(keys, callbacks):
        if key not in states or not hasattr(callback, "set_state"):
            continue
        state = dict(states[key])
        files = state.pop("arrays", None) or {}
        arrays = {name: _writer.load_npz(storage, storage.join(directory, file))
                  for name, file in files.items()}
        callback.set_state(state, arrays, local_directory)


class ResumePoint:
    """Where the next `fit` of a resumed ParallelModelCheckpoint continues.

    `epoch` is the epoch the fit starts with; inside it, `batches_done`
    batches were trained before the interruption: they are read and skipped
    (`distribute.skip_batches`), the running metrics come back, and the
    global random states of the epoch's start, so the data come in the
    interrupted run's order.
    """

    def __init__(self, record: dict[str, Any], batches_done: int):
        resume = record.get("resume") or {}
        self.epoch = int(record.get("epoch", 0))
        self.batches_done = batches_done
        self.logs = dict(record.get("logs") or {})
        self.rng = resume.get("rng")
        self.metrics = arrays_from_record(resume.get("metrics"))
        self._skipping = False

    def begin_epoch(self, model: keras.Model, epoch: int) -> bool:
        """At an epoch's start: restores that epoch's state; whether batches are to skip."""
        if epoch != self.epoch:
            return False
        if self.rng is not None:
            set_random_states(self.rng)
        for variable, value in zip(model.metrics_variables, self.metrics if self.batches_done else []):
            variable.assign(value)
        return bool(self.batches_done)

    def begin_batch(self, model: keras.Model) -> None:
        """At the resumed epoch's first batch: the train function is final here (callbacks
        may make a new one in their epoch-begin hooks), so the skipping starts now."""
        if not self._skipping:
            self._skipping = True
            distribute.skip_batches(model, self.batches_done, self.logs)

    def skips(self, epoch: int, batch: int) -> bool:
        """Whether `batch` of `epoch` is one of the interrupted run's, skipped."""
        return epoch == self.epoch and batch < self.batches_done

"""Data- and model-parallel training on one or several devices and workers.

This package is the only part of keras_callbacks_plus that depends on the
Keras backend or on the distribution strategy; the callbacks ask it questions
(`is_chief()`, `barrier()`, ...) instead. Every backend-specific line is in
`_tf.py` or `_jax.py`, which define the same functions; this module imports
the one of the Keras backend, once, as Keras's own `backend/` folder does.
`_twin.py` is the backend-neutral part of a twin, `_model_parallel.py` the
model-parallel twin (`model_parallel`, `copy_weights`), `_devices.py` device
names.

Replica consistency: a data-parallel twin keeps every variable identical on
all replicas. On TensorFlow, `data_parallel` turns on synchronized batch
statistics (`BatchNormalization(synchronized=True)`) in the twin, so each
replica normalizes with the statistics of the global batch and updates its
moving statistics with the same values. On JAX, `keras.distribution
.DataParallel` runs one SPMD program over the global batch, so batch
statistics are global already. Either way, training the twin with
`batch_size=B` on N devices computes what one device would with batch `B`.
"""

from __future__ import annotations

import copy as _copy
import importlib
from typing import Any, Sequence

import keras
import numpy as np

from keras_callbacks_plus import _base, _layers
from keras_callbacks_plus.distribute import _twin
from keras_callbacks_plus.distribute._devices import canonical_device, resolve_devices
from keras_callbacks_plus.distribute._model_parallel import copy_weights, model_parallel
# check_same_architecture and scope are for the callbacks, outside __all__.
from keras_callbacks_plus.distribute._twin import (  # noqa: F401
    check_same_architecture,
    scope,
)

__all__ = [
    "any_worker",
    "barrier",
    "broadcast_from_chief",
    "copy_weights",
    "data_parallel",
    "emulate_cpu_devices",
    "is_chief",
    "list_devices",
    "model_parallel",
    "multi_worker_strategy",
    "num_replicas",
    "num_workers",
    "replica_divergence",
    "worker_index",
]

_BACKEND_MODULES = {"tensorflow": "_tf", "jax": "_jax"}


class _Unsupported:
    """Stands in for the backend module on other backends: using it raises, importing does not."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attribute: str):
        raise NotImplementedError(
            "keras_callbacks_plus supports the TensorFlow and JAX backends. "
            f"Received: KERAS_BACKEND={self._name!r}"
        )


def _load_backend():
    name = keras.backend.backend()
    if name not in _BACKEND_MODULES:
        return _Unsupported(name)
    return importlib.import_module(f"{__name__}.{_BACKEND_MODULES[name]}")


# `_tf` or `_jax`: every backend-specific call of the package goes through it.
_backend = _load_backend()


def list_devices(device_type: str | None = None) -> list[str]:
    """Lists this process's devices as Keras names such as `"cpu:0"`.

    On TensorFlow these are the logical devices (a CPU split with
    `tf.config.set_logical_device_configuration` shows as `cpu:0`, `cpu:1`).

    Args:
        device_type: `"cpu"`, `"gpu"` or `"tpu"` to list only those. Defaults
            to `None`, every device.

    Returns:
        A list of device names, in the backend's order.
    """
    found = [canonical_device(d) for d in _backend.local_devices()]
    names = [name for name in found if name is not None]
    if device_type is not None:
        names = [n for n in names if n.startswith(device_type.lower() + ":")]
    return names


def emulate_cpu_devices(count: int = 2) -> list[str]:
    """Splits the host CPU into `count` devices, to try data-parallel code without accelerators.

    TensorFlow gets `count` logical CPU devices
    (`tf.config.set_logical_device_configuration`); JAX gets `count` host
    devices (`XLA_FLAGS=--xla_force_host_platform_device_count`). The devices
    share the same cores: they show that data-parallel code runs, not how
    fast. It must run before the backend starts its runtime (the first op or
    device query); if that already happened, or the CPU is already split, the
    devices stay as they are.

    Args:
        count: how many CPU devices. Defaults to `2`.

    Returns:
        The CPU device names after the call, e.g. `["cpu:0", "cpu:1"]`.
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(
            f"Invalid value for argument count. Expected an int >= 1. Received: count={count!r}"
        )
    _backend.split_host_cpu(count)
    return list_devices("cpu")


def data_parallel(model: keras.Model, devices: Sequence[Any] | None = None) -> keras.Model:
    """Returns a data-parallel twin of `model`, replicated over `devices`.

    The successor of Keras 2's `multi_gpu_model(model, gpus=N)`. The twin has
    the architecture and weights of `model` (the template), with its variables
    replicated on every device: `tf.distribute.MirroredStrategy` on
    TensorFlow, `keras.distribution.DataParallel` on JAX. Compile and fit the
    twin as usual; `batch_size` is the global batch, split across replicas.
    The template is not touched by training; bring the trained weights back
    with `copy_weights(twin, model)` (ParallelModelCheckpoint does it for you).

    Optimizer and metric objects passed to the twin's `compile()` are
    re-created from their config on the twin's devices (before training they
    hold no other state), so `twin.optimizer` is a copy of the one passed.

    After `multi_worker_strategy()`, the twin spans every worker, and every
    worker's template and twin start from the chief's weights.

    Args:
        model: a built Keras model (Functional, Sequential, or subclassed
            with `get_config()`).
        devices: device names (`"gpu:0"`, `"/cpu:1"`, ...) or device
            objects. Defaults to `None`: every GPU, else every CPU device.

    Returns:
        The data-parallel twin, a new `keras.Model`.

    Raises:
        ValueError: `model` is not built, is already a twin, or a device does
            not exist (the message lists those that do).

    Example:

    ```python
    model = make_model()                      # the template
    parallel_model = data_parallel(model)     # every GPU, else every CPU
    parallel_model.compile(loss="categorical_crossentropy", optimizer="rmsprop")
    parallel_model.fit(x, y, epochs=20, batch_size=256)
    copy_weights(parallel_model, model)
    model.save("my_model.keras")
    ```
    """
    multi_worker = _backend.multi_worker()
    _twin.check_template(model, "data_parallel()", "replicate")
    if multi_worker is not None:
        if devices is not None:
            raise ValueError(
                "Argument devices cannot be used after multi_worker_strategy(): "
                "the multi-worker setup decides the devices. Received: "
                f"devices={devices!r}"
            )
        distribution = multi_worker
    else:
        distribution = _backend.device_distribution(resolve_devices(devices, list_devices()))

    with distribution.scope():
        twin = _twin._clone(model)
    _backend.prepare_twin(twin)
    _twin._bind_to_distribution(
        twin, distribution, _backend.num_replicas(distribution), _backend.guard_method
    )
    if num_workers() > 1:
        # Templates built without a seed differ between workers: all start
        # from the chief's weights, as variables created under
        # MultiWorkerMirroredStrategy do.
        model.set_weights(broadcast_from_chief(model.get_weights()))
    copy_weights(model, twin)
    object.__setattr__(twin, _base.TWIN_ATTR, distribution)
    return twin


def num_replicas(model: keras.Model) -> int:
    """Returns how many replicas a twin trains on (1 for any other model).

    For a `data_parallel` twin, its devices; for a `model_parallel` twin, its
    `data_parallel` factor (the model axis splits variables, not batches).
    """
    distribution = _base.twin_distribution(model)
    return 1 if distribution is None else _backend.num_replicas(distribution)


def replica_divergence(model: keras.Model) -> float:
    """Returns the largest difference between replicas of any variable.

    0.0 means every replica of every variable (weights and non-trainable
    state such as BatchNormalization moving statistics) holds the same value
    in this process. Useful to check a custom layer in a data-parallel twin.

    Args:
        model: a model, typically a `data_parallel` twin after training.

    Returns:
        The maximum absolute difference, as a float.
    """
    worst = 0.0
    for variable in model.variables:
        values = _backend.replica_values(variable)
        for other in values[1:]:
            diff = np.abs(values[0].astype(np.float64) - other.astype(np.float64))
            worst = max(worst, float(diff.max(initial=0.0)))
    return worst


def multi_worker_strategy(
    worker_addresses: Sequence[str] | None = None,
    worker_index: int | None = None,
):
    """Sets up training over several workers (processes or hosts).

    Call it once, at the start of every worker's program, before any other
    TensorFlow or JAX computation. Afterwards `data_parallel(model)` returns
    a twin that trains over all workers' devices, and `is_chief()`,
    `worker_index()`, `num_workers()` and `barrier()` describe the job.

    * TensorFlow: returns a `tf.distribute.MultiWorkerMirroredStrategy`, with
      the fix of keras-team/keras#20585 applied (only on tested Keras
      versions). Every worker passes the same data to `fit`; TensorFlow
      shards it, and `batch_size` is the global batch.
    * JAX: calls `keras.distribution.initialize` (gloo collectives on CPU) and
      returns `keras.distribution.DataParallel` over every process's devices,
      without auto-sharding: each process passes its own shard of the data,
      and `batch_size` is the per-process batch.

    Args:
        worker_addresses: `"host:port"` of every worker, the same list in
            every worker; on JAX the first is the coordinator. Defaults to
            `None`: read `TF_CONFIG` (TensorFlow) or the
            `KERAS_DISTRIBUTION_*` variables (JAX) from the environment.
        worker_index: this worker's position in `worker_addresses`. Defaults
            to `None` (from the environment).

    Returns:
        The strategy (TensorFlow) or distribution (JAX) now in use.

    Raises:
        ValueError: inconsistent arguments.
        RuntimeError: called after the backend started computing, or (on
            TensorFlow) with an untested Keras version.
    """
    current = _backend.multi_worker()
    if current is not None:
        return current
    addresses = None
    if worker_addresses is not None:
        addresses = (
            worker_addresses.split(",")
            if isinstance(worker_addresses, str)
            else list(worker_addresses)
        )
        if worker_index is None or not 0 <= worker_index < len(addresses):
            raise ValueError(
                "Invalid value for argument worker_index. Expected an int in "
                f"[0, {len(addresses)}) with worker_addresses={addresses!r}. "
                f"Received: worker_index={worker_index!r}"
            )
    return _backend.start_multi_worker(addresses, worker_index)


def worker_index() -> int:
    """Returns this worker's index: 0 on a single machine."""
    return _backend.worker_index()


def num_workers() -> int:
    """Returns the number of workers (processes) training together: 1 on one machine."""
    return _backend.num_workers()


def is_chief() -> bool:
    """Whether this worker is the one that writes files and logs.

    True on a single machine (with or without MirroredStrategy); with several
    workers, true on exactly one: the `chief` task if the cluster names one,
    else worker 0 (TensorFlow), or process 0 (JAX).
    """
    return worker_index() == 0


def barrier() -> None:
    """Blocks until every worker has reached this call; returns at once on one worker.

    Every worker must call it the same number of times, in the same order
    relative to training steps.
    """
    if num_workers() > 1:
        _backend.barrier()


def any_worker(flag: bool) -> bool:
    """Returns True on every worker if `flag` is True on any worker.

    Lets all workers take the same decision (stop, save, skip) at the same
    step. A collective: every worker must call it at the same point. Returns
    `flag` itself on one worker.
    """
    if num_workers() <= 1:
        return bool(flag)
    return _backend.any_worker(flag)


def broadcast_from_chief(arrays: Sequence[Any]) -> list[np.ndarray]:
    """Returns the chief's `arrays` on every worker; `arrays` itself on one worker.

    A collective: every worker must call it at the same point, with arrays of
    the same shapes and dtypes.
    """
    arrays = [np.asarray(a) for a in arrays]
    if num_workers() <= 1:
        return arrays
    return _backend.broadcast_from_chief(arrays)


# -- Internal: used by the callbacks, not part of __all__ --------------------


def single_device_copy(model: keras.Model | dict[str, Any]) -> keras.Model:
    """Returns a copy of a model's architecture on the CPU, outside any strategy.

    The copy has fresh weights (use `copy_weights`) and undoes what
    `data_parallel` changed for replicas (synchronized batch statistics), so
    it saves a file that loads anywhere. Call it where no strategy or
    distribution scope is active, such as a background thread (both are
    thread-local).

    Args:
        model: a built model (a twin or not), or its
            `keras.saving.serialize_keras_object(model)` (safe to pass to
            another thread while the model trains).

    Returns:
        The new model, its variables on the host CPU.
    """
    with _backend.host_cpu_scope():
        if isinstance(model, dict):
            # Keras's deserialization empties parts of the dict it is given.
            copy = keras.saving.deserialize_keras_object(_copy.deepcopy(model))
        else:
            copy = _twin._clone(model)
    for layer in _layers.all_layers(copy):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.synchronized = False
    return copy


def host_copy(variables, out: list[np.ndarray] | None = None) -> list[np.ndarray]:
    """Copies variables to host memory as numpy arrays that training cannot change.

    Exactly one copy per variable (Keras's `convert_to_numpy` makes two on
    TensorFlow), from a read of the variable (a mirrored one reads its
    primary replica; a sharded one is assembled shard by shard, so the host
    never holds a second whole copy of it) into `out` when given. Reusing
    `out` from the previous copy matters for large models: fresh memory
    costs a page fault per page, which for hundreds of MB takes longer than
    the copy itself. A model-parallel twin whose model axis spans processes
    is gathered by a collective: every process must then call this with the
    same variables.

    Args:
        variables: Keras variables.
        out: arrays of matching shapes and dtypes to copy into. Defaults to
            `None`: new arrays.

    Returns:
        The arrays (`out` itself when it was usable).
    """
    variables = list(variables)
    if out is not None and len(out) == len(variables) and all(
        o.shape == tuple(v.shape) and o.dtype == np.dtype(v.dtype) for o, v in zip(out, variables)
    ):
        for variable, target in zip(variables, out):
            _backend.read_into(variable, target)
        return out
    return [_backend.read_into(variable) for variable in variables]


def local_value(variable) -> np.ndarray:
    """This process's first replica of `variable`, whole, on the host.

    Reading it involves no collective, so one worker can do it alone (for
    example to evaluate a twin on a single device). A replica of a sharded
    variable is assembled from its shards on this process's devices.
    """
    return _backend.replica_values(variable)[0]


def compile_function(fn):
    """`fn` compiled by the backend (`jax.jit`, or `tf.function` with XLA), traced per input shape.

    On TensorFlow a function XLA cannot compile falls back to a plain graph,
    once, with an info log.
    """
    return _backend.compile_function(fn)


def graph_function(fn):
    """`fn` traced once per input shape into the backend's graph: `jax.jit`, or `tf.function`
    without XLA."""
    return _backend.graph_function(fn)


def inner_xla_function(fn):
    """`fn` compiled by XLA as a part of a graph that is not (`tf.function(jit_compile=True)`
    called inside a `tf.function`); no fallback."""
    return _backend.inner_xla_function(fn)


def row_sums(values):
    """The sums of the rows of a (rows, n) float32 tensor, in the backend's fastest form."""
    return _backend.row_sums(values)


# Whether ActivationLogger runs its statistics inside the forward graph
# (TensorFlow) or as a program after it (JAX).
STATISTICS_IN_FORWARD_GRAPH: bool = _backend.STATISTICS_IN_FORWARD_GRAPH


def skip_batches(model: keras.Model, count: int, logs: dict[str, float]) -> None:
    """Makes `model`'s next `count` training batches read but not trained.

    Replaces `model.train_function` until they are skipped: each of those
    steps takes its batch from the iterator and returns `logs` (what the
    interrupted run reported at that point), so a resumed epoch continues at
    the batch where a checkpoint was written, with the data order of the
    interrupted run. Call it when the train function is final for the epoch,
    e.g. from `on_train_batch_begin`.
    """
    train_function = model.train_function
    left = [count]

    def done_skipping() -> bool:
        if left[0] <= 0:
            model.train_function = train_function
            return True
        left[0] -= model.steps_per_execution
        return False

    model.train_function = _backend.skipping_train_function(
        train_function, done_skipping, logs, model.steps_per_execution)

"""The TensorFlow side of `distribute`: tf.distribute strategies, devices and collectives.

It defines the same functions as `_jax.py`; `distribute/__init__.py` imports
one of the two, once, by the Keras backend.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Callable, Sequence

import keras
import numpy as np
import tensorflow as tf

from keras_callbacks_plus import _compat, _layers

logger = logging.getLogger(__name__)

# One MirroredStrategy per device set: a second strategy over the same devices
# in one process breaks the next `fit` ("Shape mismatch in the collective
# instance").
_mirrored_strategies: dict[tuple[str, ...], Any] = {}
# What `start_multi_worker()` set up in this process, if anything.
_multi_worker: Any = None


def local_devices() -> list[Any]:
    """This process's logical devices (a split CPU shows as several)."""
    return tf.config.list_logical_devices()


def split_host_cpu(count: int) -> None:
    """Gives the host CPU `count` logical devices, unless TensorFlow started or it is split."""
    cpu = tf.config.list_physical_devices("CPU")[0]
    if tf.config.get_logical_device_configuration(cpu) is None:
        try:
            tf.config.set_logical_device_configuration(
                cpu, [tf.config.LogicalDeviceConfiguration()] * count
            )
        except RuntimeError:  # The runtime is initialized: too late.
            logger.warning("TensorFlow already started: the CPU stays as it is.")


def device_distribution(devices: tuple[str, ...]):
    """The MirroredStrategy over `devices` (names such as `"cpu:0"`), one per device set."""
    if devices not in _mirrored_strategies:
        _mirrored_strategies[devices] = tf.distribute.MirroredStrategy(
            devices=["/" + d for d in devices]
        )
    return _mirrored_strategies[devices]


def num_replicas(distribution) -> int:
    """How many replicas `distribution` (a strategy) trains on."""
    return distribution.num_replicas_in_sync


# Keras 3's TensorFlow `distribution_lib` is a prototype marked "DO NOT USE".
_NO_MODEL_PARALLEL = (
    "model_parallel() needs the JAX backend: Keras 3 has no supported model-parallel "
    "distribution on TensorFlow (keras.distribution.ModelParallel runs on JAX; the "
    "TensorFlow side of keras.distribution is an unfinished prototype). Run with "
    "KERAS_BACKEND=jax (the same code then shards the model over GPUs, TPUs or host "
    "devices), or train on TensorFlow with data_parallel(). Received: "
    "KERAS_BACKEND='tensorflow'"
)


def mesh_devices(names: tuple[str, ...] | None) -> list[Any]:
    """Model parallelism is JAX-only: raises."""
    raise NotImplementedError(_NO_MODEL_PARALLEL)


def model_parallel_distribution(devices: np.ndarray, axis_names: tuple[str, ...],
                                layouts: dict[str, tuple], batch_dim_name: str):
    """Model parallelism is JAX-only: raises."""
    raise NotImplementedError(_NO_MODEL_PARALLEL)


def multi_worker():
    """The strategy `start_multi_worker()` set up in this process, or None."""
    return _multi_worker


def start_multi_worker(addresses: list[str] | None, index: int | None):
    """Creates the MultiWorkerMirroredStrategy, with the Keras fix it needs.

    Args:
        addresses: `"host:port"` of every worker, or None to use `TF_CONFIG`.
        index: this worker's position in `addresses`.

    Returns:
        The strategy, now this process's multi-worker setup.
    """
    global _multi_worker
    _compat.patch_multi_worker_fit(tf)
    if addresses is not None:
        os.environ["TF_CONFIG"] = json.dumps(
            {"cluster": {"worker": addresses}, "task": {"type": "worker", "index": index}}
        )
    elif "TF_CONFIG" not in os.environ:
        raise ValueError(
            "multi_worker_strategy() needs worker_addresses and worker_index, "
            "or a TF_CONFIG environment variable."
        )
    try:
        _multi_worker = tf.distribute.MultiWorkerMirroredStrategy()
    except (RuntimeError, ValueError) as error:
        raise RuntimeError(
            "multi_worker_strategy() must run at program start, before "
            f"TensorFlow executes any operation: {error}"
        ) from error
    return _multi_worker


def _strategy():
    """The strategy collectives run on: the multi-worker one, else the one in scope."""
    return _multi_worker if _multi_worker is not None else tf.distribute.get_strategy()


def _task() -> tuple[str | None, int, int, bool]:
    """(task type, task id, number of workers, has a chief task) of the TF job."""
    for strategy in (tf.distribute.get_strategy(), _multi_worker):
        resolver = getattr(strategy, "cluster_resolver", None)
        spec = resolver.cluster_spec().as_dict() if resolver is not None else {}
        if spec:
            workers = sum(len(spec.get(kind, ())) for kind in ("chief", "worker"))
            has_chief = "chief" in spec
            return resolver.task_type, int(resolver.task_id or 0), workers, has_chief
    return None, 0, 1, False


def worker_index() -> int:
    """This worker's index; a `chief` task, where the cluster names one, is 0."""
    task_type, task_id, _, has_chief = _task()
    if task_type == "worker" and has_chief:
        return task_id + 1
    return task_id


def num_workers() -> int:
    """The number of workers (chief included) in the cluster, 1 without one."""
    return _task()[2]


def barrier() -> None:
    """Blocks until every worker has reached this call (several workers)."""
    strategy = _strategy()
    ones = strategy.run(lambda: tf.constant(1.0))
    strategy.reduce("SUM", ones, axis=None).numpy()


def any_worker(flag: bool) -> bool:
    """Whether `flag` is True on any worker (several workers)."""
    strategy = _strategy()
    value = float(bool(flag))
    votes = strategy.run(lambda: tf.constant(value))
    return bool(strategy.reduce("SUM", votes, axis=None).numpy() > 0)


def broadcast_from_chief(arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
    """The chief's `arrays` on every worker (several workers)."""
    strategy = _strategy()

    def chief_only():
        # Global replica 0 lives on the chief: only it contributes, so the
        # sum is its value exactly.
        context = tf.distribute.get_replica_context()
        first = tf.equal(context.replica_id_in_sync_group, 0)
        return context.all_reduce(
            "SUM", [tf.where(first, a, tf.zeros_like(a)) for a in arrays]
        )

    results = strategy.run(chief_only)
    return [strategy.experimental_local_results(r)[0].numpy() for r in results]


def prepare_twin(twin: keras.Model) -> None:
    """Synchronizes batch statistics, so that every replica normalizes and updates alike."""
    for layer in _layers.all_layers(twin):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.synchronized = True


def guard_method(name: str, method: Callable, replicas: int) -> tuple[Callable, Callable | None]:
    """A twin's method as it is: MirroredStrategy splits any batch over its replicas."""
    return method, None


def read_into(variable, out: np.ndarray | None = None) -> np.ndarray:
    """`variable`'s value on the host (its primary replica for a mirrored one), into `out`."""
    view = np.asarray(variable.value.read_value())
    if out is None:
        return np.array(view)
    np.copyto(out, view)
    return out


def assign_value(variable, value: np.ndarray) -> None:
    """Assigns the host array `value` to `variable` (every replica of a mirrored one)."""
    variable.assign(value)


def replica_values(variable) -> list[np.ndarray]:
    """Every replica's value of `variable` in this process, on the host."""
    value = variable.value
    # A MirroredVariable lists one component per replica; others are one.
    return [np.asarray(v) for v in getattr(value, "values", (value,))]


def compile_function(fn):
    """`tf.function(fn, jit_compile=True)`, falling back to a plain graph once if XLA fails."""
    # XLA makes small reductions several times faster on CPU.
    compiled = [tf.function(fn, jit_compile=True)]

    def run(*args):
        try:
            return compiled[0](*args)
        except (tf.errors.InvalidArgumentError, tf.errors.UnimplementedError,
                tf.errors.NotFoundError) as error:
            if len(compiled) > 1:
                raise
            logger.info("XLA cannot compile %s (%s); running it without XLA.",
                        getattr(fn, "__name__", fn), str(error).splitlines()[0])
            compiled[0:0] = [tf.function(fn)]
            return compiled[0](*args)

    return run


# ActivationLogger's forward stage is a graph that reads the weights itself and
# runs the statistics program inside it, as one XLA cluster per batch.
STATISTICS_IN_FORWARD_GRAPH = True


def graph_function(fn):
    """`tf.function(fn)` without XLA: its CPU convolutions (oneDNN) are several times faster
    than XLA's, and tracing a model-sized graph takes seconds where XLA takes a minute."""
    return tf.function(fn)


def inner_xla_function(fn):
    """`fn` as one XLA cluster to call inside another (non-XLA) graph."""
    return tf.function(fn, jit_compile=True)


def row_sums(values):
    """The sums of the rows of a (rows, n) float32 tensor, as a product with a vector of ones:
    TensorFlow's XLA runs that several times faster than a reduction (measured on CPU)."""
    return keras.ops.matmul(values, keras.ops.ones((values.shape[1],), "float32"))


def host_cpu_scope():
    """The context that places new variables on the host CPU."""
    return tf.device("/cpu:0")


def skipping_train_function(train_function: Callable, done_skipping: Callable[[], bool],
                            logs: dict, steps: int) -> Callable:
    """A TensorFlow train function that skips steps (reads their batches) until `done_skipping()`."""

    def skipping(iterator):
        if done_skipping():
            return train_function(iterator)
        for _ in range(steps):  # one call runs `steps_per_execution` steps
            next(iterator)
        return logs

    return skipping

"""Data-parallel training on one or several devices and workers.

This is the only module of keras_callbacks_plus that branches on the Keras
backend or on the distribution strategy; the callbacks ask it questions
(`is_chief()`, `barrier()`, ...) instead.

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

import contextlib
import copy as _copy
import functools
import inspect
import json
import logging
import math
import os
import re
from typing import Any, Sequence

import keras
import numpy as np

from keras_callbacks_plus import _compat, _layers

__all__ = [
    "any_worker",
    "barrier",
    "broadcast_from_chief",
    "compile_function",
    "copy_weights",
    "host_copy",
    "data_parallel",
    "emulate_cpu_devices",
    "is_chief",
    "list_devices",
    "local_value",
    "multi_worker_strategy",
    "num_replicas",
    "num_workers",
    "replica_divergence",
    "scope",
    "single_device_copy",
    "worker_index",
]

logger = logging.getLogger(__name__)

_SUPPORTED_BACKENDS = ("tensorflow", "jax")
_DEVICE_PATTERN = re.compile(r"(cpu|gpu|tpu|cuda|rocm):(\d+)$")
# Methods of a twin that must run under its strategy or distribution.
_SCOPED_METHODS = (
    "compile",
    "fit",
    "evaluate",
    "predict",
    "train_on_batch",
    "test_on_batch",
    "predict_on_batch",
)
_TWIN_ATTR = "_keras_callbacks_plus_distribution"

# One MirroredStrategy per device set: a second strategy over the same devices
# in one process breaks the next `fit` ("Shape mismatch in the collective
# instance").
_mirrored_strategies: dict[tuple[str, ...], Any] = {}
# What `multi_worker_strategy()` set up in this process, if anything.
_multi_worker: Any = None


def _backend() -> str:
    name = keras.backend.backend()
    if name not in _SUPPORTED_BACKENDS:
        raise NotImplementedError(
            "keras_callbacks_plus supports the TensorFlow and JAX backends. "
            f"Received: KERAS_BACKEND={name!r}"
        )
    return name


def _canonical_device(spec: Any) -> str | None:
    """`"cpu:0"` for a device name, TF logical device or JAX device."""
    if hasattr(spec, "platform") and hasattr(spec, "id"):  # a jax.Device
        kind, index = spec.platform, spec.id
    else:
        name = str(getattr(spec, "name", spec)).strip().lower()
        match = _DEVICE_PATTERN.search(name)
        if match is None:
            return None
        kind, index = match.groups()
    kind = {"cuda": "gpu", "rocm": "gpu"}.get(str(kind).lower(), str(kind).lower())
    return f"{kind}:{int(index)}"


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
    if _backend() == "tensorflow":
        import tensorflow as tf

        found = [_canonical_device(d) for d in tf.config.list_logical_devices()]
    else:
        import jax

        found = [_canonical_device(d) for d in jax.local_devices()]
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
    if _backend() == "tensorflow":
        import tensorflow as tf

        cpu = tf.config.list_physical_devices("CPU")[0]
        if tf.config.get_logical_device_configuration(cpu) is None:
            try:
                tf.config.set_logical_device_configuration(
                    cpu, [tf.config.LogicalDeviceConfiguration()] * count
                )
            except RuntimeError:  # The runtime is initialized: too late.
                logger.warning("TensorFlow already started: the CPU stays as it is.")
    else:
        flags = os.environ.get("XLA_FLAGS", "")
        if "--xla_force_host_platform_device_count" not in flags:
            flag = f"--xla_force_host_platform_device_count={count}"
            os.environ["XLA_FLAGS"] = f"{flags} {flag}".strip()
    return list_devices("cpu")


def _resolve_devices(devices: Sequence[Any] | None) -> tuple[str, ...]:
    available = list_devices()
    if devices is None:
        gpus = [d for d in available if d.startswith("gpu:")]
        return tuple(gpus or [d for d in available if d.startswith("cpu:")])
    if isinstance(devices, (str, bytes)) or not isinstance(devices, Sequence):
        devices = [devices]
    if not devices:
        raise ValueError(
            "Invalid value for argument devices. Expected a non-empty list of "
            f"devices. Received: devices={devices!r}"
        )
    names = []
    for spec in devices:
        name = _canonical_device(spec)
        if name is None or name not in available:
            raise ValueError(
                f"Device {spec!r} does not exist. Available devices: "
                f"{', '.join(available)}."
            )
        if name in names:
            raise ValueError(f"Device {spec!r} is listed twice in devices={devices!r}.")
        names.append(name)
    return tuple(names)


def _mirrored_strategy(devices: tuple[str, ...]):
    import tensorflow as tf

    if devices not in _mirrored_strategies:
        _mirrored_strategies[devices] = tf.distribute.MirroredStrategy(
            devices=["/" + d for d in devices]
        )
    return _mirrored_strategies[devices]


def _jax_data_parallel(devices: tuple[str, ...]):
    import jax

    by_name = {_canonical_device(d): d for d in jax.local_devices()}
    return keras.distribution.DataParallel(devices=[by_name[d] for d in devices])


def _num_replicas(distribution) -> int:
    if _backend() == "tensorflow":
        return distribution.num_replicas_in_sync
    return int(np.prod(distribution.device_mesh.shape))


def _clone(model: keras.Model) -> keras.Model:
    try:
        twin = keras.models.clone_model(model, recursive=True)
    except Exception as error:
        if "not the same on each process" in str(error):
            raise ValueError(
                f"data_parallel() could not create the twin of model {model.name!r}: the JAX "
                "processes drew different initial values. Call keras.utils.set_random_seed() "
                "with the same seed on every process (or on none) before building models."
            ) from error
        raise ValueError(
            f"data_parallel() could not rebuild model {model.name!r}: {error}. "
            "Functional and Sequential models clone as they are; a subclassed "
            "model needs get_config() (and from_config() if its constructor "
            "takes non-serializable arguments)."
        ) from error
    if len(twin.weights) != len(model.weights):
        # A subclassed model creates its sublayers' weights on its first call.
        shape = (model.get_build_config() or {}).get("input_shape")
        if shape is None:
            raise ValueError(
                f"data_parallel() could not build the copy of model {model.name!r}: "
                "it has no recorded input shape. Build it by calling it on data "
                "once (model(x)) before data_parallel()."
            )
        twin(keras.tree.map_shape_structure(
            lambda s: np.zeros([1 if d is None else d for d in s], "float32"), shape
        ))
    return twin


def _num_samples(data) -> int | None:
    """Rows of an array or of a (nested) structure of arrays; None for datasets."""
    leaves = keras.tree.flatten(data) if isinstance(data, (list, tuple, dict)) else [data]
    if not leaves or not all(hasattr(leaf, "shape") and len(leaf.shape) for leaf in leaves):
        return None
    return int(leaves[0].shape[0])


def _check_even_batches(method: str, replicas: int, samples: int | None, batch_size: int) -> None:
    if samples is None or replicas <= 1:
        return
    last = samples % batch_size
    if batch_size % replicas == 0 and last % replicas == 0:
        return
    raise ValueError(
        f"{method}() on a data-parallel twin splits every batch evenly over its "
        f"{replicas} replicas (JAX backend), but {samples} samples in batches of "
        f"{batch_size} give a batch of {last or batch_size}. Use a batch_size that "
        f"is a multiple of {replicas}, and a number of samples that leaves a "
        f"multiple of {replicas} in the last batch (for example drop "
        f"{last % replicas} samples)."
    )


def _even_batches_guard(name, method, replicas):
    """Checks array inputs of a JAX twin's methods before any step runs."""
    signature = inspect.signature(method)

    def check(args, kwargs):
        bound = signature.bind_partial(*args, **kwargs).arguments
        x = bound.get("x")
        batch_size = bound.get("batch_size") or 32
        if name in ("fit", "evaluate"):
            samples = _num_samples(x)
            split = bound.get("validation_split") or 0.0
            if samples is not None and split:
                train = int(math.ceil(samples * (1.0 - split)))
                _check_even_batches(name, replicas, train, batch_size)
                _check_even_batches(name, replicas, samples - train, batch_size)
            else:
                _check_even_batches(name, replicas, samples, batch_size)
            val = bound.get("validation_data")
            if isinstance(val, (list, tuple)) and val:
                val_batch = bound.get("validation_batch_size") or batch_size
                _check_even_batches("fit", replicas, _num_samples(val[0]), val_batch)
        elif name in ("train_on_batch", "test_on_batch"):
            samples = _num_samples(x)
            _check_even_batches(name, replicas, samples, samples or 1)

    return check


def _predict_padded(method, replicas):
    """Pads array inputs to whole replica batches, then drops the padding."""
    signature = inspect.signature(method)

    def predict(*args, **kwargs):
        bound = signature.bind_partial(*args, **kwargs)
        x = bound.arguments.get("x")
        samples = _num_samples(x)
        batch_size = bound.arguments.get("batch_size") or 32
        if samples is None or batch_size % replicas or samples % replicas == 0:
            return method(*args, **kwargs)
        pad = replicas - samples % replicas
        bound.arguments["x"] = keras.tree.map_structure(
            lambda a: np.concatenate([np.asarray(a), np.repeat(np.asarray(a)[-1:], pad, 0)]), x
        )
        outputs = method(*bound.args, **bound.kwargs)
        return keras.tree.map_structure(lambda out: out[:samples], outputs)

    return predict


def _recreate(obj, kind: str):
    """A state-free copy of a metric or unbuilt optimizer, made from its config."""
    try:
        copy = obj.__class__.from_config(obj.get_config())
    except Exception as error:
        raise ValueError(
            f"The {kind} {type(obj).__name__} given to the data-parallel twin's "
            "compile() was created outside the twin's devices and cannot be "
            f"re-created from its config ({error}). Pass it by name, or give "
            "it a get_config() that covers its constructor arguments."
        ) from error
    return copy


def _twin_optimizer(optimizer):
    if not isinstance(optimizer, keras.optimizers.Optimizer):
        return optimizer
    if optimizer.built:
        raise ValueError(
            "The optimizer given to the data-parallel twin's compile() already "
            "holds state for other variables. Pass a new optimizer (or its name)."
        )
    copy = _recreate(optimizer, "optimizer")
    copy.iterations.assign(optimizer.iterations)
    return copy


def _compile_in_scope(method, distribution):
    """`compile` that re-creates optimizer and metric objects on the twin's devices.

    Objects made before (outside) the twin's strategy or distribution own
    variables on one device, which the replicated step cannot use
    (TensorFlow: "Mixing different tf.distribute.Strategy objects"; JAX:
    "incompatible devices"). Before their first step they hold no state but
    their configuration, so a copy from `get_config()` is the same object.
    """
    signature = inspect.signature(method)

    @functools.wraps(method)
    def compile(*args, **kwargs):
        bound = signature.bind_partial(*args, **kwargs)
        with distribution.scope():
            if "optimizer" in bound.arguments:
                bound.arguments["optimizer"] = _twin_optimizer(bound.arguments["optimizer"])
            for key in ("metrics", "weighted_metrics"):
                if bound.arguments.get(key) is not None:
                    bound.arguments[key] = keras.tree.map_structure(
                        lambda m: _recreate(m, "metric")
                        if isinstance(m, keras.metrics.Metric)
                        else m,
                        bound.arguments[key],
                    )
            return method(*bound.args, **bound.kwargs)

    return compile


def _bind_to_distribution(twin: keras.Model, distribution, replicas: int) -> None:
    # Variables created later (optimizer slots at compile or the first step,
    # metrics) must be replicated like the model's: TensorFlow refuses to mix
    # strategies, and JAX reads the distribution from Keras's thread-local
    # state when it creates variables and shards batches. So the twin enters
    # its own scope whenever it runs.
    jax = _backend() == "jax"
    for name in _SCOPED_METHODS:
        method = getattr(twin, name)
        check = _even_batches_guard(name, method, replicas) if jax else None
        if jax and name == "predict":
            method = _predict_padded(method, replicas)

        if name == "compile":
            object.__setattr__(twin, name, _compile_in_scope(method, distribution))
            continue

        @functools.wraps(method)
        def run_in_scope(*args, _method=method, _check=check, **kwargs):
            if _check is not None:
                _check(args, kwargs)
            with distribution.scope():
                return _method(*args, **kwargs)

        object.__setattr__(twin, name, run_in_scope)


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
    backend = _backend()
    if not isinstance(model, keras.Model):
        raise TypeError(
            f"data_parallel() expects a keras.Model. Received: {type(model).__name__}"
        )
    if getattr(model, _TWIN_ATTR, None) is not None:
        raise ValueError(
            f"Model {model.name!r} is already a data-parallel twin. Pass the "
            "template model to data_parallel()."
        )
    if not model.built:
        raise ValueError(
            f"Model {model.name!r} is not built, so it has no weights to "
            "replicate. Build it or call it first: model.build(input_shape) "
            "or model(x) on one batch, or give it an Input layer."
        )
    if _multi_worker is not None:
        if devices is not None:
            raise ValueError(
                "Argument devices cannot be used after multi_worker_strategy(): "
                "the multi-worker setup decides the devices. Received: "
                f"devices={devices!r}"
            )
        distribution = _multi_worker
    elif backend == "tensorflow":
        distribution = _mirrored_strategy(_resolve_devices(devices))
    else:
        distribution = _jax_data_parallel(_resolve_devices(devices))

    with distribution.scope():
        twin = _clone(model)
    if backend == "tensorflow":
        for layer in _layers.all_layers(twin):
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.synchronized = True
    _bind_to_distribution(twin, distribution, _num_replicas(distribution))
    if num_workers() > 1:
        # Templates built without a seed differ between workers: all start
        # from the chief's weights, as variables created under
        # MultiWorkerMirroredStrategy do.
        model.set_weights(broadcast_from_chief(model.get_weights()))
    copy_weights(model, twin)
    object.__setattr__(twin, _TWIN_ATTR, distribution)
    return twin


def num_replicas(model: keras.Model) -> int:
    """Returns how many replicas a `data_parallel` twin trains on (1 for any other model)."""
    distribution = getattr(model, _TWIN_ATTR, None)
    return 1 if distribution is None else _num_replicas(distribution)


def scope(model: keras.Model):
    """The context a twin's own variables are made in; a no-op for other models.

    Use it to create state for a twin outside its methods, for example
    `with distribute.scope(twin): twin.optimizer.build(twin.trainable_variables)`.
    """
    distribution = getattr(model, _TWIN_ATTR, None)
    return contextlib.nullcontext() if distribution is None else distribution.scope()


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
    if _backend() == "tensorflow":
        import tensorflow as tf

        device = tf.device("/cpu:0")
    else:
        import jax

        device = jax.default_device(jax.local_devices(backend="cpu")[0])
    with device:
        if isinstance(model, dict):
            # Keras's deserialization empties parts of the dict it is given.
            copy = keras.saving.deserialize_keras_object(_copy.deepcopy(model))
        else:
            copy = _clone(model)
    for layer in _layers.all_layers(copy):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.synchronized = False
    return copy


def host_copy(variables, out: list[np.ndarray] | None = None) -> list[np.ndarray]:
    """Copies variables to host memory as numpy arrays that training cannot change.

    Exactly one copy per variable (Keras's `convert_to_numpy` makes two on
    TensorFlow), from a read of the variable (a mirrored one reads its
    primary replica) into `out` when given. Reusing `out` from the previous
    copy matters for large models: fresh memory costs a page fault per page,
    which for hundreds of MB takes longer than the copy itself.

    Args:
        variables: Keras variables.
        out: arrays of matching shapes and dtypes to copy into. Defaults to
            `None`: new arrays.

    Returns:
        The arrays (`out` itself when it was usable).
    """
    if _backend() == "tensorflow":
        views = (np.asarray(v.value.read_value()) for v in variables)
    else:
        views = (np.asarray(v.value) for v in variables)
    if out is not None and len(out) == len(variables) and all(
        o.shape == tuple(v.shape) and o.dtype == np.dtype(v.dtype) for o, v in zip(out, variables)
    ):
        for target, view in zip(out, views):
            np.copyto(target, view)
        return out
    return [np.array(view) for view in views]


def copy_weights(source: keras.Model, target: keras.Model) -> None:
    """Copies every weight, trainable or not, from `source` to `target`.

    Works both ways between a data-parallel twin and its template: into a
    twin, each value goes to every replica. Afterwards the two models predict
    the same.

    Args:
        source: the model to read weights from.
        target: a model of the same architecture to write them into.

    Raises:
        ValueError: the models' weights differ in number or shape.
    """
    src, dst = source.weights, target.weights
    if len(src) != len(dst):
        raise ValueError(
            "copy_weights() needs two models of the same architecture: "
            f"{source.name!r} has {len(src)} weights, {target.name!r} has {len(dst)}."
        )
    for s, d in zip(src, dst):
        if tuple(s.shape) != tuple(d.shape):
            raise ValueError(
                "copy_weights() needs two models of the same architecture: "
                f"weight {s.path!r} of {source.name!r} has shape {tuple(s.shape)}, "
                f"weight {d.path!r} of {target.name!r} has shape {tuple(d.shape)}."
            )
    target.set_weights(source.get_weights())


def _replica_values(variable) -> list[np.ndarray]:
    value = variable.value
    if _backend() == "tensorflow":
        # A MirroredVariable lists one component per replica; others are one.
        return [np.asarray(v) for v in getattr(value, "values", (value,))]
    return [np.asarray(shard.data) for shard in value.addressable_shards]


def local_value(variable) -> np.ndarray:
    """This process's first replica of `variable`, on the host.

    Reading it involves no collective, so one worker can do it alone (for
    example to evaluate a twin on a single device).
    """
    return _replica_values(variable)[0]


def compile_function(fn):
    """`fn` compiled by the backend (`jax.jit`, or `tf.function` with XLA), traced per input shape.

    On TensorFlow a function XLA cannot compile falls back to a plain graph,
    once, with an info log.
    """
    if _backend() == "jax":
        import jax

        return jax.jit(fn)
    import tensorflow as tf

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
        values = _replica_values(variable)
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
    global _multi_worker
    if _multi_worker is not None:
        return _multi_worker
    backend = _backend()
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
    if backend == "tensorflow":
        _multi_worker = _tf_multi_worker(addresses, worker_index)
    else:
        _multi_worker = _jax_multi_worker(addresses, worker_index)
    return _multi_worker


def _tf_multi_worker(addresses, index):
    _compat.patch_multi_worker_fit()
    import tensorflow as tf

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
        return tf.distribute.MultiWorkerMirroredStrategy()
    except (RuntimeError, ValueError) as error:
        raise RuntimeError(
            "multi_worker_strategy() must run at program start, before "
            f"TensorFlow executes any operation: {error}"
        ) from error


def _jax_multi_worker(addresses, index):
    import jax

    # CPU collectives across processes need gloo; GPUs use their own.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        keras.distribution.initialize(
            job_addresses=",".join(addresses) if addresses else None,
            num_processes=len(addresses) if addresses else None,
            process_id=index,
        )
    except RuntimeError as error:
        raise RuntimeError(
            "multi_worker_strategy() must run at program start, before JAX "
            f"executes any computation: {error}"
        ) from error
    return keras.distribution.DataParallel(devices=jax.devices(), auto_shard_dataset=False)


def _tf_task() -> tuple[str | None, int, int, bool]:
    """(task type, task id, number of workers, has a chief task) of the TF job."""
    import tensorflow as tf

    for strategy in (tf.distribute.get_strategy(), _multi_worker):
        resolver = getattr(strategy, "cluster_resolver", None)
        spec = resolver.cluster_spec().as_dict() if resolver is not None else {}
        if spec:
            workers = sum(len(spec.get(kind, ())) for kind in ("chief", "worker"))
            has_chief = "chief" in spec
            return resolver.task_type, int(resolver.task_id or 0), workers, has_chief
    return None, 0, 1, False


def worker_index() -> int:
    """Returns this worker's index: 0 on a single machine."""
    if _backend() == "jax":
        import jax

        return jax.process_index()
    task_type, task_id, _, has_chief = _tf_task()
    if task_type == "worker" and has_chief:
        return task_id + 1
    return task_id


def num_workers() -> int:
    """Returns the number of workers (processes) training together: 1 on one machine."""
    if _backend() == "jax":
        import jax

        return jax.process_count()
    return _tf_task()[2]


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
    if num_workers() <= 1:
        return
    if _backend() == "jax":
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("keras_callbacks_plus.barrier")
        return
    import tensorflow as tf

    strategy = _multi_worker if _multi_worker is not None else tf.distribute.get_strategy()
    ones = strategy.run(lambda: tf.constant(1.0))
    strategy.reduce("SUM", ones, axis=None).numpy()


def any_worker(flag: bool) -> bool:
    """Returns True on every worker if `flag` is True on any worker.

    Lets all workers take the same decision (stop, save, skip) at the same
    step. A collective: every worker must call it at the same point. Returns
    `flag` itself on one worker.
    """
    if num_workers() <= 1:
        return bool(flag)
    if _backend() == "jax":
        from jax.experimental import multihost_utils

        gathered = multihost_utils.process_allgather(np.asarray([int(bool(flag))], np.int32))
        return bool(np.asarray(gathered).max())
    import tensorflow as tf

    strategy = _multi_worker if _multi_worker is not None else tf.distribute.get_strategy()
    value = float(bool(flag))
    votes = strategy.run(lambda: tf.constant(value))
    return bool(strategy.reduce("SUM", votes, axis=None).numpy() > 0)


def broadcast_from_chief(arrays: Sequence[Any]) -> list[np.ndarray]:
    """Returns the chief's `arrays` on every worker; `arrays` itself on one worker.

    A collective: every worker must call it at the same point, with arrays of
    the same shapes and dtypes.
    """
    arrays = [np.asarray(a) for a in arrays]
    if num_workers() <= 1:
        return arrays
    if _backend() == "jax":
        from jax.experimental import multihost_utils

        # As bytes: JAX without x64 would turn int64 / float64 into 32 bits.
        raw = [np.ascontiguousarray(a).reshape(-1).view(np.uint8) for a in arrays]
        received = multihost_utils.broadcast_one_to_all(raw)
        return [
            np.asarray(r).view(a.dtype).reshape(a.shape) for r, a in zip(received, arrays)
        ]
    import tensorflow as tf

    strategy = _multi_worker if _multi_worker is not None else tf.distribute.get_strategy()

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

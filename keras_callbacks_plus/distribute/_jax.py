"""The JAX side of `distribute`: keras.distribution, host devices and multihost collectives.

It defines the same functions as `_tf.py`; `distribute/__init__.py` imports
one of the two, once, by the Keras backend.
"""

from __future__ import annotations

import inspect
import math
import os
from typing import Any, Callable, Sequence

import jax
import keras
import numpy as np
from jax.experimental import multihost_utils

from keras_callbacks_plus.distribute._devices import canonical_device

# What `start_multi_worker()` set up in this process, if anything.
_multi_worker: Any = None


def local_devices() -> list[Any]:
    """This process's JAX devices."""
    return jax.local_devices()


def split_host_cpu(count: int) -> None:
    """Asks XLA for `count` host devices, unless the flag is already set.

    Only a JAX runtime that has not started yet reads the flag.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if "--xla_force_host_platform_device_count" not in flags:
        flag = f"--xla_force_host_platform_device_count={count}"
        os.environ["XLA_FLAGS"] = f"{flags} {flag}".strip()


def device_distribution(devices: tuple[str, ...]):
    """`keras.distribution.DataParallel` over `devices` (names such as `"cpu:0"`)."""
    by_name = {canonical_device(d): d for d in jax.local_devices()}
    return keras.distribution.DataParallel(devices=[by_name[d] for d in devices])


def num_replicas(distribution) -> int:
    """How many devices `distribution` splits batches over: its data-parallel axis.

    Every device for a DataParallel; the size of the batch axis of a
    ModelParallel's mesh (the model axis splits variables, not batches).
    """
    if isinstance(distribution, keras.distribution.ModelParallel):
        return int(distribution.num_model_replicas)
    return int(np.prod(distribution.device_mesh.shape))


def mesh_devices(names: tuple[str, ...] | None) -> list[Any]:
    """The devices named `names` (this process's), or with None every device of the job.

    Every device of the job: all processes' after `start_multi_worker()`,
    else this process's accelerators (GPUs, TPUs), or its CPU devices when it
    has none.
    """
    if names is None:
        if _multi_worker is not None:
            return list(jax.devices())
        found = jax.local_devices()
        return [d for d in found if d.platform != "cpu"] or found
    by_name = {canonical_device(d): d for d in jax.local_devices()}
    return [by_name[name] for name in names]


def model_parallel_distribution(devices: np.ndarray, axis_names: tuple[str, ...],
                                layouts: dict[str, tuple], batch_dim_name: str):
    """`keras.distribution.ModelParallel` over the mesh `devices` (shaped like the mesh).

    `layouts` maps variable-path patterns (regular expressions, as in
    `LayoutMap`) to axis tuples. Each process passes its own share of the
    data, as with `start_multi_worker()` (`auto_shard_dataset=False`).
    """
    mesh = keras.distribution.DeviceMesh(devices.shape, list(axis_names), devices=devices)
    layout_map = keras.distribution.LayoutMap(mesh)
    for pattern, axes in layouts.items():
        layout_map[pattern] = tuple(axes)
    return keras.distribution.ModelParallel(
        layout_map=layout_map, batch_dim_name=batch_dim_name, auto_shard_dataset=False)


def multi_worker():
    """The distribution `start_multi_worker()` set up in this process, or None."""
    return _multi_worker


def start_multi_worker(addresses: list[str] | None, index: int | None):
    """Connects the JAX processes and makes a DataParallel over all their devices.

    Args:
        addresses: `"host:port"` of every process, the first the
            coordinator; or None to use the `KERAS_DISTRIBUTION_*` variables.
        index: this process's position in `addresses`.

    Returns:
        The distribution, now this process's multi-worker setup.
    """
    global _multi_worker
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
    _multi_worker = keras.distribution.DataParallel(
        devices=jax.devices(), auto_shard_dataset=False
    )
    return _multi_worker


def worker_index() -> int:
    """This process's index."""
    return jax.process_index()


def num_workers() -> int:
    """The number of JAX processes."""
    return jax.process_count()


def barrier() -> None:
    """Blocks until every process has reached this call (several processes)."""
    multihost_utils.sync_global_devices("keras_callbacks_plus.barrier")


def any_worker(flag: bool) -> bool:
    """Whether `flag` is True on any process (several processes)."""
    gathered = multihost_utils.process_allgather(np.asarray([int(bool(flag))], np.int32))
    return bool(np.asarray(gathered).max())


def broadcast_from_chief(arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Process 0's `arrays` on every process (several processes)."""
    # As bytes: JAX without x64 would turn int64 / float64 into 32 bits.
    raw = [np.ascontiguousarray(a).reshape(-1).view(np.uint8) for a in arrays]
    received = multihost_utils.broadcast_one_to_all(raw)
    return [
        np.asarray(r).view(a.dtype).reshape(a.shape) for r, a in zip(received, arrays)
    ]


def prepare_twin(twin: keras.Model) -> None:
    """Nothing to do: DataParallel runs one SPMD program, so batch statistics are global."""


def guard_method(name: str, method: Callable, replicas: int) -> tuple[Callable, Callable | None]:
    """A twin's method, padded for `predict`, and the check of its batches.

    DataParallel splits every batch evenly over the devices: fit, evaluate
    and the batch methods get a clear error before any step instead of a
    sharding error after an epoch; predict pads to whole replica batches.
    """
    check = _even_batches_guard(name, method, replicas)
    if name == "predict":
        method = _predict_padded(method, replicas)
    return method, check


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


def read_into(variable, out: np.ndarray | None = None) -> np.ndarray:
    """`variable`'s whole value on the host, copied into `out` (or a new array).

    A replicated variable is read from one device. A sharded one is
    assembled shard by shard (`addressable_shards`, each at its `index`),
    so no second whole copy exists on the host; a shard held by several
    devices is read once. When this process does not hold every shard (a
    model axis across processes) the shards are gathered with
    `process_allgather`, a collective: then every process must read the
    same variables in the same order.
    """
    array = variable.value
    tiles = None if array.is_fully_replicated else _tiles(array.addressable_shards, array.shape)
    if tiles is not None:
        return _assemble(tiles, array, out)
    view = (np.asarray(array) if array.is_fully_replicated or array.is_fully_addressable
            else np.asarray(multihost_utils.process_allgather(array, tiled=True)))
    if out is None:
        return np.array(view)
    np.copyto(out, view)
    return out


def assign_value(variable, value: np.ndarray) -> None:
    """Assigns the host array `value` to `variable`, each device receiving only its shard."""
    array = variable.value
    value = np.asarray(value).astype(array.dtype, copy=False)
    variable.assign(jax.make_array_from_callback(
        array.shape, array.sharding, lambda index: value[index]))


def _tiles(shards, shape: tuple[int, ...]) -> dict[tuple, Any] | None:
    """`shards` by the tile of the array they hold (the lowest replica of each), or None
    when they do not cover the whole array (part of it lives on other processes)."""
    tiles: dict[tuple, Any] = {}
    for shard in sorted(shards, key=lambda s: s.replica_id):
        tiles.setdefault(tuple(s.indices(n)[:2] for s, n in zip(shard.index, shape)), shard)
    covered = sum(math.prod(stop - start for start, stop in tile) for tile in tiles)
    return tiles if covered == math.prod(shape) else None


def _assemble(tiles: dict[tuple, Any], array, out: np.ndarray | None = None) -> np.ndarray:
    if out is None:
        out = np.empty(array.shape, array.dtype)
    for shard in tiles.values():
        out[shard.index] = np.asarray(shard.data)
    return out


def replica_values(variable) -> list[np.ndarray]:
    """Every replica's whole value of `variable` in this process, on the host.

    A sharded variable's replica is assembled from its shards.

    Raises:
        ValueError: no replica of `variable` is whole in this process.
    """
    array = variable.value
    if array.is_fully_replicated:
        return [np.asarray(shard.data) for shard in array.addressable_shards]
    replicas: dict[int, list[Any]] = {}
    for shard in array.addressable_shards:
        replicas.setdefault(shard.replica_id, []).append(shard)
    tiled = [_tiles(shards, array.shape) for shards in replicas.values()]
    values = [_assemble(tiles, array) for tiles in tiled if tiles is not None]
    if not values:
        raise ValueError(
            f"Variable {variable.path!r} is sharded across processes: no process holds "
            "all of it, so it cannot be read without a collective. Lay the model axis "
            "of the mesh out within each process (model_parallel() does by default)."
        )
    return values


def compile_function(fn):
    """`jax.jit(fn)`."""
    return jax.jit(fn)


# ActivationLogger's statistics program runs after the forward program.
STATISTICS_IN_FORWARD_GRAPH = False


def graph_function(fn):
    """`jax.jit(fn)`."""
    return jax.jit(fn)


def inner_xla_function(fn):
    """`jax.jit(fn)`: called inside another jitted function, it is inlined."""
    return jax.jit(fn)


def row_sums(values):
    """The sums of the rows of a (rows, n) float32 array: a reduction, JAX's fastest (CPU)."""
    return keras.ops.sum(values, axis=1)


def host_cpu_scope():
    """The context that places new arrays on the host CPU."""
    return jax.default_device(jax.local_devices(backend="cpu")[0])


def skipping_train_function(train_function: Callable, done_skipping: Callable[[], bool],
                            logs: dict, steps: int) -> Callable:
    """A JAX train function that skips steps (reads their batches) until `done_skipping()`."""

    def skipping(state, iterator):
        if done_skipping():
            return train_function(state, iterator)
        for _ in range(steps):  # one call runs `steps_per_execution` steps
            next(iterator)
        return logs, state

    return skipping

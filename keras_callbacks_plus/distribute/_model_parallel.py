"""Model parallelism: a twin whose variables are split over a mesh of devices (JAX only).

The successor of the Keras 2 device-parallel recipe (`with tf.device("/gpu:0"):
...` around parts of one model) is `keras.distribution.ModelParallel`: one
SPMD program over a `(data_parallel, model)` mesh, each variable laid out by
a `LayoutMap`. `model_parallel` makes such a twin of a single-device
template, as `data_parallel` does for replicas; the callbacks treat both
twins alike. What is backend-specific (the devices, the distribution, reading
and writing shards) is in `_jax.py` / `_tf.py`; on TensorFlow, which Keras 3
gives no model-parallel distribution, it raises.
"""

from __future__ import annotations

import math
import re
from typing import Any, Mapping, Sequence

import keras
import numpy as np

from keras_callbacks_plus import _base, _validate
from keras_callbacks_plus.distribute import _twin
from keras_callbacks_plus.distribute._devices import canonical_device, resolve_devices

# The mesh axes of a dict layout: Keras's default batch axis, and the one variables split over.
AXIS_NAMES = ("batch", "model")
# LayoutMap keys ending so lay out a layer's output, not a variable (Keras's convention).
_OUTPUT_SUFFIX = "/output"
_LISTED = 20  # variable paths shown at most in an error


def _distribute():
    # The package whose `_backend` is the Keras backend's module; imported
    # here, at call time, because it imports this module.
    from keras_callbacks_plus import distribute

    return distribute


def is_model_parallel(model: Any) -> bool:
    """Whether `model` is a `model_parallel` twin."""
    return isinstance(_base.twin_distribution(model), keras.distribution.ModelParallel)


def model_parallel(
    model: keras.Model,
    layout: keras.distribution.LayoutMap | Mapping[str, Sequence[Any]],
    devices: Sequence[Any] | None = None,
    data_parallel: int | None = None,
) -> keras.Model:
    """Returns a twin of `model` whose variables are sharded over a mesh of devices (JAX).

    The successor of Keras 2's device parallelism (`with tf.device("/gpu:0"):`
    around parts of a model), for a model that does not fit on one device or
    whose layers should run side by side. The twin has the architecture and
    weights of `model` (the template); `layout` says how its variables split
    over a `(data_parallel, model)` mesh: each variable is cut along the
    `"model"` axis as its layout says (or replicated), and each batch is cut
    along `"batch"`, so data and model parallelism combine. It is a
    `keras.distribution.ModelParallel`, entered by the twin's methods only:
    the template stays a plain single-device model. Compile and fit the twin
    as usual; `copy_weights` works both ways (it gathers shards into the
    template, and scatters the template into shards, each device receiving
    only its part). Every callback of this package works on it as on a
    `data_parallel` twin; ParallelModelCheckpoint saves the single-device
    template.

    After `multi_worker_strategy()` the mesh spans every process's devices,
    in process order, so that the model axis stays within a process when it
    fits (each process then holds whole replicas); each process passes its
    own share of the data, as with `data_parallel`.

    Args:
        model: a built Keras model (Functional, Sequential, or subclassed
            with `get_config()`).
        layout: how variables are split: a dict of variable-path regular
            expressions (full match, as in `LayoutMap`) to axis tuples, one
            entry per dimension, each `"model"`, `"batch"` or `None`
            (`{"dense_1/kernel": (None, "model")}`); or a
            `keras.distribution.LayoutMap`. A LayoutMap built on a
            `DeviceMesh` brings its own mesh, devices and axis names (the
            first axis splits batches). Keys ending in `"/output"` lay out a
            layer's output, as in Keras. Variables that no key matches are
            replicated.
        devices: device names (`"gpu:0"`, `"/cpu:1"`, ...) or device objects
            of the mesh. Defaults to `None`: every GPU (or TPU), else every CPU
            device (every process's after `multi_worker_strategy()`).
        data_parallel: the size of the mesh's batch axis; it must divide the
            number of devices, the rest forming the model axis. Defaults to
            `None`: 1, or the LayoutMap's mesh.

    Returns:
        The model-parallel twin, a new `keras.Model`.

    Raises:
        NotImplementedError: the backend is TensorFlow (Keras 3 has no
            supported model-parallel distribution there).
        ValueError: `model` is not built or is already a twin; a layout
            pattern matches no variable, or two patterns match one, or a
            layout does not fit its variable; the mesh does not fit the
            devices; `data_parallel` does not divide the device count.

    Example:

    ```python
    model = make_model()                                   # the template
    twin = model_parallel(model, {"dense_1/kernel": (None, "model")}, data_parallel=2)
    twin.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    twin.fit(x, y, epochs=10, batch_size=64)              # 64: the global batch
    copy_weights(twin, model)                              # gathers the shards
    model.save("my_model.keras")                           # loads on one device
    ```
    """
    distribute = _distribute()
    backend = distribute._backend
    available = backend.mesh_devices(None)  # TensorFlow: the clear error, first
    multi_worker = backend.multi_worker()
    _twin.check_template(model, "model_parallel()", "shard")
    patterns, mesh = _layouts_of(layout)
    if mesh is not None:
        for name, value in (("devices", devices), ("data_parallel", data_parallel)):
            if value is not None:
                raise ValueError(
                    f"Invalid value for argument {name}. The device_mesh of the LayoutMap "
                    f"passed as layout decides the mesh: leave {name} unset. "
                    f"Received: {name}={value!r}"
                )
        grid, axis_names = _mesh_grid(mesh, available), tuple(mesh.axis_names)
    else:
        if multi_worker is not None and devices is not None:
            raise ValueError(
                "Argument devices cannot be used after multi_worker_strategy(): the "
                f"multi-worker setup decides the devices. Received: devices={devices!r}"
            )
        chosen = available if devices is None else backend.mesh_devices(
            resolve_devices(devices, distribute.list_devices()))
        grid, axis_names = _grid(chosen, data_parallel), AXIS_NAMES
    _check_layouts(model, patterns, dict(zip(axis_names, grid.shape)))

    distribution = backend.model_parallel_distribution(grid, axis_names, patterns, axis_names[0])
    with distribution.scope():
        twin = _twin._clone(model, "model_parallel()")
    backend.prepare_twin(twin)
    _twin._bind_to_distribution(
        twin, distribution, backend.num_replicas(distribution), backend.guard_method
    )
    object.__setattr__(twin, _base.TWIN_ATTR, distribution)
    if distribute.num_workers() > 1:
        # As data_parallel: every process starts from the chief's weights.
        model.set_weights(distribute.broadcast_from_chief(model.get_weights()))
    copy_weights(model, twin)
    return twin


def copy_weights(source: keras.Model, target: keras.Model) -> None:
    """Copies every weight, trainable or not, from `source` to `target`.

    Works both ways between a twin and its template. Into a data-parallel
    twin each value goes to every replica; from a model-parallel twin each
    variable is gathered shard by shard, and into one each device receives
    only its shard, one variable at a time (the host holds one variable
    beside the models, not a copy of all weights). Afterwards the two models
    predict the same. With a model-parallel twin across processes, every
    process must call it.

    Args:
        source: the model to read weights from.
        target: a model of the same architecture to write them into.

    Raises:
        ValueError: the models' weights differ in number or shape.
    """
    transfer = None
    if is_model_parallel(source) or is_model_parallel(target):
        backend = _distribute()._backend

        def transfer(from_variable, to_variable):
            backend.assign_value(to_variable, backend.read_into(from_variable))

    _twin.copy_weights(source, target, transfer)


def _layouts_of(layout: Any) -> tuple[dict[str, tuple], Any]:
    """`{pattern: axes}` of a dict or LayoutMap, and the LayoutMap's mesh (or None)."""
    if isinstance(layout, keras.distribution.LayoutMap):
        patterns = {key: tuple(value.axes) for key, value in layout.items()}
        mesh = layout.device_mesh
    elif isinstance(layout, Mapping):
        patterns = {key: _axes(key, value) for key, value in layout.items()}
        mesh = None
    else:
        raise _validate.invalid(
            "layout", "a keras.distribution.LayoutMap or a dict of variable-path patterns to "
            "axis tuples, e.g. {'dense_1/kernel': (None, 'model')}", layout)
    if not patterns:
        raise _validate.invalid(
            "layout", "at least one pattern (a model without sharded variables is "
            "data_parallel()'s)", layout)
    for key in patterns:
        try:
            re.compile(key)
        except (TypeError, re.error) as error:
            raise ValueError(
                "Invalid value for argument layout. Expected regular expressions "
                f"(strings) as keys. Received: key {key!r} ({error})"
            ) from None
    return patterns, mesh


def _axes(key: Any, value: Any) -> tuple:
    if isinstance(value, keras.distribution.TensorLayout):
        return tuple(value.axes)
    entries = tuple(value) if isinstance(value, (tuple, list)) else None
    if entries is None or not all(
        e is None or isinstance(e, str)
        or isinstance(e, tuple) and all(isinstance(n, str) for n in e)
        for e in entries
    ):
        raise ValueError(
            "Invalid value for argument layout. Expected a tuple of mesh axis names or "
            f"None per dimension, e.g. (None, 'model'). Received: layout[{key!r}]={value!r}"
        )
    return entries


def _grid(devices: list[Any], data_parallel: int | None) -> np.ndarray:
    """`devices` as a `(data_parallel, model)` array, in order."""
    factor = 1 if data_parallel is None else data_parallel
    count = len(devices)
    if not _validate.is_int(factor, 1) or count % factor:
        names = ", ".join(str(canonical_device(d)) for d in devices)
        raise _validate.invalid(
            "data_parallel", f"a positive int that divides the number of devices ({count}: "
            f"{names})", data_parallel)
    return np.array(devices, dtype=object).reshape(int(factor), count // int(factor))


def _mesh_grid(mesh: Any, available: list[Any]) -> np.ndarray:
    """The devices of a LayoutMap's DeviceMesh, as device objects, checked against `available`."""
    if mesh is None:
        raise ValueError(
            "Invalid value for argument layout. Expected a LayoutMap built on a "
            "keras.distribution.DeviceMesh, or a dict. Received: a LayoutMap without device_mesh"
        )
    by_name = {canonical_device(d): d for d in available}
    names = [canonical_device(d) for d in np.asarray(mesh.devices).flat]
    if any(n not in by_name for n in names) or len(set(names)) != len(names):
        raise ValueError(
            "Invalid value for argument layout. Expected a LayoutMap whose device_mesh uses "
            f"devices that exist, each once (available: {', '.join(by_name)}). Received: "
            f"device_mesh of shape {tuple(mesh.shape)} over {', '.join(map(str, names))}"
        )
    return np.array([by_name[n] for n in names], dtype=object).reshape(tuple(mesh.shape))


def _check_layouts(model: keras.Model, patterns: dict[str, tuple],
                   axis_sizes: dict[str, int]) -> None:
    """Raises unless every pattern fits the mesh and the variables it matches, one each."""
    for key, axes in patterns.items():
        unknown = [n for e in axes if e is not None for n in ((e,) if isinstance(e, str) else e)
                   if n not in axis_sizes]
        if unknown:
            raise ValueError(
                f"Invalid value for argument layout. Expected axis names of the mesh "
                f"{tuple(axis_sizes)}. Received: layout[{key!r}]={axes!r}"
            )
    matched: dict[str, int] = {key: 0 for key in patterns}
    for variable in model.weights:
        path = variable.path
        hits = [path] if path in patterns else [k for k in patterns if re.fullmatch(k, path)]
        if len(hits) > 1:
            raise ValueError(
                "Invalid value for argument layout. Expected each variable path to match at "
                f"most one pattern. Received: patterns {hits} all match {path!r}"
            )
        for key in hits:
            matched[key] += 1
            _check_fits(key, patterns[key], variable, axis_sizes)
    unmatched = [k for k, n in matched.items() if not n and not k.endswith(_OUTPUT_SUFFIX)]
    if unmatched:
        paths = [v.path for v in model.weights]
        shown = ", ".join(paths[:_LISTED]) + (", ..." if len(paths) > _LISTED else "")
        raise ValueError(
            f"Invalid value for argument layout. Expected every pattern to match a variable "
            f"path of model {model.name!r} (or to end in {_OUTPUT_SUFFIX!r}, for a layer "
            f"output). Received: {unmatched[0]!r}, which matches none of: {shown}"
        )


def _check_fits(key: str, axes: tuple, variable: Any, axis_sizes: dict[str, int]) -> None:
    shape = tuple(variable.shape)
    if len(axes) != len(shape):
        raise ValueError(
            f"Invalid value for argument layout. Expected {len(shape)} axes for variable "
            f"{variable.path!r} of shape {shape}. Received: layout[{key!r}]={axes!r}"
        )
    for dim, (size, entry) in enumerate(zip(shape, axes)):
        names = () if entry is None else (entry,) if isinstance(entry, str) else entry
        parts = math.prod(axis_sizes[n] for n in names)
        if size % parts:
            raise ValueError(
                f"Invalid value for argument layout. Expected dimension {dim} of variable "
                f"{variable.path!r} (shape {shape}) to split evenly over mesh axis {entry!r} "
                f"of size {parts}. Received: layout[{key!r}]={axes!r}"
            )

"""Statistics of intermediate activations, per epoch, without disturbing training.

Keras 2 users read intermediate outputs with
`K.function([model.input, K.learning_phase()], [layer.output])`, evaluated in
learning phase 0 (test) or 1 (train). Keras 3 removed both, and calling a
model with `training=True` updates BatchNormalization moving statistics and
advances dropout seeds. Here the chosen layers are evaluated with
`Model.stateless_call`: the model's variable values go in, the updates come
back and are dropped, so nothing the model holds changes.

* `intermediate_outputs(model, layers, x, training=False)`: the outputs of
  some layers as NumPy arrays (the successor of the `K.function` recipe).
* `ActivationLogger`: a callback that streams a fixed probe through the chosen
  layers every few epochs, in test and/or train phase, and records
  statistics and histograms to HDF5, TensorBoard and the epoch logs.
* `read_activation_log(path)`: an HDF5 log as NumPy arrays.

Statistics stream over the probe's batches; the host keeps a fixed-size
summary per layer and phase, so memory does not grow with the probe (beyond
one batch) or with the epochs. Mean and standard deviation come from float32
sums of values and squares over rows of 1024 values, merged in float64 (Chan
et al.): the variance's relative error is about 1e-7 * (mean / std)**2, so
negligible unless |mean| is hundreds of times std. Min, max, the zero and
non-finite counts and the histogram are exact. The histogram's edges are fixed at the first logged
epoch, as `(k + j) * 2**e` covering its range; later values outside them
are counted as underflow and overflow.

Percentiles come from a quantile sketch with a bucket per sign, binary
exponent and top 7 mantissa bits of each float32 value (as HDR histograms
do), so its bucket boundaries are exact. Every value `v` with
`2**-30 <= |v| < 2**41` is represented within 1/256 (0.39%) of itself; smaller
magnitudes (except exact zeros, which have their own bucket) within 2**-30.
A percentile is interpolated between the two ranks around it, as NumPy's
default `linear` method does, so it is within 0.39% of the larger of those
two values of `numpy.percentile` on the same data; it is clipped to the exact
min and max.
"""

from __future__ import annotations

import datetime
import fnmatch
import importlib.metadata
import json
import logging
import math
import os
import sys
import time
import warnings
import weakref
from pathlib import Path
from typing import Any, Iterator, Mapping, NamedTuple, Sequence

import h5py
import keras
import numpy as np

from keras_callbacks_plus import distribute
from keras_callbacks_plus._base import PlusCallback

__all__ = ["ActivationLogger", "intermediate_outputs", "layer_paths", "read_activation_log"]

logger = logging.getLogger(__name__)

PHASES = ("test", "train")
STATISTICS = ("mean", "std", "min", "max", "zero_frac", "nonfinite_frac")
_DEFAULT_SCALARS = ("mean", "std", "zero_frac", "nonfinite_frac")
_FORMAT = "keras_callbacks_plus.activation_log"
_FORMAT_VERSION = 1

# The quantile sketch: a bucket per sign, binary exponent and top
# `_MANTISSA_BITS` mantissa bits of a float32, for magnitudes from 2**-30 to
# 2**41 (smaller ones share the lowest bucket, larger ones the highest).
_MANTISSA_BITS = 7
_TOP_LOW = (127 - 30) << _MANTISSA_BITS
_TOP_HIGH = ((127 + 40) << _MANTISSA_BITS) | ((1 << _MANTISSA_BITS) - 1)
_TOP_NONFINITE = 255 << _MANTISSA_BITS
_MAGNITUDES = _TOP_HIGH - _TOP_LOW + 1
# Ordered buckets: negatives (largest magnitude first), zero, positives.
_SKETCH_SIZE = 2 * _MAGNITUDES + 1
_TOPS = np.arange(_TOP_LOW, _TOP_HIGH + 1)
_REPRESENTATIVES = np.ldexp(
    1.0 + ((_TOPS & ((1 << _MANTISSA_BITS) - 1)) + 0.5) / (1 << _MANTISSA_BITS),
    (_TOPS >> _MANTISSA_BITS) - 127,
)
_SKETCH_VALUES = np.concatenate([-_REPRESENTATIVES[::-1], [0.0], _REPRESENTATIVES])
# Values per row of the device-side summary (see _summarize).
_ROW = 1024

# How long a write waits for a reader that holds the HDF5 file (HDF5 locks it).
_LOCK_WAIT_S = 2.0
_LOCK_WAIT_AT_END_S = 10.0


# ---------------------------------------------------------------- layers


def _is_graph_model(layer: Any) -> bool:
    """A Functional or Sequential model, whose inner layers have symbolic outputs."""
    if not isinstance(layer, keras.Model):
        return False
    try:
        return layer.outputs is not None and layer.inputs is not None
    except (AttributeError, ValueError):
        return False


def _walk(model: keras.Model, prefix: str = "") -> Iterator[tuple[str, keras.layers.Layer]]:
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        path = prefix + layer.name
        yield path, layer
        if _is_graph_model(layer):
            yield from _walk(layer, path + "/")


def layer_paths(model: keras.Model) -> list[str]:
    """Every layer of `model` as a path, nested models included (`"backbone/conv_1"`)."""
    _check_model(model)
    return [path for path, _ in _walk(model)]


def _check_model(model: Any) -> None:
    if not isinstance(model, keras.Model):
        raise TypeError(f"Expected a keras.Model. Received: {type(model).__name__}")
    if not _is_graph_model(model):
        raise ValueError(
            f"Model {model.name!r} has no symbolic layer outputs: intermediate "
            "activations need a Functional or Sequential model (a subclassed "
            "model can be used as a layer inside one), built with an Input."
        )


def _listing(paths: Sequence[str], limit: int = 60) -> str:
    shown = ", ".join(paths[:limit])
    return shown + (f", ... ({len(paths) - limit} more)" if len(paths) > limit else "")


def _select(model: keras.Model, layers: str | Sequence[str] | None) -> list[str]:
    """Layer paths chosen by names, glob patterns or paths, in model order."""
    _check_model(model)
    available = list(_walk(model))
    paths = [path for path, _ in available]
    if layers is None:
        return [path for path, layer in available if not _is_graph_model(layer)]
    patterns = [layers] if isinstance(layers, str) else list(layers)
    chosen = set()
    for pattern in patterns:
        hits = [
            path
            for path in paths
            if fnmatch.fnmatchcase(path, pattern)
            or ("/" not in pattern and fnmatch.fnmatchcase(path.rsplit("/", 1)[-1], pattern))
        ]
        if not hits:
            raise ValueError(
                f"No layer of model {model.name!r} matches {pattern!r}. Use layer "
                "names, glob patterns or paths in nested models "
                f"('backbone/block_3*'). Available layers: {_listing(paths)}."
            )
        chosen.update(hits)
    return [path for path in paths if path in chosen]


def _io(model: keras.Model):
    """The symbolic input and output structures of a graph model."""
    if isinstance(model, keras.Sequential):
        return model.inputs[0], model.outputs[0]
    return model.input, model.output


def _retrace(model: keras.Model, wanted: Sequence[str]):
    """Calls `model`'s layers again on new Inputs; returns (inputs, outputs, {path: tensor}).

    A nested model is replaced by a Functional over its own layers that also
    returns the wanted inner outputs, so that they become tensors of the
    outer graph. Layers are shared, never copied.
    """
    captured: dict[str, Any] = {}
    direct = set(wanted)
    deeper: dict[str, list[str]] = {}
    for path in wanted:
        head, _, rest = path.partition("/")
        if rest:
            deeper.setdefault(head, []).append(rest)

    def call(layer, *args, **kwargs):
        inner = deeper.get(layer.name)
        if inner:
            _, own = _io(layer)
            sub_inputs, sub_outputs, sub_captured = _retrace(layer, inner)
            n_own = len(keras.tree.flatten(own))
            extended = keras.Model(
                sub_inputs,
                [*keras.tree.flatten(sub_outputs), *(sub_captured[p] for p in inner)],
            )
            results = extended(*args, **kwargs)
            outputs = keras.tree.pack_sequence_as(own, list(results[:n_own]))
            for path, tensor in zip(inner, results[n_own:]):
                captured.setdefault(f"{layer.name}/{path}", tensor)
        else:
            outputs = layer(*args, **kwargs)
        if layer.name in direct:
            captured.setdefault(layer.name, outputs)
        return outputs

    inputs, outputs = _io(model)
    shell = keras.Model(inputs, outputs)  # uncompiled, so its clone is not compiled either
    clone = keras.models.clone_model(shell, clone_function=lambda layer: layer, call_function=call)
    return clone.input, clone.output, captured


def _build_extractor(model: keras.Model, paths: Sequence[str]) -> tuple[keras.Model, list[str]]:
    """A Functional from `model`'s inputs to the outputs of `paths`, and their names."""
    by_path = dict(_walk(model))
    inputs, _ = _io(model)
    tensors = None
    if all("/" not in p and not _is_graph_model(by_path[p]) for p in paths):
        # The model's own graph, so its layers get no new inbound nodes. A
        # layer first called in another model has its output elsewhere.
        tensors = {p: by_path[p].output for p in paths}
        try:
            keras.Model(inputs, [keras.tree.flatten(t) for t in tensors.values()])
        except ValueError:
            tensors = None
    if tensors is None:
        inputs, _, tensors = _retrace(model, paths)
        missing = [p for p in paths if p not in tensors]
        if missing:
            raise ValueError(
                f"Layers {missing} of model {model.name!r} are not called in its graph, "
                "so they have no output to log."
            )
    outputs, names = [], []
    for path in paths:
        leaves = keras.tree.flatten(tensors[path])
        outputs += leaves
        names += [path] if len(leaves) == 1 else [f"{path}:{i}" for i in range(len(leaves))]
    return keras.Model(inputs, outputs, name=f"{model.name}_activations"), names


# ------------------------------------------------------------ evaluation


def _summarize(outputs, edges):
    """Per-batch summary of all outputs at once, on the device (keras.ops only).

    The outputs are flattened into rows of `_ROW` values (a layer's last row
    padded with copies of its first value), so that a fixed number of
    operations serves any number of layers: XLA compiles one reduction per
    layer slowly. Per row: sum, sum of squares, min and max, over all values
    (fast) or, if some value is not finite, over the finite ones. Per
    output: the quantile sketch and the histogram over `edges` (one row of
    `bins + 1` edges per output, multiples of a power of two), both by
    integer keys, so bucket boundaries are exact.
    """
    ops = keras.ops
    rows, layer_of_row, valid_of_row = [], [], []
    for i, y in enumerate(outputs):
        size = int(np.prod(y.shape))
        count = -(-size // _ROW)
        flat = ops.reshape(ops.cast(y, "float32"), (-1,))
        if count * _ROW > size:
            start = (count - 1) * _ROW
            flat = ops.concatenate(
                [flat, ops.broadcast_to(flat[start:start + 1], (count * _ROW - size,))]
            )
        rows.append(ops.reshape(flat, (count, _ROW)))
        layer_of_row.append(ops.full((count,), i, "int32"))
        valid_of_row.append(ops.minimum(_ROW, size - _ROW * ops.arange(count, dtype="int32")))
    x = ops.concatenate(rows, axis=0)
    layer = ops.concatenate(layer_of_row)
    valid = ops.concatenate(valid_of_row)
    inside = ops.expand_dims(ops.arange(_ROW, dtype="int32"), 0) < ops.expand_dims(valid, 1)

    def plain():  # the padding copies a row's first value: corrected on the host
        return (ops.sum(x, axis=1), ops.sum(ops.square(x), axis=1),
                ops.min(x, axis=1), ops.max(x, axis=1))

    def masked():
        keep = ops.logical_and(ops.isfinite(x), inside)
        safe = ops.where(keep, x, 0.0)
        return (ops.sum(safe, axis=1), ops.sum(ops.square(safe), axis=1),
                ops.min(ops.where(keep, x, np.inf), axis=1),
                ops.max(ops.where(keep, x, -np.inf), axis=1))

    # A row sum is finite unless the row holds a non-finite value (or overflows).
    all_finite = ops.all(ops.isfinite(ops.sum(x, axis=1)))
    row_sum, row_squares, row_min, row_max = ops.cond(all_finite, plain, masked)
    summary = {
        "layer": layer, "valid": valid, "first": x[:, 0], "masked": ops.logical_not(all_finite),
        "sum": row_sum, "squares": row_squares, "min": row_min, "max": row_max,
    }
    # Sketch key from the float's bits: sign, exponent and the top mantissa bits.
    magnitude = ops.bitwise_and(ops.view(x, "int32"), 0x7FFFFFFF)
    top = ops.right_shift(magnitude, 23 - _MANTISSA_BITS)
    index = ops.clip(top, _TOP_LOW, _TOP_HIGH) - _TOP_LOW
    key = ops.where(ops.view(x, "int32") < 0, _MAGNITUDES - 1 - index, _MAGNITUDES + 1 + index)
    key = ops.where(ops.equal(magnitude, 0), _MAGNITUDES, key)
    dropped = ops.logical_or(top >= _TOP_NONFINITE, ops.logical_not(inside))
    key = ops.where(dropped, _SKETCH_SIZE, key)
    offset = ops.expand_dims(layer, 1)
    key = ops.reshape(key + offset * (_SKETCH_SIZE + 1), (-1,))
    summary["sketch"] = ops.segment_sum(
        ops.ones_like(key), key, num_segments=len(outputs) * (_SKETCH_SIZE + 1)
    )
    # Edges are (first + j) * width with width a power of two, so
    # floor(x / width) is exact. Slot 0: below the first edge; 1..bins: the
    # bins; bins + 1: above the last edge (the last bin is closed).
    bins = edges.shape[1] - 1
    width = edges[:, 1] - edges[:, 0]
    first = ops.expand_dims(ops.take(edges[:, 0] / width, layer), 1)
    scale = ops.expand_dims(ops.take(1.0 / width, layer), 1)
    slot = ops.clip(ops.floor(x * scale), first - 1, first + bins) - first + 1
    slot = ops.cast(slot, "int32")
    slot = ops.where(ops.equal(x, ops.expand_dims(ops.take(edges[:, -1], layer), 1)), bins, slot)
    slot = ops.where(dropped, bins + 2, slot)
    slot = ops.reshape(slot + offset * (bins + 3), (-1,))
    summary["histogram"] = ops.segment_sum(
        ops.ones_like(slot), slot, num_segments=len(outputs) * (bins + 3)
    )
    return summary


class _Stats:
    """Streaming statistics of several outputs over batches; fixed size."""

    def __init__(self, outputs: int):
        self.outputs = outputs
        self.total = np.zeros(outputs, np.int64)
        self.count = np.zeros(outputs, np.int64)
        self.mean = np.zeros(outputs, np.float64)
        self.m2 = np.zeros(outputs, np.float64)
        self.low = np.full(outputs, np.inf)
        self.high = np.full(outputs, -np.inf)
        self.sketch = np.zeros((outputs, _SKETCH_SIZE), np.int64)
        self.histogram: np.ndarray | None = None

    def add(self, summary: Mapping[str, np.ndarray]) -> None:
        layer, n = summary["layer"], self.outputs

        def per_output(values):
            return np.bincount(layer, weights=np.asarray(values, np.float64), minlength=n)

        sketch = summary["sketch"].reshape(n, -1)[:, :_SKETCH_SIZE]
        count = sketch.sum(axis=1)
        sums, squares = per_output(summary["sum"]), per_output(summary["squares"])
        if not summary["masked"]:
            # Remove the padding: copies of the first value of each output's last row.
            padding = per_output(_ROW - summary["valid"])
            last = np.searchsorted(layer, np.arange(n), side="right") - 1
            value = summary["first"][last].astype(np.float64)
            sums -= padding * value
            squares -= padding * value * value
        mean = sums / np.maximum(count, 1)
        m2 = np.maximum(squares - count * mean * mean, 0.0)
        # This batch merges with the previous ones (Chan et al.).
        merged = self.count + count
        delta = mean - self.mean
        weight = np.divide(count, merged, out=np.zeros(n), where=merged > 0)
        self.m2 += m2 + delta**2 * self.count * weight
        self.mean += delta * weight
        self.count = merged
        self.total += per_output(summary["valid"]).astype(np.int64)
        np.minimum.at(self.low, layer, summary["min"].astype(np.float64))
        np.maximum.at(self.high, layer, summary["max"].astype(np.float64))
        self.sketch += sketch
        if "histogram" in summary:
            histogram = summary["histogram"].reshape(n, -1)[:, :-1].astype(np.int64)
            self.histogram = histogram if self.histogram is None else self.histogram + histogram

    def percentiles(self, i: int, levels: Sequence[float]) -> np.ndarray:
        n, low, high = int(self.count[i]), self.low[i], self.high[i]
        if not n:
            return np.full(len(levels), np.nan)
        ranks = (n - 1) * np.asarray(levels, np.float64) / 100.0
        below = np.floor(ranks).astype(np.int64)
        above = np.minimum(below + 1, n - 1)
        cumulative = np.cumsum(self.sketch[i])

        def value(rank):
            found = np.clip(_SKETCH_VALUES[np.searchsorted(cumulative, rank, side="right")],
                            low, high)
            return np.where(rank == 0, low, np.where(rank == n - 1, high, found))

        low_values = value(below)
        return low_values + (ranks - below) * (value(above) - low_values)

    def result(self, i: int, levels: Sequence[float]) -> dict[str, Any]:
        """The statistics of output `i` as a dict of floats and arrays."""
        count, total = int(self.count[i]), max(int(self.total[i]), 1)
        finite = count > 0
        result = {
            "count": int(self.total[i]),
            "mean": float(self.mean[i]) if finite else math.nan,
            "std": math.sqrt(max(self.m2[i], 0.0) / count) if finite else math.nan,
            "min": float(self.low[i]) if finite else math.nan,
            "max": float(self.high[i]) if finite else math.nan,
            "zero_frac": int(self.sketch[i, _MAGNITUDES]) / total,
            "nonfinite_frac": (int(self.total[i]) - count) / total,
            "percentiles": self.percentiles(i, levels),
        }
        if self.histogram is not None:
            result["underflow"] = int(self.histogram[i, 0])
            result["histogram"] = self.histogram[i, 1:-1].copy()
            result["overflow"] = int(self.histogram[i, -1])
        return result


def _fixed_edges(low: float, high: float, bins: int) -> np.ndarray:
    """`bins + 1` edges `(first + j) * width` covering [low, high], width a power of two.

    Power-of-two widths make a value's bin exact in float32 arithmetic on the
    device. The bins are at most about twice as wide as a tight fit; the span
    is at least 1e-4 of the largest magnitude.
    """
    if not (math.isfinite(low) and math.isfinite(high)):
        low, high = -1.0, 1.0
    span = max(high - low, 1e-4 * max(abs(low), abs(high)), 2.0**-60)
    exponent = math.floor(math.log2(span / bins))
    while True:
        width = 2.0**exponent
        first = math.floor(low / width)
        if (first + bins) * width >= high:
            break
        exponent += 1
    return (first + np.arange(bins + 1, dtype=np.float64)) * width


def _aligned(edges: Sequence[float], bins: int) -> bool:
    """Whether `edges` are `bins + 1` edges as `_fixed_edges` makes them."""
    edges = np.asarray(edges, np.float64)
    if edges.shape != (bins + 1,) or not np.all(np.isfinite(edges)):
        return False
    width = edges[1] - edges[0]
    first = edges[0] / width
    return (width > 0 and math.frexp(width)[0] == 0.5 and first == math.floor(first)
            and np.array_equal(edges, (first + np.arange(bins + 1)) * width))


class _Evaluator:
    """Runs the chosen layers of a model statelessly, compiled once per phase."""

    def __init__(self, model: keras.Model, paths: Sequence[str]):
        self.paths = list(paths)
        self.extractor, self.names = _build_extractor(model, paths)
        self._functions: dict[tuple[bool, bool], Any] = {}

    def _function(self, training: bool, summarize: bool):
        key = (training, summarize)
        if key not in self._functions:
            extractor = self.extractor

            def run(trainable, non_trainable, x, edges):
                outputs, non_trainable = extractor.stateless_call(
                    trainable, non_trainable, x, training=training
                )
                outputs = keras.tree.flatten(outputs)
                if not summarize:
                    return outputs, non_trainable
                return _summarize(outputs, edges), non_trainable

            self._functions[key] = distribute.compile_function(run)
        return self._functions[key]

    def state(self, model: keras.Model):
        """The current values of the extractor's variables, without copying where possible.

        A data-parallel twin's variables live on several devices (and maybe
        workers); this worker's first replica is read to the host, so the
        evaluation runs on one device and involves no collective.
        """
        local = distribute.num_replicas(model) > 1 or distribute.num_workers() > 1

        def values(variables):
            if local:
                return [keras.ops.convert_to_tensor(distribute.local_value(v)) for v in variables]
            return [keras.ops.convert_to_tensor(v) for v in variables]

        return (values(self.extractor.trainable_variables),
                values(self.extractor.non_trainable_variables))

    def outputs(self, model, x, training: bool) -> list[np.ndarray]:
        trainable, non_trainable = self.state(model)
        outputs, _ = self._function(training, False)(trainable, non_trainable, x, None)
        return [keras.ops.convert_to_numpy(y) for y in outputs]

    def statistics(self, model, batches, training: bool, edges: np.ndarray,
                   keep_histogram: bool = True) -> _Stats:
        """Streams `batches` through the layers; `edges` has shape `(outputs, bins + 1)`.

        With `keep_histogram=False` the edges are placeholders (the first
        pass, which finds the range) and the histogram is dropped; the same
        compiled function serves both passes.
        """
        trainable, non_trainable = self.state(model)
        function = self._function(training, True)
        edges = keras.ops.convert_to_tensor(np.asarray(edges, np.float32))
        stats = _Stats(len(self.names))
        for x in batches:
            # Seed states move on from batch to batch, as in a real epoch;
            # the updates are dropped after the probe.
            summary, non_trainable = function(trainable, non_trainable, x, edges)
            summary = {k: keras.ops.convert_to_numpy(v) for k, v in summary.items()}
            if not keep_histogram:
                summary.pop("histogram")
            stats.add(summary)
        return stats


# model -> {layer paths: _Evaluator}; one compiled evaluator per selection.
_evaluators: "weakref.WeakKeyDictionary[keras.Model, dict]" = weakref.WeakKeyDictionary()


def _evaluator(model: keras.Model, paths: Sequence[str]) -> _Evaluator:
    cache = _evaluators.setdefault(model, {})
    key = tuple(paths)
    if key not in cache:
        cache[key] = _Evaluator(model, paths)
    return cache[key]


# ----------------------------------------------------------------- probe


class _Probe:
    """The fixed inputs streamed through the layers, one batch at a time."""

    def __init__(self, probe: Any, batch_size: int):
        self.batch_size = batch_size
        self.kind = "arrays"
        if isinstance(probe, keras.utils.PyDataset):
            if probe.num_batches is None:
                raise ValueError(
                    "Invalid value for argument probe. Expected a PyDataset with a "
                    "bounded number of batches (num_batches is None)."
                )
            self.kind, self.data = "pydataset", probe
        elif hasattr(probe, "cardinality") and hasattr(probe, "element_spec"):
            if int(probe.cardinality()) == -1:  # tf.data.INFINITE_CARDINALITY
                raise ValueError(
                    "Invalid value for argument probe. Expected a dataset with a "
                    "bounded number of batches; this one repeats forever. Use "
                    "dataset.take(n)."
                )
            self.kind, self.data = "dataset", probe
        elif not (isinstance(probe, (list, tuple, dict)) or hasattr(probe, "shape")):
            raise ValueError(
                "Invalid value for argument probe. Expected an array, a tuple or "
                "dict of arrays (multi-input models), a tf.data.Dataset or a "
                "keras.utils.PyDataset with a bounded number of batches; the same "
                f"probe is used every epoch. Received: probe of type {type(probe).__name__}"
            )
        else:
            self.data = keras.tree.map_structure(np.asarray, probe)
            leaves = keras.tree.flatten(self.data)
            rows = {leaf.shape[0] if leaf.ndim else None for leaf in leaves}
            if not leaves or None in rows or len(rows) != 1 or 0 in rows:
                raise ValueError(
                    "Invalid value for argument probe. Expected arrays with the "
                    "same, non-zero number of samples along their first axis. "
                    f"Received shapes: {[leaf.shape for leaf in leaves]}"
                )
            self.samples = rows.pop()

    def batches(self) -> Iterator[Any]:
        if self.kind == "arrays":
            for start in range(0, self.samples, self.batch_size):
                yield keras.tree.map_structure(
                    lambda a: a[start:start + self.batch_size], self.data
                )
            return
        items = (
            (self.data[i] for i in range(self.data.num_batches))
            if self.kind == "pydataset"
            else iter(self.data)
        )
        for item in items:
            x, _, _ = keras.utils.unpack_x_y_sample_weight(item)
            yield keras.tree.map_structure(np.asarray, x)

    def first(self) -> Any:
        for x in self.batches():
            return x
        raise ValueError("Invalid value for argument probe. It yields no batch.")

    def describe(self) -> str:
        if self.kind == "arrays":
            shapes = [tuple(leaf.shape) for leaf in keras.tree.flatten(self.data)]
            return f"arrays {shapes} in batches of {self.batch_size}"
        return type(self.data).__name__


def _check_fits(model: keras.Model, x: Any) -> None:
    """Raises if the probe batch `x` does not fit the model's inputs."""
    specs = list(model.inputs)
    if isinstance(x, Mapping):
        missing = [t.name for t in specs if t.name not in x]
        if missing:
            raise ValueError(
                f"The probe does not fit model {model.name!r}: it has keys "
                f"{sorted(x)}, the model's inputs are named {[t.name for t in specs]}."
            )
        pairs = [(t, x[t.name]) for t in specs]
    else:
        leaves = keras.tree.flatten(x)
        if len(leaves) != len(specs):
            raise ValueError(
                f"The probe does not fit model {model.name!r}: it gives "
                f"{len(leaves)} array(s), the model has {len(specs)} input(s) "
                f"{[t.name for t in specs]}."
            )
        pairs = list(zip(specs, leaves))
    for spec, array in pairs:
        expected, shape = tuple(spec.shape), tuple(np.shape(array))
        if len(expected) != len(shape) or any(
            e is not None and e != s for e, s in zip(expected, shape)
        ):
            raise ValueError(
                f"The probe does not fit model {model.name!r}: input {spec.name!r} "
                f"expects shape {expected}, the probe's batch has shape {shape}."
            )


def intermediate_outputs(
    model: keras.Model,
    layers: str | Sequence[str] | None,
    x: Any,
    training: bool = False,
) -> dict[str, np.ndarray]:
    """Returns the outputs of some layers of `model` for the inputs `x`.

    The successor of Keras 2's
    `K.function([model.input, K.learning_phase()], [layer.output])([x, phase])`,
    without side effects: with `training=True` dropout is on and
    BatchNormalization normalizes with the batch statistics, but no moving
    statistic, seed or other variable of `model` changes (the layers run
    through `stateless_call` and their updates are dropped). `x` is
    evaluated as one batch.

    Args:
        model: a built Functional or Sequential model (nested models inside
            it are fine).
        layers: a layer name, glob pattern (`"conv*"`) or path in nested
            models (`"backbone/block_3*"`), or a list of those; a name without
            `/` also matches layers of nested models. `None` selects every
            layer with an output except Input layers and the nested models
            themselves.
        x: inputs as the model takes them: an array, or a list or dict of
            arrays for a multi-input model.
        training: `False` for test phase (learning phase 0), `True` for train
            phase (learning phase 1). Defaults to `False`.

    Returns:
        `{layer path: numpy array}` in model order. A layer with several
        outputs gives one entry per output, `"<path>:<index>"`.

    Raises:
        ValueError: no layer matches a pattern (the message lists the
            layers), or `x` does not fit the model's inputs.

    Example:

    >>> import keras, numpy as np
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="d"),
    ...                           keras.layers.Dropout(0.5, name="drop")])
    >>> out = intermediate_outputs(model, ["d", "drop"], np.ones((2, 4)), training=True)
    >>> sorted(out), out["d"].shape
    (['d', 'drop'], (2, 3))
    """
    paths = _select(model, layers)
    x = keras.tree.map_structure(np.asarray, x)
    _check_fits(model, x)
    evaluator = _evaluator(model, paths)
    return dict(zip(evaluator.names, evaluator.outputs(model, x, bool(training))))


# --------------------------------------------------------------- writers


class _Record(NamedTuple):
    """The statistics of one output in one phase at one logged epoch."""

    phase: str
    name: str
    shape: tuple
    result: dict[str, Any]
    edges: np.ndarray


def _versions() -> dict[str, str]:
    found = {"python": sys.version.split()[0]}
    for name in ("keras", "numpy", "h5py", "tensorflow", "tensorflow-cpu", "jax", "jaxlib"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    try:
        from keras_callbacks_plus import __version__

        found["keras_callbacks_plus"] = __version__
    except ImportError:
        pass
    return found


def _open_h5(path: str | os.PathLike, mode: str, wait: float) -> h5py.File:
    """Opens `path`, waiting up to `wait` seconds while another process holds it.

    HDF5 locks a file while it is open: a reader blocks the writer and the
    other way round. Writer and readers here keep it open only briefly.
    """
    deadline = time.monotonic() + wait
    delay = 0.01
    while True:
        try:
            return h5py.File(path, mode)
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(delay)
            delay = min(2 * delay, 0.2)


def _group_name(path: str) -> str:
    return path.replace("/", "|")


class _H5Log:
    """One run of an HDF5 activation log, written by reopening the file per epoch.

    Closing the file after each epoch flushes it and releases HDF5's lock,
    so another process can read it while training runs. Records that cannot
    be written because a reader holds the file stay pending until the next
    write.
    """

    def __init__(self, path: str | os.PathLike, run_attrs: dict[str, Any], resume: str | None):
        self.path = Path(path)
        # Each layer group repeats these, so that a group read alone says what made it.
        self.layer_attrs = {k: run_attrs[k] for k in ("backend", "versions", "percentile_levels")}
        self.pending: list[tuple[int, list]] = []
        self._warned = False
        parent = self.path.parent
        if not parent.is_dir():
            raise ValueError(
                f"Invalid value for argument h5_path. Its folder {str(parent)!r} "
                f"does not exist. Received: h5_path={str(path)!r}"
            )
        try:
            with _open_h5(self.path, "a", _LOCK_WAIT_S) as f:
                if f.attrs.get("format") != _FORMAT:
                    if len(f) or len(f.attrs):
                        raise ValueError(
                            f"Invalid value for argument h5_path. {str(path)!r} is an "
                            "HDF5 file but not an activation log; ActivationLogger "
                            "never overwrites a file. Choose another path."
                        )
                    f.attrs["format"] = _FORMAT
                    f.attrs["format_version"] = _FORMAT_VERSION
                if resume is not None and resume in f:
                    self.run = resume
                else:
                    taken = [int(k[4:]) for k in f if k.startswith("run_") and k[4:].isdigit()]
                    self.run = f"run_{max(taken, default=-1) + 1:03d}"
                    group = f.create_group(self.run)
                    for key, value in run_attrs.items():
                        group.attrs[key] = value
        except ValueError:
            raise
        except OSError as error:
            raise ValueError(
                f"Invalid value for argument h5_path. Cannot write the activation "
                f"log {str(path)!r}: {error}"
            ) from error

    def append(self, epoch: int, records: list[_Record]) -> None:
        self.pending.append((epoch, records))
        self.flush(_LOCK_WAIT_S)

    def flush(self, wait: float) -> None:
        """Writes the pending records; keeps them if a reader holds the file longer than `wait`."""
        if not self.pending:
            return
        try:
            with _open_h5(self.path, "a", wait) as f:
                run = f[self.run]
                for epoch, records in self.pending:
                    for record in records:
                        self._write(run, epoch, record)
            self.pending.clear()
        except BlockingIOError:
            if not self._warned:
                warnings.warn(
                    f"ActivationLogger: {str(self.path)!r} is held open by another "
                    "process; its records are kept and written at the next epoch. "
                    "Read it with read_activation_log(), which closes it quickly.",
                    stacklevel=3,
                )
                self._warned = True

    def _write(self, run, epoch: int, record: _Record) -> None:
        group = run.require_group(record.phase)
        key = _group_name(record.name)
        if key not in group:
            g = group.create_group(key)
            g.attrs.update(self.layer_attrs)
            g.attrs["layer_path"] = record.name
            g.attrs["phase"] = record.phase
            g.attrs["output_shape"] = [-1 if d is None else d for d in record.shape]
            g.attrs["bin_edges"] = record.edges
            bins, levels = len(record.edges) - 1, len(self.layer_attrs["percentile_levels"])
            for field, dtype, width in (
                ("epoch", np.int64, None),
                ("count", np.int64, None),
                *((s, np.float64, None) for s in STATISTICS),
                ("percentiles", np.float64, levels),
                ("histogram", np.int64, bins),
                ("underflow", np.int64, None),
                ("overflow", np.int64, None),
            ):
                shape = (0,) if width is None else (0, width)
                g.create_dataset(field, shape=shape, maxshape=(None, *shape[1:]),
                                 dtype=dtype, chunks=(64, *shape[1:]))
        g = group[key]
        row = g["epoch"].shape[0]
        values = {"epoch": epoch, **record.result}
        for field, dataset in g.items():
            dataset.resize(row + 1, axis=0)
            dataset[row] = values[field]


class _TensorBoardWriter:
    """Activation histograms in TensorBoard's format, through tf.summary."""

    def __init__(self, logdir: str | os.PathLike):
        first_import = "tensorflow" not in sys.modules
        import tensorflow as tf

        if first_import:
            # Imported only to write summaries (JAX backend): keep TF off the GPUs.
            try:
                tf.config.set_visible_devices([], "GPU")
            except RuntimeError:
                pass
        self._tf = tf
        self._writer = tf.summary.create_file_writer(str(logdir))
        metadata = tf.compat.v1.SummaryMetadata()
        metadata.plugin_data.plugin_name = "histograms"
        self._metadata = metadata.SerializeToString()

    def write(self, epoch: int, records: list[_Record]) -> None:
        tf = self._tf
        with self._writer.as_default():
            for phase, name, _, result, edges in records:
                rows = [[l, r, c] for l, r, c in zip(edges[:-1], edges[1:], result["histogram"])]
                if result["underflow"]:
                    rows.insert(0, [result["min"], edges[0], result["underflow"]])
                if result["overflow"]:
                    rows.append([edges[-1], result["max"], result["overflow"]])
                tf.summary.write(
                    f"activations_{phase}/{name}",
                    tf.constant(rows, tf.float64),
                    step=epoch,
                    metadata=self._metadata,
                )
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


# -------------------------------------------------------------- callback


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(
            f"Invalid value for argument {name}. Expected an int >= {minimum}. "
            f"Received: {name}={value!r}"
        )
    return int(value)


def _level_name(level: float) -> str:
    return f"p{level:g}"


class ActivationLogger(PlusCallback):
    """Logs statistics of intermediate activations every few epochs, with no effect on training.

    At the end of every `every`-th epoch, the probe goes through the chosen
    layers, batch by batch, in each phase: `"test"` (dropout off,
    BatchNormalization with its moving statistics; learning phase 0 in
    Keras 2) and/or `"train"` (dropout on, batch statistics; learning phase
    1). The layers run through `stateless_call` and their updates are
    dropped: no weight, moving statistic, optimizer variable or seed changes,
    so training with the logger gives the same weights as without it.

    Per layer and phase it records the mean, standard deviation, min, max,
    `percentiles`, the fraction of exact zeros (dead units) and of non-finite
    values, and a histogram over `bins` fixed bins. The edges are set at the
    first logged epoch to cover its min and max (multiples of a power of two,
    at most about twice as wide as a tight fit) and kept, so epochs compare;
    later values outside them are counted as underflow and overflow. Mean,
    std, min, max and percentiles are over the finite values, the two
    fractions over all values. Percentiles come from a quantile sketch,
    within 0.39% of the exact values (module docstring).

    Cost: per logged epoch and phase, one pass of the probe through the
    model that keeps the chosen outputs, and their statistics on the device
    (the first logged epoch makes one more pass, to find the range, and
    compiles). `benchmarks/activation_logger_cost.py` measures it.

    Records go to an HDF5 file (`h5_path`; read it with
    `read_activation_log`, draw it with `python -m keras_callbacks_plus
    report`), to TensorBoard (`tensorboard_dir`, histograms
    `activations_<phase>/<layer>`) and, with `log_scalars`, into the epoch
    logs as `act/<layer>/<statistic>` (test phase) and
    `act_train/<layer>/<statistic>` (train phase), for CSVLogger or early
    stopping. Epochs are counted from 0, as in `History.epoch`.

    With a `data_parallel` twin, this worker's replica of the weights is
    evaluated on one device. With several workers only the chief writes; the
    others evaluate (locally) only when `log_scalars` asks for the values, so
    that all workers see the same logs.

    Args:
        probe: the fixed inputs: an array, a tuple or dict of arrays
            (multi-input models), a `tf.data.Dataset` or a
            `keras.utils.PyDataset` with a bounded number of batches (targets
            in its batches are ignored). The same probe every epoch.
        layers: layer names, glob patterns or paths in nested models
            (`"backbone/block_3*"`); a name without `/` also matches inside
            nested models. Defaults to `None`: every layer with an output but
            Input layers and nested models themselves.
        phases: any of `"test"` and `"train"`. Defaults to `("test",)`.
        every: log every this many epochs (epochs `every - 1`, `2 * every -
            1`, ...). Defaults to 1.
        percentiles: percentiles to record, in [0, 100]. Defaults to
            `(1, 50, 99)`.
        bins: number of histogram bins. Defaults to 64.
        h5_path: HDF5 file to append to; an existing log gets a new run,
            anything else there is an error. Defaults to `None`: no file.
        tensorboard_dir: folder for TensorBoard histograms; needs TensorFlow
            importable (any backend), else a warning and no histograms.
            Defaults to `None`.
        log_scalars: `True` for the statistics `mean`, `std`, `zero_frac`
            and `nonfinite_frac` in the epoch logs, or a list of statistic
            names (also `min`, `max`, `p<level>` such as `p99`). Defaults to
            `False`.
        batch_size: rows per batch for an array probe. Defaults to 32.
        verbose: 1 to print a line per logged epoch. Defaults to 0.

    Raises:
        ValueError: bad arguments (in the constructor); at train begin, an
            unknown layer (the message lists the available ones), a probe
            that does not fit the model's inputs, or an `h5_path` that cannot
            be written.

    Example:

    ```python
    logger = ActivationLogger(x_val[:256], layers=["conv*", "dense"],
                              phases=("test", "train"), h5_path="activations.h5")
    model.fit(x, y, epochs=10, callbacks=[logger])
    runs = read_activation_log("activations.h5")
    runs[-1]["layers"]["test"]["dense"]["zero_frac"]  # one value per epoch
    ```
    """

    def __init__(
        self,
        probe: Any,
        *,
        layers: str | Sequence[str] | None = None,
        phases: Sequence[str] = ("test",),
        every: int = 1,
        percentiles: Sequence[float] = (1, 50, 99),
        bins: int = 64,
        h5_path: str | os.PathLike | None = None,
        tensorboard_dir: str | os.PathLike | None = None,
        log_scalars: bool | Sequence[str] = False,
        batch_size: int = 32,
        verbose: int = 0,
    ):
        super().__init__(verbose=verbose)
        self.every = _check_int("every", every, 1)
        self.bins = _check_int("bins", bins, 1)
        self.batch_size = _check_int("batch_size", batch_size, 1)
        phases = (phases,) if isinstance(phases, str) else tuple(phases)
        if not phases or any(p not in PHASES for p in phases) or len(set(phases)) != len(phases):
            raise ValueError(
                "Invalid value for argument phases. Expected a non-empty list of "
                f"distinct phases among {PHASES}. Received: phases={phases!r}"
            )
        self.phases = phases
        try:
            levels = tuple(float(p) for p in percentiles)
        except (TypeError, ValueError):
            levels = (math.nan,)
        if not all(0.0 <= p <= 100.0 for p in levels):
            raise ValueError(
                "Invalid value for argument percentiles. Expected numbers in "
                f"[0, 100]. Received: percentiles={percentiles!r}"
            )
        self.percentiles = levels
        if layers is not None and not (
            isinstance(layers, str) or all(isinstance(p, str) for p in layers)
        ) or layers == []:
            raise ValueError(
                "Invalid value for argument layers. Expected None, a layer name or "
                f"pattern, or a non-empty list of them. Received: layers={layers!r}"
            )
        self.layers = layers
        scalar_names = (*STATISTICS, *(_level_name(p) for p in levels))
        if log_scalars is True:
            self.log_scalars: tuple[str, ...] = _DEFAULT_SCALARS
        elif log_scalars is False or log_scalars is None:
            self.log_scalars = ()
        else:
            names = (log_scalars,) if isinstance(log_scalars, str) else tuple(log_scalars)
            unknown = [n for n in names if n not in scalar_names]
            if unknown or not names:
                raise ValueError(
                    "Invalid value for argument log_scalars. Expected True, False or "
                    f"a list of statistics among {scalar_names}. "
                    f"Received: log_scalars={log_scalars!r}"
                )
            self.log_scalars = names
        self.h5_path = None if h5_path is None else Path(h5_path)
        self.tensorboard_dir = None if tensorboard_dir is None else Path(tensorboard_dir)
        self._probe = _Probe(probe, self.batch_size)
        self._restored: dict[str, Any] = {}
        self._reset()

    def _reset(self) -> None:
        self._paths: list[str] = []
        self._evaluator: _Evaluator | None = None
        self._edges: dict[str, dict[str, list[float]]] = {}
        self._h5: _H5Log | None = None
        self._tensorboard: _TensorBoardWriter | None = None
        self._evaluates = False
        self._writes = False
        self._run: str | None = None

    # -- set-up

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        self._reset()
        error = None
        try:
            self._set_up()
        except Exception as caught:  # re-raised below, after the workers agree
            error = caught
        # Another worker's failure must stop this one too, or it would wait
        # in the first collective of training forever.
        if distribute.num_workers() > 1 and distribute.any_worker(error is not None):
            if error is None:
                raise RuntimeError("ActivationLogger failed at train begin on another worker.")
        if error is not None:
            raise error

    def _set_up(self) -> None:
        model = self.model
        self._paths = _select(model, self.layers)
        first = self._probe.first()
        _check_fits(model, first)
        self._writes = distribute.is_chief()
        self._evaluates = self._writes or bool(self.log_scalars)
        restored, self._restored = self._restored, {}
        if not self._evaluates:
            return
        self._evaluator = _evaluator(model, self._paths)
        # Compile and run once now, so that a layer that cannot run
        # statelessly fails before the first step rather than after an epoch.
        for phase in self.phases:
            self._evaluator.statistics(model, [first], phase == "train",
                                       self._placeholder_edges(), keep_histogram=False)
        self._edges = {
            phase: {name: list(edges) for name, edges in restored.get("bin_edges", {})
                    .get(phase, {}).items() if _aligned(edges, self.bins)}
            for phase in self.phases
        }
        if not self._writes:
            return
        if self.h5_path is not None:
            self._h5 = _H5Log(self.h5_path, self._run_attrs(), restored.get("run"))
            self._run = self._h5.run
        if self.tensorboard_dir is not None:
            try:
                self._tensorboard = _TensorBoardWriter(self.tensorboard_dir)
            except ImportError:
                warnings.warn(
                    "ActivationLogger: tensorboard_dir is set but TensorFlow is not "
                    "installed, so no TensorBoard histograms are written "
                    "(pip install tensorflow-cpu). The other outputs are unaffected.",
                    stacklevel=2,
                )

    def _run_attrs(self) -> dict[str, Any]:
        return {
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "model": self.model.name,
            "backend": keras.backend.backend(),
            "versions": json.dumps(_versions()),
            "phases": list(self.phases),
            "layers": list(self._evaluator.names),
            "percentile_levels": np.asarray(self.percentiles, np.float64),
            "bins": self.bins,
            "every": self.every,
            "probe": self._probe.describe(),
        }

    # -- logging

    def on_epoch_end(self, epoch, logs=None):
        if not self._evaluates or (epoch + 1) % self.every:
            return
        start = time.perf_counter()
        model, evaluator, records = self.model, self._evaluator, []
        for phase in self.phases:
            training, known = phase == "train", self._edges.setdefault(phase, {})
            if any(name not in known for name in evaluator.names):
                # First logged epoch: one pass for the range, then the edges are fixed.
                ranges = evaluator.statistics(model, self._probe.batches(), training,
                                              self._placeholder_edges(), keep_histogram=False)
                for i, name in enumerate(evaluator.names):
                    known.setdefault(
                        name, list(_fixed_edges(ranges.low[i], ranges.high[i], self.bins))
                    )
            edges = np.asarray([known[name] for name in evaluator.names], np.float64)
            stats = evaluator.statistics(model, self._probe.batches(), training, edges)
            for i, (name, spec) in enumerate(zip(evaluator.names, evaluator.extractor.outputs)):
                records.append(_Record(phase, name, tuple(spec.shape),
                                       stats.result(i, self.percentiles), edges[i]))
        if logs is not None and self.log_scalars:
            logs.update(self._scalars(records))
        if self._writes:
            if self._h5 is not None:
                self._h5.append(epoch, records)
            if self._tensorboard is not None:
                self._tensorboard.write(epoch, records)
        self._say(
            f"Epoch {epoch + 1}: ActivationLogger recorded {len(evaluator.names)} outputs "
            f"({', '.join(self.phases)}) in {time.perf_counter() - start:.2f}s"
            + (f" to {self.h5_path}" if self._h5 is not None else "")
        )

    def _placeholder_edges(self) -> np.ndarray:
        return np.tile(np.linspace(-1.0, 1.0, self.bins + 1), (len(self._evaluator.names), 1))

    def _scalars(self, records: list[_Record]) -> dict[str, float]:
        scalars = {}
        for phase, name, _, result, _ in records:
            prefix = "act" if phase == "test" else f"act_{phase}"
            levels = zip(self.percentiles, result["percentiles"])
            values = {**{s: result[s] for s in STATISTICS},
                      **{_level_name(p): v for p, v in levels}}
            for stat in self.log_scalars:
                scalars[f"{prefix}/{name}/{stat}"] = float(values[stat])
        return scalars

    def on_train_end(self, logs=None):
        try:
            if self._h5 is not None and self._h5.pending:
                self._h5.flush(_LOCK_WAIT_AT_END_S)
                if self._h5.pending:
                    warnings.warn(
                        f"ActivationLogger: {len(self._h5.pending)} logged epoch(s) could "
                        f"not be written to {str(self.h5_path)!r}: another process kept "
                        "it open.",
                        stacklevel=2,
                    )
            if self._tensorboard is not None:
                self._tensorboard.close()
        finally:
            super().on_train_end(logs)

    # -- state

    def get_state(self, directory: str | None = None) -> dict[str, Any]:
        """The HDF5 run and the fixed bin edges, so that a resumed fit continues them."""
        return {
            "run": self._run,
            "bin_edges": {phase: {name: [float(v) for v in edges] for name, edges in by.items()}
                          for phase, by in self._edges.items()},
        }

    def set_state(self, state: dict[str, Any], directory: str | None = None) -> None:
        """Restores `get_state()`: the next fit appends to the same run with the same edges."""
        self._restored = {"run": state.get("run"), "bin_edges": state.get("bin_edges", {})}


# ---------------------------------------------------------------- reader


def read_activation_log(path: str | os.PathLike, *, wait: float = 10.0) -> list[dict[str, Any]]:
    """Reads an HDF5 activation log written by `ActivationLogger`.

    Safe while training writes to it: the file is opened briefly, waiting up
    to `wait` seconds if the writer holds it at that moment.

    Args:
        path: the `.h5` file.
        wait: seconds to wait for the writer's lock. Defaults to 10.

    Returns:
        A list of runs, oldest first (each `fit` with the logger adds one).
        Each run is a dict:

        * `"name"`: `"run_000"`, ...
        * `"attrs"`: `started` (UTC ISO time), `model`, `backend`,
          `versions` (dict), `phases`, `layers`, `percentile_levels`,
          `bins`, `every`, `probe`.
        * `"layers"`: `{phase: {layer path: record}}`, where each record
          holds NumPy arrays with one row per logged epoch: `epoch` (counted
          from 0), `count`, `mean`, `std`, `min`, `max`, `zero_frac`,
          `nonfinite_frac` (shape `(E,)`), `percentiles` (`(E, P)`),
          `histogram` (`(E, bins)`), `underflow`, `overflow` (`(E,)`); and
          `bin_edges` (`(bins + 1,)`), `percentile_levels` (`(P,)`),
          `output_shape` (tuple, `None` for the batch dimension).

    Raises:
        ValueError: the file is not an activation log.
    """
    with _open_h5(path, "r", wait) as f:
        if f.attrs.get("format") != _FORMAT:
            raise ValueError(f"{str(path)!r} is not an activation log written by ActivationLogger.")
        runs = []
        for name in sorted(k for k in f if k.startswith("run_")):
            group = f[name]
            attrs = {k: _attr(v) for k, v in group.attrs.items()}
            if "versions" in attrs:
                attrs["versions"] = json.loads(attrs["versions"])
            order = {path: i for i, path in enumerate(attrs.get("layers", []))}
            layers: dict[str, dict[str, Any]] = {}
            for phase in attrs.get("phases", sorted(group)):
                if phase not in group:
                    continue
                found = sorted(group[phase].values(),
                               key=lambda g: order.get(str(g.attrs["layer_path"]), len(order)))
                for layer in found:
                    record = {field: dataset[()] for field, dataset in layer.items()}
                    record["bin_edges"] = np.asarray(layer.attrs["bin_edges"])
                    record["percentile_levels"] = np.asarray(layer.attrs["percentile_levels"])
                    record["output_shape"] = tuple(
                        None if d < 0 else int(d) for d in layer.attrs["output_shape"]
                    )
                    layers.setdefault(phase, {})[str(layer.attrs["layer_path"])] = record
            runs.append({"name": name, "attrs": attrs, "layers": layers})
    return runs


def _attr(value: Any) -> Any:
    if isinstance(value, np.ndarray) and value.dtype.kind in "OSU":
        return [str(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value

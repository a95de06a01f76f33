"""Streaming statistics of activations: a device-side summary per batch, merged on the host.

`summarize` runs inside the compiled evaluation function (keras.ops only)
and reduces all outputs of a batch to a few numbers and count vectors;
`Stats` merges those summaries over the probe's batches in fixed memory.

Mean and standard deviation come from float32 sums of values and squares
over rows of 1024 values, merged in float64 (Chan et al.): the variance's
relative error is about 1e-7 * (mean / std)**2, so negligible unless |mean|
is hundreds of times std. Min, max, the zero and non-finite counts and the
histogram are exact. The histogram's edges are fixed by the caller, as
`(k + j) * 2**e` (see `fixed_edges`).

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

import math
from typing import Any, Mapping, Sequence

import keras
import numpy as np

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
# Values per row of the device-side summary (see summarize).
_ROW = 1024


def summarize(outputs, edges):
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


class Stats:
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


def fixed_edges(low: float, high: float, bins: int) -> np.ndarray:
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


def aligned(edges: Sequence[float], bins: int) -> bool:
    """Whether `edges` are `bins + 1` edges as `fixed_edges` makes them."""
    edges = np.asarray(edges, np.float64)
    if edges.shape != (bins + 1,) or not np.all(np.isfinite(edges)):
        return False
    width = edges[1] - edges[0]
    first = edges[0] / width
    return (width > 0 and math.frexp(width)[0] == 0.5 and first == math.floor(first)
            and np.array_equal(edges, (first + np.arange(bins + 1)) * width))

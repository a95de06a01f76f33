"""Streaming statistics of activations: a device-side summary per batch, merged on the host.

`summarize` runs inside the compiled evaluation function (keras.ops only)
and reduces all outputs of a batch to a few numbers and count vectors;
`Stats` merges those summaries over the probe's batches in fixed memory.

Over every value: mean and standard deviation come from float32 sums of
values and squares over rows of 1024 values, merged in float64 (Chan et
al.): the variance's relative error is about 1e-7 * (mean / std)**2, so
negligible unless |mean| is hundreds of times std. Min, max, the zero and
non-finite counts are exact.

Percentiles and the histogram count a systematic sample of at most
`sample_values` values per output and batch (every k-th value, k coprime
with the channel count), or every value. On a CPU, scattering every value
of every output into counts costs several times a forward pass; a sample
of 65536 values per batch puts a percentile's rank within about
0.1 percentage point of the exact one (one standard error at the median:
0.5 / sqrt(65536) = 0.2%, per batch). The histogram counts the sampled
values exactly; its edges are fixed by the caller, as `(k + j) * 2**e`
(see `fixed_edges`).

Percentiles come from a quantile sketch with a bucket per sign, binary
exponent and top 7 mantissa bits of each float32 value (as HDR histograms
do), so its bucket boundaries are exact. Every value `v` with
`2**-30 <= |v| < 2**41` is represented within 1/256 (0.39%) of itself; smaller
magnitudes (except exact zeros, which have their own bucket) within 2**-30.
A percentile is interpolated between the two ranks around it, as NumPy's
default `linear` method does, so it is within 0.39% of the larger of those
two values of `numpy.percentile` on the same (sampled) values; it is
clipped to the exact min and max, and levels 0 and 100 are the exact min
and max.
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
# Values per row of the device-side sums (see summarize).
_ROW = 1024


def sample_stride(size: int, last: int, limit: int | None) -> int:
    """Every how many values of a flattened output the sample takes: 1 keeps all.

    The stride is coprime with `last` (the channel axis, last in memory), so
    the sample visits every channel equally often.
    """
    if limit is None or size <= limit:
        return 1
    stride = -(-size // limit)
    while math.gcd(stride, max(int(last), 1)) != 1:
        stride += 1
    return stride


def summarize(outputs, edges, sample_values=None, finite_only=False):
    """Per-batch summary of all outputs, on the device (keras.ops only).

    Every value counts for the sums (per row of `_ROW` values, merged on the
    host in float64), min, max, the finite and non-zero counts. The
    quantile sketch and the histogram over `edges` (one row of `bins + 1`
    edges per output, multiples of a power of two) count a systematic
    sample of at most `sample_values` values per output (every k-th value,
    `sample_stride`), or every value with `None`. Both count by integer
    keys, so bucket boundaries are exact; scattering every value into them
    is what costs most on a CPU.

    The sums, min and max are over all values, which is right unless some
    value is not finite (then a row sum is not finite): the caller then
    summarizes that batch again with `finite_only=True`, which masks them.
    A condition on the device instead would keep every output of the batch
    in memory at once (XLA's temporary memory grows several times).
    """
    ops = keras.ops
    bins = edges.shape[1] - 1
    blocks, keys, slots, totals = [], [], [], []
    for i, y in enumerate(outputs):
        size = int(np.prod(y.shape))
        totals.append(size)
        flat = ops.reshape(ops.cast(y, "float32"), (-1,))
        full = size // _ROW
        parts = [ops.reshape(flat[:full * _ROW], (full, _ROW))] if full else []
        if size % _ROW:
            parts.append(ops.reshape(flat[full * _ROW:], (1, size - full * _ROW)))
        blocks.append(parts)
        stride = sample_stride(size, y.shape[-1] if len(y.shape) else 1, sample_values)
        if stride > 1:
            kept = size // stride
            flat = ops.reshape(flat[:kept * stride], (kept, stride))[:, 0]
        key, slot = _sketch_key_and_slot(flat, edges[i], bins)
        # One segment_sum for all outputs: each output has its own range of keys.
        keys.append(key + i * (_SKETCH_SIZE + 1))
        slots.append(slot + i * (bins + 3))

    def rows(reduce, parts):
        return ops.concatenate([reduce(part) for part in parts])

    def count(reduce, parts):  # per-row counts are exact in float32, their total in int32
        return ops.sum(ops.cast(rows(reduce, parts), "int32"))

    sums, squares, lows, highs, nonzeros, finites = [], [], [], [], [], []
    for parts, size in zip(blocks, totals):
        if not parts:  # an output with no values (a zero-sized dimension)
            sums.append(ops.zeros((0,)))
            squares.append(ops.zeros((0,)))
            lows.append(ops.convert_to_tensor(np.inf, "float32"))
            highs.append(ops.convert_to_tensor(-np.inf, "float32"))
            nonzeros.append(ops.convert_to_tensor(0, "int32"))
            finites.append(ops.convert_to_tensor(0, "int32"))
            continue
        if finite_only:
            keep = [ops.isfinite(p) for p in parts]
            safe = [ops.where(k, p, 0.0) for k, p in zip(keep, parts)]
            low = [ops.where(k, p, np.inf) for k, p in zip(keep, parts)]
            high = [ops.where(k, p, -np.inf) for k, p in zip(keep, parts)]
            finites.append(count(lambda k: ops.sum(ops.cast(k, "float32"), axis=1), keep))
        else:
            safe = low = high = parts
            finites.append(ops.convert_to_tensor(size, "int32"))
        sums.append(rows(lambda p: ops.sum(p, axis=1), safe))
        squares.append(rows(lambda p: ops.sum(ops.square(p), axis=1), safe))
        lows.append(ops.min(rows(lambda p: ops.min(p, axis=1), low)))
        highs.append(ops.max(rows(lambda p: ops.max(p, axis=1), high)))
        # |sign(v)| is 1 for a non-zero value: a cheap count on the CPU.
        nonzeros.append(count(lambda p: ops.sum(ops.abs(ops.sign(p)), axis=1), safe))
    key, slot = ops.concatenate(keys), ops.concatenate(slots)
    return {
        "total": np.asarray(totals, np.int64),
        "sum": ops.concatenate(sums), "squares": ops.concatenate(squares),
        "min": ops.stack(lows), "max": ops.stack(highs),
        "nonzero": ops.stack(nonzeros), "finite": ops.stack(finites),
        "sketch": ops.segment_sum(ops.ones_like(key), key,
                                  num_segments=len(outputs) * (_SKETCH_SIZE + 1)),
        "histogram": ops.segment_sum(ops.ones_like(slot), slot,
                                     num_segments=len(outputs) * (bins + 3)),
    }


def _sketch_key_and_slot(x, edges, bins):
    """Sketch bucket and histogram slot of each value of `x` (one output's values).

    Sketch keys come from the float's bits: sign, exponent and the top
    mantissa bits, ordered from the most negative to the most positive;
    `_SKETCH_SIZE` drops a non-finite value. Edges are `(first + j) * width`
    with `width` a power of two, so `floor(x / width)` is exact. Slot 0:
    below the first edge; 1..bins: the bins (the last one closed); bins + 1:
    above the last edge; bins + 2: dropped.
    """
    ops = keras.ops
    bits = ops.view(x, "int32")
    magnitude = ops.bitwise_and(bits, 0x7FFFFFFF)
    top = ops.right_shift(magnitude, 23 - _MANTISSA_BITS)
    index = ops.clip(top, _TOP_LOW, _TOP_HIGH) - _TOP_LOW
    key = ops.where(bits < 0, _MAGNITUDES - 1 - index, _MAGNITUDES + 1 + index)
    key = ops.where(ops.equal(magnitude, 0), _MAGNITUDES, key)
    dropped = top >= _TOP_NONFINITE
    key = ops.where(dropped, _SKETCH_SIZE, key)
    width = edges[1] - edges[0]
    first = edges[0] / width
    slot = ops.clip(ops.floor(x * (1.0 / width)), first - 1, first + bins) - first + 1
    slot = ops.where(ops.equal(x, edges[-1]), bins, ops.cast(slot, "int32"))
    return key, ops.where(dropped, bins + 2, slot)


class Stats:
    """Streaming statistics of several outputs over batches; fixed size."""

    def __init__(self, outputs: int):
        self.outputs = outputs
        self.total = np.zeros(outputs, np.int64)
        self.count = np.zeros(outputs, np.int64)
        self.zeros = np.zeros(outputs, np.int64)
        self.mean = np.zeros(outputs, np.float64)
        self.m2 = np.zeros(outputs, np.float64)
        self.low = np.full(outputs, np.inf)
        self.high = np.full(outputs, -np.inf)
        self.sketch = np.zeros((outputs, _SKETCH_SIZE), np.int64)
        self.histogram: np.ndarray | None = None

    def add(self, summary: Mapping[str, np.ndarray]) -> None:
        n = self.outputs
        # Each output's row sums: ceil(size / _ROW) of them, in order.
        layer = np.repeat(np.arange(n), -(-np.asarray(summary["total"]) // _ROW))

        def per_output(values):
            return np.bincount(layer, weights=np.asarray(values, np.float64), minlength=n)

        count = np.asarray(summary["finite"], np.int64)
        sums, squares = per_output(summary["sum"]), per_output(summary["squares"])
        mean = sums / np.maximum(count, 1)
        m2 = np.maximum(squares - count * mean * mean, 0.0)
        # This batch merges with the previous ones (Chan et al.).
        merged = self.count + count
        delta = mean - self.mean
        weight = np.divide(count, merged, out=np.zeros(n), where=merged > 0)
        self.m2 += m2 + delta**2 * self.count * weight
        self.mean += delta * weight
        self.count = merged
        self.total += np.asarray(summary["total"], np.int64)
        self.zeros += count - np.asarray(summary["nonzero"], np.int64)
        self.low = np.minimum(self.low, np.asarray(summary["min"], np.float64))
        self.high = np.maximum(self.high, np.asarray(summary["max"], np.float64))
        self.sketch += summary["sketch"].reshape(n, -1)[:, :_SKETCH_SIZE]
        if "histogram" in summary:
            histogram = summary["histogram"].reshape(n, -1)[:, :-1].astype(np.int64)
            self.histogram = histogram if self.histogram is None else self.histogram + histogram

    def percentiles(self, i: int, levels: Sequence[float]) -> np.ndarray:
        """Percentiles of the sketched values, clipped to the exact min and max.

        Levels 0 and 100 are the exact min and max.
        """
        n, low, high = int(self.sketch[i].sum()), self.low[i], self.high[i]
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
            "zero_frac": int(self.zeros[i]) / total,
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

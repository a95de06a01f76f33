"""Streaming statistics of activations: two compiled stages per batch, merged on the host.

Per probe batch, the forward stage (`_extract`) runs the chosen layers and
`stage` lays their outputs out in two buffers:

* `rows`, `(R, 1024)` float32: every output flattened, its last row padded
  with zeros, the outputs one after another;
* `sample`, float32: a systematic sample of at most `sample_values` values
  of each output (every k-th value, k coprime with the channel count, from
  the first one; all values of smaller outputs), each output's part padded
  with NaN (dropped) to a multiple of 256.

The sketch accumulator holds `SIZE` buckets per output, then one slot for
dropped (non-finite) values.

Then `summarize` (one small program, the same for every model and phase,
compiled once per buffer shape; on TensorFlow `stage` and `summarize` run
as one XLA cluster inside the forward graph instead) reduces each row to its sum, sum of squares,
min, max and count of non-zero values, and adds the sample's sketch buckets
(`_activation_sketch`) to a per-output accumulator on the device. Only these
reductions and each output's last row (partly zero padding), not the
outputs, come back to the host, where `Stats` merges them per output and
batch.

Mean and standard deviation come from float32 sums over rows of 1024 values,
merged in float64 (Chan et al.): the variance's relative error is about
1e-7 * (mean / std)**2, so negligible unless |mean| is hundreds of times std.
Min, max, the zero and non-finite counts are exact. An output with a
non-finite value (or one whose float32 sums overflow) is recomputed for that
batch on the host from its values (the rows buffer, or on TensorFlow the
batch run again from the same state), masking non-finite values.

The layout replaces the one program per phase of earlier versions, which
compiled every output's statistics into one XLA graph (tens of seconds for
150 outputs) and kept XLA's slow CPU convolutions on TensorFlow: now the
forward stage is the only model-sized program, and the statistics program has
a handful of operations whatever the model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import keras
import numpy as np

from keras_callbacks_plus import _activation_sketch as sketch_buckets
from keras_callbacks_plus import distribute

# Values per row of the device-side sums, and the sample's block size.
ROW = 1024
BLOCK = 256


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


@dataclass(frozen=True)
class Layout:
    """Where each output of one batch shape lies in the `rows` and `sample` buffers."""

    sizes: np.ndarray  # values per output
    row_starts: np.ndarray  # first row of each output, then the spare row
    strides: np.ndarray
    kept: np.ndarray  # sampled values per output
    block_base: np.ndarray  # per sample block: its output's first sketch slot
    tail_rows: np.ndarray  # the last row of each output with values, then the spare row

    @classmethod
    def of(cls, shapes: Sequence[Sequence[int]], sample_values: int | None) -> "Layout":
        sizes = np.asarray([int(np.prod(s, dtype=np.int64)) for s in shapes], np.int64)
        channels = [int(s[-1]) if len(s) else 1 for s in shapes]
        rows = -(-sizes // ROW)
        starts = np.concatenate([[0], np.cumsum(rows)]).astype(np.int64)
        strides = np.asarray([sample_stride(int(n), c, sample_values)
                              for n, c in zip(sizes, channels)], np.int64)
        kept = sizes // strides
        blocks = -(-kept // BLOCK)
        base = np.repeat(np.arange(len(sizes), dtype=np.int64) * sketch_buckets.SIZE, blocks)
        # A spare row (zeros) and block (NaN) at the end: no buffer is ever empty.
        base = np.append(base, 0).astype(np.int32)
        tails = np.append((starts[:-1] + rows - 1)[sizes > 0], starts[-1]).astype(np.int32)
        return cls(sizes, starts, strides, kept, base, tails)

    @property
    def outputs(self) -> int:
        return len(self.sizes)


def stage(outputs: Sequence[Any], sample_values: int | None):
    """`(rows, sample, layout)` of one batch's outputs (keras.ops, inside the forward stage).

    The layout comes from the outputs' static shapes, while tracing.
    """
    ops = keras.ops
    layout = Layout.of([tuple(y.shape) for y in outputs], sample_values)
    pieces, samples = [], []
    for i, y in enumerate(outputs):
        size, stride, kept = int(layout.sizes[i]), int(layout.strides[i]), int(layout.kept[i])
        if not size:
            continue
        # As few operations as possible: on TensorFlow each one costs a few
        # microseconds per batch, and there are several per output.
        flat = ops.reshape(y if y.dtype == "float32" else ops.cast(y, "float32"), (-1,))
        pieces.append(flat)
        if size % ROW:  # the host reads an output's last row itself
            pieces.append(np.zeros(ROW - size % ROW, np.float32))
        samples.append(flat if stride == 1 else flat[:kept * stride:stride])
        if kept % BLOCK:
            samples.append(np.full(BLOCK - kept % BLOCK, np.nan, np.float32))
    pieces.append(np.zeros(ROW, np.float32))
    samples.append(np.full(BLOCK, np.nan, np.float32))
    rows = ops.reshape(ops.concatenate(pieces), (-1, ROW))
    return rows, ops.concatenate(samples), layout


def summarize(rows, sample, block_base, tail_rows, accumulator):
    """Row reductions of `rows` and the sketch of `sample` added to `accumulator` (keras.ops).

    Returns `(reductions, tails, accumulator)`: `reductions` is `(5, R)`:
    per row the sum, the sum of squares, min, max and the count of non-zero
    values; `tails` the rows `tail_rows` (each output's last, partly
    padding), which the host reduces itself. Arithmetic only (|sign| counts
    non-zero values): a comparison in these loops makes XLA's CPU code
    several times slower. TensorFlow's XLA sums a row's squares several
    times faster as a product with a vector of ones, JAX's as a reduction
    (measured on CPU).
    """
    ops = keras.ops
    row_sum = distribute.row_sums
    reductions = ops.stack([
        row_sum(rows), row_sum(ops.square(rows)),
        ops.min(rows, axis=1), ops.max(rows, axis=1),
        row_sum(ops.abs(ops.sign(rows))),
    ])
    base = ops.expand_dims(block_base, 1)
    # Dropped values go to the accumulator's last slot, so the host reads
    # the buckets as one contiguous (outputs, SIZE) array.
    dropped = accumulator.shape[0] - 1 - base
    key = ops.reshape(sketch_buckets.keys(ops.reshape(sample, (-1, BLOCK)), dropped) + base, (-1,))
    counts = ops.segment_sum(ops.ones_like(key), key, num_segments=accumulator.shape[0])
    return reductions, ops.take(rows, tail_rows, axis=0), accumulator + counts


class Stats:
    """Streaming statistics of several outputs over batches; fixed size."""

    def __init__(self, outputs: int):
        self.outputs = outputs
        self.total = np.zeros(outputs, np.int64)
        self.count = np.zeros(outputs, np.int64)  # finite values
        self.zeros = np.zeros(outputs, np.int64)
        self.mean = np.zeros(outputs, np.float64)
        self.m2 = np.zeros(outputs, np.float64)
        self.low = np.full(outputs, np.inf)
        self.high = np.full(outputs, -np.inf)
        self.sketch = np.zeros((outputs, sketch_buckets.SIZE), np.int32)

    def add(self, layout: Layout, reductions: np.ndarray, tails: np.ndarray,
            values: Callable[[int], np.ndarray]) -> None:
        """Merges one batch: `reductions` and `tails` from `summarize`.

        `values(i)` gives output i's values, read only when it holds a
        non-finite value outside its last row (or its float32 sums overflow).
        """
        sizes, starts = layout.sizes, layout.row_starts
        has_rows = sizes > 0
        # Whole rows on the device: all of an output's rows but its last.
        first, end = starts[:-1], np.where(has_rows, starts[1:] - 1, starts[:-1])
        sums, squares, lows, highs, nonzeros = (np.asarray(r, np.float64) for r in reductions)

        def ranged(values):  # sums over [first, end) per output
            prefix = np.concatenate([[0.0], np.cumsum(values)])
            return prefix[end] - prefix[first]

        def extreme(values, reduce, empty):
            result = np.full(len(sizes), empty)
            some = end > first
            if some.any():
                bounds = np.stack([first[some], end[some]], axis=1).reshape(-1)
                result[some] = reduce.reduceat(values, bounds)[::2]
            return result

        with np.errstate(invalid="ignore", over="ignore"):
            sum_, square, nonzero = ranged(sums), ranged(squares), ranged(nonzeros)
            low, high = extreme(lows, np.minimum, np.inf), extreme(highs, np.maximum, -np.inf)
        count = (end - first) * ROW
        bad = (end > first) & ~(np.isfinite(sum_) & np.isfinite(square) & np.isfinite(low)
                                & np.isfinite(high))
        # The last rows, in float64 on the host, their padding left out.
        tails = np.asarray(tails, np.float64)[:-1]
        valid = np.arange(ROW)[None, :] < (sizes[has_rows] - (end - first)[has_rows] * ROW)[:, None]
        finite = valid & np.isfinite(tails)
        kept = np.where(finite, tails, 0.0)
        sum_[has_rows] += kept.sum(axis=1)
        square[has_rows] += np.square(kept).sum(axis=1)
        low[has_rows] = np.minimum(low[has_rows], np.where(finite, tails, np.inf).min(axis=1))
        high[has_rows] = np.maximum(high[has_rows], np.where(finite, tails, -np.inf).max(axis=1))
        nonzero[has_rows] += (valid & (tails != 0)).sum(axis=1)
        count[has_rows] += finite.sum(axis=1)
        for i in np.flatnonzero(bad):
            sum_[i], square[i], low[i], high[i], nonzero[i], count[i] = _exact(values(i))
        self._merge(sum_, square, count, low, high, sizes - nonzero, sizes)

    def _merge(self, sums, squares, count, low, high, zeros, sizes) -> None:
        n = self.outputs
        count = count.astype(np.int64)
        mean = sums / np.maximum(count, 1)
        m2 = np.maximum(squares - count * mean * mean, 0.0)
        # This batch merges with the previous ones (Chan et al.).
        merged = self.count + count
        delta = mean - self.mean
        weight = np.divide(count, merged, out=np.zeros(n), where=merged > 0)
        self.m2 += m2 + delta**2 * self.count * weight
        self.mean += delta * weight
        self.count = merged
        self.total += sizes
        self.zeros += np.rint(zeros).astype(np.int64)
        self.low = np.minimum(self.low, low)
        self.high = np.maximum(self.high, high)

    def result(self, i: int, percentiles: np.ndarray) -> dict[str, Any]:
        """The statistics of output `i` as a dict of floats, with its row of `percentiles`."""
        count, total = int(self.count[i]), max(int(self.total[i]), 1)
        finite = count > 0
        return {
            "count": int(self.total[i]),
            "mean": float(self.mean[i]) if finite else math.nan,
            "std": math.sqrt(max(self.m2[i], 0.0) / count) if finite else math.nan,
            "min": float(self.low[i]) if finite else math.nan,
            "max": float(self.high[i]) if finite else math.nan,
            "zero_frac": int(self.zeros[i]) / total,
            "nonfinite_frac": (int(self.total[i]) - count) / total,
            "percentiles": np.asarray(percentiles, np.float64),
        }

    def sketched(self) -> sketch_buckets.Sketch:
        """The sketch of the sampled values (`_activation_sketch`)."""
        return sketch_buckets.Sketch(self.sketch, self.low, self.high)

    def percentiles(self, levels: Sequence[float]) -> np.ndarray:
        """Percentiles `(outputs, levels)` of the sampled values."""
        return self.sketched().percentiles(self.low, self.high, levels)


def _exact(values: np.ndarray):
    """Sum, sum of squares, min, max, non-zero and finite counts of `values`, in float64."""
    values = values.astype(np.float64)
    finite = values[np.isfinite(values)]
    if not finite.size:
        return 0.0, 0.0, np.inf, -np.inf, float(np.count_nonzero(values)), 0.0
    return (float(finite.sum()), float(np.square(finite).sum()), float(finite.min()),
            float(finite.max()), float(np.count_nonzero(values)), float(finite.size))

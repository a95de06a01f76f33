"""The quantile sketch of ActivationLogger: its buckets, percentiles, histograms and bin edges.

A value's bucket comes from its float32 bits: sign, binary exponent and the
top 7 mantissa bits (as HDR histograms do), so bucket boundaries are exact
numbers. Magnitudes from 2**-30 to 2**41 get their own buckets: every such
value is represented within 1/256 (0.39%) of itself by its bucket's middle;
smaller magnitudes share the lowest bucket (within 2**-30), exact zeros have
their own, non-finite values are dropped. Positive buckets hold `[a, b)`,
negative ones `[-b, -a)`, both closed on the left like histogram bins.

Percentiles are interpolated between the two ranks around them, as NumPy's
default `linear` method does, so each is within 0.39% of the larger of those
two values of `numpy.percentile` on the same values; they are clipped to the
exact min and max, and levels 0 and 100 are the exact min and max.

Histograms are derived from the sketch on the host, over bin edges chosen at
each logged epoch. Edges are `k * w` for consecutive integers `k`, with `w`
a power of two or three times one, `|k|` (times 3 for the latter) at most
256 and `2**-29 <= w <= 2**31`: then every edge has at most 8 significant
bits, so it is a bucket boundary, every bucket lies in one bin and the
histogram counts the sketched values exactly, in half-open bins
`[e_j, e_j+1)` (a value equal to the last edge counts as overflow). The price
is resolution: a bin is at least 1/256 of the largest edge's magnitude wide.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

MANTISSA_BITS = 7
TOP_LOW = (127 - 30) << MANTISSA_BITS
TOP_HIGH = ((127 + 40) << MANTISSA_BITS) | ((1 << MANTISSA_BITS) - 1)
TOP_NONFINITE = 255 << MANTISSA_BITS
MAGNITUDES = TOP_HIGH - TOP_LOW + 1
# Ordered buckets: negatives (largest magnitude first), zero, positives; one
# more slot per output collects the dropped non-finite values.
SIZE = 2 * MAGNITUDES + 1
_TOPS = np.arange(TOP_LOW, TOP_HIGH + 1)
_MIDDLES = np.ldexp(
    1.0 + ((_TOPS & ((1 << MANTISSA_BITS) - 1)) + 0.5) / (1 << MANTISSA_BITS),
    (_TOPS >> MANTISSA_BITS) - 127,
)
VALUES = np.concatenate([-_MIDDLES[::-1], [0.0], _MIDDLES])

# Bin edges: `k * width`, |k| (times 3 for widths 3 * 2**p) at most MAX_FIRST.
MAX_FIRST = 256
MIN_POWER, MAX_POWER = -29, 31
MAX_BINS = 2 * MAX_FIRST
# Edges are chosen from these sampled percentiles, widened by MARGIN of their
# distance and kept while at most KEEP_OUTSIDE of the values fall outside and
# new edges would not be more than SHRINK times narrower.
ROBUST_LEVELS = (0.1, 99.9)
MARGIN = 0.1
KEEP_OUTSIDE = 0.01
SHRINK = 4.0


def keys(values, dropped=SIZE):
    """The sketch bucket of each float32 value (keras.ops, inside a compiled function).

    Integer arithmetic only, no comparisons: on XLA's CPU backend a select
    in this loop makes it several times slower. A non-finite value gets
    `dropped` (broadcast against `values`).
    """
    import keras

    ops = keras.ops
    bits = ops.view(values, "int32")
    magnitude = ops.bitwise_and(bits, 0x7FFFFFFF)
    negative = ops.bitwise_and(ops.right_shift(bits, 31), 1)
    # One unit less for negatives: their buckets are (a, b] in magnitude, so
    # [-b, -a) in value, closed on the left like the positive ones.
    top = ops.right_shift(magnitude - negative, 23 - MANTISSA_BITS)
    index = ops.minimum(ops.maximum(top, TOP_LOW), TOP_HIGH) - TOP_LOW
    nonzero = ops.minimum(magnitude, 1)
    key = MAGNITUDES + nonzero * (1 + index - negative * (2 * index + 2))
    nonfinite = ops.maximum(
        ops.minimum(ops.right_shift(magnitude, 23 - MANTISSA_BITS) - TOP_NONFINITE + 1, 1), 0
    )
    return key + nonfinite * (dropped - key)


def keys_numpy(values: np.ndarray) -> np.ndarray:
    """`keys` in NumPy, for tests and host-side checks."""
    bits = np.asarray(values, np.float32).view(np.int32).astype(np.int64)
    magnitude = bits & 0x7FFFFFFF
    negative = (bits >> 31) & 1
    top = (magnitude - negative) >> (23 - MANTISSA_BITS)
    index = np.clip(top, TOP_LOW, TOP_HIGH) - TOP_LOW
    key = np.where(bits < 0, MAGNITUDES - 1 - index, MAGNITUDES + 1 + index)
    key = np.where(magnitude == 0, MAGNITUDES, key)
    return np.where((magnitude >> (23 - MANTISSA_BITS)) >= TOP_NONFINITE, SIZE, key)


class Sketch:
    """Bucket counts `(outputs, SIZE)` of several outputs, with their non-empty buckets listed.

    The listing is made once, so percentiles and histograms of many outputs
    cost a few vectorized passes over the non-empty buckets only.
    """

    def __init__(self, counts: np.ndarray, low: np.ndarray | None = None,
                 high: np.ndarray | None = None):
        """`counts` `(outputs, SIZE)`; `low`, `high` bound each output's values, if known.

        With the bounds, only the buckets between theirs are searched (a
        few hundred of 18,000 for most outputs).
        """
        self.counts = counts
        if low is None or high is None:
            flat = np.flatnonzero(counts)
        else:
            ends = keys_numpy(np.stack([low, high], axis=1).astype(np.float32))
            ends = np.where(np.isfinite(np.stack([low, high], axis=1)), ends, [0, SIZE - 1])
            parts = [np.flatnonzero(counts[i, a:b + 1]) + (i * SIZE + a)
                     for i, (a, b) in enumerate(np.minimum(ends, SIZE - 1))]
            flat = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        self.rows, self.buckets = np.divmod(flat, counts.shape[1])
        self.weights = counts.reshape(-1)[flat].astype(np.int64)
        self._last: tuple | None = None  # (edges, histograms): edges are often kept
        self.cumulative = np.cumsum(self.weights)
        self.totals = counts.sum(axis=1, dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.totals)[:-1]]).astype(np.int64)

    @property
    def outputs(self) -> int:
        return self.counts.shape[0]

    def percentiles(self, low: np.ndarray, high: np.ndarray,
                    levels: Sequence[float]) -> np.ndarray:
        """Percentiles `(outputs, levels)` of each output's values; NaN for an empty one.

        Clipped to the exact `low` and `high` (min and max); levels 0 and
        100 are those. Interpolated between ranks like `numpy.percentile`.
        """
        levels = np.asarray(levels, np.float64)
        low = np.asarray(low, np.float64)[:, None]
        high = np.asarray(high, np.float64)[:, None]
        n = self.totals[:, None]
        last = np.maximum(n - 1, 0)
        ranks = last * levels[None, :] / 100.0
        below = np.floor(ranks).astype(np.int64)
        above = np.minimum(below + 1, last)

        def value(rank):
            if not len(self.cumulative):
                return np.zeros(rank.shape)
            found = np.searchsorted(self.cumulative, self.starts[:, None] + rank, side="right")
            found = VALUES[self.buckets[np.minimum(found, len(self.buckets) - 1)]]
            found = np.clip(found, low, high)
            return np.where(rank == 0, low, np.where(rank == n - 1, high, found))

        with np.errstate(invalid="ignore"):
            below_values = value(below)
            result = below_values + (ranks - below) * (value(above) - below_values)
        return np.where(n > 0, result, np.nan)

    def histograms(self, edges: np.ndarray):
        """Each output's values in half-open bins: `(histogram, underflow, overflow)`.

        `edges` has shape `(outputs, bins + 1)`, each row from
        `aligned_edges`, so that every bucket lies in one bin: the counts
        are exact.
        """
        if self._last is not None and np.array_equal(self._last[0], edges):
            return self._last[1]
        outputs, bins = edges.shape[0], edges.shape[1] - 1
        width = edges[:, 1] - edges[:, 0]
        first = np.round(edges[:, 0] / width)
        rows = self.rows
        # No edge lies inside a bucket, and a bucket's middle is at least half
        # a bucket away from the edges: its quotient by the width, floored,
        # is the bin of the whole bucket, rounding errors notwithstanding.
        slot = np.floor(VALUES[self.buckets] / width[rows]) - first[rows]
        slot = np.clip(slot, -1, bins).astype(np.int64) + 1
        counts = np.bincount(rows * (bins + 2) + slot, weights=self.weights,
                             minlength=outputs * (bins + 2)).reshape(outputs, bins + 2)
        counts = np.rint(counts).astype(np.int64)
        result = counts[:, 1:-1], counts[:, 0], counts[:, -1]
        self._last = (edges.copy(), result)
        return result


def aligned_edges(low: float, high: float, bins: int) -> np.ndarray:
    """The narrowest `bins + 1` edges `(first + j) * width` with `low >= e_0` and `high < e_bins`.

    `width` is `2**p` or `3 * 2**p`, and every edge `k * width` has `|k|`
    (times 3) at most 256, so that it is a boundary of the sketch's buckets
    (module docstring); `2**-29 <= width <= 2**31`. Values beyond those
    limits fall outside the edges.
    """
    if not (math.isfinite(low) and math.isfinite(high)) or low > high:
        low, high = -1.0, 1.0
    limit = MAX_FIRST * 2.0**MAX_POWER
    low, high = min(max(low, -limit), limit), min(max(high, -limit), limit)
    span = max(high - low, 2.0**MIN_POWER)
    power = min(max(math.floor(math.log2(span / bins)) - 1, MIN_POWER), MAX_POWER)
    while True:
        # Widths 2**p, 1.5 * 2**p, 2**(p+1), ...: at most 1.5 times a tight fit.
        for factor, multiple in ((1.0, 1), (1.5, 3)):
            width, limit = factor * 2.0**power, MAX_FIRST // multiple
            # The lowest first edge that still covers `high`, the highest that covers `low`.
            first = min(math.floor(low / width), limit - bins)
            if (width >= 2.0**MIN_POWER and first >= -limit
                    and (first + bins) * width > high):
                return (first + np.arange(bins + 1, dtype=np.float64)) * width
        if power >= MAX_POWER:
            width = 2.0**MAX_POWER
            first = min(max(math.floor(low / width), -MAX_FIRST), MAX_FIRST - bins)
            return (first + np.arange(bins + 1, dtype=np.float64)) * width
        power += 1


def choose_edges(sketch: Sketch, low: np.ndarray, high: np.ndarray, bins: int,
                 previous: np.ndarray | None) -> np.ndarray:
    """This epoch's edges `(outputs, bins + 1)`: the previous ones while they fit, else new ones.

    New edges cover the sampled 0.1 and 99.9 percentiles widened by 10% of
    their distance on each side: a few outliers do not squeeze the bins, and
    a value piled up at the min or max (a ReLU's zeros, a saturated
    activation) stays inside when the distribution moves a little. The previous edges stay (so epochs compare) as
    long as at most 1% of this epoch's sampled values fall outside them and
    new edges would not be more than 4 times narrower; a distribution that
    grows or moves gets new edges in the epoch it does, so the share outside
    is at most about 1% at every epoch.
    """
    robust = sketch.percentiles(low, high, ROBUST_LEVELS)
    kept = None
    if previous is not None:
        _, under, over = sketch.histograms(previous)
        kept = (under + over) <= KEEP_OUTSIDE * sketch.totals
    result = np.empty((sketch.outputs, bins + 1))
    for i, (q_low, q_high) in enumerate(robust):
        if not np.isfinite(q_low):  # nothing sketched (no finite value)
            result[i] = previous[i] if previous is not None else aligned_edges(-1.0, 1.0, bins)
            continue
        margin = MARGIN * (q_high - q_low)
        fresh = aligned_edges(q_low - margin, q_high + margin, bins)
        if kept is not None and kept[i]:
            old_span = previous[i, -1] - previous[i, 0]
            if (fresh[-1] - fresh[0]) * SHRINK >= old_span:
                result[i] = previous[i]
                continue
        result[i] = fresh
    return result

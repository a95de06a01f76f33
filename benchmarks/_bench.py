"""Timing helpers shared by every benchmark script in this folder.

Import this module before keras: `parse_args()` sets `KERAS_BACKEND` from
`--backend`, which must happen before keras is imported.

What a measurement is here: `warmup` untimed runs, then several timed runs,
reported as the median; cases that are compared are interleaved (A, B, C, A,
B, C, ...) so that machine noise hits them alike; device work is
synchronised before the clock stops.

On a shared host, load from other work comes and goes within seconds, so a
comparison is made per round: `rounds()` times every case once per round
(wall and process CPU time), alternating the order (A, B, C, then C, B, A) so
that a trend in the load hits all cases alike, and `paired()` summarises the
per-round ratios of a case to its baseline with 95 % confidence intervals. An
interval narrower than the effect asked about says the run resolved it
(`resolves()`); one that is wider says it did not, however good the median
looks.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Sequence


def parse_args(description: str, extra: Callable[[argparse.ArgumentParser], None] | None = None):
    """Common flags: --backend, --quick, --out. Sets KERAS_BACKEND."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--backend", choices=("tensorflow", "jax"), default=None,
                        help="Keras backend (default: $KERAS_BACKEND, else tensorflow)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: runs in seconds, for tests")
    parser.add_argument("--out", default="benchmarks/results", help="folder for JSON/markdown/PNG")
    if extra is not None:
        extra(parser)
    args = parser.parse_args()
    if args.backend:
        os.environ["KERAS_BACKEND"] = args.backend
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return args


def sync(value: Any) -> Any:
    """Waits until the device work that produces `value` is done."""
    import keras

    if keras.backend.backend() == "jax":
        import jax

        return jax.block_until_ready(value)
    leaves = keras.tree.flatten(value)
    for leaf in leaves:
        if hasattr(leaf, "numpy"):
            leaf.numpy()
    return value


def time_call(fn: Callable[[], Any]) -> float:
    """Seconds one call of `fn` takes, its device work included."""
    start = time.perf_counter()
    sync(fn())
    return time.perf_counter() - start


def interleaved(cases: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Times each case `repeats` times, round-robin, after `warmup` rounds."""
    for _ in range(warmup):
        for fn in cases.values():
            sync(fn())
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            times[name].append(time_call(fn))
    return times


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def has_accelerator() -> bool:
    """Whether Keras's backend sees a GPU or TPU (the scripts size some runs by it)."""
    from keras_callbacks_plus import distribute

    return any(not name.startswith("cpu") for name in distribute.list_devices())


def load_average() -> list[float]:
    """The host's 1, 5 and 15 minute load averages (other work sharing the cores)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:  # not on every platform
        return []


def host_cpu_seconds() -> float | None:
    """CPU seconds the whole host has been busy (all cores, every process, stolen time
    included), from /proc/stat; None where there is no /proc/stat."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    # user nice system idle iowait irq softirq steal: all but idle and iowait.
    ticks = [int(v) for v in fields[1:9]]
    busy = sum(ticks) - ticks[3] - ticks[4]
    return busy / os.sysconf("SC_CLK_TCK")


def rounds(
    cases: dict[str, Callable[[], Any]],
    count: int,
    warmup: int = 1,
    between: Callable[[], None] | None = None,
) -> dict[str, dict[str, list[float]]]:
    """Times every case once per round, `count` rounds after `warmup` untimed ones.

    Each call is timed on the wall clock (device work included) and in process
    CPU time (`time.process_time()`: every thread of this process, background
    writers included); `others` is how many cores other work on the host kept
    busy meanwhile, on average (from /proc/stat; NaN where it cannot be read):
    the load that makes one round slower than the next. Odd rounds run the cases in reverse order, so each case
    sits next to the ones it is compared with equally often and a trend in the
    load cancels; put a case next to its baseline in `cases` to pair them
    closely.

    Args:
        cases: `{name: call}`.
        count: timed rounds.
        warmup: untimed rounds first (tracing, caches, first-use costs).
        between: called untimed after every call (e.g. flush files to disk),
            or None.

    Returns:
        `{name: {"wall": [seconds], "cpu": [seconds], "others": [cores]}}`, one
        value per timed round.
    """
    times = {name: {"wall": [], "cpu": [], "others": []} for name in cases}
    names = list(cases)
    for index in range(warmup + count):
        for name in names if index % 2 == 0 else names[::-1]:
            host, cpu, start = host_cpu_seconds(), time.process_time(), time.perf_counter()
            sync(cases[name]())
            wall, cpu = time.perf_counter() - start, time.process_time() - cpu
            others = math.nan if host is None else max(0.0, (host_cpu_seconds() - host - cpu) / wall)
            if index >= warmup:
                times[name]["wall"].append(wall)
                times[name]["cpu"].append(cpu)
                times[name]["others"].append(others)
            if between is not None:
                between()
    return times


# Two-sided 95 % quantiles of Student's t for 1..30 degrees of freedom.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
         2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
         2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t_quantile_975(df: int) -> float:
    """The 97.5 % quantile of Student's t with `df` degrees of freedom (a 95 % interval)."""
    if df < 1:
        return math.inf
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964  # Cornish-Fisher expansion: within 1e-3 beyond 30 degrees of freedom
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def mean_ci(values: Sequence[float]) -> tuple[float, float, float]:
    """Mean and t-based 95 % confidence interval of `values` (independent rounds)."""
    n = len(values)
    mean = float(statistics.fmean(values))
    if n < 2:
        return mean, -math.inf, math.inf
    half = t_quantile_975(n - 1) * statistics.stdev(values) / math.sqrt(n)
    return mean, mean - half, mean + half


def median_ci(values: Sequence[float]) -> tuple[float, float, float]:
    """Median and distribution-free 95 % confidence interval of `values`.

    The interval is between order statistics, from the binomial distribution
    of how many values fall below the median (the sign test's interval): it
    assumes nothing about the shape of the noise and is robust to a round hit
    by a burst of load, which the mean's interval is not. It needs 6 values
    or more; with fewer it is unbounded.
    """
    ordered = sorted(values)
    n = len(ordered)
    mid = median(ordered)
    # The largest k with P(Binomial(n, 1/2) < k) <= 2.5 %: [x_(k), x_(n+1-k)].
    k, below = 0, 0.0
    while k < n // 2:
        below += math.comb(n, k) / 2**n
        if below > 0.025:
            break
        k += 1
    if k == 0:
        return mid, -math.inf, math.inf
    return mid, ordered[k - 1], ordered[n - k]


def paired(values: Sequence[float], base: Sequence[float]) -> dict[str, Any]:
    """Per-round ratios `values[i] / base[i] - 1` (an overhead), summarised.

    Returns:
        `median`, `median_ci95` (order statistics), `mean`, `mean_ci95` (t-based),
        `min`, `max`, `n` and the `ratios` themselves, all as overheads
        (0.02 is +2 %).
    """
    if len(values) != len(base):
        raise ValueError(f"paired() needs one baseline per round: {len(values)} != {len(base)}")
    overheads = [v / b - 1.0 for v, b in zip(values, base)]
    mid, mid_lo, mid_hi = median_ci(overheads)
    mean, lo, hi = mean_ci(overheads)
    return {
        "n": len(overheads),
        "median": mid,
        "median_ci95": [mid_lo, mid_hi],
        "mean": mean,
        "mean_ci95": [lo, hi],
        "min": min(overheads),
        "max": max(overheads),
        "ratios": overheads,
    }


def load_adjusted(values: Sequence[float], base: Sequence[float], others: Sequence[float],
                  base_others: Sequence[float]) -> dict[str, Any]:
    """The per-round overhead `values / base - 1` at equal load from other work, with its interval.

    On a shared host most of the scatter of a paired ratio is how much more
    of the cores other work took during one run of the pair than during the
    other (`rounds()` measures it as `others`). A least-squares line of the
    overhead against that difference, over the rounds, gives the overhead at
    zero difference (its intercept) with a t-based 95 % interval: the paired
    comparison with the measured interference taken out. Where the callbacks'
    own work takes cores from the other work, the difference leans negative
    and the estimate errs high (towards failing a target), never low.

    Returns:
        `estimate`, `ci95`, `slope` (overhead per core of extra load), `r2`
        (the share of the scatter the load explains), `n`; an unbounded
        interval with fewer than 3 rounds or without load figures.
    """
    y = [v / b - 1.0 for v, b in zip(values, base)]
    x = [o - p for o, p in zip(others, base_others)]
    n = len(y)
    unbounded = {"estimate": statistics.fmean(y) if y else math.nan, "ci95": [-math.inf, math.inf],
                 "slope": math.nan, "r2": math.nan, "n": n}
    if n < 3 or any(math.isnan(v) for v in x):
        return unbounded
    mx, my = statistics.fmean(x), statistics.fmean(y)
    sxx = sum((v - mx) ** 2 for v in x)
    syy = sum((v - my) ** 2 for v in y)
    if sxx == 0:
        return {**unbounded, "ci95": list(mean_ci(y)[1:])}
    slope = sum((a - mx) * (b - my) for a, b in zip(x, y)) / sxx
    intercept = my - slope * mx
    residual = sum((b - intercept - slope * a) ** 2 for a, b in zip(x, y))
    se = math.sqrt(residual / (n - 2) * (1.0 / n + mx**2 / sxx))
    half = t_quantile_975(n - 2) * se
    return {"estimate": intercept, "ci95": [intercept - half, intercept + half], "slope": slope,
            "r2": 1.0 - residual / syy if syy else math.nan, "n": n}


def resolves(ci: Sequence[float], threshold: float, width: float) -> bool:
    """Whether a confidence interval settles a comparison with `threshold`.

    True if the interval is narrower than `width`, or lies wholly on one
    side of `threshold` (then even a wide interval answers the question).
    """
    low, high = ci
    return (high - low) < width or high <= threshold or low > threshold


def pct(value: float) -> str:
    """`0.0123` as `+1.2 %`."""
    return f"{value * 100:+.1f} %"


def pct_ci(summary: dict[str, Any], key: str = "median") -> str:
    """A `paired()` summary as `+1.2 % [-0.3, +2.6]`."""
    low, high = summary[f"{key}_ci95"]
    return f"{pct(summary[key])} [{low * 100:+.1f}, {high * 100:+.1f}]"


def environment() -> dict[str, Any]:
    """Versions, backend, devices, machine and date for a results record."""
    import keras

    from keras_callbacks_plus import distribute

    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "backend": keras.backend.backend(),
        "keras": keras.version(),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "devices": distribute.list_devices(),
    }
    if info["backend"] == "jax":
        import jax

        info["jax"] = jax.__version__
        info["device_kinds"] = sorted({d.device_kind for d in jax.local_devices()})
    else:
        import tensorflow as tf

        info["tensorflow"] = tf.__version__
    return info


def markdown_table(rows: list[dict[str, Any]], columns: Sequence[str]) -> str:
    def cell(v):
        if v is None:
            return ""
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def _finite(value: Any) -> Any:
    """`value` with NaN and infinities (unbounded intervals) as None: strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def write_results(out_dir: str | Path, name: str, record: dict[str, Any], table: str) -> Path:
    """Writes `<name>.json` (the record plus `environment()`) and `<name>.md`; prints the table."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    record = {"benchmark": name, "environment": {**environment(), "load_average_end": load_average()},
              **record}
    (out / f"{name}.json").write_text(json.dumps(_finite(record), indent=2, default=str))
    (out / f"{name}.md").write_text(table + "\n")
    print(table)
    return out / f"{name}.json"


def pyplot():
    """`matplotlib.pyplot` drawing to files, or None (with a note) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib missing: no plot; install the `plot` extra)")
        return None
    return plt

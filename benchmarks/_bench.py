"""Timing helpers shared by every benchmark script in this folder.

Import this module before keras: `parse_args()` sets `KERAS_BACKEND` from
`--backend`, which must happen before keras is imported.

What a measurement is here: `warmup` untimed runs, then several timed runs,
reported as the median; cases that are compared are interleaved (A, B, C, A,
B, C, ...) so that machine noise hits them alike; device work is
synchronised before the clock stops.
"""

from __future__ import annotations

import argparse
import datetime
import json
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
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_results(out_dir: str | Path, name: str, record: dict[str, Any], table: str) -> Path:
    """Writes `<name>.json` (the record plus `environment()`) and `<name>.md`; prints the table."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    record = {"benchmark": name, "environment": environment(), **record}
    (out / f"{name}.json").write_text(json.dumps(record, indent=2, default=str))
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

"""Overhead of RobustEarlyStopping on `fit`, at defaults and with its batch-level checks on.

Cases, interleaved with a bare `fit` and timed as medians (see _bench.py); `ratio`
is median / bare median, `min_ratio` fastest / fastest bare round (load from
other work only adds time), `paired_ratio` (and `overhead_pct`) the median of
the per-round ratios:

* `epoch_only`: `check_finite=False`, no `max_time`: no batch hook at all.
* `defaults`: the defaults (`check_finite=True`: an async-safe batch hook).
* `batch_checks`: `check_finite=True` and `max_time` set (never reached).
* `noop_batch_hook`: a plain callback whose `on_train_batch_end` does
  nothing. A batch hook that is not `async_safe` makes Keras call batch-end
  callbacks synchronously (on JAX that also waits for each step's logs):
  the price RobustEarlyStopping avoids by being async-safe.

Every RobustEarlyStopping case monitors `loss` with a patience that never
triggers, and keeps best weights (a host copy on each improving epoch, a
restore at the end), so the runs do the same steps as the bare one. Also
reported: the cost of one call of the batch hook, in microseconds, and the
cost of the host copy of the weights taken at the start of each `fit` (what a
non-finite stop before the first improvement restores) against one copy of
the best weights (target: no more), on a ~8 M-parameter model.

    python benchmarks/early_stopping_overhead.py [--backend jax] [--quick] [--out DIR]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

import _bench  # noqa: E402  (sets KERAS_BACKEND before keras is imported)

NAME = "early_stopping_overhead"
TARGET_PCT = 1.0


def _add_flags(parser):
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per case")
    parser.add_argument("--width", type=int, default=None, help="hidden units (step size)")
    parser.add_argument("--batch-size", type=int, default=None, help="batch size (step size)")
    parser.add_argument("--steps", type=int, default=None, help="steps per epoch")


def main() -> None:
    args = _bench.parse_args(__doc__.splitlines()[0], _add_flags)
    import keras
    import numpy as np

    from keras_callbacks_plus.early_stopping import RobustEarlyStopping

    if args.quick:
        features, width, batch, steps, epochs, repeats = 16, 32, 32, 8, 2, 2
    else:
        features, width, batch, steps, epochs, repeats = 64, 256, 128, 200, 4, 9
    repeats = args.repeats or repeats
    width = args.width or width
    batch = args.batch_size or batch
    steps = args.steps or steps
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch * steps, features)).astype("float32")
    y = rng.integers(0, 10, size=(batch * steps,)).astype("int32")

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((features,)),
            keras.layers.Dense(width, activation="relu"),
            keras.layers.Dense(width, activation="relu"),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")

    class NoopBatchHook(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            pass

    never = 10**9

    def stopper(**kwargs):
        return RobustEarlyStopping("loss", patience=never, **kwargs)

    def fit(make_callbacks):
        def run():
            model.fit(x, y, batch_size=batch, epochs=epochs, shuffle=False, verbose=0,
                      callbacks=make_callbacks())
        return run

    cases = {
        "bare": fit(list),
        "epoch_only": fit(lambda: [stopper(check_finite=False)]),
        "defaults": fit(lambda: [stopper()]),
        "batch_checks": fit(lambda: [stopper(max_time=1e9)]),
        "noop_batch_hook": fit(lambda: [NoopBatchHook()]),
    }
    times = _bench.interleaved(cases, repeats=repeats, warmup=1)

    # One call of the batch hook with both checks on, outside fit.
    hook = RobustEarlyStopping("loss", max_time=1e9, restore_best_weights=False)
    hook.set_model(model)
    hook.on_train_begin()
    logs = {"loss": 0.5}
    calls = 2_000 if args.quick else 200_000
    start = time.perf_counter()
    for i in range(calls):
        hook.on_train_batch_end(i, logs)
    hook_us = (time.perf_counter() - start) / calls * 1e6
    hook.on_train_end()

    start_copy_s, best_copy_s = _copy_costs(keras, np, RobustEarlyStopping, args.quick, repeats)

    total_steps = steps * epochs
    bare = _bench.median(times["bare"])
    rows = []
    for name, values in times.items():
        median = _bench.median(values)
        # Each round times every case back to back: the ratio within a round
        # cancels load that drifts between rounds.
        paired = _bench.median([v / b for v, b in zip(values, times["bare"])])
        rows.append(
            {
                "case": name,
                "median_s": median,
                "step_ms": median / total_steps * 1e3,
                "ratio": median / bare,
                # Load from other work only adds time: the fastest rounds compare best.
                "min_ratio": min(values) / min(times["bare"]),
                "paired_ratio": paired,
                "overhead_pct": (paired - 1.0) * 100.0,
            }
        )
    step_us = bare / total_steps * 1e6
    # Against a plain (synchronously dispatched) empty batch hook.
    own = {
        name: _bench.median([v / n for v, n in zip(times[name], times["noop_batch_hook"])])
        for name in ("defaults", "batch_checks")
    }
    table = _bench.markdown_table(
        rows, ["case", "median_s", "step_ms", "ratio", "min_ratio", "paired_ratio", "overhead_pct"]
    )
    table += (
        f"\n\nbatch hook call: {hook_us:.3f} us = {hook_us / step_us * 100:.4f} % of a "
        f"{step_us:.0f} us step; target: overhead <= {TARGET_PCT:g} % of step time."
        f"\nagainst an empty batch hook (paired): defaults {own['defaults']:.4f}, "
        f"batch_checks {own['batch_checks']:.4f}."
        f"\nfit-start copy of the weights: {start_copy_s * 1e3:.2f} ms; one best-weights copy: "
        f"{best_copy_s * 1e3:.2f} ms; ratio {start_copy_s / best_copy_s:.3f} (target <= 1)."
    )
    record = {
        "quick": args.quick,
        "config": {"features": features, "width": width, "batch_size": batch,
                   "steps_per_epoch": steps, "epochs": epochs, "repeats": repeats},
        "target_overhead_pct": TARGET_PCT,
        "times_s": times,
        "rows": rows,
        "ratios": {row["case"]: row["ratio"] for row in rows},
        "vs_noop_batch_hook": own,
        "hook_call_us": hook_us,
        "hook_call_pct_of_step": hook_us / step_us * 100,
        "fit_start_copy_s": start_copy_s,
        "best_weights_copy_s": best_copy_s,
        "fit_start_vs_best_copy": start_copy_s / best_copy_s,
    }
    _bench.write_results(args.out, NAME, record, table)


def _copy_costs(keras, np, RobustEarlyStopping, quick, repeats):
    """Seconds of the fit-start copy and of one best-weights copy, each as a paired difference.

    The fit-start copy: `on_train_begin` with `check_finite=True` (copy taken)
    minus with `check_finite=False` (none). A best-weights copy: an improving
    `on_epoch_end` minus one that does not improve.
    """
    width = 64 if quick else 2048  # 2 x 2048 x 2048: ~8.4 M parameters
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((width,)), keras.layers.Dense(width),
                              keras.layers.Dense(width)])
    model.compile(optimizer="sgd", loss="mse")

    # Every copy stays alive to the end, so that each one writes into fresh
    # memory, as a fit's first copy does: its page faults are part of its cost,
    # and memory the allocator reuses would hide them from one case only.
    kept = []

    def train_begin(check_finite):
        stopper = RobustEarlyStopping("loss", check_finite=check_finite)
        stopper.set_model(model)
        start = time.perf_counter()
        stopper.on_train_begin()
        elapsed = time.perf_counter() - start
        kept.append(stopper)
        return elapsed

    stopper = RobustEarlyStopping("loss", patience=10**9, check_finite=False)
    stopper.set_model(model)
    stopper.on_train_begin()
    losses = iter(np.linspace(1.0, 0.0, 4 * repeats + 4))

    def epoch_end(improves):
        value = next(losses) if improves else 2.0
        start = time.perf_counter()
        stopper.on_epoch_end(0, {"loss": value})
        elapsed = time.perf_counter() - start
        kept.append(stopper.best_weights)
        return elapsed

    start_copy, best_copy = [], []
    for _ in range(2 * repeats + 1):
        start_copy.append(train_begin(True) - train_begin(False))
        best_copy.append(epoch_end(True) - epoch_end(False))
    return _bench.median(start_copy[1:]), _bench.median(best_copy[1:])


if __name__ == "__main__":
    main()

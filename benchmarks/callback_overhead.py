"""What each callback of keras_callbacks_plus costs `fit`, alone and together.

Same model and data, interleaved repeats in one run: bare `fit`, `fit` with
each callback at its defaults, and with ParallelModelCheckpoint (async, every
epoch), ProgressiveUnfreezing (no stage change) and RobustEarlyStopping
together; ActivationLogger, which runs extra forward passes by design, is
listed apart. Each overhead is printed as a ratio to the bare `fit`.

Target: the three together at most 2 % over bare `fit`.

    python benchmarks/callback_overhead.py [--backend jax] [--quick]
"""

import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _bench  # noqa: E402

args = _bench.parse_args(
    __doc__.splitlines()[0],
    lambda p: (
        p.add_argument("--repeats", type=int, default=5),
        p.add_argument("--epochs", type=int, default=3),
        p.add_argument("--steps", type=int, default=600, help="steps per epoch"),
    ),
)

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_callbacks_plus as kcp  # noqa: E402

if args.quick:
    args.repeats, args.epochs, args.steps = 1, 2, 4
WIDTH, BATCH = (32, 16) if args.quick else (512, 128)

rng = np.random.default_rng(0)
x = rng.normal(size=(BATCH * args.steps, 64)).astype("float32")
y = rng.integers(0, 10, size=len(x))
val = (x[: BATCH * 4], y[: BATCH * 4])
workdir = tempfile.mkdtemp(prefix="kcp-overhead-")


def make_model():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((64,))
    h = keras.layers.Dense(WIDTH, activation="relu", name="hidden1")(inputs)
    h = keras.layers.Dense(WIDTH, activation="relu", name="hidden2")(h)
    model = keras.Model(inputs, keras.layers.Dense(10, name="head")(h))
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def checkpoint():
    return kcp.ParallelModelCheckpoint(os.path.join(workdir, "m.keras"))


def unfreezing():
    return kcp.ProgressiveUnfreezing({0: "all"})


def early_stopping():
    return kcp.RobustEarlyStopping()


def activation_logger():
    return kcp.ActivationLogger(x[:BATCH])


configurations = {
    "bare fit": lambda: [],
    "ParallelModelCheckpoint": lambda: [checkpoint()],
    "ProgressiveUnfreezing": lambda: [unfreezing()],
    "RobustEarlyStopping": lambda: [early_stopping()],
    "the three together": lambda: [unfreezing(), early_stopping(), checkpoint()],
}
if hasattr(kcp, "ActivationLogger"):
    configurations["ActivationLogger (apart)"] = lambda: [activation_logger()]


def case(make_callbacks):
    # One model per case, traced in the warm-up round: the timed fits measure
    # training and callbacks, not building and tracing.
    model = make_model()

    def run():
        return model.fit(x, y, validation_data=val, batch_size=BATCH, epochs=args.epochs,
                         shuffle=False, verbose=0, callbacks=make_callbacks()).history
    return run


try:
    times = _bench.interleaved(
        {name: case(make) for name, make in configurations.items()}, repeats=args.repeats, warmup=1
    )
finally:
    shutil.rmtree(workdir, ignore_errors=True)

bare = _bench.median(times["bare fit"])
# `min_overhead` compares the fastest rounds: load from other work only adds time.
rows = [{"case": name, "fit_s": _bench.median(t), "overhead": _bench.median(t) / bare - 1.0,
         "min_overhead": min(t) / min(times["bare fit"]) - 1.0}
        for name, t in times.items()]
together = next(r for r in rows if r["case"] == "the three together")
_bench.write_results(
    args.out, "callback_overhead",
    {"rows": rows, "raw_seconds": times, "epochs": args.epochs, "steps_per_epoch": args.steps,
     "quick": args.quick,
     "targets": {"three_together_overhead": {"max": 0.02, "measured": together["overhead"]}}},
    _bench.markdown_table(rows, ["case", "fit_s", "overhead", "min_overhead"]),
)
print(f"the three together: {together['overhead']:+.1%} over bare fit, fastest rounds "
      f"{together['min_overhead']:+.1%} (target <= +2 %)")

"""Step time with a frozen backbone vs a fully trainable one, and the cost of each stage change.

A CNN backbone (keras.applications.MobileNetV3Small, weights=None, 96x96
inputs) under a small head, Adam, batch 32. In one run, interleaved:

* step time of the model whose backbone ProgressiveUnfreezing froze (stage 0:
  the head only) against the same model fully trainable (`{0: "all"}`),
  timed over `train_on_batch` calls. Target: the frozen step at least 2.5x
  faster (frozen layers need no backward pass; frozen BatchNormalization
  runs in inference mode).
* the one-off cost of each stage change inside one `fit`
  (`{0: head, 1: last blocks, 2: all}`): the time from the epoch's start to
  the end of its first step (optimizer rebuild, new train function, its
  trace and compilation, the step) minus one ordinary step of that stage,
  reported in ordinary steps of that stage.

    python benchmarks/freeze_speedup.py [--backend jax] [--quick] [--out DIR]

`--quick` uses a 3-block CNN on 32x32 inputs so that it runs in seconds.
"""

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _bench  # noqa: E402

args = _bench.parse_args(
    __doc__.splitlines()[0],
    lambda p: (
        p.add_argument("--rounds", type=int, default=10, help="interleaved timing rounds"),
        p.add_argument("--calls", type=int, default=3, help="train_on_batch calls per timing"),
        p.add_argument("--steps", type=int, default=6, help="steps per epoch of the stage run"),
    ),
)

import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_callbacks_plus.unfreezing import ProgressiveUnfreezing  # noqa: E402

if args.quick:
    args.rounds, args.calls, args.steps = 3, 2, 3
    SIZE, BATCH, LAST = 32, 8, "block3"
else:
    SIZE, BATCH, LAST = 96, 32, "expanded_conv_10"
TARGET = 2.5
STAGES = {0: ["head_hidden", "head"], 1: f"backbone/{LAST}*", 2: "all"}


def make_backbone():
    if args.quick:
        inputs = keras.Input((SIZE, SIZE, 3))
        x = inputs
        for i, filters in enumerate((16, 32, 64), start=1):
            x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"block{i}_conv")(x)
            x = keras.layers.BatchNormalization(name=f"block{i}_bn")(x)
            x = keras.layers.ReLU(name=f"block{i}_relu")(x)
            x = keras.layers.MaxPooling2D(name=f"block{i}_pool")(x)
        return keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x), name="backbone")
    return keras.applications.MobileNetV3Small(
        input_shape=(SIZE, SIZE, 3), include_top=False, weights=None,
        include_preprocessing=False, pooling="avg", name="backbone",
    )


def make_model():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((SIZE, SIZE, 3))
    x = make_backbone()(inputs)
    x = keras.layers.Dense(64, activation="relu", name="head_hidden")(x)
    outputs = keras.layers.Dense(10, name="head")(x)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


rng = np.random.default_rng(0)
x = rng.uniform(size=(BATCH * args.steps, SIZE, SIZE, 3)).astype("float32")
y = rng.integers(0, 10, BATCH * args.steps)
xb, yb = x[:BATCH], y[:BATCH]


# -- frozen vs trainable step ----------------------------------------------------
def prepared(schedule):
    """A model after one step of fit under `schedule` (flags set, train function traced)."""
    model = make_model()
    model.fit(xb, yb, batch_size=BATCH, epochs=1, verbose=0, callbacks=[ProgressiveUnfreezing(schedule)])
    return model


frozen, trainable = prepared({0: STAGES[0]}), prepared({0: "all"})


def steps(model):
    def run():
        for _ in range(args.calls):
            logs = model.train_on_batch(xb, yb, return_dict=True)
        return logs

    return run


cases = {"frozen": steps(frozen), "trainable": steps(trainable)}
times = _bench.interleaved(cases, args.rounds, warmup=1)
step_s = {name: _bench.median(t) / args.calls for name, t in times.items()}
speedup = step_s["trainable"] / step_s["frozen"]


# -- stage changes in one fit ----------------------------------------------------
class Clock(keras.callbacks.Callback):
    """Epoch starts (before ProgressiveUnfreezing runs) and step ends, synchronised."""

    def __init__(self):
        super().__init__()
        self.epoch_start, self.step_ends = {}, {}

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch
        self.step_ends[epoch] = []
        self.epoch_start[epoch] = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        float(logs["loss"])  # waits for the step
        self.step_ends[self.epoch].append(time.perf_counter())


class AfterRebuild(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.done = {}

    def on_epoch_begin(self, epoch, logs=None):
        self.done[epoch] = time.perf_counter()


clock, after = Clock(), AfterRebuild()
model = make_model()
model.fit(x, y, batch_size=BATCH, epochs=len(STAGES), shuffle=False, verbose=0,
          callbacks=[clock, ProgressiveUnfreezing(STAGES), after])
transitions = []
for stage, epoch in enumerate(STAGES):
    ends = [clock.epoch_start[epoch]] + clock.step_ends[epoch]
    step = statistics.median(b - a for a, b in zip(ends[1:-1], ends[2:]))
    first = ends[1] - ends[0]
    transitions.append({
        "stage": stage,
        "epoch": epoch,
        "trainable": STAGES[epoch] if isinstance(STAGES[epoch], str) else ", ".join(STAGES[epoch]),
        "rebuild_s": after.done[epoch] - clock.epoch_start[epoch],
        "first_step_s": first,
        "step_s": step,
        "cost_steps": (first - step) / step,
    })

rows = [
    {"case": "backbone frozen (stage 0)", "step_ms": step_s["frozen"] * 1e3, "speedup": speedup},
    {"case": "fully trainable", "step_ms": step_s["trainable"] * 1e3, "speedup": 1.0},
]
table = (
    f"Step time, {'tiny CNN' if args.quick else 'MobileNetV3Small'} {SIZE}x{SIZE}, batch {BATCH}, "
    f"{keras.backend.backend()} (target: frozen >= {TARGET}x faster)\n\n"
    + _bench.markdown_table(rows, ["case", "step_ms", "speedup"])
    + "\n\nStage changes inside one fit (stage 0 includes the first trace of fit)\n\n"
    + _bench.markdown_table(
        transitions,
        ["stage", "epoch", "trainable", "rebuild_s", "first_step_s", "step_s", "cost_steps"],
    )
)
_bench.write_results(
    args.out,
    "freeze_speedup",
    {
        "config": {
            "backbone": "tiny CNN" if args.quick else "MobileNetV3Small", "size": SIZE,
            "batch": BATCH, "rounds": args.rounds, "calls": args.calls,
            "steps_per_epoch": args.steps, "quick": args.quick,
            "stages": {str(k): v for k, v in STAGES.items()},
        },
        "step_s": step_s,
        "step_samples_s": {name: [t / args.calls for t in ts] for name, ts in times.items()},
        "speedup": speedup,
        "target_speedup": TARGET,
        "meets_target": speedup >= TARGET,
        "transitions": transitions,
    },
    table,
)

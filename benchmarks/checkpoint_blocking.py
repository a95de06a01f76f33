"""How long each checkpoint save blocks training, and what saving every epoch costs `fit`.

In one run, interleaved (bare fit, then each checkpointer, round after round):
a ~25 M-parameter MLP trained with Adam, saving a `.keras` file every epoch with
`keras.callbacks.ModelCheckpoint`, ParallelModelCheckpoint synchronous,
ParallelModelCheckpoint async (the default), and `keras.callbacks.OrbaxCheckpoint`
where orbax-checkpoint is installed. Blocking time = the time the training
thread spends in the callback's `on_epoch_end` (for the async save: copying
weights and optimizer state to host memory, plus any wait for the previous
write). The first save of each run builds the writer's model and is left out
of the blocking median.

Targets: async blocking <= 10 % of ModelCheckpoint's; fit overhead of the async
save every epoch <= 3.5 %.

    python benchmarks/checkpoint_blocking.py [--backend jax] [--quick]
"""

import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _bench  # noqa: E402

args = _bench.parse_args(
    __doc__.splitlines()[0],
    lambda p: (
        p.add_argument("--rounds", type=int, default=2, help="interleaved rounds"),
        p.add_argument("--epochs", type=int, default=3),
        p.add_argument("--steps", type=int, default=8, help="steps per epoch"),
    ),
)

import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_callbacks_plus import ParallelModelCheckpoint  # noqa: E402

if args.quick:
    args.rounds, args.epochs, args.steps = 1, 2, 2
    WIDTH, INPUTS, BATCH = 128, 64, 32
else:
    WIDTH, INPUTS, BATCH = 4096, 2048, 256  # 2048*4096 + 4096*4096 + 4096*10: ~25.2 M


def make_model():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((INPUTS,))
    x = keras.layers.Dense(WIDTH, activation="relu")(inputs)
    x = keras.layers.Dense(WIDTH, activation="relu")(x)
    model = keras.Model(inputs, keras.layers.Dense(10)(x))
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


class BlockingTimer:
    """Times a callback's on_epoch_end on the training thread."""

    def __init__(self, callback):
        self.seconds = []
        inner = callback.on_epoch_end

        def timed(epoch, logs=None):
            start = time.perf_counter()
            inner(epoch, logs)
            self.seconds.append(time.perf_counter() - start)

        callback.on_epoch_end = timed


def checkpointers(directory):
    made = {
        "keras.ModelCheckpoint": lambda: keras.callbacks.ModelCheckpoint(
            os.path.join(directory, "keras_{epoch}.keras")
        ),
        "ParallelModelCheckpoint sync": lambda: ParallelModelCheckpoint(
            os.path.join(directory, "sync_{epoch}.keras"), async_save=False
        ),
        "ParallelModelCheckpoint async": lambda: ParallelModelCheckpoint(
            os.path.join(directory, "async_{epoch}.keras")
        ),
    }
    try:
        import orbax.checkpoint  # noqa: F401

        made["keras.OrbaxCheckpoint"] = lambda: keras.callbacks.OrbaxCheckpoint(
            os.path.join(directory, "orbax")
        )
    except Exception as error:  # optional dependency
        print(f"(keras.OrbaxCheckpoint left out: {error})")
    return made


rng = np.random.default_rng(0)
x = rng.normal(size=(BATCH * args.steps, INPUTS)).astype("float32")
y = rng.integers(0, 10, size=len(x))
fit_kwargs = dict(batch_size=BATCH, epochs=args.epochs, shuffle=False, verbose=0)

make_model().fit(x[:BATCH], y[:BATCH], batch_size=BATCH, verbose=0)  # warm-up: compile, caches
fit_seconds = {"bare fit": []}
blocking = {}
unavailable = {}
workdir = tempfile.mkdtemp(prefix="kcp-bench-")
try:
    for _ in range(args.rounds):
        model = make_model()
        fit_seconds["bare fit"].append(_bench.time_call(lambda: model.fit(x, y, **fit_kwargs)))
        for name, make in checkpointers(workdir).items():
            if name in unavailable:
                continue
            model = make_model()
            try:
                callback = make()
                timer = BlockingTimer(callback)
                seconds = _bench.time_call(lambda: model.fit(x, y, callbacks=[callback], **fit_kwargs))
            except Exception as error:
                unavailable[name] = f"{type(error).__name__}: {error}"[:200]
                continue
            fit_seconds.setdefault(name, []).append(seconds)
            blocking.setdefault(name, []).extend(timer.seconds[1:] or timer.seconds)
            shutil.rmtree(workdir)
            os.makedirs(workdir)
finally:
    shutil.rmtree(workdir, ignore_errors=True)

bare = _bench.median(fit_seconds["bare fit"])
reference = _bench.median(blocking["keras.ModelCheckpoint"])
rows = [{"case": "bare fit", "fit_s": bare, "fit_overhead": 0.0}]
for name, seconds in blocking.items():
    rows.append(
        {
            "case": name,
            "blocking_s": _bench.median(seconds),
            "blocking_vs_ModelCheckpoint": _bench.median(seconds) / reference,
            "fit_s": _bench.median(fit_seconds[name]),
            "fit_overhead": _bench.median(fit_seconds[name]) / bare - 1.0,
        }
    )
for name, reason in unavailable.items():
    rows.append({"case": f"{name} (unavailable: {reason})"})
async_row = next(r for r in rows if r["case"] == "ParallelModelCheckpoint async")
record = {
    "parameters": int(make_model().count_params()),
    "epochs": args.epochs,
    "steps_per_epoch": args.steps,
    "rounds": args.rounds,
    "quick": args.quick,
    "rows": rows,
    "raw_fit_seconds": fit_seconds,
    "raw_blocking_seconds": blocking,
    "targets": {
        "async_blocking_vs_ModelCheckpoint": {"max": 0.10, "measured": async_row["blocking_vs_ModelCheckpoint"]},
        "async_fit_overhead": {"max": 0.035, "measured": async_row["fit_overhead"]},
    },
}
table = _bench.markdown_table(
    rows, ["case", "blocking_s", "blocking_vs_ModelCheckpoint", "fit_s", "fit_overhead"]
)
_bench.write_results(args.out, "checkpoint_blocking", record, table)
print(
    f"async blocking = {async_row['blocking_vs_ModelCheckpoint']:.3f} x ModelCheckpoint's "
    f"(target <= 0.10); fit overhead of an async save every epoch = "
    f"{async_row['fit_overhead']:+.1%} (target <= 3.5 %)"
)

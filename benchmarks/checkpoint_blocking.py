"""How long each checkpoint save blocks training, and what saving every epoch costs `fit`.

A ~25 M-parameter MLP with Adam state (a ~300 MB `.keras` file), saved with
`keras.callbacks.ModelCheckpoint`, ParallelModelCheckpoint synchronous,
ParallelModelCheckpoint async (the default), and `keras.callbacks.OrbaxCheckpoint`
where orbax-checkpoint is installed. Two measures, each interleaved in one run:

* Blocking: each callback's epoch hooks are driven on the trained model, and
  the time its `on_epoch_end` keeps the training thread is taken, with a pause
  between saves long enough for a background write to finish (an epoch longer
  than a save, the usual case). For the async save this is the copy of weights
  and optimizer state to host memory. The first save of each callback builds
  its writer's model and is left out.
* `fit` overhead: real `fit` runs, bare and with the async save every epoch.
  On a CPU-only host the writer shares the cores with training, so this
  figure is an upper bound of what a GPU host sees.

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
        p.add_argument("--rounds", type=int, default=2, help="interleaved fit rounds"),
        p.add_argument("--epochs", type=int, default=3, help="epochs per fit"),
        p.add_argument("--steps", type=int, default=12, help="steps per epoch"),
        p.add_argument("--saves", type=int, default=3, help="timed saves per callback"),
        p.add_argument("--pause", type=float, default=3.0, help="seconds between saves"),
    ),
)

import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_callbacks_plus import ParallelModelCheckpoint  # noqa: E402

if args.quick:
    args.rounds, args.epochs, args.steps, args.saves, args.pause = 1, 2, 2, 1, 0.1
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

model = make_model()
model.fit(x[:BATCH], y[:BATCH], batch_size=BATCH, verbose=0)  # builds the optimizer state
logs = {"loss": 1.0, "val_loss": 1.0}
blocking, unavailable = {}, {}
workdir = tempfile.mkdtemp(prefix="kcp-bench-")
try:
    made = {}
    for name, make in checkpointers(workdir).items():
        try:
            callback = make()
            callback.set_model(model)
            callback.on_train_begin()
            made[name] = callback
        except Exception as error:
            unavailable[name] = f"{type(error).__name__}: {error}"[:200]
    for epoch in range(args.saves + 1):
        for name, callback in list(made.items()):
            callback.on_epoch_begin(epoch)
            start = time.perf_counter()
            try:
                callback.on_epoch_end(epoch, logs)
            except Exception as error:
                unavailable[name] = f"{type(error).__name__}: {error}"[:200]
                made.pop(name)
                continue
            if epoch:  # the first save builds the writer's model
                blocking.setdefault(name, []).append(time.perf_counter() - start)
            time.sleep(args.pause)  # "the rest of the epoch": background writes finish
    for callback in made.values():
        callback.on_train_end()
    shutil.rmtree(workdir)
    os.makedirs(workdir)

    fit_seconds = {"bare fit": [], "ParallelModelCheckpoint async": []}
    for _ in range(args.rounds):
        bare_model, saved_model = make_model(), make_model()
        fit_seconds["bare fit"].append(_bench.time_call(lambda: bare_model.fit(x, y, **fit_kwargs)))
        callback = ParallelModelCheckpoint(os.path.join(workdir, "fit_{epoch}.keras"), max_to_keep=1)
        fit_seconds["ParallelModelCheckpoint async"].append(
            _bench.time_call(lambda: saved_model.fit(x, y, callbacks=[callback], **fit_kwargs))
        )
finally:
    shutil.rmtree(workdir, ignore_errors=True)

bare = _bench.median(fit_seconds["bare fit"])
reference = _bench.median(blocking["keras.ModelCheckpoint"])
rows = [{"case": "bare fit", "fit_s": bare}]
for name, seconds in blocking.items():
    row = {
        "case": name,
        "blocking_s": _bench.median(seconds),
        "blocking_vs_ModelCheckpoint": _bench.median(seconds) / reference,
    }
    if name in fit_seconds:
        row["fit_s"] = _bench.median(fit_seconds[name])
        row["fit_overhead"] = row["fit_s"] / bare - 1.0
    rows.append(row)
for name, reason in unavailable.items():
    rows.append({"case": f"{name} (unavailable: {reason})"})
async_row = next(r for r in rows if r["case"] == "ParallelModelCheckpoint async")
record = {
    "parameters": int(make_model().count_params()),
    "epochs": args.epochs,
    "steps_per_epoch": args.steps,
    "rounds": args.rounds,
    "saves": args.saves,
    "pause_s": args.pause,
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

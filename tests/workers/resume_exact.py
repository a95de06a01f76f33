"""Interrupted and resumed training runs for tests/test_resume_exact.py; mode in argv[1].

Every run trains a data-parallel twin over 2 CPU devices with the four
callbacks of this package (ProgressiveUnfreezing, RobustEarlyStopping,
ActivationLogger, ParallelModelCheckpoint) on one of three kinds of data:
`arrays` (shuffle=False), `shuffled` (arrays, shuffle=True, seeded) and
`hdf5` (a shuffled, seeded HDF5Sequence). 3 epochs of 6 batches.

* `interrupt DIR KIND SEED COUNT`: the uninterrupted run (its final weights
  and optimizer variables into DIR/KIND/reference.npz), then one run that
  SIGTERM stops COUNT times at random batches, each time resumed in this
  process from the checkpoint that preemption wrote (into DIR/KIND/sigterm_<i>)
  and continued; prints one JSON line: the signal batches and how far the end
  of that chain is from the reference.
* `kill DIR KIND N`: one run with a checkpoint every 3 batches, into
  DIR/KIND/kill_<N>, killed by SIGKILL right after its N-th save was
  committed (`KCP_TEST_CRASH_AT`, set by the test).
* `resume DIR KIND`: resumes every interrupted run of DIR/KIND in this new
  process, trains it to the end, and prints one JSON line: per run, the epoch
  it resumed at and the largest difference of its weights and optimizer
  variables from the reference.

A twin is reused from run to run (its compiled functions too); `resume()`
overwrites all of its state.
"""

import json
import os
import random
import signal
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
from keras_callbacks_plus import distribute  # noqa: E402

distribute.emulate_cpu_devices(2)  # before the backend starts

import h5py  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_callbacks_plus import (  # noqa: E402
    ActivationLogger,
    HDF5Sequence,
    ParallelModelCheckpoint,
    ProgressiveUnfreezing,
    RobustEarlyStopping,
    data_parallel,
    resume,
)

KINDS = ("arrays", "shuffled", "hdf5")
EPOCHS, STEPS, BATCH = 3, 6, 16
rng = np.random.default_rng(0)
X = rng.normal(size=(STEPS * BATCH, 8)).astype("float32")
Y = ((X[:, 0] > 0).astype("int32") + (X[:, 1] > 0.5)) % 3


def data(folder, kind):
    if kind != "hdf5":
        return {"x": X, "y": Y, "shuffle": kind == "shuffled"}
    path = os.path.join(folder, "data.h5")
    if not os.path.exists(path):  # other processes may write it too: the same, atomically
        os.makedirs(folder, exist_ok=True)
        with h5py.File(f"{path}.{os.getpid()}", "w") as f:
            f["x"], f["y"] = X, Y
        os.replace(f"{path}.{os.getpid()}", path)
    return {"x": HDF5Sequence(path, batch_size=BATCH, seed=1)}


def twin():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8,), name="features")
    x = keras.layers.Dense(16, name="hidden")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.Activation("relu", name="relu")(x)
    x = keras.layers.Dropout(0.25, seed=3, name="dropout")(x)
    template = keras.Model(inputs, keras.layers.Dense(3, activation="softmax", name="head")(x))
    model = data_parallel(template)
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="sparse_categorical_crossentropy")
    return template, model


def callbacks(run, template, save_freq="epoch"):
    name = "ck_{epoch}.keras" if save_freq == "epoch" else "ck_{epoch}_{batch}.keras"
    os.makedirs(run, exist_ok=True)
    return [
        ProgressiveUnfreezing({0: "head", 2: "all"}),
        RobustEarlyStopping("loss", patience=50),
        ActivationLogger(X[:32], layers=["hidden", "relu"], h5_path=os.path.join(run, "act.h5")),
        ParallelModelCheckpoint(template, os.path.join(run, name), save_freq=save_freq),
    ]


class SignalAt(keras.callbacks.Callback):
    """SIGTERM to this process at the end of global batch `at` (counted from 1)."""

    def __init__(self, at):
        super().__init__()
        self.at, self.epoch = at, 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if self.epoch * STEPS + batch + 1 == self.at:
            os.kill(os.getpid(), signal.SIGTERM)


def state(model):
    values = model.get_weights() + [keras.ops.convert_to_numpy(v) for v in model.optimizer.variables]
    return [np.asarray(v) for v in values]


def max_diff(model, expected):
    return max(float(np.max(np.abs(a - b), initial=0.0)) for a, b in zip(state(model), expected))


def fit(model, fit_data, kind, callbacks_, initial_epoch=0):
    if kind == "shuffled" and initial_epoch == 0:
        keras.utils.set_random_seed(0)  # the seeded shuffling of the arrays
    model.fit(**fit_data, batch_size=BATCH, epochs=EPOCHS, initial_epoch=initial_epoch,
              verbose=0, callbacks=callbacks_)


def resume_and_fit(model, template, source, target, kind, extra=()):
    """Resumes `model` from the checkpoints in `source`, trains on, saving into `target`."""
    fit_data = data(os.path.dirname(source), kind)
    resumed = callbacks(target, template)
    initial_epoch = resume(model, source, callbacks=resumed, data=fit_data["x"])
    fit(model, fit_data, kind, [*extra, *resumed], initial_epoch)
    return initial_epoch


def load_reference(folder):
    with np.load(os.path.join(folder, "reference.npz")) as stored:
        return [stored[f"arr_{i}"] for i in range(len(stored.files))]


mode, directory, kind = sys.argv[1], sys.argv[2], sys.argv[3]
assert kind in KINDS, kind
folder = os.path.join(directory, kind)
if mode == "interrupt":
    seed, count = int(sys.argv[4]), int(sys.argv[5])
    os.makedirs(folder, exist_ok=True)
    template, model = twin()
    fit(model, data(folder, kind), kind, callbacks(os.path.join(folder, "reference"), template))
    np.savez(os.path.join(folder, "reference.npz"), *state(model))
    times = sorted(random.Random(f"{seed}-{kind}").sample(range(1, EPOCHS * STEPS), count))
    template, model = twin()
    runs = [os.path.join(folder, f"sigterm_{i}") for i in range(count)]
    fit(model, data(folder, kind), kind, [SignalAt(times[0]), *callbacks(runs[0], template)])
    for at, previous, run in zip(times[1:], runs, runs[1:]):
        # Each run continues from the previous one's preemption checkpoint.
        resume_and_fit(model, template, previous, run, kind, extra=[SignalAt(at)])
    resume_and_fit(model, template, runs[-1], os.path.join(folder, "chain_end"), kind)
    print(json.dumps({"signal_batches": times,
                      "chain_max_diff": max_diff(model, load_reference(folder))}))
elif mode == "kill":
    n = sys.argv[4]
    template, model = twin()
    fit(model, data(folder, kind), kind, callbacks(os.path.join(folder, f"kill_{n}"), template, 3))
    sys.exit(3)  # the crash point was never reached
elif mode == "resume":
    report = {}
    expected = load_reference(folder)
    template, model = twin()
    for run in sorted(os.listdir(folder)):
        if run.startswith(("sigterm_", "kill_")):
            initial_epoch = resume_and_fit(model, template, os.path.join(folder, run),
                                           os.path.join(folder, "resumed", run), kind)
            report[f"{kind}/{run}"] = {"initial_epoch": initial_epoch,
                                       "max_diff": max_diff(model, expected)}
    print(json.dumps(report))

"""A model-parallel twin with all four callbacks in one process, for tests/test_model_parallel.py.

Usage: model_parallel_mesh.py FOLDER DATA_PARALLEL, started with as many host
devices as the mesh has (`XLA_FLAGS=--xla_force_host_platform_device_count=4`
for a `(2, 2)` mesh). Trains a `model_parallel` twin with all four callbacks
of the package, then resumes a checkpoint into a new twin, and prints one JSON
line of what it found.
"""

import os
import sys

from _worker import report

import keras  # noqa: E402
import numpy as np  # noqa: E402
from helpers import build_tiny_model, make_tiny_data  # noqa: E402

from keras_callbacks_plus import (  # noqa: E402
    ActivationLogger,
    ParallelModelCheckpoint,
    ProgressiveUnfreezing,
    RobustEarlyStopping,
    distribute,
    model_parallel,
    read_activation_log,
    resume,
)

folder, data_parallel = sys.argv[1], int(sys.argv[2])
LAYOUT = {"hidden/kernel": (None, "model"), "hidden/bias": ("model",),
          "head/kernel": ("model", None), "hidden/output": ("batch", "model")}
FIT = dict(batch_size=32, shuffle=False, verbose=0)
x, y = make_tiny_data()
xv, yv = x[:64], (y[:64] + 1) % 3  # wrong labels: val_loss is best early on
found = {}


def twin_of(template):
    twin = model_parallel(template, LAYOUT, data_parallel=data_parallel)
    twin.compile(optimizer=keras.optimizers.Adam(0.01), loss="sparse_categorical_crossentropy")
    return twin


class WeightRecorder(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.weights = {0: None}

    def on_train_begin(self, logs=None):
        self.start = distribute.host_copy(self.model.weights)

    def on_epoch_end(self, epoch, logs=None):
        self.weights[epoch] = distribute.host_copy(self.model.weights)


template = build_tiny_model(batch_norm=True)
twin = twin_of(template)
kernel = twin.get_layer("hidden").kernel
found["mesh"] = list(distribute._base.twin_distribution(twin).device_mesh.shape)
found["replicas"] = distribute.num_replicas(twin)
found["kernel_spec"] = list(kernel.value.sharding.spec)
found["kernel_shards"] = sorted(
    [s.device.id, s.index[1].start or 0, s.index[1].stop or 16, s.replica_id]
    for s in kernel.value.addressable_shards)
found["predict_diff"] = float(np.abs(twin.predict(x, verbose=0)
                                      - template.predict(x, verbose=0)).max())

# All four callbacks in one fit.
recorder = WeightRecorder()
stopper = RobustEarlyStopping(patience=2)
callbacks = [
    ProgressiveUnfreezing({0: "head", 1: "all"}),
    ActivationLogger(x[:64], layers=["hidden"], h5_path=os.path.join(folder, "act.h5")),
    stopper,
    recorder,
    ParallelModelCheckpoint(template, os.path.join(folder, "ckpt", "m_{epoch}.keras")),
]
history = twin.fit(x, y, validation_data=(xv, yv), epochs=6, callbacks=callbacks, **FIT)
index = [v.path for v in twin.weights].index("hidden/kernel")
found["frozen_bit_identical"] = bool(np.array_equal(recorder.weights[0][index],
                                                     recorder.start[index]))
found["slot_spec"] = next(list(v.value.sharding.spec) for v in twin.optimizer.variables
                           if v.path.endswith("hidden_kernel_momentum"))
record = read_activation_log(os.path.join(folder, "act.h5"))[-1]["layers"]["test"]["hidden"]
found["logger_count_whole"] = bool(record["count"][0] == 64 * 16)
best = recorder.weights[stopper.best_epoch]
found["best_epoch"], found["last_epoch"] = stopper.best_epoch, history.epoch[-1]
found["best_weights_restored"] = all(
    np.array_equal(np.asarray(s.data), w[s.index])
    for v, w in zip(twin.weights, best) for s in v.value.addressable_shards)
# The best epoch's checkpoint is a single-device template that predicts what the twin now does.
loaded = keras.saving.load_model(os.path.join(folder, "ckpt", f"m_{stopper.best_epoch + 1}.keras"))
found["loaded_predict_diff"] = float(np.abs(loaded.predict(x, verbose=0)
                                             - twin.predict(x, verbose=0)).max())

# Resume: a checkpoint of an uninterrupted run, into a new twin, continues bit for bit.
straight = twin_of(build_tiny_model(batch_norm=True))
path = os.path.join(folder, "resume", "m_{epoch}.keras")
straight.fit(x, y, epochs=3, callbacks=[ParallelModelCheckpoint(path)], **FIT)
resumed = twin_of(build_tiny_model(batch_norm=True, seed=7))
initial_epoch = resume(resumed, os.path.join(folder, "resume", "m_1.keras"))
resumed.fit(x, y, epochs=3, initial_epoch=initial_epoch, **FIT)
found["resume_bit_identical"] = initial_epoch == 1 and all(
    np.array_equal(a, b) for a, b in zip(
        distribute.host_copy(straight.variables + straight.optimizer.variables),
        distribute.host_copy(resumed.variables + resumed.optimizer.variables)))
report(**found)

"""Checkpointing worker for tests/test_checkpoint.py; modes are chosen by argv[1].

* `crash DIR`: trains forever, saving every batch (async, max_to_keep, last);
  the test kills it with SIGKILL at random moments.
* `multi DIR`: one of 2 workers (KCP_WORKER_ADDRESSES / KCP_WORKER_INDEX);
  trains a data-parallel twin with a checkpoint in the shared DIR and prints
  one JSON line: how many files this process wrote, and its predictions.
* `load FILE`: loads FILE on one CPU device, no strategy, prints predictions.
"""

import os
import sys

from _worker import join_workers, report

mode, where = sys.argv[1], sys.argv[2]

if mode == "multi":
    join_workers()

import keras  # noqa: E402
from helpers import build_tiny_model, make_tiny_data  # noqa: E402

from keras_callbacks_plus import ParallelModelCheckpoint, _files, distribute  # noqa: E402

x, y = make_tiny_data(64)

if mode == "load":
    model = keras.saving.load_model(where)
    report(predictions=model.predict(x, verbose=0).tolist())
    sys.exit(0)

writes = []
_write_atomic = _files.write_atomic


def counting_write_atomic(target, write):
    writes.append(str(target))
    return _write_atomic(target, write)


_files.write_atomic = counting_write_atomic

if mode == "crash":
    # Wide enough that a save takes a while: kills land inside writes.
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8,))
    hidden = keras.layers.Dense(768, activation="relu")(inputs)
    hidden = keras.layers.Dense(768, activation="relu")(hidden)
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(hidden))
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    checkpoint = ParallelModelCheckpoint(
        os.path.join(where, "model_{epoch:03d}_{batch:02d}.keras"),
        save_freq=1,
        max_to_keep=2,
        save_last=True,
    )
    print("training", flush=True)
    model.fit(x, y, batch_size=16, epochs=10_000, callbacks=[checkpoint], verbose=0)
elif mode == "multi":
    template = build_tiny_model(batch_norm=True)
    twin = distribute.data_parallel(template)
    twin.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    checkpoint = ParallelModelCheckpoint(
        template, os.path.join(where, "model_{epoch:02d}.keras"), max_to_keep=2, save_last=True
    )
    twin.fit(x, y, batch_size=16, epochs=3, shuffle=False, callbacks=[checkpoint], verbose=0)
    distribute.barrier()
    report(
        is_chief=distribute.is_chief(),
        writes=len(writes),
        predictions=template.predict(x, verbose=0).tolist(),
    )

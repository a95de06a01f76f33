"""Checkpointing worker for tests/test_checkpoint.py; modes are chosen by argv[1].

* `crash DIR`: trains, saving every batch (async, max_to_keep, last), until
  the test's `KCP_TEST_CRASH_AT` crash point kills it (exits 3 if none did).
* `multi DIR`: one of 2 workers (KCP_WORKER_ADDRESSES / KCP_WORKER_INDEX);
  trains a data-parallel twin with a checkpoint in the shared DIR and prints
  one JSON line: how many files this process wrote, and its predictions.
* `load FILE`: loads FILE on one CPU device, no strategy, prints predictions.
"""

import os
import sys

from _worker import count_local_writes, join_workers, report

mode, where = sys.argv[1], sys.argv[2]

if mode == "multi":
    join_workers()

import keras  # noqa: E402
from helpers import build_tiny_model, make_tiny_data  # noqa: E402

from keras_callbacks_plus import ParallelModelCheckpoint, distribute  # noqa: E402

x, y = make_tiny_data(64)

if mode == "load":
    model = keras.saving.load_model(where)
    report(predictions=model.predict(x, verbose=0).tolist())
    sys.exit(0)

writes = count_local_writes()

if mode == "crash":
    model = build_tiny_model()
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    checkpoint = ParallelModelCheckpoint(
        os.path.join(where, "model_{epoch:03d}_{batch:02d}.keras"),
        save_freq=1,
        max_to_keep=2,
        save_last=True,
    )
    model.fit(x, y, batch_size=16, epochs=5, callbacks=[checkpoint], verbose=0)
    sys.exit(3)  # the crash point was never reached
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

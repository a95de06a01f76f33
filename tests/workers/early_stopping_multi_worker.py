"""One worker of a 2-worker run of RobustEarlyStopping(max_time=...), started by
tests/test_early_stopping.py.

Each worker has its own fake clock: worker 1's runs 1/16 s per batch, worker 0's
1/1000 s. Worker 1 spends the 1.125 s budget at its 18th batch (epoch 4, batch
1, with 4 batches per epoch); worker 0 never would. Both must stop after that
same batch. Prints one JSON line.
"""

from _worker import join_workers, report, weights_digest

index = join_workers()

import keras  # noqa: E402
import numpy as np  # noqa: E402
from helpers import build_tiny_model, make_tiny_data  # noqa: E402

from keras_callbacks_plus import distribute, early_stopping  # noqa: E402

SECONDS_PER_BATCH = 1 / 16 if index == 1 else 1 / 1000
BUDGET = 1.125


class FakeClock(keras.callbacks.Callback):
    """Advances this worker's clock by a fixed amount after every batch."""

    def __init__(self):
        super().__init__()
        self.now = 0.0
        self.batches = 0

    def on_train_batch_end(self, batch, logs=None):
        self.now += SECONDS_PER_BATCH
        self.batches += 1


clock = FakeClock()
early_stopping._clock = lambda: clock.now

template = build_tiny_model(seed=0)
x, y = make_tiny_data(64, seed=100 + index)
twin = distribute.data_parallel(template)
twin.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
stopper = early_stopping.RobustEarlyStopping("loss", patience=100, max_time=BUDGET)
history = twin.fit(
    x, y, batch_size=16, epochs=12, shuffle=False, verbose=0, callbacks=[clock, stopper]
)
distribute.barrier()
weights = twin.get_weights()
report(
    index=index,
    num_workers=distribute.num_workers(),
    stop_reason=stopper.stop_reason,
    stopped_epoch=stopper.stopped_epoch,
    stopped_batch=stopper.stopped_batch,
    batches=clock.batches,
    epochs=len(history.epoch),
    best_epoch=stopper.best_epoch,
    finite=bool(all(np.isfinite(w).all() for w in weights)),
    weights=weights_digest(weights),
)

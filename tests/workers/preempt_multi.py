"""One of 2 workers of a preempted run, started by tests/test_preemption.py.

`DIR WHO`: first trains 3 epochs of 4 batches without interruption (the
reference), then the same from the same start, but SIGTERM reaches worker 0
and 1 (`WHO=both`) or worker 1 only (`WHO=one`) after batch 5: every worker
must stop at the same step, and the chief alone writes the one checkpoint of
it into DIR (saves are every 1000 batches otherwise). Then each worker
resumes from DIR and trains to the end.

Prints one JSON line: the steps the fits stopped at, whether the interrupted
one was preempted, the files in DIR after it, and digests of the final
weights and optimizer variables of both runs.
"""

import os
import signal
import sys

from _worker import join_workers, report, weights_digest

index = join_workers()  # first thing, before the backend computes anything

import keras  # noqa: E402
from helpers import build_tiny_model, make_tiny_data  # noqa: E402

from keras_callbacks_plus import ParallelModelCheckpoint, distribute, resume  # noqa: E402

x, y = make_tiny_data(64, seed=100 + index)  # this worker's own shard (JAX), or the data (TF)


class SignalAt(keras.callbacks.Callback):
    def __init__(self, at):
        super().__init__()
        self.at, self.seen = at, 0

    def on_train_batch_end(self, batch, logs=None):
        self.seen += 1
        if self.seen == self.at:
            os.kill(os.getpid(), signal.SIGTERM)


directory, who = sys.argv[1], sys.argv[2]


def twin():
    template = build_tiny_model(batch_norm=True, seed=0)
    model = distribute.data_parallel(template)
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="sparse_categorical_crossentropy")
    return template, model


def checkpoint(template):
    return ParallelModelCheckpoint(template, os.path.join(directory, "ck_{epoch}_{batch}.keras"),
                                   save_freq=1000)


def fit(model, callbacks, initial_epoch=0):
    model.fit(x, y, batch_size=16, epochs=3, initial_epoch=initial_epoch, shuffle=False,
              verbose=0, callbacks=callbacks)
    return int(keras.ops.convert_to_numpy(model.optimizer.iterations))


def state_digest(model):
    return weights_digest(model.get_weights() + [keras.ops.convert_to_numpy(v)
                                                 for v in model.optimizer.variables])


_, reference = twin()
reference_stop = fit(reference, [])
template, model = twin()
first = checkpoint(template)
signals = [SignalAt(5)] if who == "both" or index == 1 else []
stops = [fit(model, [*signals, first])]
distribute.barrier()
files = sorted(os.listdir(directory))
resumed = checkpoint(template)
initial_epoch = resume(model, directory, callbacks=[resumed])
stops.append(fit(model, [resumed], initial_epoch))
distribute.barrier()
report(index=index, reference_stop=reference_stop, stops=stops, preempted=first.preempted,
       files=files, reference=state_digest(reference), digest=state_digest(model))

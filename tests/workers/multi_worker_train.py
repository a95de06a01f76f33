"""One worker of a multi-worker training run, started by tests/test_distribute.py.

Reads KCP_WORKER_ADDRESSES and KCP_WORKER_INDEX, trains the tiny model on this
worker's own data shard through `data_parallel`, and prints one JSON line.
"""

from _worker import join_workers, report, weights_digest

# First thing in the program, before the backend computes anything.
index = join_workers()

import numpy as np  # noqa: E402
from helpers import build_tiny_model, make_tiny_data  # noqa: E402

from keras_callbacks_plus import distribute  # noqa: E402


def digest(model):
    return weights_digest(model.get_weights())


template = build_tiny_model(batch_norm=True, seed=0)
# A different start on each worker (the global seed must stay the same: on JAX
# the twin's variables are created on all processes at once).
template.set_weights([w + index for w in template.get_weights()])
initial = digest(template)
x, y = make_tiny_data(64, seed=100 + index)  # this worker's own shard
twin = distribute.data_parallel(template)
start = digest(template)
broadcast = distribute.broadcast_from_chief(
    [np.full((2, 3), index + 0.5, np.float32), np.arange(4, dtype=np.int64) * (index + 1)]
)
twin.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
history = twin.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
distribute.barrier()
distribute.copy_weights(twin, template)
distribute.barrier()
votes = [distribute.any_worker(index == 1), distribute.any_worker(False)]
report(
    index=index,
    is_chief=distribute.is_chief(),
    worker_index=distribute.worker_index(),
    num_workers=distribute.num_workers(),
    initial=initial,
    start=start,
    broadcast=[b.tolist() for b in broadcast],
    broadcast_dtypes=[str(b.dtype) for b in broadcast],
    final=digest(template),
    any_worker=votes,
    loss=[float(v) for v in history.history["loss"]],
)

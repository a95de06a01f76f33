"""One worker of a 2-worker fit with ActivationLogger, started by tests/test_activations.py.

Both workers pass the same h5_path (as on a shared file system); only the
chief may write it. With log_scalars, every worker must see the same values in
its epoch logs. Prints one JSON line.
"""

import sys

from _worker import join_workers, report

# First thing in the program, before the backend computes anything.
index = join_workers()

from helpers import build_tiny_model, make_tiny_data  # noqa: E402

from keras_callbacks_plus import distribute  # noqa: E402
from keras_callbacks_plus.activations import ActivationLogger  # noqa: E402

h5_path = sys.argv[1]
template = build_tiny_model(batch_norm=True, seed=0)
x, y = make_tiny_data(64, seed=100 + index)  # this worker's own shard
probe = make_tiny_data(32, seed=5)[0]  # the same probe on every worker
twin = distribute.data_parallel(template)
twin.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
logger = ActivationLogger(probe, layers=["bn", "relu"], phases=("test", "train"), h5_path=h5_path,
                          log_scalars=["zero_frac", "mean"])
history = twin.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0, callbacks=[logger])
distribute.barrier()
report(
    index=index,
    is_chief=distribute.is_chief(),
    logs={k: [float(v) for v in values] for k, values in history.history.items()
          if k.startswith("act")},
)

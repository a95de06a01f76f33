"""One of 2 processes training a model-parallel twin over both, for tests/test_model_parallel.py.

Each process has 2 host devices (XLA_FLAGS from the test) and its own data
shard; the twin's `(2, 2)` mesh puts the batch axis across the processes and
the model axis within each. A checkpoint goes to the shared folder argv[1]
(the chief alone writes). A second twin over a `(1, 4)` mesh, whose model
axis spans the processes, is gathered by a collective. Prints one JSON line.
"""

import os
import sys

from _worker import count_local_writes, join_workers, report, weights_digest

index = join_workers()

import keras  # noqa: E402
from helpers import build_tiny_model, make_tiny_data  # noqa: E402

from keras_callbacks_plus import ParallelModelCheckpoint, distribute, model_parallel  # noqa: E402

writes = count_local_writes()
LAYOUT = {"hidden/kernel": (None, "model"), "hidden/bias": ("model",),
          "head/kernel": ("model", None)}
template = build_tiny_model(batch_norm=True)
twin = model_parallel(template, LAYOUT, data_parallel=2)
twin.compile(optimizer=keras.optimizers.Adam(0.01), loss="sparse_categorical_crossentropy")
x, y = make_tiny_data(64, seed=100 + index)  # this process's shard
checkpoint = ParallelModelCheckpoint(
    template, os.path.join(sys.argv[1], "ckpt", "m_{epoch}.keras"), save_last=True)
history = twin.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0,
                   callbacks=[checkpoint])
distribute.copy_weights(twin, template)

# The model axis across both processes: no process holds a whole kernel. The chief's
# checkpoint writer may have drawn random numbers: seed again, so that both processes
# create the same variables.
keras.utils.set_random_seed(1)
wide = model_parallel(template, {"hidden/kernel": (None, "model")})
kernel = wide.get_layer("hidden").kernel.value
copy = build_tiny_model(batch_norm=True, seed=5)
distribute.copy_weights(wide, copy)  # a collective: both processes gather
gathered = (not kernel.is_fully_addressable and len(kernel.addressable_shards) == 2
            and weights_digest(copy.get_weights()) == weights_digest(template.get_weights()))
distribute.barrier()
report(
    index=index,
    mesh=list(distribute._base.twin_distribution(twin).device_mesh.shape),
    loss=[float(v) for v in history.history["loss"]],
    template=weights_digest(template.get_weights()),
    writes=len(writes),
    gathered_across_processes=bool(gathered),
    predictions=template.predict(make_tiny_data(16, seed=3)[0], verbose=0).tolist(),
)

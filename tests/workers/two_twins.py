"""Two data-parallel twins over the same 2 devices, trained in turn, in a fresh process.

A second MirroredStrategy over the same devices broke the next `fit`
("Shape mismatch in the collective instance"); data_parallel reuses one.
"""

import os

from _worker import report

if os.environ["KERAS_BACKEND"] == "jax":
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
else:
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

from helpers import build_tiny_model, make_tiny_data  # noqa: E402

from keras_callbacks_plus import distribute  # noqa: E402

x, y = make_tiny_data()
trained = {}


def train(twin, key):
    twin.fit(x, y, batch_size=32, epochs=1, verbose=0)
    assert distribute.replica_divergence(twin) == 0.0
    trained[key] = "ok"


twins = []
for key, seed in (("first", 0), ("second", 1)):
    twin = distribute.data_parallel(build_tiny_model(batch_norm=True, seed=seed), ["cpu:0", "cpu:1"])
    twin.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    train(twin, key)
    twins.append(twin)
train(twins[0], "first_again")
report(**trained)

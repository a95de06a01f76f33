"""model_parallel: a twin sharded over a device mesh, and every callback on it.

JAX: a `(1, 2)` mesh in this process (conftest gives 2 host devices), all four
callbacks at once on a `(1, 2)` and a `(2, 2)` mesh in fresh processes (with 2
and 4 host devices), and a `(2, 2)` mesh over two processes. TensorFlow: the
clear error.
"""

import tracemalloc

import keras
import numpy as np
import pytest
from helpers import assert_workers_succeeded, build_tiny_model, make_tiny_data

from keras_callbacks_plus import (
    ActivationLogger,
    ParallelModelCheckpoint,
    ProgressiveUnfreezing,
    RobustEarlyStopping,
    distribute,
    intermediate_outputs,
    model_parallel,
    read_activation_log,
    resume,
)

BACKEND = keras.backend.backend()
jax_only = pytest.mark.skipif(BACKEND != "jax", reason="Keras 3 model parallelism is JAX-only")

# The tiny model's hidden layer split by columns, its head by rows (Megatron's pair).
LAYOUT = {"hidden/kernel": (None, "model"), "hidden/bias": ("model",),
          "head/kernel": ("model", None)}


def _spec(variable) -> tuple:
    return tuple(variable.value.sharding.spec)


def _compiled(twin, learning_rate=0.01):
    twin.compile(optimizer=keras.optimizers.Adam(learning_rate),
                 loss="sparse_categorical_crossentropy")
    return twin


class WeightRecorder(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.weights = {}

    def on_epoch_end(self, epoch, logs=None):
        self.weights[epoch] = distribute.host_copy(self.model.weights)


# -- TensorFlow ----------------------------------------------------------------------


@pytest.mark.skipif(BACKEND != "tensorflow", reason="the TensorFlow error")
def test_tensorflow_says_model_parallelism_needs_jax():
    with pytest.raises(NotImplementedError, match=r"needs the JAX backend.*KERAS_BACKEND=jax"):
        model_parallel(build_tiny_model(), LAYOUT)


# -- the twin ------------------------------------------------------------------------


@jax_only
def test_twin_is_sharded_and_predicts_like_its_template(two_devices, tiny_data):
    x, y = tiny_data
    template = build_tiny_model(batch_norm=True)
    twin = model_parallel(template, LAYOUT)
    kernel = twin.get_layer("hidden").kernel
    assert _spec(kernel) == (None, "model")
    assert _spec(twin.get_layer("head").kernel) == ("model", None)
    assert sorted((str(s.device), s.data.shape) for s in kernel.value.addressable_shards) == [
        ("cpu:0", (8, 8)), ("cpu:1", (8, 8))]
    assert len(template.get_layer("hidden").kernel.value.sharding.device_set) == 1
    assert distribute.num_replicas(twin) == 1
    np.testing.assert_allclose(twin.predict(x, verbose=0), template.predict(x, verbose=0),
                               atol=1e-6)

    _compiled(twin).fit(x, y, batch_size=32, epochs=2, verbose=0)
    trained = twin.predict(x, verbose=0)
    distribute.copy_weights(twin, template)  # gathered
    np.testing.assert_allclose(template.predict(x, verbose=0), trained, atol=1e-6)
    assert distribute.replica_divergence(twin) == 0.0

    template.set_weights([w * 0.5 for w in template.get_weights()])
    distribute.copy_weights(template, twin)  # scattered
    assert _spec(kernel) == (None, "model")
    np.testing.assert_allclose(twin.predict(x, verbose=0), template.predict(x, verbose=0),
                               atol=1e-6)


@jax_only
def test_layout_map_brings_its_own_mesh(two_devices, tiny_data):
    mesh = keras.distribution.DeviceMesh((1, 2), ("data", "shards"), devices=two_devices)
    layout_map = keras.distribution.LayoutMap(mesh)
    layout_map["hidden/kernel"] = (None, "shards")
    template = build_tiny_model()
    twin = model_parallel(template, layout_map)
    assert _spec(twin.get_layer("hidden").kernel) == (None, "shards")
    x, y = tiny_data
    _compiled(twin).fit(x, y, batch_size=32, epochs=1, verbose=0)
    assert _spec(twin.optimizer.variables[2]) == (None, "shards")  # the kernel's first slot


def _mesh_of_missing_devices():
    mesh = keras.distribution.DeviceMesh((2, 2), ("batch", "model"),
                                         devices=["cpu:0", "cpu:1", "cpu:2", "cpu:3"])
    layout_map = keras.distribution.LayoutMap(mesh)
    layout_map["hidden/kernel"] = (None, "model")
    return layout_map


@jax_only
@pytest.mark.parametrize("layout, kwargs, match", [
    ({"dense_9/kernel": (None, "model")}, {},
     r"argument layout.*Received: 'dense_9/kernel', which matches none of: hidden/kernel"),
    ({"hidden/kernel": ("model",)}, {}, r"Expected 2 axes for variable 'hidden/kernel'"),
    ({"head/bias": ("model",)}, {}, r"dimension 0 of variable 'head/bias' \(shape \(3,\)\)"),
    ({"hidden/kernel": (None, "rows")}, {}, r"axis names of the mesh \('batch', 'model'\)"),
    ({"hidden/.*": (None, "model"), ".*/kernel": (None, "model")}, {},
     r"at most one pattern.*'hidden/kernel'"),
    ({"hidden/kernel": "model"}, {}, r"Received: layout\['hidden/kernel'\]='model'"),
    ([("hidden/kernel", (None, "model"))], {}, r"Expected a keras.distribution.LayoutMap"),
    (LAYOUT, {"data_parallel": 3},
     r"argument data_parallel.*divides the number of devices \(2: cpu:0, cpu:1\).*"
     r"Received: data_parallel=3"),
    (LAYOUT, {"devices": ["cpu:7"]}, r"Device 'cpu:7' does not exist"),
    ("mesh", {}, r"devices that exist.*Received: device_mesh of shape \(2, 2\) over cpu:0, "
                 r"cpu:1, cpu:2, cpu:3"),
])
def test_bad_arguments_are_named(two_devices, layout, kwargs, match):
    layout = _mesh_of_missing_devices() if layout == "mesh" else layout
    with pytest.raises(ValueError, match=match):
        model_parallel(build_tiny_model(), layout, **kwargs)


@jax_only
def test_a_twin_is_not_a_template(two_devices):
    twin = model_parallel(build_tiny_model(), LAYOUT)
    with pytest.raises(ValueError, match="already a model-parallel twin"):
        model_parallel(twin, LAYOUT)


@jax_only
def test_host_copies_gather_shard_by_shard_into_one_copy(two_devices):
    inputs = keras.Input((512,))
    template = keras.Model(inputs, keras.layers.Dense(1024, name="wide")(inputs))
    twin = model_parallel(template, {"wide/kernel": (None, "model")})
    state = sum(v.value.nbytes for v in twin.weights)
    tracemalloc.start()
    try:
        buffers = distribute.host_copy(twin.weights)  # what a checkpoint's first snapshot does
        fresh = tracemalloc.get_traced_memory()[1]
        held = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        again = distribute.host_copy(twin.weights, out=buffers)  # every later snapshot
        extra = tracemalloc.get_traced_memory()[1] - held
    finally:
        tracemalloc.stop()
    assert again is buffers
    assert fresh < 1.05 * state  # one copy of the state, no whole temporary beside it
    assert extra < 0.05 * state  # filled in place, shard by shard
    for value, expected in zip(buffers, template.get_weights()):
        np.testing.assert_array_equal(value, expected)


# -- callbacks on a (1, 2) mesh --------------------------------------------------------


@jax_only
@pytest.mark.slow  # a fresh process that starts a backend to load the file
def test_checkpoint_writes_the_template_which_loads_on_one_device(tmp_path, two_devices,
                                                                  tiny_data, launch):
    x, y = tiny_data
    template = build_tiny_model(batch_norm=True)
    twin = _compiled(model_parallel(template, LAYOUT))
    checkpoint = ParallelModelCheckpoint(template, str(tmp_path / "model.keras"))
    twin.fit(x, y, batch_size=32, epochs=2, verbose=0, callbacks=[checkpoint])
    expected = twin.predict(x[:64], verbose=0)
    assert _spec(twin.get_layer("hidden").kernel) == (None, "model")

    loaded = keras.saving.load_model(tmp_path / "model.keras")
    np.testing.assert_allclose(loaded.predict(x[:64], verbose=0), expected, atol=1e-6)
    # The optimizer slots were gathered whole, bit for bit.
    for saved, live in zip(loaded.optimizer.variables, twin.optimizer.variables):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(saved),
                                      distribute.host_copy([live])[0])
    [loaded_elsewhere] = assert_workers_succeeded(
        launch("checkpoint_train.py", num_workers=1, args=["load", str(tmp_path / "model.keras")]))
    np.testing.assert_allclose(loaded_elsewhere["predictions"], expected, atol=1e-6)


@jax_only
def test_resume_inside_an_epoch_continues_bit_identically(tmp_path, two_devices, tiny_data):
    x, y = tiny_data
    fit = dict(batch_size=32, shuffle=False, verbose=0)
    straight = _compiled(model_parallel(build_tiny_model(batch_norm=True), LAYOUT))
    straight_stopper = RobustEarlyStopping(monitor="loss", patience=9)
    straight.fit(x, y, epochs=3, callbacks=[straight_stopper], **fit)

    first = _compiled(model_parallel(build_tiny_model(batch_norm=True), LAYOUT))
    path = str(tmp_path / "m_{epoch}_{batch}.keras")
    first.fit(x, y, epochs=2, callbacks=[RobustEarlyStopping(monitor="loss", patience=9),
                                         ParallelModelCheckpoint(path, save_freq=6)], **fit)
    del first  # interrupted after 6 steps: epoch 2, batch 2 of 4

    second = _compiled(model_parallel(build_tiny_model(batch_norm=True, seed=7), LAYOUT))
    stopper = RobustEarlyStopping(monitor="loss", patience=9)
    checkpoint = ParallelModelCheckpoint(path, save_freq=6)
    assert resume(second, tmp_path / "m_2_2.keras", callbacks=[stopper, checkpoint]) == 1
    assert _spec(second.get_layer("hidden").kernel) == (None, "model")
    assert _spec(second.optimizer.variables[2]) == (None, "model")
    second.fit(x, y, epochs=3, initial_epoch=1, callbacks=[stopper, checkpoint], **fit)
    for a, b in zip(distribute.host_copy(straight.variables),
                    distribute.host_copy(second.variables)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(distribute.host_copy(straight.optimizer.variables),
                    distribute.host_copy(second.optimizer.variables)):
        np.testing.assert_array_equal(a, b)
    assert (stopper.best, stopper.best_epoch) == (straight_stopper.best, straight_stopper.best_epoch)


def _three_layers():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8,))
    h = keras.layers.Dense(16, activation="relu", name="frozen")(inputs)
    h = keras.layers.Dense(16, activation="relu", name="late")(h)
    return keras.Model(inputs, keras.layers.Dense(3, activation="softmax", name="head")(h))


@jax_only
def test_unfreezing_lays_slots_out_like_their_variables(two_devices, tiny_data):
    x, y = tiny_data
    layout = {"frozen/kernel": (None, "model"), "late/kernel": (None, "model"),
              "late/bias": ("model",), "head/kernel": ("model", None)}
    twin = _compiled(model_parallel(_three_layers(), layout))
    start = distribute.host_copy(twin.weights)
    recorder = WeightRecorder()
    unfreeze = ProgressiveUnfreezing({0: "head", 1: "late"})
    twin.fit(x, y, batch_size=32, epochs=2, shuffle=False, verbose=0,
             callbacks=[unfreeze, recorder])

    paths = [v.path for v in twin.weights]
    frozen, late = paths.index("frozen/kernel"), paths.index("late/kernel")
    for epoch in (0, 1):  # frozen all along, across the stage change: bit for bit
        np.testing.assert_array_equal(recorder.weights[epoch][frozen], start[frozen])
    np.testing.assert_array_equal(recorder.weights[0][late], start[late])
    assert not np.array_equal(recorder.weights[1][late], start[late])
    # The rebuilt optimizer's slots (its name is `adam_<n>`), without the optimizer's name.
    slots = {v.path.partition("/")[2]: _spec(v) for v in twin.optimizer.variables}
    assert slots["late_kernel_momentum"] == slots["late_kernel_velocity"] == (None, "model")
    assert slots["head_kernel_momentum"] == ("model", None)
    assert "frozen_kernel_momentum" not in slots
    assert _spec(twin.get_layer("late").kernel) == (None, "model")


@jax_only
def test_activation_logger_reads_whole_tensors_without_observer_effect(tmp_path, two_devices,
                                                                       tiny_data):
    x, y = tiny_data
    layout = {**LAYOUT, "hidden/output": ("batch", "model")}  # a sharded intermediate output
    template = build_tiny_model()
    watched = _compiled(model_parallel(template, layout))
    logger = ActivationLogger(x[:64], layers=["hidden", "head"], h5_path=tmp_path / "act.h5")
    watched.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0, callbacks=[logger])
    plain = _compiled(model_parallel(build_tiny_model(), layout))
    plain.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0)
    for a, b in zip(distribute.host_copy(watched.variables),
                    distribute.host_copy(plain.variables)):
        np.testing.assert_array_equal(a, b)

    distribute.copy_weights(watched, template)
    reference = intermediate_outputs(template, "hidden", x[:64])["hidden"]
    record = read_activation_log(tmp_path / "act.h5")[-1]["layers"]["test"]["hidden"]
    assert record["count"][0] == reference.size  # the whole tensor, not one shard
    np.testing.assert_allclose(
        [record["mean"][0], record["min"][0], record["max"][0]],
        [reference.mean(), reference.min(), reference.max()], rtol=1e-5, atol=1e-6)


@jax_only
def test_best_weights_come_back_into_every_shard(two_devices, tiny_data):
    x, y = tiny_data
    xv, yv = x[:64], (y[:64] + 1) % 3  # wrong labels: val_loss is best early on
    twin = model_parallel(build_tiny_model(batch_norm=True), LAYOUT)
    twin.compile(optimizer=keras.optimizers.SGD(0.2), loss="sparse_categorical_crossentropy")
    recorder = WeightRecorder()
    stopper = RobustEarlyStopping(patience=3)
    history = twin.fit(x, y, validation_data=(xv, yv), batch_size=32, epochs=8, shuffle=False,
                       verbose=0, callbacks=[stopper, recorder])
    assert stopper.best_epoch < history.epoch[-1]
    best = recorder.weights[stopper.best_epoch]
    for variable, value in zip(twin.weights, best):
        assert _spec(variable) == tuple(variable.value.sharding.spec)
        for shard in variable.value.addressable_shards:  # each device holds its slice
            np.testing.assert_array_equal(np.asarray(shard.data), value[shard.index])
    assert _spec(twin.get_layer("hidden").kernel) == (None, "model")


# -- a (2, 2) mesh, and two processes --------------------------------------------------


@jax_only
@pytest.mark.slow  # a fresh process with as many host devices as the mesh
@pytest.mark.parametrize("mesh, shards", [
    # [device, first column, end column, replica] of the hidden kernel's shards: the batch
    # axis holds the replicas, each split over the model axis.
    ((1, 2), [[0, 0, 8, 0], [1, 8, 16, 0]]),
    ((2, 2), [[0, 0, 8, 0], [1, 8, 16, 0], [2, 0, 8, 1], [3, 8, 16, 1]]),
])
def test_every_callback_at_once_on_a_mesh(tmp_path, launch, mesh, shards):
    count = mesh[0] * mesh[1]
    [report] = assert_workers_succeeded(launch(
        "model_parallel_mesh.py", num_workers=1, args=[str(tmp_path), str(mesh[0])],
        env={"XLA_FLAGS": f"--xla_force_host_platform_device_count={count}"}, timeout=300))
    assert report["mesh"] == list(mesh) and report["replicas"] == mesh[0]
    assert report["kernel_spec"] == [None, "model"] and report["kernel_shards"] == shards
    assert report["slot_spec"] == [None, "model"]
    assert report["predict_diff"] < 1e-6
    assert report["frozen_bit_identical"] and report["logger_count_whole"]
    assert report["best_epoch"] < report["last_epoch"] and report["best_weights_restored"]
    assert report["loaded_predict_diff"] < 1e-6
    assert report["resume_bit_identical"]


@jax_only
@pytest.mark.multiprocess
def test_two_processes_train_and_only_the_chief_writes(tmp_path, launch):
    chief, other = assert_workers_succeeded(launch(
        "model_parallel_workers.py", num_workers=2, args=[str(tmp_path)],
        env={"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}, timeout=300))
    assert chief["mesh"] == other["mesh"] == [2, 2]
    assert chief["loss"] == other["loss"]
    assert chief["template"] == other["template"]  # every process gathered the same weights
    assert chief["writes"] > 0 and other["writes"] == 0
    assert chief["gathered_across_processes"] == other["gathered_across_processes"] is True
    loaded = keras.saving.load_model(tmp_path / "ckpt" / "last.keras")
    x, _ = make_tiny_data(16, seed=3)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), chief["predictions"], atol=1e-6)

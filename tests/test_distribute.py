"""Tests of keras_callbacks_plus.distribute on 2 devices and 2 workers, for each backend."""

import json

import keras
import numpy as np
import pytest
from helpers import assert_workers_succeeded

from keras_callbacks_plus import _compat, distribute
from keras_callbacks_plus.distribute import copy_weights, data_parallel

BACKEND = keras.backend.backend()


def _fit_kwargs(**overrides):
    return {"batch_size": 32, "epochs": 2, "shuffle": False, "verbose": 0, **overrides}


def _nested_bn_model(seed=0):
    """A fine-tuning shape: a nested Sequential backbone with BatchNorm, and a head."""
    keras.utils.set_random_seed(seed)
    backbone = keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(16, name="backbone_dense"),
            keras.layers.BatchNormalization(name="backbone_bn"),
            keras.layers.Activation("relu"),
        ],
        name="backbone",
    )
    inputs = keras.Input((8,))
    outputs = keras.layers.Dense(3, activation="softmax", name="head")(backbone(inputs))
    return keras.Model(inputs, outputs, name="finetune")


def test_two_devices_are_set_up(two_devices):
    assert two_devices == ["cpu:0", "cpu:1"]
    assert distribute.list_devices("gpu") == []
    assert set(two_devices) <= set(distribute.list_devices())


def test_twin_trains_on_two_devices_and_template_predicts_the_same(two_devices, tiny_data):
    template = _nested_bn_model()
    before = [w.copy() for w in template.get_weights()]
    twin = data_parallel(template, devices=two_devices)
    assert distribute.num_replicas(twin) == 2
    assert distribute.num_replicas(template) == 1
    for variable in twin.weights:  # every variable lives on both devices
        assert len(distribute._backend.replica_values(variable)) == 2

    twin.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    x, y = tiny_data
    twin.fit(x, y, **_fit_kwargs())

    # The template was not touched by training.
    for old, new in zip(before, template.get_weights()):
        np.testing.assert_array_equal(old, new)
    # Training changed the twin, moving statistics included.
    twin_bn = twin.get_layer("backbone").get_layer("backbone_bn")
    assert not np.allclose(np.asarray(twin_bn.moving_mean), 0.0)
    assert not np.allclose(twin.get_layer("head").get_weights()[0], before[-2])
    # Replicas agree on every variable, BatchNorm moving statistics included.
    assert distribute.replica_divergence(twin) == 0.0

    copy_weights(twin, template)
    np.testing.assert_allclose(
        template.predict(x, verbose=0), twin.predict(x, verbose=0), atol=1e-6
    )
    np.testing.assert_array_equal(
        np.asarray(template.get_layer("backbone").get_layer("backbone_bn").moving_mean),
        np.asarray(twin_bn.moving_mean),
    )


def test_global_batch_trains_like_one_device(two_devices, tiny_model, tiny_data):
    """batch_size is the global batch: 2 replicas of 16 compute one device's step of 32."""
    x, y = tiny_data
    single = tiny_model(batch_norm=True)
    reference = tiny_model(batch_norm=True)
    copy_weights(single, reference)
    twin = data_parallel(single, devices=two_devices)
    for model in (twin, reference):
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="sparse_categorical_crossentropy")
        model.fit(x, y, **_fit_kwargs())
    for a, b in zip(twin.get_weights(), reference.get_weights()):
        np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.skipif(
    BACKEND != "tensorflow",
    reason="JAX DataParallel runs one SPMD program: its replicas cannot diverge",
)
def test_replicas_diverge_without_synchronized_batch_norm(two_devices, tiny_model, tiny_data):
    """Why the twin synchronizes batch statistics: per-replica ones drift apart."""
    twin = data_parallel(tiny_model(batch_norm=True), devices=two_devices)
    twin.get_layer("bn").synchronized = False
    twin.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    twin.fit(*tiny_data, **_fit_kwargs())
    assert distribute.replica_divergence(twin) > 1e-4


def test_twin_validates_and_evaluates(two_devices, tiny_model, tiny_data):
    x, y = tiny_data
    twin = data_parallel(tiny_model(dropout=0.2), devices=two_devices)
    # Optimizer and metric objects made before (outside) the twin's scope work too.
    twin.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy", keras.metrics.SparseCategoricalAccuracy(name="acc_object")],
    )
    history = twin.fit(x, y, validation_data=(x[:64], y[:64]), **_fit_kwargs())
    assert len(history.history["val_loss"]) == 2
    loss, accuracy, acc_object = twin.evaluate(x, y, batch_size=32, verbose=0)
    assert np.isfinite(loss) and 0.0 <= accuracy <= 1.0
    assert acc_object == pytest.approx(accuracy)
    # An odd number of rows predicts on both backends (JAX pads, then trims).
    assert twin.predict(x[:5], verbose=0).shape == (5, 3)


def test_uneven_last_batch(two_devices, tiny_model, tiny_data):
    x, y = tiny_data
    template = tiny_model()
    twin = data_parallel(template, devices=two_devices)
    twin.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    before = twin.get_weights()
    if BACKEND == "jax":
        # 101 rows in batches of 32 leave 5, which 2 devices cannot split:
        # a clear error before any step, not a sharding error after an epoch.
        with pytest.raises(ValueError, match="multiple of 2"):
            twin.fit(x[:101], y[:101], **_fit_kwargs())
        for old, new in zip(before, twin.get_weights()):
            np.testing.assert_array_equal(old, new)
    else:
        twin.fit(x[:101], y[:101], **_fit_kwargs())
        assert not np.array_equal(before[0], twin.get_weights()[0])


def test_subclassed_model_with_config(two_devices, tiny_data):
    class TwoLayer(keras.Model):
        def __init__(self, units=4, **kwargs):
            super().__init__(**kwargs)
            self.units = units
            self.hidden = keras.layers.Dense(units, activation="relu")
            self.out = keras.layers.Dense(3, activation="softmax")

        def call(self, inputs):
            return self.out(self.hidden(inputs))

        def get_config(self):
            return {**super().get_config(), "units": self.units}

    template = TwoLayer()
    template(tiny_data[0][:1])
    twin = data_parallel(template, devices=two_devices)
    twin.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    twin.fit(*tiny_data, **_fit_kwargs())
    copy_weights(twin, template)
    x = tiny_data[0]
    np.testing.assert_allclose(template.predict(x, verbose=0), twin.predict(x, verbose=0), atol=1e-6)


def test_default_devices_are_every_cpu(tiny_model):
    twin = data_parallel(tiny_model())
    assert distribute.num_replicas(twin) == len(distribute.list_devices("cpu"))


def test_unbuilt_model_is_refused():
    model = keras.Sequential([keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="not built.*Build it or call it first"):
        data_parallel(model)


def test_unknown_device_lists_the_available_ones(tiny_model):
    with pytest.raises(ValueError, match=r"'gpu:7' does not exist\. Available devices: cpu:0, cpu:1"):
        data_parallel(tiny_model(), devices=["cpu:0", "gpu:7"])
    with pytest.raises(ValueError, match="listed twice"):
        data_parallel(tiny_model(), devices=["cpu:0", "/CPU:0"])


def test_twin_of_twin_is_refused(tiny_model):
    twin = data_parallel(tiny_model())
    with pytest.raises(ValueError, match="already a data-parallel twin"):
        data_parallel(twin)


def test_copy_weights_needs_the_same_architecture(tiny_model):
    with pytest.raises(ValueError, match="same architecture.*has shape"):
        copy_weights(tiny_model(input_dim=8), tiny_model(input_dim=5))
    with pytest.raises(ValueError, match="same architecture.*weights"):
        copy_weights(tiny_model(batch_norm=True), tiny_model())


def test_single_device_copy_from_a_config_leaves_the_config_intact():
    """Keras's deserialization empties parts of its input: one config must serve many copies."""
    model = _nested_bn_model()
    config = keras.saving.serialize_keras_object(model)
    before = json.dumps(config, sort_keys=True)
    copies = [distribute.single_device_copy(config) for _ in range(2)]
    assert json.dumps(config, sort_keys=True) == before
    x = np.random.default_rng(0).normal(size=(4, 8)).astype("float32")
    for copy in copies:
        copy_weights(model, copy)
        np.testing.assert_allclose(copy.predict_on_batch(x), model.predict_on_batch(x), rtol=1e-6)


def test_single_process_roles(two_devices, tiny_model):
    twin = data_parallel(tiny_model(), devices=two_devices)
    assert (distribute.is_chief(), distribute.worker_index(), distribute.num_workers()) == (True, 0, 1)
    distribute.barrier()  # returns at once with one worker
    assert distribute.any_worker(True) is True and distribute.any_worker(False) is False
    if BACKEND == "tensorflow":
        with twin.distribute_strategy.scope():
            assert (distribute.is_chief(), distribute.num_workers()) == (True, 1)


@pytest.mark.slow  # a fresh process that starts a backend
def test_two_twins_on_the_same_devices_in_a_fresh_process(launch):
    """One strategy per device set: a second twin must not break the first."""
    [report] = assert_workers_succeeded(launch("two_twins.py", num_workers=1, timeout=150))
    assert report == {"first": "ok", "second": "ok", "first_again": "ok"}


@pytest.mark.multiprocess
def test_two_workers_train_identically(launch):
    results = launch("multi_worker_train.py", num_workers=2, timeout=240)
    reports = assert_workers_succeeded(results)
    assert [r["worker_index"] for r in reports] == [0, 1]
    assert [r["num_workers"] for r in reports] == [2, 2]
    assert sum(r["is_chief"] for r in reports) == 1 and reports[0]["is_chief"]
    # Templates built with different seeds: data_parallel starts all from the chief's.
    assert reports[0]["initial"] != reports[1]["initial"]
    assert reports[0]["start"] == reports[1]["start"] == reports[0]["initial"]
    for r in reports:
        assert r["broadcast"] == [[[0.5] * 3] * 2, [0, 1, 2, 3]]
        assert r["broadcast_dtypes"] == ["float32", "int64"]
    assert reports[0]["final"] != reports[0]["initial"]  # training happened
    assert reports[0]["final"] == reports[1]["final"]  # and stayed in sync
    assert reports[0]["loss"] == reports[1]["loss"]
    # A flag raised on worker 1 only is seen by both; a flag raised nowhere by none.
    assert [r["any_worker"] for r in reports] == [[True, False], [True, False]]


def test_multi_worker_refuses_an_untested_keras(monkeypatch):
    monkeypatch.setattr(_compat, "keras_version", lambda: "3.99.0")
    with pytest.raises(RuntimeError, match=r"keras-team/keras#20585.*3\.15\.1.*Installed: Keras 3\.99\.0"):
        _compat.check_multi_worker_supported()
    if BACKEND == "tensorflow":
        with pytest.raises(RuntimeError, match="keras-team/keras#20585"):
            distribute.multi_worker_strategy(["127.0.0.1:1", "127.0.0.1:2"], 0)
        assert distribute._backend.multi_worker() is None


def test_multi_worker_arguments_are_checked():
    with pytest.raises(ValueError, match="worker_index"):
        distribute.multi_worker_strategy(["127.0.0.1:1", "127.0.0.1:2"], 2)
    assert distribute._backend.multi_worker() is None


@pytest.mark.skipif(BACKEND != "tensorflow", reason="the Keras fix is for the TensorFlow trainer")
def test_compat_patch_is_idempotent():
    import tensorflow as tf
    from keras.src.backend.tensorflow import trainer as tf_trainer

    _compat.patch_multi_worker_fit(tf)
    patched = tf_trainer.reduce_per_replica
    _compat.patch_multi_worker_fit(tf)
    assert tf_trainer.reduce_per_replica is patched

"""The `.keras` / `.weights.h5` files written from host arrays equal Keras's own saves."""

import io
import json
import zipfile

import h5py
import keras
import numpy as np
import pytest

from keras_callbacks_plus import _keras_format


class Block(keras.layers.Layer):
    def __init__(self, units=4, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.dense = keras.layers.Dense(units, activation="relu")
        self.norm = keras.layers.LayerNormalization()

    def call(self, x):
        return self.norm(self.dense(x))

    def get_config(self):
        return {**super().get_config(), "units": self.units}


@keras.saving.register_keras_serializable(package="kcp_tests")
class Subclassed(keras.Model):
    def __init__(self, units=4, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.block = Block(units)
        self.head = keras.layers.Dense(3)

    def call(self, x):
        return self.head(self.block(x))

    def get_config(self):
        return {**super().get_config(), "units": self.units}


def functional():
    inputs = keras.Input((6,))
    x = keras.layers.Dense(8, name="hidden")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    return keras.Model(inputs, keras.layers.Dense(3, name="head")(x), name="functional")


def sequential():
    return keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="relu"),
                             keras.layers.Dense(3)], name="sequential")


def nested():
    backbone_in = keras.Input((6,))
    features = keras.layers.Dense(8, activation="relu", name="feat")(backbone_in)
    backbone = keras.Model(backbone_in, features, name="backbone")
    inputs = keras.Input((6,))
    outputs = keras.layers.Dense(3, name="head")(backbone(inputs))
    return keras.Model(inputs, outputs, name="outer")


def subclassed():
    model = Subclassed()
    model(np.zeros((1, 6), "float32"))
    return model


MODELS = {"functional": functional, "sequential": sequential, "nested": nested,
          "subclassed": subclassed}


def _trained(make, freeze=None):
    keras.utils.set_random_seed(0)
    model = make()
    if freeze:
        model.get_layer(freeze).trainable = False
    model.compile(optimizer="adam", loss="mse")
    rng = np.random.default_rng(0)
    model.fit(rng.random((16, 6), dtype="float32"), rng.random((16, 3), dtype="float32"),
              batch_size=8, epochs=1, verbose=0)  # 2 steps: the optimizer holds state
    return model


def _host(variables):
    return [np.array(keras.ops.convert_to_numpy(v)) for v in variables]


def _archive(path):
    with zipfile.ZipFile(path) as archive:
        assert archive.testzip() is None
        config = json.loads(archive.read("config.json"))
        with archive.open("model.weights.h5") as member:
            with h5py.File(io.BytesIO(member.read()), "r") as h5:
                tree = _keras_format.read_h5_tree(h5)
        return sorted(archive.namelist()), config, tree


@pytest.mark.parametrize("kind", [*MODELS, "frozen_stage"])
def test_keras_file_equals_model_save_and_loads(tmp_path, kind):
    model = _trained(functional, freeze="hidden") if kind == "frozen_stage" else (
        _trained(MODELS[kind]))
    layout = _keras_format.learn_layout(model, with_config=True)
    fast, reference = tmp_path / "fast.keras", tmp_path / "reference.keras"
    _keras_format.write_keras(fast, layout, _keras_format.config_json(layout, model.optimizer),
                              _host(model.weights), _host(model.optimizer.variables))
    model.save(reference)
    assert _archive(fast) == _archive(reference)

    loaded = keras.saving.load_model(fast)  # safe mode
    x = np.random.default_rng(1).random((4, 6), dtype="float32")
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))
    for a, b in zip(_host(loaded.optimizer.variables), _host(model.optimizer.variables)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("kind", list(MODELS))
def test_weights_file_equals_save_weights(tmp_path, kind):
    model = _trained(MODELS[kind])
    layout = _keras_format.learn_layout(model, with_config=False)
    fast, reference = tmp_path / "fast.weights.h5", tmp_path / "reference.weights.h5"
    _keras_format.write_h5(fast, layout, _host(model.weights), _host(model.optimizer.variables))
    model.save_weights(reference)
    with h5py.File(fast, "r") as a, h5py.File(reference, "r") as b:
        assert _keras_format.read_h5_tree(a) == _keras_format.read_h5_tree(b)


def test_the_optimizer_config_is_the_current_one(tmp_path):
    model = _trained(functional)
    layout = _keras_format.learn_layout(model, with_config=True)
    model.optimizer.learning_rate = 0.125  # as a learning-rate callback would
    config = json.loads(_keras_format.config_json(layout, model.optimizer))
    assert config["compile_config"]["optimizer"]["config"]["learning_rate"] == 0.125


def test_values_other_than_variables_are_refused():
    layer = keras.layers.StringLookup(vocabulary=["a", "b"])
    inputs = keras.Input((1,), dtype="string")
    model = keras.Model(inputs, layer(inputs))
    with pytest.raises(_keras_format.UnsupportedLayout):
        _keras_format.learn_layout(model, with_config=True)


def test_large_member_offsets_and_crc_are_right(tmp_path):
    """A member written in place gets the CRC and sizes of what h5py wrote."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((512,)), keras.layers.Dense(2048)])
    layout = _keras_format.learn_layout(model, with_config=True)
    path = tmp_path / "big.keras"
    _keras_format.write_keras(path, layout, _keras_format.config_json(layout), _host(model.weights))
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo("model.weights.h5")
        assert info.compress_type == zipfile.ZIP_STORED and info.file_size > 4 * 512 * 2048
        assert archive.testzip() is None  # reads every member and checks its CRC


# -- through ParallelModelCheckpoint: the direct write equals Model.save of the same state ------


def _save_fast_and_full(model, fast, full, monkeypatch, template=None):
    """Two saves of the same state by one ParallelModelCheckpoint: the direct write, then
    (as on a Keras version it was not tested on) `Model.save` of the same layout model."""
    from keras_callbacks_plus import ParallelModelCheckpoint, _compat

    checkpoint = ParallelModelCheckpoint(str(fast.parent / "{name}.keras"),
                                         template_model=template, async_save=False)
    checkpoint.set_model(model)
    checkpoint.on_train_begin()
    checkpoint.on_epoch_begin(0)
    checkpoint.on_epoch_end(0, {"name": fast.stem})
    monkeypatch.setattr(_compat, "saving_layout_supported", lambda: False)
    checkpoint._job_writer._layout = None  # learnt again: now as a full save
    with pytest.warns(UserWarning, match=r"writes checkpoints with Model\.save.*Keras 3\.15\.1 "
                                         r"is not among the versions"):
        checkpoint.on_epoch_end(0, {"name": full.stem})
    checkpoint.on_train_end()


def _stage_changed():
    from keras_callbacks_plus import ProgressiveUnfreezing

    keras.utils.set_random_seed(0)
    model = functional()
    model.compile(optimizer="adam", loss="mse")
    rng = np.random.default_rng(0)
    x, y = rng.random((16, 6), dtype="float32"), rng.random((16, 3), dtype="float32")
    # Stage 0 trains the head only, stage 1 (epoch 1) "hidden" too, "bn" stays frozen: the
    # optimizer was rebuilt over a trainable set that is neither the first nor all.
    model.fit(x, y, batch_size=8, epochs=2, verbose=0,
              callbacks=[ProgressiveUnfreezing({0: "head", 1: "hidden"})])
    assert not model.get_layer("bn").trainable
    return model


@pytest.mark.parametrize("kind", [*MODELS, "unfreezing_stage"])
def test_checkpoint_writes_what_model_save_writes(tmp_path, monkeypatch, kind):
    model = _stage_changed() if kind == "unfreezing_stage" else _trained(MODELS[kind])
    fast, full = tmp_path / "fast.keras", tmp_path / "full.keras"
    _save_fast_and_full(model, fast, full, monkeypatch)
    assert _archive(fast) == _archive(full)
    loaded = keras.saving.load_model(fast)  # safe mode, one device, no distribution
    x = np.random.default_rng(1).random((4, 6), dtype="float32")
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))


def test_a_twins_checkpoint_is_its_templates_file(tmp_path, monkeypatch, two_devices):
    from keras_callbacks_plus import data_parallel

    keras.utils.set_random_seed(0)
    template = functional()
    twin = data_parallel(template, devices=two_devices)
    twin.compile(optimizer="adam", loss="mse")
    rng = np.random.default_rng(0)
    twin.fit(rng.random((16, 6), dtype="float32"), rng.random((16, 3), dtype="float32"),
             batch_size=8, epochs=1, verbose=0)
    fast, full = tmp_path / "fast.keras", tmp_path / "full.keras"
    _save_fast_and_full(twin, fast, full, monkeypatch, template=template)
    assert _archive(fast) == _archive(full)
    loaded = keras.saving.load_model(fast)
    x = np.random.default_rng(1).random((4, 6), dtype="float32")
    np.testing.assert_allclose(loaded.predict(x, verbose=0), twin.predict(x, verbose=0), atol=1e-6)

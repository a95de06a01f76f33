"""One layer-pattern language: one table of patterns through every caller, on each backend.

The same patterns go through `_layers.select`, `intermediate_outputs` (the
layers ActivationLogger logs), ProgressiveUnfreezing (the layers trainable at
stage 0) and the report's matcher (on the names of a real activation log).
Each must select the same layers, and fail with the same error core. A
nested model named by a pattern means, per caller: its own output
(ActivationLogger), everything inside it (ProgressiveUnfreezing).
"""

import keras
import numpy as np
import pytest

from keras_callbacks_plus import _layers
from keras_callbacks_plus.activations import (
    ActivationLogger,
    intermediate_outputs,
    read_activation_log,
)
from keras_callbacks_plus.report import _chosen, plot_activation_log
from keras_callbacks_plus.unfreezing import ProgressiveUnfreezing

PATHS = [
    "backbone", "backbone/block_1", "backbone/block_2", "backbone/block_3a",
    "backbone/block_3b", "block_4", "head",
]
WEIGHTED = ["backbone/block_1", "backbone/block_2", "backbone/block_3b", "block_4", "head"]

# pattern -> the paths it selects, in model order.
TABLE = [
    ("head", ["head"]),  # a plain name at the top
    ("block_1", ["backbone/block_1"]),  # a plain name, found at depth
    ("block_?", ["backbone/block_1", "backbone/block_2", "block_4"]),  # a glob at any depth
    ("block_3*", ["backbone/block_3a", "backbone/block_3b"]),
    ("backbone/block_2", ["backbone/block_2"]),  # a path from the top
    ("backbone/block_3*", ["backbone/block_3a", "backbone/block_3b"]),  # a glob path
    ("*/block_1", ["backbone/block_1"]),
    ("backbone", ["backbone"]),  # a container: per caller, its output or everything inside
    ("backbone*", ["backbone"]),  # a name glob matches names, not the paths below them
    (["head", "backbone/block_1"], ["backbone/block_1", "head"]),  # a list, in model order
    ("all", PATHS),
]
# pattern -> the close matches the error names, among paths and names.
NO_MATCH = [
    ("block_5", {"block_1", "block_2", "block_3a", "block_3b", "block_4"}),
    ("hed", {"head"}),
    ("backbone/block_5", {"backbone", "backbone/block_1", "backbone/block_2",
                          "backbone/block_3a", "backbone/block_3b"}),
    ("nothing*", set()),
]
IDS = [str(pattern) for pattern, _ in TABLE]


def _model():
    """A Functional model with a Functional backbone used as a layer."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8,), name="x")
    x = keras.layers.Dense(16, name="block_1")(inputs)
    x = keras.layers.BatchNormalization(name="block_2")(x)
    x = keras.layers.Activation("relu", name="block_3a")(x)
    x = keras.layers.Dense(16, name="block_3b")(x)
    backbone = keras.Model(inputs, x, name="backbone")
    features = keras.Input((8,), name="features")
    x = keras.layers.Dense(8, activation="relu", name="block_4")(backbone(features))
    outputs = keras.layers.Dense(3, activation="softmax", name="head")(x)
    return keras.Model(features, outputs, name="finetune")


def _inside(path, selected):
    return any(path == s or path.startswith(s + "/") for s in selected)


def _unfrozen(model, pattern):
    """The layers that train at stage 0, and the ids of the trainable variables."""
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    unfreeze = ProgressiveUnfreezing({0: pattern})
    unfreeze.set_model(model)
    unfreeze.on_train_begin()
    unfreeze.on_train_end()
    return unfreeze.unfrozen_layers, {id(v) for v in model.trainable_variables}


@pytest.fixture(scope="module")
def probe():
    return np.random.default_rng(0).normal(size=(16, 8)).astype("float32")


@pytest.fixture(scope="module")
def logged(tmp_path_factory, probe):
    """A real ActivationLogger run with `layers="all"`: the names it logged, and the log."""
    path = tmp_path_factory.mktemp("log") / "act.h5"
    logger = ActivationLogger(probe, layers="all", h5_path=path)
    logger.set_model(_model())
    logger.on_train_begin()
    logger.on_epoch_end(0, {})
    logger.on_train_end()
    log = read_activation_log(path)
    return log[-1]["attrs"]["layers"], log


def test_every_layer_is_a_candidate_in_model_order(logged):
    model = _model()
    assert [path for path, _ in _layers.walk(model)] == PATHS
    assert logged[0] == PATHS


@pytest.mark.parametrize("pattern, expected", TABLE, ids=IDS)
def test_a_pattern_selects_the_same_layers_in_every_caller(pattern, expected, probe, logged):
    model = _model()
    by_path = dict(_layers.walk(model))
    assert [path for path, _ in _layers.select(model, pattern)] == expected
    assert _layers.match(PATHS, pattern, owner="the table") == expected

    # ActivationLogger: the outputs of the selected layers (a nested model: its own output).
    outputs = intermediate_outputs(model, pattern, probe)
    assert list(outputs) == expected
    if "backbone" in expected:
        np.testing.assert_allclose(outputs["backbone"], by_path["backbone"](probe),
                                   rtol=1e-5, atol=1e-6)

    # ProgressiveUnfreezing: the selected layers and everything inside them.
    layers, trainable = _unfrozen(model, pattern)
    assert layers == [path for path in WEIGHTED if _inside(path, expected)]
    assert trainable == {id(v) for path in layers for v in by_path[path].trainable_variables}

    # The report: the same layers among the logged names.
    names, _ = logged
    patterns = [pattern] if isinstance(pattern, str) else pattern
    assert _chosen(names, patterns, "the log") == expected


@pytest.mark.parametrize("pattern, close", NO_MATCH, ids=[p for p, _ in NO_MATCH])
def test_a_pattern_that_matches_nothing_fails_alike_everywhere(pattern, close, probe, logged,
                                                                tmp_path):
    def error(call):
        with pytest.raises(ValueError) as caught:
            call()
        return str(caught.value)

    model = _model()
    logger = ActivationLogger(probe, layers=["head", pattern])
    logger.set_model(model)
    messages = {
        "select": error(lambda: _layers.select(model, pattern)),
        "intermediate_outputs": error(lambda: intermediate_outputs(model, pattern, probe)),
        "ActivationLogger": error(logger.on_train_begin),
        "ProgressiveUnfreezing": error(lambda: _unfrozen(model, ["head", pattern])),
        "report": error(lambda: plot_activation_log(logged[1], tmp_path / "r.png",
                                                    layers=[pattern])),
    }
    for caller, message in messages.items():
        assert "'finetune'" in message and f"matches {pattern!r}." in message, caller
        named = message.partition("Close matches: ")[2].partition(". ")[0]
        assert set(filter(None, named.split(", "))) == close, caller
        assert f"Available layers: {', '.join(PATHS)}." in message, caller
    assert messages["ProgressiveUnfreezing"].startswith(
        "ProgressiveUnfreezing, schedule epoch 0: No layer of model 'finetune'")
    assert not (tmp_path / "r.png").exists()


def test_activation_logger_sees_only_layers_with_an_output():
    """Inside a subclassed model, sublayers can be unfrozen but have no output to log."""

    class Block(keras.Model):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.inner = keras.layers.Dense(4, name="inner")

        def call(self, x):
            return self.inner(x)

    inputs = keras.Input((8,), name="x")
    model = keras.Model(inputs, Block(name="block")(inputs), name="outer")
    assert [path for path, _ in _layers.select(model, "inner")] == ["block/inner"]
    assert _unfrozen(model, "inner")[0] == ["block/inner"]
    with pytest.raises(ValueError, match="No layer of model 'outer' matches 'inner'"):
        intermediate_outputs(model, "inner", np.zeros((2, 8), "float32"))
    assert list(intermediate_outputs(model, "block", np.zeros((2, 8), "float32"))) == ["block"]

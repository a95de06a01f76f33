"""Tests of keras_callbacks_plus.unfreezing (ProgressiveUnfreezing), for each backend.

Real `fit` runs on tiny models: probes placed before and after the callback
in the callback list see the optimizer and weights just before and just after
a stage change. A model whose gradients do not depend on its weights (a
linear layer under the loss `mean(y_pred)`) makes each step's learning rate
readable from the weights.
"""

import re

import keras
import numpy as np
import pytest

from helpers import build_tiny_model, make_tiny_data
from keras_callbacks_plus import _optimizers, distribute
from keras_callbacks_plus._base import PlusCallback
from keras_callbacks_plus.unfreezing import ProgressiveUnfreezing

BACKEND = keras.backend.backend()


# ------------------------------------------------------------------ helpers
def _weights(model):
    return {v.path: keras.ops.convert_to_numpy(v).copy() for v in model.weights}


def _values(optimizer, model=None):
    """Optimizer state by key (see `_optimizers.state_keys`), as numpy arrays."""
    state = _optimizers.optimizer_state(optimizer, model)
    return {k: keras.ops.convert_to_numpy(v).copy() for k, v in state.items()}


def _optimizer_values(model):
    return _values(model.optimizer, model)


class Probe(keras.callbacks.Callback):
    """Records weights, optimizer state, trainable paths (and rates) at each epoch begin."""

    def __init__(self, unfreezing=None):
        super().__init__()
        self.unfreezing = unfreezing
        self.seen = {}

    def on_epoch_begin(self, epoch, logs=None):
        model = self.model
        self.seen[epoch] = {
            "weights": _weights(model),
            "optimizer": _optimizer_values(model) if model.optimizer.built else {},
            "trainable": [v.path for v in model.trainable_variables],
            "rates": self.unfreezing.learning_rates() if self.unfreezing else None,
        }


class StepWeights(keras.callbacks.Callback):
    """Weights after every step (and before the first)."""

    def __init__(self):
        super().__init__()
        self.steps = []

    def on_train_begin(self, logs=None):
        self.steps = [_weights(self.model)]

    def on_train_batch_end(self, batch, logs=None):
        self.steps.append(_weights(self.model))


class StageRecorder(PlusCallback):
    def __init__(self):
        super().__init__()
        self.calls = []

    def on_unfreeze_stage(self, stage, epoch, layers):
        self.calls.append((stage, epoch, list(layers)))


def _compiled(optimizer="adam", **kwargs):
    model = build_tiny_model(**kwargs)
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy")
    return model


def _fit(model, callbacks, epochs=3, **kwargs):
    x, y = make_tiny_data()
    kwargs.setdefault("batch_size", 32)
    model.fit(x, y, epochs=epochs, shuffle=False, verbose=0, callbacks=callbacks, **kwargs)


def _assert_same(a, b, keys):
    for key in keys:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def _assert_changed(a, b, keys):
    for key in keys:
        assert not np.array_equal(a[key], b[key]), f"{key} did not change"


HIDDEN = ["hidden/kernel", "hidden/bias"]
BN = ["bn/gamma", "bn/beta", "bn/moving_mean", "bn/moving_variance"]
HEAD = ["head/kernel", "head/bias"]


# ------------------------------------------------------------------ arguments
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"schedule": ["head"]}, "argument schedule. Expected a dict"),
        ({"schedule": {}}, "argument schedule. Expected a dict"),
        ({"schedule": {0: "head", -1: "hidden"}}, "epochs that are ints >= 0"),
        ({"schedule": {0: "head", 1.5: "hidden"}}, "epochs that are ints >= 0"),
        ({"schedule": {0: "head", True: "hidden"}}, "epochs that are ints >= 0"),
        ({"schedule": {2: "head"}}, "an entry for epoch 0"),
        ({"schedule": {0: []}}, "non-empty list"),
        ({"schedule": {0: ["head", 3]}}, "non-empty list"),
        ({"schedule": {0: "head"}, "group_lr_decay": 0}, re.escape(
            "Invalid value for argument group_lr_decay. Expected a number > 0. "
            "Received: group_lr_decay=0")),
        ({"schedule": {0: "head"}, "group_lr_decay": -2.6}, "group_lr_decay=-2.6"),
        ({"schedule": {0: "head"}, "group_lr_decay": float("nan")}, "group_lr_decay=nan"),
        ({"schedule": {0: "head"}, "group_lr_decay": "2.6"}, "group_lr_decay='2.6'"),
        ({"schedule": {0: "head"}, "warmup_epochs": -1}, "warmup_epochs=-1"),
        ({"schedule": {0: "head"}, "train_bn": "yes"}, "train_bn='yes'"),
    ],
)
def test_bad_arguments_raise_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ProgressiveUnfreezing(**kwargs)


def test_gradual_builds_ulmfit_schedule_and_checks_arguments():
    unfreeze = ProgressiveUnfreezing.gradual(["head", ["hidden", "bn"]], every=2, group_lr_decay=2.6)
    assert unfreeze.schedule == {0: ("head",), 2: ("hidden", "bn")}
    assert unfreeze.group_lr_decay == 2.6
    with pytest.raises(ValueError, match="argument every. Expected an int >= 1. Received: every=0"):
        ProgressiveUnfreezing.gradual(["head"], every=0)
    with pytest.raises(ValueError, match="argument groups"):
        ProgressiveUnfreezing.gradual([])


def test_unknown_layer_fails_before_first_step_with_close_matches():
    model = _compiled()
    before = _weights(model)
    with pytest.raises(ValueError, match=r"matches 'hiden'.*Close matches: hidden"):
        _fit(model, [ProgressiveUnfreezing({0: "head", 1: "hiden"})])
    _assert_same(before, _weights(model), HIDDEN + HEAD)


def test_uncompiled_model_is_refused():
    unfreeze = ProgressiveUnfreezing({0: "head"})
    unfreeze.set_model(build_tiny_model())
    with pytest.raises(ValueError, match="needs a compiled model"):
        unfreeze.on_train_begin()


# ------------------------------------------------------------------ stages in one fit
def test_frozen_layers_and_bn_statistics_stay_bitwise_until_their_stage(capsys):
    model = _compiled(batch_norm=True)
    initial = _weights(model)
    unfreeze = ProgressiveUnfreezing({0: "head", 2: ["hidden", "bn"]}, verbose=1)
    recorder, probe = StageRecorder(), Probe(unfreeze)
    _fit(model, [unfreeze, recorder, probe], epochs=3)

    for epoch in (1, 2):  # after epochs 0 and 1 of training the head only
        _assert_same(initial, probe.seen[epoch]["weights"], HIDDEN + BN)
        _assert_changed(initial, probe.seen[epoch]["weights"], HEAD)
    _assert_changed(probe.seen[2]["weights"], _weights(model), HIDDEN + BN)
    assert probe.seen[1]["trainable"] == HEAD
    assert sorted(probe.seen[2]["trainable"]) == sorted(HIDDEN + HEAD + ["bn/gamma", "bn/beta"])
    assert unfreeze.current_stage == 1
    assert sorted(unfreeze.unfrozen_layers) == ["bn", "head", "hidden"]
    # The hook reaches a sibling registered after this callback's train begin.
    assert recorder.calls == [(0, 0, ["head"]), (1, 2, ["hidden", "bn"])]
    out = capsys.readouterr().out
    assert "Epoch 3: ProgressiveUnfreezing stage 1: unfreezing 2 layers (hidden, bn)" in out


def test_train_bn_keeps_batch_norm_training_in_frozen_groups():
    model = _compiled(batch_norm=True)
    initial = _weights(model)
    probe = Probe()
    _fit(model, [ProgressiveUnfreezing({0: "head", 2: "hidden"}, train_bn=True), probe], epochs=2)
    after = probe.seen[1]["weights"]
    _assert_same(initial, after, HIDDEN)
    _assert_changed(initial, after, BN + HEAD)


def test_second_fit_starts_again_at_stage_zero():
    model = _compiled()
    unfreeze = ProgressiveUnfreezing({0: "head", 1: "hidden"})
    _fit(model, [unfreeze], epochs=2)
    assert unfreeze.current_stage == 1
    before = _weights(model)
    _fit(model, [unfreeze], epochs=1)
    assert unfreeze.current_stage == 0
    _assert_same(before, _weights(model), HIDDEN)
    _assert_changed(before, _weights(model), HEAD)


OPTIMIZERS = {
    "sgd_momentum": lambda: keras.optimizers.SGD(0.05, momentum=0.9),
    "adam": lambda: keras.optimizers.Adam(0.01),
    "adamw": lambda: keras.optimizers.AdamW(0.01, weight_decay=0.01),
    "rmsprop": lambda: keras.optimizers.RMSprop(0.01, momentum=0.5),
    "adagrad": lambda: keras.optimizers.Adagrad(0.05),
    "nadam": lambda: keras.optimizers.Nadam(0.01),
    "lion": lambda: keras.optimizers.Lion(0.001),
}


@pytest.mark.parametrize("name", [  # the fast tier keeps two of the optimizers
    n if n in ("sgd_momentum", "adam") else pytest.param(n, marks=pytest.mark.slow)
    for n in OPTIMIZERS
])
def test_stage_change_keeps_slots_bitwise_and_gives_fresh_ones(name):
    model = _compiled(OPTIMIZERS[name]())
    unfreeze = ProgressiveUnfreezing({0: "head", 2: "hidden"})
    before, after = Probe(), Probe()
    _fit(model, [before, unfreeze, after], epochs=3)

    old, new = before.seen[2]["optimizer"], after.seen[2]["optimizer"]
    assert set(old) < set(new)
    _assert_same(old, new, old)  # iteration, learning rate and the head's slots
    assert int(old[next(k for k in old if k.endswith("/iteration"))]) == 8
    fresh = type(model.optimizer).from_config(model.optimizer.get_config())
    fresh.build(model.trainable_variables)
    _assert_same(_values(fresh, model), new, set(new) - set(old))  # new slots start as in a new optimizer
    _assert_same(before.seen[0]["weights"], after.seen[2]["weights"], HIDDEN)
    _assert_changed(after.seen[2]["weights"], _weights(model), HIDDEN + HEAD)


def test_loss_scale_optimizer_with_mixed_precision():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8,))
    x = keras.layers.Dense(16, activation="relu", name="hidden", dtype="mixed_float16")(inputs)
    outputs = keras.layers.Dense(3, name="head", dtype="mixed_float16")(x)
    model = keras.Model(inputs, keras.layers.Activation("softmax", dtype="float32")(outputs))
    model.compile(optimizer=keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam(0.01)),
                  loss="sparse_categorical_crossentropy")
    unfreeze = ProgressiveUnfreezing({0: "head", 1: "hidden"}, group_lr_decay=2.6)
    before, after = Probe(), Probe()
    _fit(model, [before, unfreeze, after], epochs=2)

    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    old, new = before.seen[1]["optimizer"], after.seen[1]["optimizer"]
    assert any("dynamic_scale" in k for k in old) and set(old) < set(new)
    _assert_same(old, new, old)
    _assert_same(before.seen[0]["weights"], after.seen[1]["weights"], HIDDEN)
    _assert_changed(after.seen[1]["weights"], _weights(model), HIDDEN)
    assert unfreeze.learning_rates()["hidden"] == pytest.approx(0.01 / 2.6)


# ------------------------------------------------------------------ learning rates
def _linear_model(optimizer):
    """Two linear branches under loss mean(y_pred): each kernel's gradient is the batch mean of x."""
    inputs = keras.Input((4,))
    top = keras.layers.Dense(1, use_bias=False, kernel_initializer="zeros", name="top")(inputs)
    low = keras.layers.Dense(1, use_bias=False, kernel_initializer="zeros", name="low")(inputs)
    model = keras.Model(inputs, keras.layers.Add(name="sum")([top, low]))
    model.compile(optimizer=optimizer, loss=lambda y_true, y_pred: keras.ops.mean(y_pred))
    return model


def _linear_run(optimizer, epochs=4, **kwargs):
    x = np.random.default_rng(1).uniform(0.5, 1.5, size=(8, 4)).astype("float32")
    model = _linear_model(optimizer)
    steps = StepWeights()
    unfreeze = ProgressiveUnfreezing({0: "top", 1: "low"}, **kwargs)
    model.fit(x, np.zeros((8, 1), "float32"), batch_size=4, epochs=epochs, shuffle=False,
              verbose=0, callbacks=[unfreeze, steps])
    gradients = [x[:4].mean(0)[:, None], x[4:].mean(0)[:, None]]
    return steps.steps, gradients


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_group_lr_decay_divides_lower_group_updates_exactly(name):
    make = {"sgd": lambda: keras.optimizers.SGD(0.1), "adam": lambda: keras.optimizers.Adam(0.1)}[name]
    scaled, _ = _linear_run(make(), group_lr_decay=2.6)
    plain, _ = _linear_run(make())
    for step in range(3, len(plain)):  # the low branch trains from the 3rd step (epoch 1)
        for branch, ratio in (("top/kernel", 1.0), ("low/kernel", 1 / 2.6)):
            update = scaled[step][branch] - scaled[step - 1][branch]
            reference = plain[step][branch] - plain[step - 1][branch]
            assert np.all(reference != 0)
            np.testing.assert_allclose(
                update, reference * ratio, rtol=1e-5, err_msg=f"{branch} step {step}"
            )


def test_rates_follow_schedule_group_decay_warmup_and_weight_decay():
    schedule = keras.optimizers.schedules.ExponentialDecay(0.1, decay_steps=1, decay_rate=0.9)
    steps, gradients = _linear_run(
        keras.optimizers.SGD(schedule, weight_decay=0.05), epochs=4, group_lr_decay=2.0, warmup_epochs=2
    )
    # Stage 1 starts at step 2 (epoch 1) and warms up over 2 epochs = 4 steps.
    warmup = [1.0, 1.0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    for step, factor in enumerate(warmup):
        rate = 0.1 * 0.9**step * factor
        gradient = gradients[step % 2]
        for branch, multiplier in (("top/kernel", 1.0), ("low/kernel", 0.5)):
            w = steps[step][branch]
            if branch == "low/kernel" and step < 2:
                np.testing.assert_array_equal(steps[step + 1][branch], w)
                continue
            lr = rate * multiplier
            expected = w - w * 0.05 * lr - lr * gradient
            np.testing.assert_allclose(
                steps[step + 1][branch], expected, rtol=1e-5, err_msg=f"{branch} step {step}"
            )


# ------------------------------------------------------------------ devices, models
def test_two_device_twin_matches_one_device(two_devices):
    def run(twin):
        model = build_tiny_model(batch_norm=True)
        trained = distribute.data_parallel(model, two_devices) if twin else model
        trained.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
        unfreeze = ProgressiveUnfreezing(
            {0: "head", 1: ["hidden", "bn"]}, group_lr_decay=2.6, warmup_epochs=1
        )
        before, after = Probe(), Probe()
        # Validation after a stage change runs the new trainable set too (on
        # JAX, functions made earlier hold the old set's output shardings).
        x, y = make_tiny_data(64, seed=1)
        _fit(trained, [before, unfreeze, after], epochs=3, validation_data=(x, y))
        return trained, before, after

    twin, before, after = run(twin=True)
    _assert_same(before.seen[1]["optimizer"], after.seen[1]["optimizer"], before.seen[1]["optimizer"])
    _assert_same(before.seen[0]["weights"], after.seen[1]["weights"], HIDDEN + BN)
    _assert_changed(after.seen[1]["weights"], _weights(twin), HIDDEN + BN)
    assert distribute.replica_divergence(twin) == 0.0
    single, _, _ = run(twin=False)
    final, reference = _weights(twin), _weights(single)
    for key in reference:
        # (hidden/bias feeds a BatchNormalization: its gradient is rounding noise)
        np.testing.assert_allclose(final[key], reference[key], rtol=1e-4, atol=1e-4, err_msg=key)


@pytest.mark.slow  # builds and compiles MobileNetV3Small
def test_keras_applications_backbone_by_path_pattern():
    keras.utils.set_random_seed(0)
    backbone = keras.applications.MobileNetV3Small(
        input_shape=(32, 32, 3), include_top=False, weights=None, minimalistic=True,
        alpha=0.75, include_preprocessing=False, pooling="avg",
    )
    inputs = keras.Input((32, 32, 3))
    model = keras.Model(inputs, keras.layers.Dense(3, name="head")(backbone(inputs)))
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    rng = np.random.default_rng(0)
    x, y = rng.uniform(size=(8, 32, 32, 3)).astype("float32"), rng.integers(0, 3, 8)
    initial = _weights(model)
    unfreeze = ProgressiveUnfreezing({0: "head", 1: "MobileNetV3Small/expanded_conv_10_*"})
    model.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=[unfreeze])

    final = _weights(model)
    changed = {k for k in initial if not np.array_equal(initial[k], final[k])}
    block = {k for k in initial if k.startswith("expanded_conv_10_") and "moving" not in k}
    assert block and block <= changed
    assert {k for k in changed if not k.startswith("head/")} <= {
        k for k in initial if k.startswith("expanded_conv_10_")
    }  # every other backbone weight, BN statistics included, is untouched
    assert len(unfreeze.unfrozen_layers) == 7


class Block(keras.layers.Layer):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.parts = [keras.layers.Dense(4, name="p0"), keras.layers.Dense(4, name="p1")]

    def build(self, input_shape):
        self.scale = self.add_weight(shape=(4,), initializer="ones", name="scale")

    def call(self, x):
        return self.parts[1](self.parts[0](x)) * self.scale


class Subclassed(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.block = Block(name="blk")
        self.head = keras.layers.Dense(3, activation="softmax", name="head")

    def call(self, x):
        return self.head(self.block(x))


@pytest.mark.parametrize("kind", ["subclassed", "sequential"])
def test_sublayers_of_subclassed_and_sequential_models_are_reached(kind):
    keras.utils.set_random_seed(0)
    if kind == "subclassed":
        model = Subclassed(name="sub")
    else:
        inner = keras.Sequential(
            [keras.layers.Dense(4, name="p0"), keras.layers.Dense(4, name="p1")], name="blk"
        )
        head = keras.layers.Dense(3, activation="softmax", name="head")
        model = keras.Sequential([keras.Input((8,)), inner, head])
    model(np.zeros((1, 8), "float32"))
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    initial = _weights(model)
    unfreeze = ProgressiveUnfreezing({0: "head", 1: "blk/p1"})
    _fit(model, [unfreeze], epochs=2)
    final = _weights(model)
    for key in initial:
        moved = not np.array_equal(initial[key], final[key])
        assert moved == (("/p1/" in key) or ("head/" in key)), key
    assert sorted(unfreeze.unfrozen_layers) == ["blk/p1", "head"]  # not blk's own scale


def test_unchanged_trainable_set_keeps_the_optimizer():
    model = _compiled()
    model.optimizer.build(model.trainable_variables)
    optimizer = model.optimizer
    unfreeze = ProgressiveUnfreezing({0: "all"})
    unfreeze.set_model(model)
    unfreeze.on_train_begin()
    assert model.optimizer is optimizer
    unfreeze.on_train_end()


# ------------------------------------------------------------------ resume
@pytest.mark.parametrize("with_state", [True, False], ids=["set_state", "initial_epoch_only"])
def test_resume_at_a_later_stage_continues_bitwise(with_state):
    def callback():
        return ProgressiveUnfreezing(
            {0: "head", 2: "hidden", 4: "bn"}, group_lr_decay=2.6, warmup_epochs=2
        )

    reference_callback = callback()
    reference = _compiled(batch_norm=True)
    reference_probe = Probe(reference_callback)
    _fit(reference, [reference_callback, reference_probe], epochs=5)

    first_callback = callback()
    first = _compiled(batch_norm=True)
    _fit(first, [first_callback], epochs=3)  # stops inside stage 1's warm-up
    state = first_callback.get_state()
    assert state["epoch"] == 3 and state["stage"] == 1

    # What resume() does: weights, trainable flags, optimizer state by key.
    resumed = _compiled(batch_norm=True, seed=1)
    resumed.set_weights(first.get_weights())
    _optimizers.apply_trainable_flags(resumed, _optimizers.trainable_flags(first))
    _optimizers.restore_optimizer_state(resumed, _optimizer_values(first))
    resumed_callback = callback()
    if with_state:
        resumed_callback.set_state(state)
    probe = Probe(resumed_callback)
    _fit(resumed, [resumed_callback, probe], epochs=5, initial_epoch=3)

    assert probe.seen[3]["trainable"] == reference_probe.seen[3]["trainable"]
    assert probe.seen[3]["rates"] == reference_probe.seen[3]["rates"]
    assert probe.seen[3]["rates"]["hidden"] < 0.001 / 2.6  # still warming up
    expected = reference_probe.seen[4]["weights"]
    _assert_same(expected, probe.seen[4]["weights"], expected)
    _assert_same(_weights(reference), _weights(resumed), _weights(reference))


def test_resume_through_checkpoint_files_continues_bitwise(tmp_path):
    """Checkpoint every epoch, restart from files with resume(): same weights as never stopped."""
    from keras_callbacks_plus import ParallelModelCheckpoint, resume

    def callbacks():
        unfreeze = ProgressiveUnfreezing(
            {0: "head", 2: "hidden", 4: "bn"}, group_lr_decay=2.6, warmup_epochs=2
        )
        return unfreeze, ParallelModelCheckpoint(str(tmp_path / "m_{epoch}.keras"))

    keras.utils.set_random_seed(5)
    reference = _compiled(batch_norm=True)
    _fit(reference, [callbacks()[0]], epochs=5)

    keras.utils.set_random_seed(5)
    _fit(_compiled(batch_norm=True), list(callbacks()), epochs=3)  # then "crashes"

    resumed = _compiled(batch_norm=True, seed=9)
    unfreeze, checkpoint = callbacks()
    initial_epoch = resume(resumed, tmp_path, callbacks=[unfreeze, checkpoint])
    assert initial_epoch == 3 and unfreeze.current_stage == 1
    _fit(resumed, [unfreeze, checkpoint], epochs=5, initial_epoch=initial_epoch)
    assert unfreeze.current_stage == 2
    for key, value in _weights(reference).items():
        np.testing.assert_array_equal(_weights(resumed)[key], value, err_msg=key)

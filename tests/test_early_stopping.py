"""Tests of keras_callbacks_plus.early_stopping (RobustEarlyStopping), for each backend.

Scripted-log tests drive the hooks with chosen values on a tiny real model
whose weights are set to the epoch number before each epoch end, so the
restored weights tell which epoch they came from. Real `fit` runs cover the
batch-level stops, resuming, a 2-device twin and 2 workers.
"""

import copy
import json
import os
import re
import warnings
from pathlib import Path

import keras
import numpy as np
import pytest

from keras_callbacks_plus import distribute, early_stopping
from keras_callbacks_plus.early_stopping import RobustEarlyStopping

BACKEND = keras.backend.backend()
REPO = Path(__file__).resolve().parents[1]
NAN, INF = float("nan"), float("inf")


# ------------------------------------------------------------------ helpers
@pytest.fixture(scope="module")
def model():
    """A compiled tiny model for scripted-log tests (never trained)."""
    from helpers import build_tiny_model

    model = build_tiny_model()
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def _mark(model, epoch):
    model.set_weights([np.full(w.shape, epoch, w.dtype) for w in model.get_weights()])


def _marker(model):
    """The epoch whose (marked) weights the model holds."""
    weights = model.get_weights()
    assert all(np.all(w == weights[0].flat[0]) for w in weights)
    return int(weights[0].flat[0])


def _drive(stopper, model, values, *, monitor="val_loss", start=0, before_epoch=None, end=True):
    """Runs epochs like `fit` with scripted `values`; returns the epochs run."""
    stopper.set_model(model)
    model.stop_training = False
    stopper.on_train_begin()
    ran = 0
    for epoch, value in enumerate(values, start=start):
        stopper.on_epoch_begin(epoch)
        if before_epoch is not None:
            before_epoch(epoch)
        _mark(model, epoch)
        stopper.on_epoch_end(epoch, value if isinstance(value, dict) else {monitor: value})
        ran += 1
        if model.stop_training:
            break
    if end:
        stopper.on_train_end()
    return ran


def _compiled(tiny_model, lr=0.05, **kwargs):
    model = tiny_model(**kwargs)
    model.compile(optimizer=keras.optimizers.SGD(lr), loss="sparse_categorical_crossentropy")
    return model


class WeightRecorder(keras.callbacks.Callback):
    """Keeps a copy of the weights at every epoch end."""

    def __init__(self):
        super().__init__()
        self.weights = {}

    def on_epoch_end(self, epoch, logs=None):
        self.weights[epoch] = self.model.get_weights()


class FakeClock(keras.callbacks.Callback):
    """Advances a fake clock by `step` seconds after every training batch."""

    def __init__(self, step):
        super().__init__()
        self.step, self.now = step, 0.0

    def on_train_batch_end(self, batch, logs=None):
        self.now += self.step


def _assert_weights_equal(actual, expected):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        np.testing.assert_array_equal(a, e)


# ----------------------------------------- Keras's own EarlyStopping cases
@pytest.mark.parametrize("patience", [0, 1, 2, 3])
def test_keras_patience(model, patience):
    stopper = RobustEarlyStopping("loss", patience=patience)
    _drive(stopper, model, [10.0, 9.0, 8.0, 9.0, 8.9, 8.8, 8.7, 8.6, 8.5], monitor="loss")
    assert stopper.stopped_epoch == max(patience, 1) + 2
    assert stopper.stop_reason == "patience"
    assert (stopper.best, stopper.best_epoch) == (8.0, 2)


def test_keras_restores_best_weights(model):
    stopper = RobustEarlyStopping(patience=2)
    assert _drive(stopper, model, [0.2, 0.15, 0.1, 0.11, 0.12]) == 5
    assert _marker(model) == 2

    # No epoch beats the baseline: patience runs out, the best epoch is restored.
    stopper = RobustEarlyStopping(patience=5, baseline=0.5)
    assert _drive(stopper, model, [0.9, 0.8, 0.7, 0.71, 0.72, 0.73]) == 5
    assert _marker(model) == 2 and stopper.stop_reason == "patience"

    # Another callback stops training: the best weights are restored anyway.
    stopper = RobustEarlyStopping(patience=5, baseline=0.5)

    def other_stops(epoch):
        model.stop_training = epoch == 3

    assert _drive(stopper, model, [0.9, 0.8, 0.7, 0.71, 0.72, 0.73], before_epoch=other_stops) == 4
    assert _marker(model) == 2
    assert stopper.stop_reason is None and stopper.stopped_epoch == 0


def test_keras_reuse_and_start_from_epoch(tiny_model, tiny_data):
    """A second `fit` starts clean; warm-up epochs never stop training."""
    x, y = tiny_data
    net = _compiled(tiny_model, lr=0.0)  # a constant loss: no epoch improves on the first
    stopper = RobustEarlyStopping("loss", patience=2, baseline=0.0, start_from_epoch=2)
    for _ in range(2):
        history = net.fit(x, y, batch_size=32, epochs=20, shuffle=False, verbose=0,
                          callbacks=[stopper])
        # Epoch 2 is the first monitored one; it does not beat the baseline, so
        # patience runs out one epoch later.
        assert len(history.epoch) == 4
        assert (stopper.stop_reason, stopper.stopped_epoch, stopper.best_epoch) == (
            "patience", 3, 2)


# ------------------------------------------------------ scripted-log rules
@pytest.mark.parametrize(
    "kwargs, values, stopped, best_epoch",
    [
        # Absolute delta: 99 beats 100 by more than 0.5.
        ({"min_delta": 0.5}, [100.0, 99.0, 98.0, 98.0], 3, 2),
        # Relative delta: 0.5 * |100| = 50 is needed.
        ({"min_delta": 0.5, "relative_delta": True}, [100.0, 99.0, 98.0], 1, 0),
        ({"min_delta": 0.1, "relative_delta": True, "mode": "max"}, [1.0, 1.5, 1.6], 2, 1),
        # An improvement by exactly min_delta does not count.
        ({"min_delta": 0.25}, [1.0, 0.75, 0.5], 1, 0),
    ],
)
def test_min_delta(model, kwargs, values, stopped, best_epoch):
    stopper = RobustEarlyStopping(patience=1, **kwargs)
    _drive(stopper, model, values)
    assert (stopper.stop_reason, stopper.stopped_epoch, stopper.best_epoch) == (
        "patience", stopped, best_epoch)
    assert _marker(model) == best_epoch


def test_baseline_beaten_resets_patience(model):
    stopper = RobustEarlyStopping(patience=2, baseline=0.5)
    # 0.45 beats the baseline: patience restarts there, so the stop is 2 epochs later.
    _drive(stopper, model, [0.9, 0.8, 0.45, 0.6, 0.6, 0.6])
    assert (stopper.stopped_epoch, stopper.best_epoch) == (4, 2)


def test_start_from_epoch_ignores_warm_up_values(model):
    values = [5.0, 4.0, 3.0, 10.0, 10.0, 10.0]
    stopper = RobustEarlyStopping(patience=1, start_from_epoch=3, divergence_threshold=4.5)
    # Without the warm-up, epoch 0 (5.0) would already diverge.
    _drive(stopper, model, values[:3] + [4.0, 4.0])
    assert (stopper.stop_reason, stopper.stopped_epoch, stopper.best_epoch) == ("patience", 4, 3)
    plain = RobustEarlyStopping(patience=1)
    _drive(plain, model, values)
    assert (plain.stopped_epoch, plain.best_epoch) == (3, 2)


def test_smoothing_mean_of_last_n(model):
    # Exact in binary floating point.
    values = [1.0, 0.75, 0.875, 0.75, 0.875, 0.75, 0.875]
    raw = RobustEarlyStopping(patience=2)
    _drive(raw, model, values)
    assert (raw.stopped_epoch, raw.best_epoch, raw.best) == (3, 1, 0.75)
    smooth = RobustEarlyStopping(patience=2, smoothing=2)
    _drive(smooth, model, values)
    # Means: 1.0, 0.875, 0.8125, 0.8125, 0.8125: no improvement after epoch 2.
    assert (smooth.stopped_epoch, smooth.best_epoch, smooth.best) == (4, 2, 0.8125)
    assert _marker(model) == 2


def test_smoothing_exponential_moving_average(model):
    # A lucky epoch (0.25) among steadily falling values.
    values = [1.0, 0.25, 0.875, 0.75, 0.625, 0.5, 0.375]
    raw = RobustEarlyStopping(patience=3)
    _drive(raw, model, values)
    assert (raw.stop_reason, raw.stopped_epoch, raw.best_epoch) == ("patience", 4, 1)
    smooth = RobustEarlyStopping(patience=3, smoothing=0.25)
    assert _drive(smooth, model, values) == len(values)
    # EMA with weight 1/4 on the newest value (exact in binary floating point).
    ema = [1.0]
    for v in values[1:]:
        ema.append(0.25 * v + 0.75 * ema[-1])
    assert ema[:4] == [1.0, 0.8125, 0.828125, 0.80859375]
    assert smooth.stop_reason is None
    assert (smooth.best, smooth.best_epoch) == (ema[-1], 6)
    assert _marker(model) == 6


@pytest.mark.parametrize(
    "kwargs, values, reason, stopped, best_epoch",
    [
        ({"stopping_threshold": 0.3}, [1.0, 0.5, 0.3, 0.1], "stopping_threshold", 2, 2),
        ({"divergence_threshold": 4.0}, [1.0, 0.9, 4.0, 4.5], "divergence", 3, 1),
        ({"stopping_threshold": 0.95, "mode": "max"}, [0.5, 0.97, 0.99], "stopping_threshold",
         1, 1),
        ({"divergence_threshold": 0.2, "monitor": "val_accuracy"}, [0.5, 0.6, 0.1], "divergence",
         2, 1),
        # Thresholds apply to the smoothed value: the mean of 0.5 and 0.25.
        ({"stopping_threshold": 0.375, "smoothing": 2}, [0.5, 0.25], "stopping_threshold", 1, 1),
    ],
)
def test_thresholds(model, kwargs, values, reason, stopped, best_epoch):
    monitor = kwargs.pop("monitor", "val_loss")
    stopper = RobustEarlyStopping(monitor, patience=10, **kwargs)
    _drive(stopper, model, values, monitor=monitor)
    assert (stopper.stop_reason, stopper.stopped_epoch, stopper.best_epoch) == (
        reason, stopped, best_epoch)
    assert _marker(model) == best_epoch


def test_non_finite_monitored_value(model):
    stopper = RobustEarlyStopping(patience=5)
    _drive(stopper, model, [1.0, 0.5, NAN, 0.1])
    assert (stopper.stop_reason, stopper.stopped_epoch) == ("non_finite", 2)
    assert _marker(model) == 1
    # Unchecked, NaN and inf count as epochs without improvement.
    unchecked = RobustEarlyStopping(patience=2, check_finite=False, smoothing=2)
    _drive(unchecked, model, [1.0, NAN, INF, 0.5])
    assert (unchecked.stop_reason, unchecked.stopped_epoch, unchecked.best_epoch) == (
        "patience", 2, 0)


def test_non_finite_stop_before_any_improvement_restores_the_weights_of_the_fit_start(model):
    _mark(model, 7)  # the weights when fit starts; _drive marks them 0 before epoch 0 ends
    stopper = RobustEarlyStopping()
    _drive(stopper, model, [NAN])
    assert (stopper.stop_reason, stopper.best_weights, stopper.restored_weights) == (
        "non_finite", None, "fit_start")
    assert _marker(model) == 7
    # Without restore_best_weights the last weights stay, as in Keras.
    _mark(model, 7)
    keep = RobustEarlyStopping(restore_best_weights=False)
    _drive(keep, model, [NAN])
    assert (keep.stop_reason, keep.restored_weights, _marker(model)) == ("non_finite", None, 0)


def test_other_stop_before_any_improvement_keeps_the_last_weights(model, caplog):
    stopper = RobustEarlyStopping(check_finite=False)  # NaN is then an epoch without improvement
    with caplog.at_level("WARNING", logger="keras_callbacks_plus.early_stopping"):
        _drive(stopper, model, [NAN])
    assert (stopper.stop_reason, stopper.restored_weights) == ("patience", None)
    assert _marker(model) == 0
    assert "no best weights to restore" in caplog.text


def test_patience_restarts_when_a_stage_is_unfrozen(model):
    values = [1.0, 1.1, 1.2, 1.3, 1.4]

    def unfreeze_before_epoch_2(stopper):
        def hook(epoch):
            if epoch == 2:
                stopper.on_unfreeze_stage(1, epoch, ["hidden"])
        return hook

    for reset, stopped in [(True, 3), (False, 2)]:
        stopper = RobustEarlyStopping(patience=2, reset_patience_on_unfreeze=reset)
        _drive(stopper, model, values, before_epoch=unfreeze_before_epoch_2(stopper))
        assert (stopper.stop_reason, stopper.stopped_epoch) == ("patience", stopped)


def test_missing_monitor_warns_once_and_strict_raises(model):
    stopper = RobustEarlyStopping("val_auc", mode="max", patience=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _drive(stopper, model, [{"loss": 1.0, "accuracy": 0.5}] * 3)
    messages = [str(w.message) for w in caught if "val_auc" in str(w.message)]
    assert len(messages) == 1
    assert "Available keys: accuracy, loss" in messages[0]
    assert stopper.stop_reason is None and stopper.best is None
    strict = RobustEarlyStopping("val_auc", mode="max", strict=True)
    with pytest.raises(KeyError, match="val_auc.*Available keys: loss"):
        _drive(strict, model, [{"loss": 1.0}])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"patience": -1}, "Invalid value for argument patience. Expected an int >= 0. "
                           "Received: patience=-1"),
        ({"patience": 1.5}, "argument patience. Expected an int >= 0"),
        ({"start_from_epoch": -2}, "argument start_from_epoch. Expected an int >= 0"),
        ({"smoothing": 0}, "argument smoothing. Expected None, an int >= 1"),
        ({"smoothing": 1.0}, "Received: smoothing=1.0"),
        ({"smoothing": -0.5}, "Received: smoothing=-0.5"),
        ({"smoothing": True}, "Received: smoothing=True"),
        ({"smoothing": "3"}, "Received: smoothing='3'"),
        ({"max_time": 0}, "argument max_time. Expected a number of seconds > 0 or None. "
                          "Received: max_time=0"),
        ({"max_time": -5.0}, "Received: max_time=-5.0"),
        ({"baseline": NAN}, "argument baseline. Expected a finite number"),
        ({"min_delta": -1}, "argument min_delta"),
        ({"mode": "up"}, "argument mode"),
        ({"mode": "min", "stopping_threshold": 5.0, "divergence_threshold": 3.0},
         "stopping_threshold. Expected a value better than divergence_threshold=3.0 with "
         "mode='min'"),
        ({"mode": "max", "stopping_threshold": 0.5, "divergence_threshold": 0.9},
         "stopping_threshold. Expected a value better than divergence_threshold=0.9"),
        ({"mode": "min", "baseline": 5.0, "divergence_threshold": 3.0},
         "argument baseline. Expected a value no worse than divergence_threshold=3.0"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        RobustEarlyStopping(**kwargs)


def test_thresholds_are_checked_against_the_resolved_mode(model):
    stopper = RobustEarlyStopping("val_accuracy", stopping_threshold=0.5, divergence_threshold=0.9)
    stopper.set_model(model)
    stopper.on_train_begin()  # mode="auto" is decided at the first epoch end, as in Keras
    assert stopper.monitor_op is None
    with pytest.raises(ValueError, match="mode='max' \\(higher is better\\)"):
        stopper.on_epoch_end(0, {"val_accuracy": 0.7})
    # The same numbers suit a loss.
    _drive(RobustEarlyStopping(stopping_threshold=0.5, divergence_threshold=0.9), model, [0.7])


def test_batch_hook_only_with_batch_level_checks(model):
    def keras_sees_batch_hook(callback):
        return not getattr(callback.on_train_batch_end, "_is_default", False) or not getattr(
            callback.on_batch_end, "_is_default", False)

    quiet = RobustEarlyStopping(check_finite=False)
    assert isinstance(quiet, RobustEarlyStopping) and not keras_sees_batch_hook(quiet)
    assert not keras_sees_batch_hook(copy.deepcopy(quiet))
    for checking in (RobustEarlyStopping(), RobustEarlyStopping(check_finite=False, max_time=60)):
        assert isinstance(checking, RobustEarlyStopping) and keras_sees_batch_hook(checking)
        assert keras_sees_batch_hook(copy.deepcopy(checking))
        # One name either way: ParallelModelCheckpoint files states by class name.
        assert type(checking).__name__ == type(quiet).__name__ == "RobustEarlyStopping"
    # Keras keeps its asynchronous batch-end dispatch (a JAX feature: TensorFlow
    # dispatches synchronously anyway): the batch hook is async-safe in one process.
    quiet_list = keras.callbacks.CallbackList([quiet], model=model)
    checking_list = keras.callbacks.CallbackList([RobustEarlyStopping()], model=model)
    assert quiet_list._async_train is (BACKEND == "jax")
    assert checking_list._async_train is (BACKEND == "jax")


def test_batch_hook_runs_in_order_on_several_workers(model, monkeypatch):
    # Every worker must stop at the same step, and max_time votes are collectives.
    monkeypatch.setattr(distribute, "num_workers", lambda: 2)
    checking = RobustEarlyStopping(max_time=60)
    assert checking.async_safe is False
    assert keras.callbacks.CallbackList([checking], model=model)._async_train is False
    monkeypatch.setattr(distribute, "num_workers", lambda: 1)
    assert checking.async_safe is True


def test_verbose_says_why_and_what_was_restored(model, capsys):
    keras.config.enable_interactive_logging()
    stopper = RobustEarlyStopping(patience=1, verbose=1)
    _drive(stopper, model, [0.5, 0.4, 0.6])
    out = capsys.readouterr().out
    assert "Epoch 3: early stopping: val_loss did not improve for 1 epochs" in out
    assert "(best 0.4 at epoch 2)" in out
    assert "Restoring model weights from the end of the best epoch: 2." in out
    _drive(RobustEarlyStopping(divergence_threshold=1.0, verbose=1), model, [0.5, 2.0])
    assert "Epoch 2: early stopping: val_loss = 2 is worse than divergence_threshold=1" in (
        capsys.readouterr().out)
    _drive(RobustEarlyStopping(verbose=0), model, [0.5, 0.6])
    assert capsys.readouterr().out == ""


# -------------------------------------------------------------- state
def test_state_round_trip_decides_like_an_uninterrupted_run(model, tmp_path):
    values = [1.0, 0.5, 0.75, 0.25, 0.5, 0.625, 0.75, 0.875, 1.0, 1.125]
    kwargs = {"patience": 3, "smoothing": 0.5, "min_delta": 0.01}
    whole = RobustEarlyStopping(**kwargs)
    _drive(whole, model, values)
    expected = (whole.stop_reason, whole.stopped_epoch, whole.best, whole.best_epoch)
    assert expected[0] == "patience" and 0 < expected[3] < expected[1] - 1
    restored_epoch = _marker(model)

    for split in range(1, expected[1] + 1):
        first = RobustEarlyStopping(**kwargs)
        _drive(first, model, values[:split], end=False)  # interrupted: no on_train_end
        state = json.loads(json.dumps(first.get_state()))
        second = RobustEarlyStopping(**kwargs)
        second.set_state(state, _arrays_of(first))
        _drive(second, model, values[split:], start=split)
        assert (second.stop_reason, second.stopped_epoch, second.best, second.best_epoch) == (
            expected), split
        assert _marker(model) == restored_epoch, split


def _arrays_of(callback):
    return {name: arrays for name, (_, arrays) in callback.state_arrays().items()}


def test_state_has_no_side_effects_and_names_best_weights_by_version(model, tmp_path):
    stopper = RobustEarlyStopping(patience=5)
    assert stopper.state_arrays() == {}  # nothing held yet
    _drive(stopper, model, [1.0, 0.5], end=False)
    before = os.listdir(tmp_path)
    json.dumps(stopper.get_state())  # plain data
    assert os.listdir(tmp_path) == before
    version, weights = stopper.state_arrays()["best_weights"]
    assert _marker_of(weights) == 1
    stopper.on_epoch_end(2, {"val_loss": 0.7})  # no improvement: the same version
    assert stopper.state_arrays()["best_weights"][0] == version
    _mark(model, 3)
    stopper.on_epoch_end(3, {"val_loss": 0.1})
    newer, weights = stopper.state_arrays()["best_weights"]
    assert newer != version and _marker_of(weights) == 3
    # Without restore_best_weights there is nothing to save.
    assert RobustEarlyStopping(restore_best_weights=False).state_arrays() == {}


def _marker_of(weights):
    return int(weights[0].flat[0])


def test_checkpoints_write_best_weights_only_when_they_change(tiny_model, tmp_path):
    from keras_callbacks_plus import ParallelModelCheckpoint, resume

    model = _compiled(tiny_model)
    stopper = RobustEarlyStopping(patience=5)
    checkpoint = ParallelModelCheckpoint(str(tmp_path / "m_{epoch}.keras"), max_to_keep=2,
                                         async_save=False)
    checkpoint.set_model(model)
    checkpoint.on_train_begin()
    saved = []
    for epoch, value in enumerate([1.0, 0.5, 0.7, 0.8, 0.1]):
        checkpoint.on_epoch_begin(epoch)
        stopper_logs = {"val_loss": value}
        _drive_one(stopper, model, epoch, stopper_logs)
        checkpoint.on_epoch_end(epoch, stopper_logs)
        saved.append(sorted(f for f in os.listdir(tmp_path) if f.endswith(".npz")))
    checkpoint.on_train_end()
    stopper.on_train_end()
    # A new file when the best weights change (epochs 1, 2, 5), none otherwise; one that
    # no kept checkpoint refers to any more goes with it (max_to_keep=2: epoch 1's at epoch 3).
    assert [len(files) for files in saved] == [1, 2, 1, 1, 2]
    assert saved[1][1] == saved[2][0] == saved[3][0] == saved[4][0]
    resumed = RobustEarlyStopping(patience=5)
    resume(_fresh(model), tmp_path, callbacks=[checkpoint, resumed])
    assert resumed.best_epoch == 4 and _marker_of(resumed.best_weights) == 4


def _fresh(model):
    copy = keras.models.clone_model(model)
    copy.compile(optimizer=keras.optimizers.SGD(0.05), loss="sparse_categorical_crossentropy")
    return copy


def _drive_one(stopper, model, epoch, logs):
    if epoch == 0:
        stopper.set_model(model)
        model.stop_training = False
        stopper.on_train_begin()
    stopper.on_epoch_begin(epoch)
    _mark(model, epoch)
    stopper.on_epoch_end(epoch, logs)


def test_states_of_earlier_versions_still_load(model, tmp_path):
    """0.1.0.dev0 wrote best weights to `early_stopping_<monitor>.best.npz` beside the state."""
    np.savez(tmp_path / "early_stopping_val_loss.best.npz",
             *[np.full(w.shape, 3, w.dtype) for w in model.get_weights()])
    state = {"version": 1, "monitor": "val_loss", "best": 0.5, "best_epoch": 3, "wait": 1,
             "best_weights": "early_stopping_val_loss.best.npz"}
    with pytest.raises(ValueError, match="directory"):
        RobustEarlyStopping().set_state(state)
    with pytest.raises(FileNotFoundError, match="do not exist"):
        RobustEarlyStopping().set_state(state, directory=str(tmp_path / "elsewhere"))
    stopper = RobustEarlyStopping(patience=5)
    stopper.set_state(state, directory=str(tmp_path))
    assert (stopper.best_epoch, _marker_of(stopper.best_weights)) == (3, 3)
    # Old or partial states load with defaults.
    partial = RobustEarlyStopping(patience=1)
    partial.set_state({"best": 0.5, "best_epoch": 0})
    _drive(partial, model, [0.6], start=1)
    assert (partial.stop_reason, partial.stopped_epoch) == ("patience", 1)


def test_second_fit_starts_clean_unless_state_was_set(model):
    stopper = RobustEarlyStopping(patience=1)
    _drive(stopper, model, [0.5, 0.6])
    assert stopper.stop_reason == "patience"
    _drive(stopper, model, [2.0, 1.0, 0.9])  # 2.0 would not improve on 0.5
    assert (stopper.stop_reason, stopper.best, stopper.best_epoch) == (None, 0.9, 2)
    stopper.set_state({"best": 0.5, "best_epoch": 0, "wait": 0})
    _drive(stopper, model, [2.0], start=3)
    assert (stopper.stop_reason, stopper.stopped_epoch) == ("patience", 3)


# -------------------------------------------------------------- real fits
def _poisoned_batches(x, y, batch_size, bad_step):
    """Batches forever; the one at global step `bad_step` has an infinite sample weight.

    (An infinite input is not enough: TensorFlow's ReLU turns the NaN it makes into 0.)
    """
    step = 0
    while True:
        for start in range(0, len(x), batch_size):
            weights = np.ones(len(x[start : start + batch_size]), "float32")
            if step == bad_step:
                weights[0] = np.inf
            yield x[start : start + batch_size], y[start : start + batch_size], weights
            step += 1


class BatchCounter(keras.callbacks.Callback):
    """A batch hook that is not async-safe: Keras then handles batch ends in order."""

    def __init__(self):
        super().__init__()
        self.batches = 0

    def on_train_batch_end(self, batch, logs=None):
        self.batches += 1


@pytest.mark.parametrize("check_finite", [True, False])
def test_nan_loss_stops_in_its_batch(tiny_model, tiny_data, check_finite):
    x, y = tiny_data[0][:64], tiny_data[1][:64]  # 4 batches of 16 per epoch
    net = _compiled(tiny_model)
    recorder, counter = WeightRecorder(), BatchCounter()
    stopper = RobustEarlyStopping("loss", check_finite=check_finite)
    history = net.fit(
        _poisoned_batches(x, y, 16, bad_step=6), steps_per_epoch=4, epochs=4, shuffle=False,
        verbose=0, callbacks=[stopper, recorder, counter],
    )
    assert len(history.epoch) == 2
    if check_finite:
        # Batch 3 of epoch 2 (0-based: 1, 2) gave NaN: nothing ran after it.
        assert (stopper.stop_reason, stopper.stopped_epoch, stopper.stopped_batch) == (
            "non_finite", 1, 2)
        assert int(net.optimizer.iterations) == counter.batches == 4 + 3
    else:
        # Without the batch check the epoch runs to its end, then NaN is no improvement.
        assert (stopper.stop_reason, stopper.stopped_epoch) == ("patience", 1)
        assert int(net.optimizer.iterations) == 4 + 4
    assert not np.isfinite(history.history["loss"][1])
    assert stopper.best_epoch == 0
    _assert_weights_equal(net.get_weights(), recorder.weights[0])


def test_nan_loss_in_the_first_epoch_restores_the_weights_of_the_fit_start(
    tiny_model, tiny_data, capsys
):
    """No epoch improved yet: the weights from before the NaN batch come back, not NaNs."""
    x, y = tiny_data  # 8 batches of 16 per epoch
    net = _compiled(tiny_model)
    start = net.get_weights()
    stopper = RobustEarlyStopping("loss", verbose=1)
    keras.config.enable_interactive_logging()
    net.fit(_poisoned_batches(x, y, 16, bad_step=5), steps_per_epoch=8, epochs=3, verbose=0,
            callbacks=[stopper])
    assert (stopper.stop_reason, stopper.stopped_epoch, stopper.stopped_batch) == (
        "non_finite", 0, 5)
    assert (stopper.best_weights, stopper.restored_weights) == (None, "fit_start")
    assert all(np.all(np.isfinite(w)) for w in net.get_weights())
    _assert_weights_equal(net.get_weights(), start)
    assert "Restoring model weights from the start of this fit" in capsys.readouterr().out


def test_nan_loss_checked_off_the_training_thread(tiny_model, tiny_data):
    """With no other batch hook, JAX keeps dispatching steps while the loss is checked."""
    import threading

    x, y = tiny_data[0][:64], tiny_data[1][:64]
    net = _compiled(tiny_model)
    recorder = WeightRecorder()
    stopper = RobustEarlyStopping("loss")
    threads = []
    stop = stopper._stop
    stopper._stop = lambda *a, **k: (threads.append(threading.current_thread()), stop(*a, **k))
    history = net.fit(
        _poisoned_batches(x, y, 16, bad_step=6), steps_per_epoch=4, epochs=4, shuffle=False,
        verbose=0, callbacks=[stopper, recorder],
    )
    assert threads == [threading.main_thread()] if BACKEND == "tensorflow" else (
        len(threads) >= 1 and threading.main_thread() not in threads)
    # The first bad batch is reported, whichever check finished first.
    assert (stopper.stop_reason, stopper.stopped_epoch, stopper.stopped_batch) == (
        "non_finite", 1, 2)
    assert len(history.epoch) == 2
    # The stop took effect in that epoch, at most one step late here.
    assert int(net.optimizer.iterations) in ((4 + 3,) if BACKEND == "tensorflow" else (7, 8))
    assert stopper.best_epoch == 0
    _assert_weights_equal(net.get_weights(), recorder.weights[0])


@pytest.mark.parametrize(
    "max_time, stopped_epoch, stopped_batch, steps",
    [(5.5, 1, 1, 6), (4.0, 0, None, 4)],  # budget spent mid-epoch / on an epoch's last batch
)
def test_time_budget(tiny_model, tiny_data, monkeypatch, max_time, stopped_epoch,
                     stopped_batch, steps):
    clock = FakeClock(step=1.0)  # one fake second per batch, 4 batches per epoch
    monkeypatch.setattr(early_stopping, "_clock", lambda: clock.now)
    net = _compiled(tiny_model)
    recorder = WeightRecorder()
    stopper = RobustEarlyStopping("loss", patience=100, max_time=max_time, check_finite=False)
    net.fit(*tiny_data, batch_size=32, epochs=5, verbose=0, shuffle=False,
            callbacks=[clock, stopper, recorder])
    assert (stopper.stop_reason, stopper.stopped_epoch, stopper.stopped_batch) == (
        "max_time", stopped_epoch, stopped_batch)
    assert int(net.optimizer.iterations) == steps
    # Epoch 0 is the last one that ended before the stop: its weights come back.
    assert stopper.best_epoch == 0
    _assert_weights_equal(net.get_weights(), recorder.weights[0])
    assert stopper.get_state()["elapsed"] == steps


class Interrupt(Exception):
    pass


class InterruptAfter(keras.callbacks.Callback):
    """Crashes the fit after epoch `epoch`; first keeps `stopper`'s state and arrays."""

    def __init__(self, epoch, stopper=None):
        super().__init__()
        self.epoch, self.stopper = epoch, stopper
        self.state = self.arrays = None

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.epoch:
            if self.stopper is not None:
                self.state = json.loads(json.dumps(self.stopper.get_state()))
                self.arrays = _arrays_of(self.stopper)
            raise Interrupt


@pytest.mark.parametrize("through", ["get_state", "checkpoint"])
def test_resumed_fit_decides_like_an_uninterrupted_one(tiny_model, tiny_data, tmp_path, through):
    from keras_callbacks_plus.checkpoint import ParallelModelCheckpoint, resume

    x, y = tiny_data
    xv, yv = tiny_data[0][:64], tiny_data[1][:64].copy()
    yv[:32] = (yv[:32] + 1) % 3  # half-wrong labels: val_loss falls, then rises
    fit = {"batch_size": 32, "epochs": 12, "shuffle": False, "verbose": 0,
           "validation_data": (xv, yv)}
    kwargs = {"patience": 2, "smoothing": 2}

    whole_net = _compiled(tiny_model)
    whole = RobustEarlyStopping(**kwargs)
    whole_net.fit(x, y, callbacks=[whole], **fit)
    assert whole.stop_reason == "patience" and whole.best_epoch >= 1
    # Resume at the stopping epoch: the state carries a running patience count
    # and smoothing window, and the best weights come back from disk.
    split = whole.stopped_epoch

    net = _compiled(tiny_model)
    first = RobustEarlyStopping(**kwargs)
    second = RobustEarlyStopping(**kwargs)
    if through == "get_state":
        interrupt = InterruptAfter(split - 1, first)
        with pytest.raises(Interrupt):
            net.fit(x, y, callbacks=[first, interrupt], **fit)
        state = interrupt.state
        second.set_state(state, interrupt.arrays)
    else:
        checkpoint = ParallelModelCheckpoint(
            str(tmp_path / "ckpt" / "epoch{epoch:02d}.weights.h5"), save_weights_only=True,
            async_save=False,
        )
        with pytest.raises(Interrupt):
            net.fit(x, y, callbacks=[first, checkpoint, InterruptAfter(split - 1)], **fit)
        assert resume(net, tmp_path / "ckpt", callbacks=[second]) == split
        state = second.get_state()
    assert state["best_epoch"] == whole.best_epoch and state["wait"] == whole.patience - 1
    assert second.best_weights is not None
    history = net.fit(x, y, initial_epoch=split, callbacks=[second], **fit)

    assert history.epoch[0] == split
    assert (second.stop_reason, second.stopped_epoch, second.best, second.best_epoch) == (
        whole.stop_reason, whole.stopped_epoch, whole.best, whole.best_epoch)
    for a, b in zip(net.get_weights(), whole_net.get_weights()):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_twin_restore_reaches_every_replica(two_devices, tiny_model, tiny_data):
    x, y = tiny_data
    xv, yv = x[:64], (y[:64] + 1) % 3  # wrong labels: val_loss is best early on
    twin = distribute.data_parallel(tiny_model(batch_norm=True), devices=two_devices)
    twin.compile(optimizer=keras.optimizers.SGD(0.2), loss="sparse_categorical_crossentropy")
    recorder = WeightRecorder()
    stopper = RobustEarlyStopping(patience=3)
    history = twin.fit(x, y, validation_data=(xv, yv), batch_size=32, epochs=8, shuffle=False,
                       verbose=0, callbacks=[stopper, recorder])
    last = history.epoch[-1]
    assert stopper.best_epoch < last
    assert not np.array_equal(recorder.weights[stopper.best_epoch][0], recorder.weights[last][0])
    assert distribute.replica_divergence(twin) == 0.0
    _assert_weights_equal(twin.get_weights(), recorder.weights[stopper.best_epoch])
    # Every replica holds the best epoch's values, BatchNorm statistics included.
    for variable, expected in zip(twin.weights, recorder.weights[stopper.best_epoch]):
        for replica in distribute._backend.replica_values(variable):
            np.testing.assert_array_equal(replica, expected)


@pytest.mark.multiprocess
def test_two_workers_stop_at_the_same_batch(launch):
    from helpers import assert_workers_succeeded

    results = launch("early_stopping_multi_worker.py", num_workers=2, timeout=240)
    reports = assert_workers_succeeded(results)
    assert [r["num_workers"] for r in reports] == [2, 2]
    for r in reports:
        # Worker 1 spent its budget at its 18th batch (epoch 4, batch 1):
        # worker 0, whose clock shows 0.018 s, stops there too.
        assert (r["stop_reason"], r["stopped_epoch"], r["stopped_batch"], r["batches"]) == (
            "max_time", 4, 1, 18)
        assert r["finite"] and r["best_epoch"] == 3
    assert reports[0]["weights"] == reports[1]["weights"]

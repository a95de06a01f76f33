"""Drop-in parity with keras.callbacks.EarlyStopping and keras.callbacks.ModelCheckpoint.

Every test case of Keras 3.15.1's `keras/src/callbacks/early_stopping_test.py`
and `keras/src/callbacks/model_checkpoint_test.py`, run against
RobustEarlyStopping and ParallelModelCheckpoint (rewritten in this suite's
style, one behaviour per case; each cites the Keras test it comes from). The
deliberate differences (README, "Differences from Keras") are asserted as
differences at the end.
"""

import os
import re
import warnings

import keras
import numpy as np
import pytest

from keras_callbacks_plus import ParallelModelCheckpoint, RobustEarlyStopping

BACKEND = keras.backend.backend()


def _regression_data(seed=0):
    rng = np.random.default_rng(seed)
    return rng.random((10, 5)), rng.random((10, 1))


def _relu_regressor(metrics):
    """The two-layer Sequential of Keras's EarlyStopping tests (no Input: built by fit)."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.layers.Dense(1, activation="relu"),
                              keras.layers.Dense(1, activation="relu")])
    model.compile(loss="mae", optimizer="sgd", metrics=metrics)
    return model


# ---------------------------------------------------------- EarlyStopping
# keras/src/callbacks/early_stopping_test.py::test_early_stopping
MODE_CASES = [
    ("max", "val_mse", "max"),
    ("min", "val_loss", "min"),
    ("auto", "val_mse", "min"),
    ("auto", "loss", "min"),
    ("auto", "acc", "max"),
    ("auto", "val_accuracy", "max"),
    ("auto", "hinge", "min"),
    ("auto", "f1_score", "max"),
]


@pytest.fixture(scope="module")
def metrics_model():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.layers.Dense(1, activation="relu"),
                              keras.layers.Dense(1, activation="relu")])
    model.compile(loss="mae", optimizer="adam",
                  metrics=["mse", "acc", "accuracy", "hinge",
                           keras.metrics.F1Score(name="f1_score")])
    return model


@pytest.mark.parametrize("mode, monitor, expected", MODE_CASES,
                         ids=[f"{m}-{n}" for m, n, _ in MODE_CASES])
def test_early_stopping_monitor_op(metrics_model, mode, monitor, expected):
    x, y = _regression_data()
    stopper = RobustEarlyStopping(monitor, patience=0, mode=mode)
    metrics_model.fit(x, y, batch_size=5, validation_data=(x, y), callbacks=[stopper],
                      epochs=2, verbose=0)
    assert stopper.monitor_op is (keras.ops.greater if expected == "max" else keras.ops.less)


def test_early_stopping_unknown_monitor_raises(metrics_model):
    x, y = _regression_data()
    with pytest.raises(ValueError, match="maximized or minimized"):
        metrics_model.fit(x, y, batch_size=5, validation_data=(x, y), epochs=2, verbose=0,
                          callbacks=[RobustEarlyStopping("unknown", patience=0)])


@pytest.mark.parametrize("patience", [0, 1, 2, 3])
def test_early_stopping_patience(patience):
    """keras/src/callbacks/early_stopping_test.py::test_early_stopping_patience"""
    model = keras.Sequential()
    model.compile(loss="mse", optimizer="sgd")
    stopper = RobustEarlyStopping(monitor="loss", patience=patience)
    stopper.set_model(model)
    stopper.on_train_begin()
    for epoch, loss in enumerate([10.0, 9.0, 8.0, 9.0, 8.9, 8.8, 8.7, 8.6, 8.5]):
        stopper.on_epoch_end(epoch=epoch, logs={"loss": loss})
        if model.stop_training:
            break
    assert stopper.stopped_epoch == max(patience, 1) + 2


def test_early_stopping_reuse():
    """keras/src/callbacks/early_stopping_test.py::test_early_stopping_reuse

    monitor="mse" with mode="auto": on TensorFlow the compiled metrics do not
    exist at train begin, so the direction is decided at the first epoch end.
    """
    rng = np.random.default_rng(1)
    data = rng.random((100, 1))
    labels = np.where(data > 0.5, 1, 0)
    model = _relu_regressor(["mse"])
    stopper = RobustEarlyStopping(monitor="mse", patience=3)
    for _ in range(2):
        history = model.fit(data, labels, callbacks=[stopper], verbose=0, epochs=20)
        assert len(history.epoch) >= 3
    assert stopper.monitor_op is keras.ops.less


def test_state_reset_across_fit_calls():
    """keras/src/callbacks/early_stopping_test.py::test_state_reset_across_fit_calls"""
    stopper = RobustEarlyStopping(monitor="loss", patience=3)
    stopper.set_model(keras.Sequential())
    stopper.on_train_begin()
    stopper.best, stopper.wait, stopper.stopped_epoch, stopper.best_epoch = 0.1, 3, 5, 5
    stopper.best_weights = object()
    stopper.on_train_begin()
    assert (stopper.best, stopper.wait, stopper.stopped_epoch, stopper.best_epoch,
            stopper.best_weights) == (None, 0, 0, 0, None)


def test_early_stopping_with_baseline():
    """keras/src/callbacks/early_stopping_test.py::test_early_stopping_with_baseline"""
    x, y = _regression_data()
    model = _relu_regressor(["mse"])
    stopper = RobustEarlyStopping(monitor="mse", patience=3, baseline=0.6)
    history = model.fit(x, y, callbacks=[stopper], verbose=0, epochs=20)
    assert len(history.epoch) >= 3


def _mark(model, epoch):
    model.set_weights([np.full(w.shape, epoch, w.dtype) for w in model.get_weights()])


def _marker(model):
    return int(model.get_weights()[0].flat[0])


def _drive_marked(stopper, losses, stop_at=None):
    """Keras's DummyModel loop on a real model whose weights are set to the epoch number."""
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(loss="mse", optimizer="sgd")
    stopper.set_model(model)
    stopper.on_train_begin()
    trained = 0
    for epoch, loss in enumerate(losses):
        trained += 1
        _mark(model, epoch)
        stopper.on_epoch_end(epoch, logs={"val_loss": loss})
        if epoch == stop_at:
            model.stop_training = True
        if model.stop_training:
            break
    stopper.on_train_end()
    return trained, _marker(model)


@pytest.mark.parametrize(
    "kwargs, losses, stop_at, trained, restored",
    [
        # The best epoch is 2 (0.1); patience 2 stops at epoch 4.
        ({"patience": 2}, [0.2, 0.15, 0.1, 0.11, 0.12], None, 5, 2),
        # No epoch beats the baseline: 5 epochs, the best (epoch 2) restored.
        ({"patience": 5, "baseline": 0.5}, [0.9, 0.8, 0.7, 0.71, 0.72, 0.73], None, 5, 2),
        # Another callback stops training: the best epoch is restored anyway.
        ({"patience": 5, "baseline": 0.5}, [0.9, 0.8, 0.7, 0.71, 0.72, 0.73], 3, 4, 2),
    ],
    ids=["patience", "baseline_never_beaten", "stopped_by_another_callback"],
)
def test_early_stopping_final_weights_when_restoring_model_weights(
    kwargs, losses, stop_at, trained, restored
):
    """keras/src/callbacks/early_stopping_test.py::
    test_early_stopping_final_weights_when_restoring_model_weights"""
    stopper = RobustEarlyStopping(monitor="val_loss", restore_best_weights=True, **kwargs)
    assert _drive_marked(stopper, losses, stop_at) == (trained, restored)


@pytest.mark.parametrize("patience, start_from_epoch", [(3, 2), (0, 2)])
def test_early_stopping_with_start_from_epoch(patience, start_from_epoch):
    """keras/src/callbacks/early_stopping_test.py::test_early_stopping_with_start_from_epoch"""
    x, y = _regression_data()
    model = _relu_regressor(["mse"])
    stopper = RobustEarlyStopping(monitor="mse", patience=patience,
                                  start_from_epoch=start_from_epoch)
    history = model.fit(x, y, callbacks=[stopper], verbose=0, epochs=20)
    assert len(history.epoch) >= patience + start_from_epoch


# -------------------------------------------------------- ModelCheckpoint
TRAIN_SAMPLES = TEST_SAMPLES = 30
NUM_CLASSES, INPUT_DIM, NUM_HIDDEN, BATCH_SIZE = 3, 3, 5, 5


def _test_data():
    """What keras.src.testing.test_utils.get_test_data(random_seed=42, ...) makes:
    one-hot labels of Gaussian blobs around a center per class."""
    rng = np.random.default_rng(42)
    samples = TRAIN_SAMPLES + TEST_SAMPLES
    labels = rng.integers(0, NUM_CLASSES, samples)
    centers = rng.random((NUM_CLASSES, INPUT_DIM))
    x = (centers[labels] + rng.normal(0, 0.5, (samples, INPUT_DIM))).astype("float32")
    y = keras.utils.to_categorical(labels, NUM_CLASSES)
    return (x[:TRAIN_SAMPLES], y[:TRAIN_SAMPLES]), (x[TRAIN_SAMPLES:], y[TRAIN_SAMPLES:])


def _checkpoint_model(metrics=None):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.layers.Dense(NUM_HIDDEN, activation="relu"),
                              keras.layers.Dense(NUM_CLASSES, activation="softmax")])
    model.compile(loss="categorical_crossentropy", optimizer="sgd",
                  metrics=metrics or [keras.metrics.Accuracy("acc")])
    return model


@pytest.fixture(scope="module")
def checkpoint_model():
    return _checkpoint_model()


def _fit(model, callbacks, batch_size=BATCH_SIZE, epochs=1):
    (x, y), (xv, yv) = _test_data()
    model.fit(x, y, batch_size=batch_size, validation_data=(xv, yv), callbacks=callbacks,
              epochs=epochs, verbose=0)


# keras/src/callbacks/model_checkpoint_test.py::test_model_checkpoint_options, cases 1-4
@pytest.mark.parametrize(
    "monitor, mode, save_best_only",
    [("val_loss", "auto", False), ("val_loss", "min", False), ("val_acc", "max", False),
     ("val_acc", "max", True)],
    ids=["case1", "case2", "case3", "case4"],
)
def test_model_checkpoint_saves_into_a_new_subfolder(
    checkpoint_model, tmp_path, monitor, mode, save_best_only
):
    filepath = tmp_path / "subdir" / "checkpoint.keras"
    _fit(checkpoint_model, [ParallelModelCheckpoint(str(filepath), monitor=monitor, mode=mode,
                                                    save_best_only=save_best_only)])
    assert filepath.exists()


def test_model_checkpoint_unknown_monitor_warns_and_saves(checkpoint_model, tmp_path):
    """test_model_checkpoint_options, case 5: metric not available."""
    filepath = tmp_path / "checkpoint.keras"
    checkpoint = ParallelModelCheckpoint(str(filepath), monitor="unknown", save_best_only=True,
                                         mode="min")
    with pytest.warns(UserWarning, match="'unknown', which is not in the logs. Available keys: "
                                         "acc, loss, val_acc, val_loss. Saving anyway"):
        _fit(checkpoint_model, [checkpoint])
    assert filepath.exists()


@pytest.mark.parametrize("weights_only", [False, True], ids=["case8a", "case8b"])
def test_model_checkpoint_int_save_freq_counts_batches_across_epochs(tmp_path, weights_only):
    """test_model_checkpoint_options, cases 8a and 8b: 5 batches per epoch, a save every 15."""
    suffix = ".weights.h5" if weights_only else ".keras"
    filepath = str(tmp_path / ("checkpoint.epoch{epoch:02d}" + suffix))
    checkpoint = ParallelModelCheckpoint(filepath, monitor="val_acc", save_freq=15,
                                         save_weights_only=weights_only)
    _fit(_checkpoint_model(), [checkpoint], batch_size=6, epochs=10)
    saved = [epoch for epoch in range(1, 11) if os.path.exists(filepath.format(epoch=epoch))]
    assert saved == [3, 6, 9]


def test_model_checkpoint_valid_save_freq():
    """test_model_checkpoint_options, case 9 (valid values; invalid: see the differences)."""
    for save_freq in ("epoch", 3):
        checkpoint = ParallelModelCheckpoint("checkpoint.weights.h5", save_weights_only=True,
                                             save_freq=save_freq)
        assert checkpoint.save_freq == save_freq


@pytest.mark.parametrize("weights_only", [False, True], ids=["case10a", "case10b"])
def test_model_checkpoint_batch_in_filename(tmp_path, weights_only):
    """test_model_checkpoint_options, cases 10a and 10b: 2 batches per epoch, a save each."""
    suffix = ".weights.h5" if weights_only else ".keras"
    filepath = str(tmp_path / ("checkpoint.epoch{epoch:02d}batch{batch:02d}" + suffix))
    checkpoint = ParallelModelCheckpoint(filepath, monitor="val_acc", save_freq=1,
                                         save_weights_only=weights_only)
    _fit(_checkpoint_model(), [checkpoint], batch_size=15, epochs=5)
    for epoch in range(1, 6):
        for batch in (1, 2):
            assert os.path.exists(filepath.format(epoch=epoch, batch=batch)), (epoch, batch)


@pytest.mark.parametrize(
    "monitor, mode, threshold, saved",
    [("val_acc", "max", -0.01, True), ("val_loss", "auto", None, True),
     ("val_loss", "min", 0, False), ("val_loss", "auto", 0, False)],
    ids=["case11", "case12", "case13", "case14"],
)
def test_model_checkpoint_initial_value_threshold(
    checkpoint_model, tmp_path, monitor, mode, threshold, saved
):
    """test_model_checkpoint_options, cases 11-14."""
    filepath = tmp_path / "checkpoint.keras"
    _fit(checkpoint_model, [ParallelModelCheckpoint(
        str(filepath), monitor=monitor, mode=mode, save_best_only=True,
        initial_value_threshold=threshold)])
    assert filepath.exists() is saved


def test_model_checkpoint_auc_threshold_in_auto_mode(tmp_path):
    """test_model_checkpoint_options, case 15: AUC is maximized; nothing beats 1."""
    filepath = tmp_path / "checkpoint.keras"
    model = _checkpoint_model(metrics=[keras.metrics.AUC()])
    _fit(model, [ParallelModelCheckpoint(str(filepath), monitor="val_auc", save_best_only=True,
                                         initial_value_threshold=1)])
    assert not filepath.exists()


def _functional_checkpoint_model():
    keras.utils.set_random_seed(0)
    inputs = keras.Input(shape=(INPUT_DIM,), batch_size=5)
    x = keras.layers.Dense(NUM_HIDDEN, activation="relu")(inputs)
    outputs = keras.layers.Dense(NUM_CLASSES, activation="softmax")(x)
    model = keras.Model(inputs, outputs)
    model.compile(loss="categorical_crossentropy", optimizer="sgd",
                  metrics=[keras.metrics.Accuracy("acc")])
    return model


@pytest.mark.parametrize("weights_only", [False, True], ids=["model", "weights"])
def test_model_checkpoint_loading(tmp_path, weights_only):
    """keras/src/callbacks/model_checkpoint_test.py::test_model_checkpoint_loading"""
    filepath = tmp_path / ("checkpoint.weights.h5" if weights_only else "checkpoint.model.keras")
    model = _functional_checkpoint_model()
    _fit(model, [ParallelModelCheckpoint(str(filepath), monitor="val_loss", save_best_only=True,
                                         save_weights_only=weights_only)])
    if weights_only:
        restored = _functional_checkpoint_model()
        restored.load_weights(filepath)
    else:
        restored = keras.saving.load_model(filepath)
    expected = model.get_weights()
    assert len(restored.get_weights()) == len(expected)
    for actual, wanted in zip(restored.get_weights(), expected):
        np.testing.assert_allclose(actual, wanted)


# ---------------------------------------------- the monitor="mse" case, real fits
def test_auto_mode_on_a_compiled_metric_is_decided_at_the_first_epoch_end(tmp_path):
    """TensorFlow builds compiled metrics at the first step: mode="auto" must wait for them."""
    (x, y), (xv, yv) = _test_data()
    model = _checkpoint_model(metrics=["mse"])
    stopper = RobustEarlyStopping(monitor="val_mse", patience=100)
    checkpoint = ParallelModelCheckpoint(str(tmp_path / "best.keras"), monitor="val_mse",
                                         save_best_only=True)
    assert stopper.monitor_op is None and checkpoint.monitor_op is None
    model.fit(x, y, validation_data=(xv, yv), epochs=2, verbose=0,
              callbacks=[stopper, checkpoint])
    assert stopper.monitor_op is checkpoint.monitor_op is keras.ops.less
    assert (tmp_path / "best.keras").exists()


def test_unresolvable_monitor_fails_before_the_checkpoint_writes(tmp_path):
    (x, y), (xv, yv) = _test_data()
    checkpoint = ParallelModelCheckpoint(str(tmp_path / "best.keras"), monitor="val_unknown",
                                         save_best_only=True)
    with pytest.raises(ValueError, match="monitor='val_unknown'.*maximized or minimized"):
        _checkpoint_model().fit(x, y, validation_data=(xv, yv), epochs=2, verbose=0,
                                callbacks=[checkpoint])
    assert os.listdir(tmp_path) == []


# ------------------------------------------------- deliberate differences
def test_difference_unknown_mode_is_an_error():
    """Keras warns "ModelCheckpoint mode 'unknown' is unknown" and falls back to "auto" (case 6)."""
    for make in (lambda: ParallelModelCheckpoint("checkpoint.keras", mode="unknown"),
                 lambda: RobustEarlyStopping(mode="unknown")):
        with pytest.raises(ValueError, match=re.escape(
                "Invalid value for argument mode. Expected one of 'auto', 'min', 'max'. "
                "Received: mode='unknown'")):
            make()


def test_difference_invalid_save_freq_wording():
    """Keras raises "Unrecognized save_freq: ..." (case 9); the error type is the same."""
    with pytest.raises(ValueError, match=re.escape(
            "Invalid value for argument save_freq. Expected 'epoch', a positive int (a number "
            "of batches), a positive duration such as '30min', '1h', '90s' or '1h30min', or a "
            "datetime.timedelta. Received: save_freq='invalid_save_freq'")):
        ParallelModelCheckpoint("checkpoint.weights.h5", save_weights_only=True,
                                save_freq="invalid_save_freq")


def test_difference_legacy_h5_model_files_are_refused():
    """Keras still writes a whole model to a legacy `.h5` file; here only `.keras` loads anywhere."""
    keras.callbacks.ModelCheckpoint("checkpoint.h5")
    with pytest.raises(ValueError, match=r"must end in `\.keras`"):
        ParallelModelCheckpoint("checkpoint.h5")


def test_difference_restore_best_weights_is_on_by_default():
    assert keras.callbacks.EarlyStopping().restore_best_weights is False
    assert RobustEarlyStopping().restore_best_weights is True


def test_difference_non_scalar_monitor_is_an_error(tmp_path):
    """Keras warns and saves every time when the monitored value is an array."""
    model = _functional_checkpoint_model()
    checkpoint = ParallelModelCheckpoint(str(tmp_path / "m.keras"), monitor="f1", mode="max",
                                         save_best_only=True)
    checkpoint.set_model(model)
    checkpoint.on_train_begin()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="not a single number"):
            checkpoint.on_epoch_end(0, {"f1": np.array([0.5, 0.7])})

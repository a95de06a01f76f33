"""Tests of ParallelModelCheckpoint and resume(), on both backends."""

import json
import signal
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from helpers import (
    WORKERS_DIR,
    assert_workers_succeeded,
    build_tiny_model,
    make_tiny_data,
    subprocess_env,
)

from keras_callbacks_plus import (
    ParallelModelCheckpoint,
    _commit,
    _storage,
    data_parallel,
    distribute,
    resume,
)
from keras_callbacks_plus._base import PlusCallback

BACKEND = keras.backend.backend()
_LOCAL = _storage.LocalStorage()


def _compiled(model=None, **kwargs):
    model = model or build_tiny_model(**kwargs)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def _drive(checkpoint, model, values, monitor="val_loss"):
    """Runs the callback's epoch hooks with scripted logs, as fit would."""
    checkpoint.set_model(model)
    checkpoint.on_train_begin()
    for epoch, value in enumerate(values):
        checkpoint.on_epoch_begin(epoch)
        checkpoint.on_epoch_end(epoch, {monitor: value, "loss": 1.0})
    checkpoint.on_train_end()


def _files_in(directory):
    return sorted(p.name for p in Path(directory).iterdir())


# -- arguments -------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"filepath": "m.h5"}, r"must end in `\.keras`.*Received: filepath=m\.h5"),
        ({"filepath": "m.keras", "save_weights_only": True}, r"must end in `\.weights\.h5`"),
        ({"filepath": "m.keras", "mode": "up"}, r"argument mode.*Received: mode='up'"),
        ({"filepath": "m.keras", "save_freq": -3}, r"argument save_freq.*Received: save_freq=-3"),
        ({"filepath": "m.keras", "save_freq": "batch"}, r"argument save_freq"),
        ({"filepath": "m.keras", "max_to_keep": 0}, r"argument max_to_keep.*Received: max_to_keep=0"),
        ({"filepath": "m.keras", "template_model": "model"}, r"argument template_model"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ParallelModelCheckpoint(**kwargs)


def test_seed_call_form_takes_the_template_first(tmp_path):
    template = build_tiny_model()
    checkpoint = ParallelModelCheckpoint(template, str(tmp_path / "m.keras"))
    assert checkpoint.template_model is template
    assert checkpoint.filepath == str(tmp_path / "m.keras")
    with pytest.raises(TypeError, match="positional"):
        ParallelModelCheckpoint(str(tmp_path / "m.keras"), "val_loss")


def test_epoch_saves_keep_keras_async_batch_dispatch(tmp_path):
    model = _compiled()
    by_epoch = ParallelModelCheckpoint(str(tmp_path / "m.keras"))
    by_batch = ParallelModelCheckpoint(str(tmp_path / "m.keras"), save_freq=3)
    no_signals = ParallelModelCheckpoint(str(tmp_path / "m.keras"), save_on_preemption=False)
    # Without batch saves nor a preemption watch, no batch hook at all.
    assert getattr(no_signals.on_train_batch_end, "_is_default", False)
    # Watching for a signal is async-safe; saving at a batch is not. (Keras
    # dispatches batch ends asynchronously on JAX only; TensorFlow never does.)
    assert by_epoch.async_safe and not by_batch.async_safe
    assert keras.callbacks.CallbackList([by_epoch], model=model)._async_train is (BACKEND == "jax")
    assert keras.callbacks.CallbackList([by_batch], model=model)._async_train is False


# -- what is saved -----------------------------------------------------------------


@pytest.mark.slow  # a fresh process that starts a backend to load the file
def test_twin_saves_its_template_which_loads_on_one_device(tmp_path, two_devices, tiny_data, launch):
    x, y = tiny_data
    template = build_tiny_model(batch_norm=True)
    twin = _compiled(data_parallel(template, devices=two_devices))
    checkpoint = ParallelModelCheckpoint(template, str(tmp_path / "model.keras"))
    twin.fit(x, y, batch_size=32, epochs=2, verbose=0, callbacks=[checkpoint])
    expected = twin.predict(x[:64], verbose=0)

    # The template received the trained weights; the file is a template, not a twin.
    np.testing.assert_allclose(template.predict(x[:64], verbose=0), expected, atol=1e-6)
    loaded = keras.saving.load_model(tmp_path / "model.keras")
    assert distribute.num_replicas(loaded) == 1
    assert int(keras.ops.convert_to_numpy(loaded.optimizer.iterations)) == 8  # 2 epochs x 4 steps
    np.testing.assert_allclose(loaded.predict(x[:64], verbose=0), expected, atol=1e-6)

    # A fresh process with one CPU device and no strategy loads it (safe mode).
    [report] = assert_workers_succeeded(
        launch("checkpoint_train.py", num_workers=1, args=["load", str(tmp_path / "model.keras")]))
    np.testing.assert_allclose(report["predictions"], expected, atol=1e-6)


def test_weights_only_and_format_keys(tmp_path, tiny_data):
    x, y = tiny_data
    model = _compiled()
    path = tmp_path / "w_{epoch:02d}_{val_loss:.3f}.weights.h5"
    history = model.fit(
        x, y, validation_split=0.25, epochs=2, verbose=0,
        callbacks=[ParallelModelCheckpoint(str(path), save_weights_only=True)],
    )
    names = [f"w_{e + 1:02d}_{v:.3f}.weights.h5" for e, v in enumerate(history.history["val_loss"])]
    assert set(names) <= set(_files_in(tmp_path))
    restored = build_tiny_model(seed=7)
    restored.load_weights(tmp_path / names[-1])
    np.testing.assert_array_equal(restored.get_weights()[0], model.get_weights()[0])


def test_unknown_format_key_fails_before_writing(tmp_path, tiny_data):
    model = _compiled()
    checkpoint = ParallelModelCheckpoint(str(tmp_path / "m_{val_acc:.2f}.keras"))
    with pytest.raises(ValueError, match=r"key 'val_acc'.*Available keys: .*accuracy.*val_loss"):
        model.fit(*tiny_data, validation_split=0.25, epochs=1, verbose=0, callbacks=[checkpoint])
    assert _files_in(tmp_path) == []


def test_unwritable_folder_fails_before_the_first_step(tmp_path, tiny_data):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("")
    model = _compiled()
    before = model.get_weights()
    with pytest.raises(PermissionError, match="cannot write"):
        model.fit(*tiny_data, epochs=1, verbose=0,
                  callbacks=[ParallelModelCheckpoint(str(blocker / "m.keras"))])
    np.testing.assert_array_equal(before[0], model.get_weights()[0])


def test_template_that_does_not_match_is_refused(tmp_path, tiny_data):
    model = _compiled()
    checkpoint = ParallelModelCheckpoint(str(tmp_path / "m.keras"), template_model=build_tiny_model(input_dim=5))
    with pytest.raises(ValueError, match="argument template_model.*shape"):
        model.fit(*tiny_data, epochs=1, verbose=0, callbacks=[checkpoint])


# -- which files stay --------------------------------------------------------------


def test_save_best_only_with_threshold_and_max_to_keep(tmp_path):
    model = _compiled()
    checkpoint = ParallelModelCheckpoint(
        str(tmp_path / "m_{epoch}.keras"), save_best_only=True, initial_value_threshold=0.9,
        max_to_keep=2, async_save=False,
    )
    _drive(checkpoint, model, [1.0, 0.8, 0.85, 0.5, 0.6, 0.4])
    # 1.0 does not beat the threshold; improvements at epochs 2, 4, 6; the 2 best stay.
    assert _files_in(tmp_path) == ["m_4.keras", "m_4.keras.json", "m_6.keras", "m_6.keras.json"]
    assert checkpoint.best == 0.4
    record = json.loads((tmp_path / "m_6.keras.json").read_text())
    assert (record["epoch"], record["value"], record["best"]) == (6, 0.4, 0.4)


def test_mode_max_and_save_last(tmp_path):
    model = _compiled()
    checkpoint = ParallelModelCheckpoint(
        str(tmp_path / "best.keras"), monitor="val_accuracy", save_best_only=True, save_last=True,
        async_save=False,
    )
    _drive(checkpoint, model, [0.5, 0.7, 0.6], monitor="val_accuracy")
    assert json.loads((tmp_path / "best.keras.json").read_text())["value"] == 0.7
    assert json.loads((tmp_path / "last.keras.json").read_text())["epoch"] == 3  # always the newest


def test_max_to_keep_keeps_the_newest_and_a_second_fit_starts_clean(tmp_path, tiny_data):
    model = _compiled()
    checkpoint = ParallelModelCheckpoint(str(tmp_path / "m_{epoch}.keras"), max_to_keep=2)
    model.fit(*tiny_data, epochs=4, verbose=0, callbacks=[checkpoint])
    assert _files_in(tmp_path) == ["m_3.keras", "m_3.keras.json", "m_4.keras", "m_4.keras.json"]
    model.fit(*tiny_data, epochs=1, verbose=0, callbacks=[checkpoint])
    assert checkpoint.get_state()["save_index"] == 1  # counting restarted
    assert "m_1.keras" in _files_in(tmp_path)


def test_leftover_temporary_files_are_removed_at_start(tmp_path, tiny_data):
    leftover = tmp_path / _storage.temporary_name("m.keras")
    leftover.write_bytes(b"torn")
    model = _compiled()
    model.fit(*tiny_data, epochs=1, verbose=0,
              callbacks=[ParallelModelCheckpoint(str(tmp_path / "m.keras"))])
    assert _files_in(tmp_path) == ["m.keras", "m.keras.json"]


def test_writer_failure_surfaces_on_the_training_thread(tmp_path, tiny_data, monkeypatch):
    def disk_full(self, target, write):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(_storage.LocalStorage, "write_with", disk_full)
    model = _compiled()
    checkpoint = ParallelModelCheckpoint(str(tmp_path / "m_{epoch}.keras"))
    with pytest.raises(OSError, match="No space left"):
        model.fit(*tiny_data, epochs=3, verbose=0, callbacks=[checkpoint])
    checkpoint._writer.check()  # raised exactly once: nothing left to raise
    assert _files_in(tmp_path) == []


# -- resume ------------------------------------------------------------------------


def _resumable(seed=0):
    model = build_tiny_model(batch_norm=True, seed=seed)
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="sparse_categorical_crossentropy")
    return model


def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path, tiny_data):
    x, y = tiny_data
    fit = dict(batch_size=32, shuffle=False, verbose=0)
    keras.utils.set_random_seed(1)
    straight = _resumable()
    straight.fit(x, y, epochs=4, **fit)

    keras.utils.set_random_seed(1)
    first = _resumable()
    first.fit(x, y, epochs=2, callbacks=[ParallelModelCheckpoint(str(tmp_path / "m_{epoch}.keras"))], **fit)
    del first  # "interrupted"

    second = _resumable(seed=99)  # different initial weights, overwritten by resume
    checkpoint = ParallelModelCheckpoint(str(tmp_path / "m_{epoch}.keras"))
    initial_epoch = resume(second, tmp_path, callbacks=[checkpoint])
    assert initial_epoch == 2
    second.fit(x, y, epochs=4, initial_epoch=initial_epoch, callbacks=[checkpoint], **fit)
    for a, b in zip(straight.get_weights(), second.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert _files_in(tmp_path)[-2:] == ["m_4.keras", "m_4.keras.json"]


def test_resume_keeps_best_so_a_restart_cannot_overwrite_a_better_file(tmp_path):
    """keras-team/keras#17012: after a restart, save_best_only forgot its best."""
    path = str(tmp_path / "best.keras")
    model = _compiled()
    _drive(ParallelModelCheckpoint(path, save_best_only=True, async_save=False), model, [0.5, 0.3])
    saved = (tmp_path / "best.keras").read_bytes()

    checkpoint = ParallelModelCheckpoint(path, save_best_only=True, async_save=False)
    assert resume(_compiled(), tmp_path, callbacks=[checkpoint]) == 2
    checkpoint.set_model(model)
    checkpoint.on_train_begin()
    checkpoint.on_epoch_end(2, {"val_loss": 0.4})  # worse than 0.3: no save
    checkpoint.on_train_end()
    assert (tmp_path / "best.keras").read_bytes() == saved
    assert checkpoint.best == 0.3


def test_resume_needs_a_complete_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="No complete checkpoint"):
        resume(_compiled(), tmp_path)
    (tmp_path / "m.keras").write_bytes(b"no sidecar")
    with pytest.raises(FileNotFoundError, match="missing or mismatching sidecar"):
        resume(_compiled(), tmp_path / "m.keras")


def test_resume_missing_ok_is_a_fresh_start(tmp_path):
    model = _compiled()
    before = [w.copy() for w in model.get_weights()]
    assert resume(model, tmp_path / "none", missing_ok=True) == 0
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))
    with pytest.raises(ValueError, match="missing_ok"):
        resume(model, tmp_path, missing_ok="yes")


def test_resume_into_a_twin(tmp_path, two_devices, tiny_data):
    x, y = tiny_data
    model = _resumable()
    model.fit(x, y, epochs=1, verbose=0, callbacks=[ParallelModelCheckpoint(str(tmp_path / "m.keras"))])
    twin = data_parallel(_resumable(seed=5), devices=two_devices)
    twin.compile(optimizer=keras.optimizers.Adam(0.01), loss="sparse_categorical_crossentropy")
    assert resume(twin, tmp_path / "m.keras") == 1
    np.testing.assert_allclose(twin.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6)
    assert int(keras.ops.convert_to_numpy(twin.optimizer.iterations)) == 4
    twin.fit(x, y, epochs=2, initial_epoch=1, verbose=0)
    assert distribute.replica_divergence(twin) == 0.0


# -- processes ---------------------------------------------------------------------


# Where a write is stopped (KCP_TEST_CRASH_AT), and whether a temporary file stays behind.
CRASH_POINTS = [
    ("half_written:3", True),    # the model file half written under its temporary name
    ("fsynced:4", True),         # written and fsynced, not renamed yet
    ("renamed:4", False),        # renamed into place, its sidecar not written yet
    ("committed:3", False),      # before a sidecar write
    ("sidecar_written:2", False),  # committed; the deletions of older files not done yet
]


@pytest.mark.slow
def test_sigkill_inside_a_write_always_leaves_a_loadable_checkpoint(tmp_path):
    """Each run of the worker is killed at a chosen point of a save, in the same folder."""
    for point, torn in CRASH_POINTS:
        result = subprocess.run(
            [sys.executable, str(WORKERS_DIR / "checkpoint_train.py"), "crash", str(tmp_path)],
            env=subprocess_env(KCP_TEST_CRASH_AT=point), capture_output=True, text=True,
            timeout=180,
        )
        assert result.returncode == -signal.SIGKILL, (point, result.stderr[-3000:])
        leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(_storage.TMP_PREFIX)]
        # The run's own temporary file, if any; the previous run's were removed at its start.
        assert len(leftovers) == int(torn), (point, leftovers)
        newest, record = _commit.complete_checkpoints(_LOCAL, str(tmp_path))[-1]
        model = keras.saving.load_model(newest)  # complete, so it loads
        assert len(model.get_weights()) == 4 and record["save_index"] >= 1, point
        resumed = _compiled()
        assert resume(resumed, tmp_path) == record["epoch"], point


@pytest.mark.multiprocess
def test_two_workers_one_writer_identical_results(tmp_path, launch):
    results = launch("checkpoint_train.py",
                     num_workers=2, args=["multi", str(tmp_path)], timeout=240)
    reports = assert_workers_succeeded(results)
    assert [r["is_chief"] for r in reports] == [True, False]
    assert reports[0]["writes"] > 0 and reports[1]["writes"] == 0
    assert _files_in(tmp_path) == [
        "last.keras", "last.keras.json", "model_02.keras", "model_02.keras.json",
        "model_03.keras", "model_03.keras.json",
    ]
    np.testing.assert_array_equal(reports[0]["predictions"], reports[1]["predictions"])
    loaded = keras.saving.load_model(tmp_path / "last.keras")
    x, _ = make_tiny_data(64)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), reports[0]["predictions"], atol=1e-6)


class _UnfreezeHiddenAt(keras.callbacks.Callback):
    """A minimal stage change: `hidden` becomes trainable at `epoch` (optimizer rebuilt)."""

    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_train_begin(self, logs=None):
        from keras_callbacks_plus import _optimizers

        # Whatever resume() restored, the stage follows the epoch (as ProgressiveUnfreezing does).
        self.model.get_layer("hidden").trainable = self.model._initial_epoch_seen >= self.epoch
        if getattr(self.model.optimizer, "built", False):
            _optimizers.rebuild_optimizer(self.model)

    def on_epoch_begin(self, epoch, logs=None):
        from keras_callbacks_plus import _optimizers

        if epoch == self.epoch:
            self.model.get_layer("hidden").trainable = True
            _optimizers.rebuild_optimizer(self.model)


def test_resume_across_a_change_of_the_trainable_set(tmp_path, tiny_data):
    """Frozen `hidden` for 2 epochs, then trainable: a resume at epoch 1 ends bit-identical."""
    x, y = tiny_data
    fit = dict(batch_size=32, shuffle=False, verbose=0)

    def run(epochs, initial_epoch=0, checkpoint=None, model=None):
        model = model or _resumable()
        model._initial_epoch_seen = initial_epoch
        if initial_epoch == 0:
            model.get_layer("hidden").trainable = False
        callbacks = [_UnfreezeHiddenAt(2)] + ([checkpoint] if checkpoint else [])
        model.fit(x, y, epochs=epochs, initial_epoch=initial_epoch, callbacks=callbacks, **fit)
        return model

    keras.utils.set_random_seed(3)
    straight = run(4)
    keras.utils.set_random_seed(3)
    run(3, checkpoint=ParallelModelCheckpoint(str(tmp_path / "m_{epoch}.keras")))
    record = json.loads((tmp_path / "m_1.keras.json").read_text())
    expected = _resumable()
    expected.get_layer("hidden").trainable = False
    assert record["trainable"] == [
        any(v is w for w in expected.trainable_variables) for v in expected.weights
    ]

    resumed = _resumable(seed=42)
    assert resume(resumed, tmp_path / "m_1.keras") == 1
    assert not resumed.get_layer("hidden").trainable_weights  # frozen again, as saved
    run(4, initial_epoch=1, model=resumed)
    for a, b in zip(straight.get_weights(), resumed.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_file_saved_with_frozen_layers_loads_with_its_optimizer_state(
    tmp_path, two_devices, tiny_data
):
    """load_model restores the optimizer only if the file holds exactly the trainable set's slots.

    The template is all trainable, the twin trains with `hidden` frozen (as
    under ProgressiveUnfreezing): the file must follow the twin.
    """
    import warnings

    x, y = tiny_data
    template = build_tiny_model()
    model = data_parallel(template, devices=two_devices)
    model.get_layer("hidden").trainable = False
    _compiled(model)
    checkpoint = ParallelModelCheckpoint(template, str(tmp_path / "m.keras"))
    model.fit(x, y, batch_size=32, epochs=2, verbose=0, callbacks=[checkpoint])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert not [w for w in caught if "Skipping variable loading" in str(w.message)]
    assert not loaded.get_layer("hidden").trainable
    trained = [keras.ops.convert_to_numpy(v) for v in model.optimizer.variables]
    restored = [keras.ops.convert_to_numpy(v) for v in loaded.optimizer.variables]
    assert len(restored) == len(trained) == 2 + 2 * 2  # iterations, lr, m and v of head's 2
    for a, b in zip(trained, restored):
        np.testing.assert_array_equal(a, b)


def test_sequential_model_saves_and_resumes_its_optimizer_state(tmp_path, tiny_data):
    """A Sequential built at construction has variable paths under its name; its copies do not.

    The checkpoint's single-device copy and the model `load_model` returns are
    rebuilt from the config, so optimizer slots are matched by the model
    variable they belong to, not by path.
    """
    x, y = tiny_data

    def sequential():
        keras.utils.set_random_seed(5)
        return _compiled(keras.Sequential([
            keras.Input(x.shape[1:]), keras.layers.Dense(8, activation="relu"),
            keras.layers.Dense(int(y.max()) + 1),
        ]))

    model = sequential()
    assert model.weights[0].path.startswith(model.name + "/")
    model.fit(x, y, batch_size=32, epochs=2, verbose=0,
              callbacks=[ParallelModelCheckpoint(str(tmp_path / "m.keras"))])
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert not loaded.weights[0].path.startswith(model.name + "/")
    trained = [keras.ops.convert_to_numpy(v) for v in model.optimizer.variables]
    restored = [keras.ops.convert_to_numpy(v) for v in loaded.optimizer.variables]
    assert len(restored) == len(trained) == 2 + 2 * 4
    for a, b in zip(trained, restored):
        np.testing.assert_array_equal(a, b)

    resumed = sequential()
    assert resume(resumed, tmp_path / "m.keras") == 2
    for a, b in zip(trained, resumed.optimizer.variables):
        np.testing.assert_array_equal(a, keras.ops.convert_to_numpy(b))


class _Counter(PlusCallback):
    """A sibling whose state changes in on_epoch_end."""

    def __init__(self):
        super().__init__()
        self.epochs = 0

    def on_epoch_end(self, epoch, logs=None):
        self.epochs += 1

    def get_state(self, directory=None):
        return {"epochs": self.epochs}


@pytest.mark.parametrize("checkpoint_first", [True, False])
def test_sidecar_has_every_sibling_state_whatever_the_order(tmp_path, tiny_data, checkpoint_first):
    checkpoint = ParallelModelCheckpoint(str(tmp_path / "m_{epoch}.keras"))
    counter = _Counter()
    callbacks = [checkpoint, counter] if checkpoint_first else [counter, checkpoint]
    _compiled().fit(*tiny_data, epochs=3, verbose=0, callbacks=callbacks)
    for epoch in (1, 2, 3):
        record = json.loads((tmp_path / f"m_{epoch}.keras.json").read_text())
        assert record["callbacks"]["_Counter"] == {"epochs": epoch}
        assert _commit.read_sidecar(_LOCAL, str(tmp_path / f"m_{epoch}.keras")) is not None

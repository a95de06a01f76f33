"""Preemption, time-based saves, retention policies and mid-epoch resume of ParallelModelCheckpoint.

In-process tests send SIGTERM to this process from a callback at a chosen
batch; the handler only sets a flag, so they are deterministic. The resumes
bit-identical to uninterrupted runs, in new processes and on several workers,
are in tests/test_resume_exact.py.
"""

import datetime
import json
import os
import re
import signal
import threading
import warnings

import keras
import numpy as np
import pytest
from helpers import build_tiny_model, make_tiny_data

from keras_callbacks_plus import (
    PREEMPTED_EXIT_CODE,
    Keep,
    ParallelModelCheckpoint,
    RobustEarlyStopping,
    _commit,
    _storage,
    checkpoint as checkpoint_module,
    resume,
)
from keras_callbacks_plus._preemption import SignalFlag
from keras_callbacks_plus._retention import SaveFreq

BACKEND = keras.backend.backend()
_LOCAL = _storage.LocalStorage()


def _compiled(seed=0):
    model = build_tiny_model(seed=seed)
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    return model


class SignalAt(keras.callbacks.Callback):
    """Sends `signum` to this process at the end of global batch `at` (counted from 1)."""

    def __init__(self, at, signum=signal.SIGTERM):
        super().__init__()
        self.at, self.signum, self.batches = at, signum, 0

    def on_train_batch_end(self, batch, logs=None):
        self.batches += 1
        if self.batches == self.at:
            os.kill(os.getpid(), self.signum)


def _names(directory):
    return sorted(p for p in os.listdir(directory) if not p.startswith("kcp_state."))


# -- arguments ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, seconds",
    [("30min", 1800.0), ("1h", 3600.0), ("90s", 90.0), ("1h30min", 5400.0),
     ("2.5 hours", 9000.0), (datetime.timedelta(minutes=5), 300.0)],
)
def test_save_freq_accepts_durations(value, seconds):
    parsed = SaveFreq.parse(value)
    assert (parsed.kind, parsed.every) == ("seconds", seconds)
    assert ParallelModelCheckpoint("m.keras", save_freq=value).save_freq == value


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"save_freq": "10 parsecs"}, "argument save_freq. Expected 'epoch', a positive int"),
        ({"save_freq": "0s"}, "Received: save_freq='0s'"),
        ({"save_freq": "-5min"}, "Received: save_freq='-5min'"),
        ({"save_freq": datetime.timedelta(0)}, "Received: save_freq=datetime.timedelta(0)"),
        ({"save_freq": 2.5}, "Received: save_freq=2.5"),
        ({"keep": "3"}, "argument keep. Expected a Keep. Received: keep='3'"),
        ({"keep": Keep(latest=2), "max_to_keep": 2}, "keep and max_to_keep cannot be used together"),
        ({"keep": Keep(best=2), "monitor": None}, "argument keep. Keep(best=2) ranks checkpoints "
                                                  "by `monitor`"),
        ({"preemption_signals": (signal.SIGKILL,)}, "SIGKILL cannot be caught"),
        ({"preemption_signals": ("SIGTERM",)}, "argument preemption_signals. Expected signals"),
    ],
)
def test_bad_arguments_fail_in_the_constructor(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        ParallelModelCheckpoint("m.keras", **kwargs)


@pytest.mark.parametrize("kwargs", [{"latest": -1}, {"best": 0}, {"every_n_epochs": 1.5}])
def test_keep_checks_its_counts(kwargs):
    (name, value), = kwargs.items()
    with pytest.raises(ValueError, match=re.escape(
            f"Invalid value for argument {name} of Keep. Expected None or an int >= 1. "
            f"Received: {name}={value!r}")):
        Keep(**kwargs)


def test_preempted_exit_code_is_the_sigterm_status():
    assert PREEMPTED_EXIT_CODE == 128 + signal.SIGTERM == 143


# -- retention ------------------------------------------------------------------------------


def test_keep_rules_are_a_union():
    saved = [{"epoch": e, "batch": None, "value": v}
             for e, v in enumerate([0.9, 0.5, 0.7, 0.4, 0.8, 0.6, 0.95, 0.85], start=1)]
    kept = Keep(latest=2, best=2, every_n_epochs=3).select(saved, "min")
    # newest: 7, 8; best: 4 (0.4), 2 (0.5); every 3rd epoch: 3, 6.
    assert [entry["epoch"] for entry in kept] == [2, 3, 4, 6, 7, 8]
    assert Keep().select(saved, "min") == saved
    assert [e["epoch"] for e in Keep(best=1).select(saved, "max")] == [7]


def test_keep_policy_over_a_fit_and_after_resume(tmp_path):
    x, y = make_tiny_data()
    keep = Keep(latest=1, best=1, every_n_epochs=3)
    checkpoint = ParallelModelCheckpoint(str(tmp_path / "m_{epoch}.keras"), monitor="loss",
                                         keep=keep, async_save=False)
    model = _compiled()
    model.fit(x, y, batch_size=32, epochs=4, verbose=0, shuffle=False, callbacks=[checkpoint])
    # Loss falls every epoch here: the best is the newest (4); every 3rd epoch: 3.
    assert _names(tmp_path) == ["m_3.keras", "m_3.keras.json", "m_4.keras", "m_4.keras.json"]
    resumed = ParallelModelCheckpoint(str(tmp_path / "m_{epoch}.keras"), monitor="loss",
                                      keep=keep, async_save=False)
    model = _compiled(seed=5)
    initial_epoch = resume(model, tmp_path, callbacks=[resumed])
    model.fit(x, y, batch_size=32, epochs=7, initial_epoch=initial_epoch, verbose=0,
              shuffle=False, callbacks=[resumed])
    # The resumed run continues the policy with the files the first one kept.
    assert _names(tmp_path) == ["m_3.keras", "m_3.keras.json", "m_6.keras", "m_6.keras.json",
                                "m_7.keras", "m_7.keras.json"]


# -- time-based saves -----------------------------------------------------------------------


class FakeClock(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.now = 0.0

    def on_train_batch_end(self, batch, logs=None):
        self.now += 25.0  # seconds per batch


def test_time_based_saves_at_the_first_batch_end_after_the_interval(tmp_path, monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(checkpoint_module, "_clock", lambda: clock.now)
    checkpoint = ParallelModelCheckpoint(str(tmp_path / "m_{epoch}_{batch}.keras"),
                                         save_freq="1min", async_save=False)
    x, y = make_tiny_data()  # 4 batches of 32 per epoch
    _compiled().fit(x, y, batch_size=32, epochs=2, verbose=0, callbacks=[clock, checkpoint])
    # 25 s per batch: the first batch end at 60 s or more after the last save is every 3rd.
    saved = sorted((r["epoch"], r["batch"]) for _, r in
                   _commit.complete_checkpoints(_LOCAL, str(tmp_path)))
    assert saved == [(0, 3), (1, 2)]


# -- preemption ---------------------------------------------------------------------------


def test_sigterm_saves_that_step_stops_and_chains_the_previous_handler(tmp_path):
    received = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    try:
        x, y = make_tiny_data()  # 4 batches of 32 per epoch
        model = _compiled()
        checkpoint = ParallelModelCheckpoint(str(tmp_path / "m_{epoch}.keras"), verbose=1)
        history = model.fit(x, y, batch_size=32, epochs=5, verbose=0, shuffle=False,
                            callbacks=[SignalAt(6), checkpoint])
        handler_after = signal.getsignal(signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert checkpoint.preempted and checkpoint.preemption_save_seconds is not None
    assert received == [signal.SIGTERM]  # the user's handler still ran
    assert handler_after is not checkpoint._flag._handle  # restored at train end
    assert len(history.epoch) == 2
    newest, record = _commit.complete_checkpoints(_LOCAL, str(tmp_path))[-1]
    # The step of the signal (or, with asynchronous dispatch on JAX, a step or two later).
    assert record["preemption"] and record["epoch"] == 1
    assert record["batches_done"] == int(keras.ops.convert_to_numpy(model.optimizer.iterations)) - 4
    assert 2 <= record["batches_done"] <= 4
    loaded = keras.saving.load_model(newest)
    for a, b in zip(loaded.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_a_second_signal_during_the_save_changes_nothing(tmp_path, monkeypatch):
    x, y = make_tiny_data()
    model = _compiled()
    checkpoint = ParallelModelCheckpoint(str(tmp_path / "m_{epoch}.keras"), save_freq=100)
    write = checkpoint._job_writer.write

    def write_and_signal(job):
        os.kill(os.getpid(), signal.SIGTERM)  # arrives while this save is written
        return write(job)

    monkeypatch.setattr(checkpoint._job_writer, "write", write_and_signal)
    model.fit(x, y, batch_size=32, epochs=5, verbose=0, callbacks=[SignalAt(3), checkpoint])
    assert checkpoint._flag.count == 2 and checkpoint.preempted
    newest, record = _commit.complete_checkpoints(_LOCAL, str(tmp_path))[-1]
    assert record["batches_done"] == 3
    keras.saving.load_model(newest)


def test_signal_handlers_only_from_the_main_thread():
    flag = SignalFlag((signal.SIGUSR1,), "Test")
    installed = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        thread = threading.Thread(target=lambda: installed.append(flag.install()))
        thread.start()
        thread.join()
    assert installed == [False]
    assert any("outside the main thread" in str(w.message) for w in caught)
    assert flag.install() is True
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert flag.received == signal.SIGUSR1
    finally:
        flag.uninstall()
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL


def test_other_callbacks_do_not_treat_the_cut_epoch_as_an_epoch(tmp_path):
    x, y = make_tiny_data()
    stopper = RobustEarlyStopping("loss", patience=0)
    checkpoint = ParallelModelCheckpoint(str(tmp_path / "m_{epoch}.keras"))
    model = _compiled()
    model.fit(x, y, batch_size=32, epochs=5, verbose=0, shuffle=False,
              callbacks=[SignalAt(6), stopper, checkpoint])
    # One complete epoch was judged; the cut one was not; no best weights came back.
    assert stopper.preempted and stopper.stop_reason is None and stopper.restored_weights is None
    state = json.loads(_LOCAL.read_bytes(str(tmp_path / "m_2.keras.json")))["callbacks"]
    assert [k for k in state if k.startswith("RobustEarlyStopping")]


# -- mid-epoch resume -------------------------------------------------------------------------


def test_resume_with_data_that_cannot_be_positioned_warns_and_starts_the_epoch_again(tmp_path):
    x, y = make_tiny_data()
    model = _compiled()
    model.fit(x, y, batch_size=32, epochs=3, verbose=0, shuffle=False,
              callbacks=[SignalAt(6), ParallelModelCheckpoint(str(tmp_path / "m.keras"))])

    def batches():
        while True:
            yield x[:32], y[:32]

    checkpoint = ParallelModelCheckpoint(str(tmp_path / "m.keras"))
    with pytest.warns(UserWarning, match="cannot be positioned at a batch"):
        assert resume(_compiled(), tmp_path, callbacks=[checkpoint], data=batches()) == 1
    assert checkpoint._resume_at.batches_done == 0


# -- several workers --------------------------------------------------------------------------


@pytest.mark.multiprocess
@pytest.mark.parametrize("who", ["both", "one"])
def test_a_signal_stops_every_worker_at_the_same_step(tmp_path, launch, who):
    from helpers import assert_workers_succeeded

    reports = assert_workers_succeeded(
        launch("preempt_multi.py", num_workers=2, args=[str(tmp_path), who], timeout=300))
    # Both stopped after batch 5 (the vote is in that batch end), both preempted...
    assert [r["stops"][0] for r in reports] == [5, 5]
    assert [r["preempted"] for r in reports] == [True, True]
    # ...the chief wrote the one checkpoint of that step...
    assert reports[0]["files"] == reports[1]["files"] == ["ck_2_1.keras", "ck_2_1.keras.json"]
    # ...and both resumed and ended as the uninterrupted run did.
    assert [r["stops"][1] for r in reports] == [r["reference_stop"] for r in reports] == [12, 12]
    assert reports[0]["digest"] == reports[1]["digest"] == reports[0]["reference"]

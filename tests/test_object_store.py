"""ParallelModelCheckpoint and resume() on object stores: memory:// and S3 (moto on 127.0.0.1).

On a store without rename a checkpoint object is written under its final
name and committed by its sidecar: an object without a matching sidecar is
never complete, never resumed from, and is removed at the next start when it
has one of the callback's names.
"""

import uuid

import keras
import numpy as np
import pytest
from helpers import build_tiny_model, make_tiny_data, moto_s3_server, s3_options, create_bucket

from keras_callbacks_plus import ParallelModelCheckpoint, _storage, _storage_fsspec, data_parallel, resume

pytest.importorskip("fsspec")


def _compiled(model=None, seed=0):
    model = model or build_tiny_model(batch_norm=True, seed=seed)
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="sparse_categorical_crossentropy")
    return model


def _objects(storage, prefix):
    return sorted(name for name in storage.list(prefix) if not name.startswith("kcp_state."))


@pytest.fixture
def memory_prefix():
    prefix = f"memory://kcp-{uuid.uuid4().hex[:8]}/run"
    yield prefix
    storage = _storage.open_storage(prefix)
    storage.fs.rm(storage.fs._strip_protocol(prefix.rsplit("/", 1)[0]), recursive=True)


def test_checkpoints_retention_and_resume_on_memory(memory_prefix):
    x, y = make_tiny_data()
    fit = dict(batch_size=32, shuffle=False, verbose=0)
    keras.utils.set_random_seed(1)
    straight = _compiled()
    straight.fit(x, y, epochs=4, **fit)

    keras.utils.set_random_seed(1)
    first = _compiled()
    checkpoint = ParallelModelCheckpoint(f"{memory_prefix}/ck_{{epoch}}.keras", max_to_keep=2,
                                         save_last=True)
    first.fit(x, y, epochs=2, callbacks=[checkpoint], **fit)
    storage = _storage.open_storage(memory_prefix)
    assert _objects(storage, memory_prefix) == [
        "ck_1.keras", "ck_1.keras.json", "ck_2.keras", "ck_2.keras.json", "last.keras",
        "last.keras.json"]

    second = _compiled(seed=9)
    resumed = ParallelModelCheckpoint(f"{memory_prefix}/ck_{{epoch}}.keras", max_to_keep=2,
                                      save_last=True)
    assert resume(second, memory_prefix, callbacks=[resumed]) == 2
    second.fit(x, y, epochs=4, initial_epoch=2, callbacks=[resumed], **fit)
    for a, b in zip(straight.get_weights(), second.get_weights()):
        np.testing.assert_array_equal(a, b)
    # max_to_keep deleted the older objects once the newer ones were committed.
    assert _objects(storage, memory_prefix) == [
        "ck_3.keras", "ck_3.keras.json", "ck_4.keras", "ck_4.keras.json", "last.keras",
        "last.keras.json"]


def test_an_object_without_its_sidecar_is_not_a_checkpoint(memory_prefix):
    x, y = make_tiny_data()
    model = _compiled()
    model.fit(x, y, batch_size=32, epochs=1, verbose=0,
              callbacks=[ParallelModelCheckpoint(f"{memory_prefix}/ck_{{epoch}}.keras")])
    storage = _storage.open_storage(memory_prefix)
    # As a run killed between the object and its sidecar leaves it; and another run's file.
    storage.write_bytes(f"{memory_prefix}/ck_9.keras", b"torn")
    storage.write_bytes(f"{memory_prefix}/other_1.keras", b"not ours")
    checkpoint = ParallelModelCheckpoint(f"{memory_prefix}/ck_{{epoch}}.keras")
    assert resume(_compiled(seed=3), memory_prefix, callbacks=[checkpoint]) == 1  # ck_1, not ck_9
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        resume(_compiled(), f"{memory_prefix}/ck_9.keras")
    model.fit(x, y, batch_size=32, epochs=2, initial_epoch=1, verbose=0, callbacks=[checkpoint])
    # The next start removed the uncommitted object of its own name pattern only.
    assert _objects(storage, memory_prefix) == [
        "ck_1.keras", "ck_1.keras.json", "ck_2.keras", "ck_2.keras.json", "other_1.keras"]


def test_bad_urls_fail_before_training(tmp_path, s3_server):
    with pytest.raises(ValueError, match=r"argument filepath.*no protocol 'foo'.*Received: filepath='foo://bucket/ck\.keras'"):
        ParallelModelCheckpoint("foo://bucket/ck.keras")
    model = _compiled()
    before = model.get_weights()
    checkpoint = ParallelModelCheckpoint("s3://no-such-bucket/run/ck.keras",
                                         storage_options=s3_options(s3_server))
    with pytest.raises(PermissionError, match=r"s3://no-such-bucket/run.*does not exist"):
        model.fit(*make_tiny_data(), epochs=1, verbose=0, callbacks=[checkpoint])
    for a, b in zip(before, model.get_weights()):  # checked before the first step
        np.testing.assert_array_equal(a, b)


def test_twin_checkpoints_on_s3_resume_bit_identically(s3_server, two_devices):
    prefix = f"s3://kcp-test/{uuid.uuid4().hex[:8]}"
    options = s3_options(s3_server)
    x, y = make_tiny_data()
    fit = dict(batch_size=32, shuffle=False, verbose=0)

    def twin(seed=0):
        template = build_tiny_model(batch_norm=True, seed=seed)
        return template, _compiled(data_parallel(template, devices=two_devices))

    keras.utils.set_random_seed(1)
    _, straight = twin()
    straight.fit(x, y, epochs=3, **fit)

    keras.utils.set_random_seed(1)
    template, first = twin()
    checkpoint = ParallelModelCheckpoint(template, f"{prefix}/ck_{{epoch}}.keras", max_to_keep=1,
                                         storage_options=options)
    first.fit(x, y, epochs=2, callbacks=[checkpoint], **fit)
    storage = _storage.open_storage(prefix, options)
    assert _objects(storage, prefix) == ["ck_2.keras", "ck_2.keras.json"]
    with storage.local_copy(f"{prefix}/ck_2.keras") as local:
        loaded = keras.saving.load_model(local)  # the template's file: one device, no strategy
    np.testing.assert_allclose(loaded.predict(x, verbose=0), first.predict(x, verbose=0), atol=1e-6)

    template, second = twin(seed=7)
    resumed = ParallelModelCheckpoint(template, f"{prefix}/ck_{{epoch}}.keras", max_to_keep=1,
                                      storage_options=options)
    assert resume(second, prefix, callbacks=[resumed], storage_options=options) == 2
    second.fit(x, y, epochs=3, initial_epoch=2, callbacks=[resumed], **fit)
    for a, b in zip(straight.get_weights(), second.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_a_store_that_goes_away_fails_on_the_training_thread(monkeypatch):
    monkeypatch.setattr(_storage_fsspec, "RETRY_ATTEMPTS", 2)
    monkeypatch.setattr(_storage_fsspec, "RETRY_BASE_DELAY", 0.01)
    x, y = make_tiny_data()
    with moto_s3_server() as (server, port):
        create_bucket(port, "goes-away")
        # One attempt per request in botocore: only the package's retries count.
        options = s3_options(port, config_kwargs={"retries": {"total_max_attempts": 1},
                                                  "connect_timeout": 1})

        class StopServer(keras.callbacks.Callback):
            def on_epoch_end(self, epoch, logs=None):
                if epoch == 0:
                    server.stop()  # after the first (committed) save

        checkpoint = ParallelModelCheckpoint("s3://goes-away/run/ck_{epoch}.keras",
                                             storage_options=options)
        with pytest.raises(Exception) as raised:
            _compiled().fit(x, y, batch_size=32, epochs=3, verbose=0,
                            callbacks=[checkpoint, StopServer()])
    assert _storage_fsspec.is_transient(raised.value)
    checkpoint._writer.check()  # raised once: nothing left to raise

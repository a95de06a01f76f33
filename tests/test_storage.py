"""Tests of the storage layer: local folders, memory:// and S3 (a local moto server), one interface.

The commit logic (atomic writes, sidecars, completeness, leftovers) runs on
every store; S3 runs against moto's server on 127.0.0.1, so the real S3
protocol (multipart uploads, listing caches, errors) is exercised offline.
"""

import ast
import contextlib
import errno
import fnmatch
import json
import logging
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from helpers import create_bucket, moto_s3_server, s3_options

from keras_callbacks_plus import _commit, _storage
from keras_callbacks_plus._commit import (
    complete_checkpoints,
    read_sidecar,
    remove_checkpoint,
    remove_leftovers,
    sidecar_path,
    write_sidecar,
)
from keras_callbacks_plus._storage import TMP_PREFIX, LocalStorage, open_storage

PACKAGE_DIR = Path(_storage.__file__).parent
MIB = 2**20


@pytest.fixture
def fast_retries(monkeypatch):
    """Retries without real waiting: 4 attempts, delays recorded instead of slept."""
    from keras_callbacks_plus import _storage_fsspec

    delays = []
    monkeypatch.setattr(_storage_fsspec, "RETRY_ATTEMPTS", 4)
    monkeypatch.setattr(_storage_fsspec, "_sleep", delays.append)
    return delays


# -- S3: a moto server on 127.0.0.1 ------------------------------------------------------


def _make_store(kind, tmp_path, request):
    if kind == "local":
        storage = open_storage(str(tmp_path / "run" / "m_{epoch}.keras"))
        return storage, str(tmp_path / "run")
    if kind == "memory":
        pytest.importorskip("fsspec")
        root = f"memory://kcp-test-{uuid.uuid4().hex[:8]}"
        storage = open_storage(f"{root}/run/m_{{epoch}}.keras")

        def clean():
            with contextlib.suppress(FileNotFoundError):
                storage.fs.rm(storage.fs._strip_protocol(root), recursive=True)

        request.addfinalizer(clean)
        return storage, f"{root}/run"
    port = request.getfixturevalue("s3_server")
    root = f"s3://kcp-test/{uuid.uuid4().hex[:8]}"
    return open_storage(f"{root}/run/m_{{epoch}}.keras", s3_options(port)), f"{root}/run"


@pytest.fixture(params=["local", "memory", "s3"])
def store(request, tmp_path):
    """(storage, directory) on each kind of store."""
    return _make_store(request.param, tmp_path, request)


@pytest.fixture(params=["memory", "s3"])
def object_store(request, tmp_path):
    return _make_store(request.param, tmp_path, request)


@pytest.fixture
def memory_store(request, tmp_path):
    return _make_store("memory", tmp_path, request)


# -- opening --------------------------------------------------------------------------------


def test_open_storage_picks_the_implementation(tmp_path):
    for local in [str(tmp_path / "m.keras"), tmp_path / "m.keras", f"file://{tmp_path}/m.keras",
                  "runs/a:b/m.keras", "m.keras"]:
        storage = open_storage(local)
        assert isinstance(storage, LocalStorage) and storage.atomic_rename, local
    pytest.importorskip("fsspec")
    remote = open_storage("memory://run/m.keras")
    assert type(remote).__name__ == "FsspecStorage" and not remote.atomic_rename
    assert remote.atomicity and storage.atomicity


def test_paths_stay_urls(tmp_path):
    pytest.importorskip("fsspec")
    storage = open_storage("memory://b/run/ck.keras")
    assert storage.parent("memory://b/run/ck.keras") == "memory://b/run"
    assert storage.join("memory://b/run", "ck.keras") == "memory://b/run/ck.keras"
    assert storage.join("memory://b/run/", "/ck.keras") == "memory://b/run/ck.keras"
    assert storage.name("memory://b/run/ck.keras") == "ck.keras"
    local = open_storage(f"file://{tmp_path}/ck.keras")
    assert local.parent(f"file://{tmp_path}/ck.keras") == str(tmp_path)
    assert local.join(str(tmp_path), "ck.keras") == str(tmp_path / "ck.keras")
    assert local.parent("ck.keras") == "."


def test_unknown_protocol_is_a_value_error_naming_the_argument():
    pytest.importorskip("fsspec")
    with pytest.raises(ValueError, match=r"argument filepath of ParallelModelCheckpoint.*'foo'.*"
                                         r"Received: filepath='foo://x/ck.keras'"):
        open_storage("foo://x/ck.keras", owner="ParallelModelCheckpoint")


@pytest.mark.parametrize("url, kwargs, match", [
    ("simplecache::s3://b/ck.keras", {}, "chained fsspec URLs are not supported"),
    ("runs/ck.keras", {"storage_options": {"anon": True}}, "storage_options.*is a local path"),
])
def test_bad_urls(url, kwargs, match):
    with pytest.raises(ValueError, match=match):
        open_storage(url, **kwargs)


class _NotInstalled:
    """A meta-path finder that makes some packages look uninstalled."""

    def __init__(self, *names):
        self.names = set(names)

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in self.names:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


def _uninstall(monkeypatch, *names):
    monkeypatch.setattr(sys, "meta_path", [_NotInstalled(*names), *sys.meta_path])
    for name in names:
        monkeypatch.delitem(sys.modules, name, raising=False)


def test_a_url_without_its_package_says_what_to_install(monkeypatch):
    pytest.importorskip("fsspec")
    _uninstall(monkeypatch, "s3fs")
    with pytest.raises(ImportError) as raised:
        open_storage("s3://ckpts/run/ck.keras", owner="ParallelModelCheckpoint")
    assert str(raised.value) == (
        "ParallelModelCheckpoint: filepath='s3://ckpts/run/ck.keras' needs fsspec and s3fs: "
        "pip install 'keras_callbacks_plus[cloud]' (or pip install fsspec s3fs)"
    )


def test_a_url_without_fsspec_says_what_to_install(monkeypatch):
    _uninstall(monkeypatch, "fsspec")
    with pytest.raises(ImportError, match=r"ActivationLogger: log_dir='gs://b/logs' needs fsspec and gcsfs: "
                                          r"pip install 'keras_callbacks_plus\[cloud\]'"):
        open_storage("gs://b/logs", owner="ActivationLogger", argument="log_dir")
    with pytest.raises(ImportError, match=r"filepath='memory://x' needs fsspec: pip install fsspec$"):
        open_storage("memory://x")
    assert isinstance(open_storage("runs/ck.keras"), LocalStorage)  # local paths need nothing


def test_only_the_storage_modules_import_fsspec():
    importers = set()
    for path in PACKAGE_DIR.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n.partition(".")[0] in ("fsspec", "s3fs", "gcsfs") for n in names):
                importers.add(path.name)
    assert importers == {"_storage_fsspec.py"}
    # ... and only when a URL is opened. The probe loads the storage modules
    # without the package's __init__ (which imports keras: seconds).
    probe = (
        "import sys, types\n"
        "package = types.ModuleType('keras_callbacks_plus')\n"
        f"package.__path__ = [{str(PACKAGE_DIR)!r}]\n"
        "sys.modules['keras_callbacks_plus'] = package\n"
        "from keras_callbacks_plus import _storage, _storage_fsspec\n"
        "_storage.open_storage('runs/m.keras')\n"
        "print(sorted(m for m in ('fsspec', 's3fs', 'gcsfs') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-1] == "[]"


# -- the commit protocol, on every store -----------------------------------------------------


def test_written_and_committed_checkpoint_is_complete(store):
    storage, directory = store
    path = storage.join(directory, "m_1.keras")
    info = storage.write_bytes(path, b"weights-1")
    assert info == storage.info(path) and info.size == 9
    write_sidecar(storage, path, info, {"save_index": 1, "epoch": 1})
    # Listed right after the write (s3fs would answer from a cached listing).
    assert storage.list(directory) == ["m_1.keras", "m_1.keras.json"]
    [(found, record)] = complete_checkpoints(storage, directory)
    assert found == path and record["epoch"] == 1 and record["file"] == "m_1.keras"
    assert read_sidecar(storage, path)["save_index"] == 1
    assert storage.read_bytes(path) == b"weights-1"


def test_checkpoint_without_sidecar_is_incomplete(store):
    storage, directory = store
    path = storage.join(directory, "m_1.keras")
    storage.write_bytes(path, b"weights")
    assert read_sidecar(storage, path) is None
    assert complete_checkpoints(storage, directory) == []


@pytest.mark.parametrize("same_size", [False, True])
def test_sidecar_of_another_version_is_incomplete(store, same_size):
    storage, directory = store
    path = storage.join(directory, "best.keras")
    write_sidecar(storage, path, storage.write_bytes(path, b"version-1"), {"save_index": 1})
    time.sleep(0.02)  # a new modification time even where the clock is coarse
    storage.write_bytes(path, b"version-2" if same_size else b"version-two")
    assert read_sidecar(storage, path) is None
    assert complete_checkpoints(storage, directory) == []


def test_torn_or_foreign_sidecar_is_incomplete(store):
    storage, directory = store
    path = storage.join(directory, "m.keras")
    info = storage.write_bytes(path, b"weights")
    storage.write_bytes(sidecar_path(path), b'{"format": "keras_callbacks_plus.checkpoint/1", "si')
    assert read_sidecar(storage, path) is None
    storage.write_bytes(sidecar_path(path), json.dumps({"format": "other", **info.to_record()}).encode())
    assert read_sidecar(storage, path) is None


def test_complete_checkpoints_oldest_save_first(store):
    storage, directory = store
    for name, index in [("m_b.keras", 1), ("m_a.keras", 3), ("m_c.weights.h5", 2)]:
        path = storage.join(directory, name)
        write_sidecar(storage, path, storage.write_bytes(path, name.encode()), {"save_index": index})
    notes = storage.join(directory, "notes.txt")
    write_sidecar(storage, notes, storage.write_bytes(notes, b"not a checkpoint"), {"save_index": 9})
    found = complete_checkpoints(storage, directory)
    assert [storage.name(p) for p, _ in found] == ["m_b.keras", "m_c.weights.h5", "m_a.keras"]


def test_write_with_gives_a_local_path_named_like_the_target(store):
    storage, directory = store
    target = storage.join(directory, "model.weights.h5")
    seen = []

    def write(local_path):
        seen.append(local_path)
        Path(local_path).write_bytes(b"h5" * 1000)

    info = storage.write_with(target, write)
    assert info.size == 2000 and storage.read_bytes(target) == b"h5" * 1000
    assert seen[0].endswith("model.weights.h5") and not os.path.exists(seen[0])
    if storage.atomic_rename:  # a temporary file beside the target, renamed over it
        assert os.path.basename(seen[0]).startswith(TMP_PREFIX)
        assert os.path.dirname(seen[0]) == directory
    assert storage.list(directory) == ["model.weights.h5"]


def test_failed_write_leaves_the_previous_file(store):
    storage, directory = store
    target = storage.join(directory, "m.keras")
    storage.write_bytes(target, b"previous")

    def write(local_path):
        Path(local_path).write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        storage.write_with(target, write)
    assert storage.read_bytes(target) == b"previous"
    assert storage.list(directory) == ["m.keras"]


def test_write_file_and_copy(store, tmp_path):
    storage, directory = store
    source = tmp_path / "source.bin"
    source.write_bytes(os.urandom(300_000))
    path = storage.join(directory, "m_3.keras")
    info = storage.write_file(path, source)
    assert source.exists() and info.size == 300_000
    last = storage.join(directory, "last.keras")
    copied = storage.copy(path, last)
    assert copied.size == info.size and storage.read_bytes(last) == source.read_bytes()
    write_sidecar(storage, last, copied, {"save_index": 1})
    assert read_sidecar(storage, last) is not None
    # A later copy over it is a new version: the old sidecar no longer matches.
    other = storage.join(directory, "m_4.keras")
    storage.write_bytes(other, b"other")
    storage.copy(other, last)
    assert read_sidecar(storage, last) is None


def test_list_info_exists_delete(store):
    storage, directory = store
    missing = storage.join(directory, "nothing.keras")
    assert storage.list(directory) == [] and storage.scan(directory) == {}
    assert storage.info(missing) is None and not storage.exists(missing)
    storage.delete(missing)  # missing is fine
    path = storage.join(directory, "m.keras")
    storage.write_bytes(path, b"x")
    storage.write_bytes(storage.join(directory, "sub", "inner.keras"), b"y")
    assert storage.list(directory) == ["m.keras"]  # files directly in it only
    assert storage.exists(path) and storage.exists(storage.join(directory, "sub"))
    assert storage.info(storage.join(directory, "sub")) is None  # a folder is no file
    storage.delete(path)
    assert storage.info(path) is None and storage.list(directory) == []
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(path)


def test_remove_checkpoint_deletes_the_sidecar_first(store, monkeypatch):
    storage, directory = store
    path = storage.join(directory, "m.keras")
    write_sidecar(storage, path, storage.write_bytes(path, b"x"), {})
    deleted = []
    delete = storage.delete
    monkeypatch.setattr(storage, "delete", lambda p: (deleted.append(storage.name(p)), delete(p)))
    remove_checkpoint(storage, path)
    assert deleted == ["m.keras.json", "m.keras"] and storage.list(directory) == []


def test_local_copy(store):
    storage, directory = store
    path = storage.join(directory, "m.keras")
    storage.write_bytes(path, b"model bytes")
    with storage.local_copy(path) as local:
        assert local.endswith("m.keras") and Path(local).read_bytes() == b"model bytes"
    assert os.path.exists(local) == storage.atomic_rename  # a download is deleted
    with pytest.raises(FileNotFoundError):
        with storage.local_copy(storage.join(directory, "missing.keras")):
            pass


def test_check_writable_creates_the_folder_and_leaves_nothing(store):
    storage, directory = store
    nested = storage.join(directory, "a", "b")
    storage.check_writable(nested)
    assert storage.list(nested) == []
    if storage.atomic_rename:
        assert os.path.isdir(nested)


def test_leftovers(store):
    storage, directory = store

    def put(name, commit=True):
        path = storage.join(directory, name)
        info = storage.write_bytes(path, name.encode())
        if commit:
            write_sidecar(storage, path, info, {})
        return path

    put("m_1.keras")
    put("m_2.keras", commit=False)  # interrupted before its sidecar
    stale = put("m_3.keras")
    storage.write_bytes(stale, b"replaced, sidecar not yet")
    put("other_1.keras", commit=False)  # another run's file
    put(f"{TMP_PREFIX}123-abcd-m_4.keras", commit=False)
    # Without a pattern, temporary files only.
    assert [storage.name(p) for p in remove_leftovers(storage, directory)] == [f"{TMP_PREFIX}123-abcd-m_4.keras"]
    removed = [storage.name(p) for p in remove_leftovers(storage, directory, "m_*.keras")]
    if storage.atomic_rename:  # renamed files are whole: kept
        assert removed == []
    else:
        assert removed == ["m_2.keras", "m_3.keras"]
        assert storage.list(directory) == ["m_1.keras", "m_1.keras.json", "other_1.keras"]
        put("m_5.keras", commit=False)
        assert remove_leftovers(storage, directory, lambda n: n.startswith("m_5")) == [
            storage.join(directory, "m_5.keras")]
    assert [storage.name(p) for p, _ in complete_checkpoints(storage, directory)] == ["m_1.keras"]


@pytest.mark.parametrize("template, matching, other", [
    ("model_{epoch:02d}-{val_loss:.4f}.keras", "model_03-0.1234.keras", "best.keras"),
    ("ck[{epoch}]?.weights.h5", "ck[7]?.weights.h5", "ck[7]x.weights.h5"),
    ("last.keras", "last.keras", "last_1.keras"),
])
def test_template_glob_matches_what_the_template_writes(template, matching, other):
    glob = _commit.template_glob(template)
    assert fnmatch.fnmatchcase(matching, glob) and not fnmatch.fnmatchcase(other, glob)


# -- local specifics -----------------------------------------------------------------------


def test_local_check_writable_names_the_path_and_the_reason(tmp_path):
    (tmp_path / "a_file").write_bytes(b"")
    storage = open_storage(str(tmp_path / "a_file" / "run" / "m.keras"), owner="ParallelModelCheckpoint")
    with pytest.raises(PermissionError, match=r"ParallelModelCheckpoint cannot write to .*a_file/run "
                                              r"\(from filepath=.*m\.keras\)"):
        storage.check_writable(str(tmp_path / "a_file" / "run"))


def test_sidecars_of_earlier_versions_still_match(tmp_path):
    """Sidecars written before the storage layer have size and mtime_ns, no version."""
    path = tmp_path / "m.keras"
    path.write_bytes(b"weights")
    stat = path.stat()
    old = {"format": _storage.SIDECAR_FORMAT, "file": "m.keras", "save_index": 1,
           "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    (tmp_path / "m.keras.json").write_text(json.dumps(old))
    local = _storage.LocalStorage()
    record = _commit.read_sidecar(local, str(path))
    assert record["save_index"] == 1
    assert _commit.complete_checkpoints(local, str(tmp_path)) == [(str(path), record)]


# -- retries ---------------------------------------------------------------------------------


class ClientError(Exception):
    """Shaped like botocore's: a `response` dict with the error code and HTTP status."""

    def __init__(self, code, status):
        super().__init__(f"An error occurred ({code})")
        self.response = {"Error": {"Code": code, "Message": code},
                         "ResponseMetadata": {"HTTPStatusCode": status}}


class EndpointConnectionError(Exception):
    """Named like botocore's, which is no OSError."""


class NoCredentialsError(Exception):
    pass


def _translated(exception_type, cause, *args):
    """An error as s3fs raises it: a Python exception caused by the client's."""
    error = exception_type(*args)
    error.__cause__ = cause
    return error


@pytest.mark.parametrize("error", [
    ConnectionResetError(errno.ECONNRESET, "reset"), ConnectionAbortedError(), ConnectionRefusedError(),
    TimeoutError(), socket.timeout(), EndpointConnectionError("no endpoint"),
    ClientError("SlowDown", 503), ClientError("Throttling", 400), ClientError("RequestTimeout", 400),
    ClientError("InternalError", 500), ClientError("ServiceUnavailable", 503), ClientError("Whatever", 502),
    _translated(OSError, ClientError("SlowDown", 503), errno.EBUSY, "slow down"),
    OSError(errno.ETIMEDOUT, "timed out"),
], ids=repr)
def test_transient_errors(error):
    from keras_callbacks_plus._storage_fsspec import is_transient

    assert is_transient(error)


@pytest.mark.parametrize("error", [
    PermissionError("denied"), FileNotFoundError("gone"), NoCredentialsError(), ValueError("bug"),
    ClientError("AccessDenied", 403), ClientError("NoSuchBucket", 404), ClientError("InvalidAccessKeyId", 403),
    _translated(PermissionError, ClientError("AccessDenied", 403), "denied"),
    _translated(FileNotFoundError, ClientError("NoSuchBucket", 404), "no bucket"),
    OSError(errno.EIO, "I/O error"),
], ids=repr)
def test_permanent_errors(error):
    from keras_callbacks_plus._storage_fsspec import is_transient

    assert not is_transient(error)


def _flaky(monkeypatch, storage, method, errors):
    """Makes `storage.fs.<method>` raise `errors` one by one, then work; returns the call count."""
    calls = []
    original = getattr(storage.fs, method)

    def flaky(*args, **kwargs):
        calls.append(args)
        if len(calls) <= len(errors):
            raise errors[len(calls) - 1]
        return original(*args, **kwargs)

    monkeypatch.setattr(storage.fs, method, flaky)
    return calls


def test_transient_errors_are_retried(object_store, monkeypatch, fast_retries, caplog):
    storage, directory = object_store
    path = storage.join(directory, "m.keras")
    calls = _flaky(monkeypatch, storage, "pipe_file", [ConnectionResetError(), ClientError("SlowDown", 503)])
    with caplog.at_level(logging.WARNING, logger="keras_callbacks_plus._storage_fsspec"):
        info = storage.write_bytes(path, b"weights")
    assert len(calls) == 3 and storage.info(path) == info
    assert len(fast_retries) == 2 and "retrying" in caplog.text and path in caplog.text


def test_permanent_errors_are_not_retried(object_store, monkeypatch, fast_retries):
    storage, directory = object_store
    calls = _flaky(monkeypatch, storage, "cat_file", [PermissionError("AccessDenied")])
    with pytest.raises(PermissionError):
        storage.read_bytes(storage.join(directory, "m.keras"))
    assert len(calls) == 1 and fast_retries == []


def test_retries_are_bounded_and_back_off(object_store, monkeypatch, fast_retries):
    from keras_callbacks_plus import _storage_fsspec

    monkeypatch.setattr(_storage_fsspec, "RETRY_BASE_DELAY", 1.0)
    monkeypatch.setattr(_storage_fsspec, "RETRY_MAX_DELAY", 3.0)
    storage, directory = object_store
    errors = [TimeoutError(f"attempt {i}") for i in range(10)]
    calls = _flaky(monkeypatch, storage, "ls", errors)
    with pytest.raises(TimeoutError, match="attempt 3"):  # the last attempt's own error
        storage.list(directory)
    assert len(calls) == 4
    ceilings = [1.0, 2.0, 3.0]  # doubling, capped; at least half of it, jittered above
    assert all(c / 2 <= d <= c for d, c in zip(fast_retries, ceilings)) and len(fast_retries) == 3


@pytest.mark.parametrize("error, reason", [
    (PermissionError("AccessDenied"), "access denied"),
    (NoCredentialsError("Unable to locate credentials"), "credentials are missing or invalid"),
    (OSError(errno.EROFS, "Read-only file system"), "the file system is read-only"),
    (FileNotFoundError("NoSuchBucket"), "the bucket or container 'kcp-test-.*' does not exist"),
])
def test_check_writable_says_what_failed(error, reason, memory_store, monkeypatch, fast_retries):
    storage, directory = memory_store
    monkeypatch.setattr(storage.fs, "pipe_file", lambda *a, **k: (_ for _ in ()).throw(error))
    with pytest.raises(PermissionError, match=f"cannot write to {directory} .*could not write a probe "
                                              f"object: {reason}"):
        storage.check_writable(directory)


# -- S3 through moto ---------------------------------------------------------------------------


@pytest.fixture
def s3(s3_server):
    root = f"s3://kcp-test/{uuid.uuid4().hex[:8]}"
    return open_storage(f"{root}/m.keras", s3_options(s3_server)), root


def test_s3_multi_mb_file_is_uploaded_in_parts(s3, tmp_path, monkeypatch):
    from keras_callbacks_plus import _storage_fsspec

    monkeypatch.setattr(_storage_fsspec, "UPLOAD_CHUNK_BYTES", 5 * MIB)  # S3's smallest part
    storage, root = s3
    source = tmp_path / "big.keras"
    source.write_bytes(os.urandom(12 * MIB))
    path = storage.join(root, "big.keras")
    info = storage.write_file(path, source)
    assert info.size == 12 * MIB and info.version.endswith("-3")  # a 3-part multipart upload
    write_sidecar(storage, path, info, {"save_index": 1})
    assert [p for p, _ in complete_checkpoints(storage, root)] == [path]
    with storage.local_copy(path) as local:
        assert Path(local).read_bytes() == source.read_bytes()


def test_s3_listing_sees_what_another_client_wrote(s3, s3_server):
    storage, root = s3
    path = storage.join(root, "m_1.keras")
    storage.write_bytes(storage.join(root, "m_0.keras"), b"zero")
    assert storage.list(root) == ["m_0.keras"]  # a listing s3fs caches
    other = open_storage(root, s3_options(s3_server, skip_instance_cache=True))
    assert other.fs is not storage.fs
    write_sidecar(other, path, other.write_bytes(path, b"one"), {"save_index": 1})
    assert storage.list(root) == ["m_0.keras", "m_1.keras", "m_1.keras.json"]
    assert [p for p, _ in complete_checkpoints(storage, root)] == [path]
    other.write_bytes(path, b"two")
    assert storage.info(path) == other.info(path) and read_sidecar(storage, path) is None


def test_s3_check_writable_on_a_missing_bucket(s3_server):
    storage = open_storage("s3://no-such-bucket/run/m.keras", s3_options(s3_server), owner="ParallelModelCheckpoint")
    with pytest.raises(PermissionError, match=r"ParallelModelCheckpoint cannot write to s3://no-such-bucket/run "
                                              r"\(from filepath=s3://no-such-bucket/run/m\.keras\).*"
                                              r"bucket or container 'no-such-bucket' does not exist"):
        storage.check_writable("s3://no-such-bucket/run")


def test_s3_check_writable_without_credentials(s3_server, monkeypatch, tmp_path):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    options = s3_options(s3_server)
    del options["key"], options["secret"]
    storage = open_storage("s3://kcp-test/run/m.keras", options)
    with pytest.raises(PermissionError, match=r"s3://kcp-test/run .*credentials are missing or invalid"):
        storage.check_writable("s3://kcp-test/run")


def test_s3_server_gone_mid_run_fails_after_bounded_retries(monkeypatch, caplog):
    from keras_callbacks_plus import _storage_fsspec

    monkeypatch.setattr(_storage_fsspec, "RETRY_ATTEMPTS", 3)
    monkeypatch.setattr(_storage_fsspec, "RETRY_BASE_DELAY", 0.05)
    with moto_s3_server() as (server, port):
        create_bucket(port, "gone")
        # One attempt per request in botocore, so that only our retries count.
        options = s3_options(port, config_kwargs={"retries": {"total_max_attempts": 1}, "connect_timeout": 2})
        storage = open_storage("s3://gone/run/m.keras", options)
        storage.write_bytes("s3://gone/run/m_1.keras", b"saved")
        server.stop()
        start = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="keras_callbacks_plus._storage_fsspec"):
            with pytest.raises(Exception) as raised:
                storage.write_bytes("s3://gone/run/m_2.keras", b"lost")
        assert time.monotonic() - start < 15
    assert _storage_fsspec.is_transient(raised.value)
    assert caplog.text.count("retrying") == 2

"""Where checkpoints and logs are stored: local folders and fsspec object stores, one interface.

`open_storage(url_or_path)` returns a `Storage`: `LocalStorage` for a path or a
`file://` URL, `FsspecStorage` (in `_storage_fsspec`) for any other fsspec URL
(`s3://bucket/run`, `gs://bucket/run`, `memory://run`). Both offer the same
few operations (write one file atomically, copy, list, read, delete, a local
copy to load from), and the commit protocol of checkpoints is written once, on
top of them, in `_commit`: `write_sidecar`, `read_sidecar`,
`complete_checkpoints`, `remove_checkpoint`, `remove_leftovers`.

fsspec is optional: this module never imports it; `open_storage` imports it
(and the protocol's package, e.g. s3fs) only for a URL, and says what to
install when it is missing.

Atomicity per store:

* Local and POSIX file systems (`LocalStorage`): each file is written under a
  temporary name (`.kcp-tmp-...`) in the target's folder, flushed, fsynced and
  renamed over the target, then the folder is fsynced. A crash leaves the old
  file or the new one, never a torn one; temporary leftovers are removed at
  the next start.
* Object stores (`FsspecStorage`: S3, GCS, ...): there is no rename, but each
  object is replaced whole (a PUT, or a multipart upload that becomes visible
  only when completed), so readers see the old or the new object. A
  checkpoint is committed by its JSON sidecar (`<file>.json`), written after
  it and recording its size and version key (ETag / generation); an object
  whose sidecar is missing or describes another version is not a complete
  checkpoint, and `remove_leftovers` deletes it at the next start when it
  matches the callback's file name pattern. On fsspec stores with folders
  (SFTP, HDFS, ...) a file may be seen half-written, but it never matches a
  sidecar, so the same commit holds.
"""

from __future__ import annotations

import abc
import contextlib
import errno
import logging
import os
import re
import shutil
import signal
import stat as stat_module
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

logger = logging.getLogger(__name__)

TMP_PREFIX = ".kcp-tmp-"
SIDECAR_SUFFIX = ".json"
SIDECAR_FORMAT = "keras_callbacks_plus.checkpoint/1"
CHECKPOINT_SUFFIXES = (".weights.h5", ".keras")

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
_LOCAL_PROTOCOLS = ("file", "local")


# Tests set this to "<point>" or "<point>:<n>" to SIGKILL the process the n-th
# time a write reaches that point (see `crash_point`).
CRASH_ENV = "KCP_TEST_CRASH_AT"
_crash_counts: dict[str, int] = {}


def crash_point(point: str, path: str | None = None) -> None:
    """Test hook: kills this process when `KCP_TEST_CRASH_AT` names `point`; a no-op otherwise.

    Lets tests stop a write at a chosen point deterministically: `half_written`
    (the temporary file is cut to half its size first, as a kill in the
    middle of writing it leaves it), `fsynced`, `renamed` (local stores),
    `committed` (before a sidecar), `sidecar_written` (before deletions).
    """
    wanted = os.environ.get(CRASH_ENV)
    if not wanted or wanted.partition(":")[0] != point:
        return
    _crash_counts[point] = _crash_counts.get(point, 0) + 1
    if _crash_counts[point] < int(wanted.partition(":")[2] or 1):
        return
    if point == "half_written" and path is not None:
        os.truncate(path, os.path.getsize(path) // 2)
    os.kill(os.getpid(), signal.SIGKILL)


@dataclass(frozen=True)
class FileInfo:
    """What identifies one version of a stored file.

    Attributes:
        size: bytes.
        mtime_ns: modification time in nanoseconds (local files: part of the
            identity; object stores: informative, used to order saves), or None.
        version: the object store's version key (ETag, GCS generation, or
            a key derived from the listing), None for local files.
    """

    size: int
    mtime_ns: int | None = None
    version: str | None = None

    def same_version(self, other: FileInfo) -> bool:
        """Whether `other` describes the same version of the file as this one."""
        if self.size != other.size:
            return False
        if self.version is not None or other.version is not None:
            return self.version == other.version
        return self.mtime_ns == other.mtime_ns

    def to_record(self) -> dict[str, Any]:
        return {"size": self.size, "mtime_ns": self.mtime_ns, "version": self.version}

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> FileInfo:
        return cls(record.get("size"), record.get("mtime_ns"), record.get("version"))


class Storage(abc.ABC):
    """The few operations checkpoints and logs need, the same for every store.

    Paths are strings: local paths for `LocalStorage`, URLs (`s3://b/run/ck.keras`)
    for `FsspecStorage`. Every `write_*` and `copy` commits one whole file (see
    the module docstring) and returns the `FileInfo` of the version it wrote.

    Attributes:
        url: the path or URL the storage was opened with (used in messages).
        owner: who opened it (a class name), for messages.
        argument: the argument the URL came from, for messages.
    """

    #: Whether a file can be renamed into place atomically (local stores).
    atomic_rename: bool = False
    #: One line on how a write becomes visible, for docs and messages.
    atomicity: str = ""

    def __init__(self, url: str, *, owner: str, argument: str):
        self.url = url
        self.owner = owner
        self.argument = argument

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"

    # -- paths -------------------------------------------------------------------

    @abc.abstractmethod
    def join(self, *parts: str) -> str:
        """`parts` joined with the store's separator (URLs stay URLs)."""

    @abc.abstractmethod
    def parent(self, path: str) -> str:
        """The folder (or prefix) holding `path`."""

    @abc.abstractmethod
    def name(self, path: str) -> str:
        """The last component of `path`."""

    # -- writing -----------------------------------------------------------------

    @abc.abstractmethod
    def check_writable(self, directory: str) -> None:
        """Creates `directory` where the store has folders, writes and deletes a probe.

        Raises:
            PermissionError: naming the URL and what failed (missing bucket,
                access denied or missing credentials, read-only, unreachable).
        """

    @abc.abstractmethod
    def write_file(self, target: str, local_path: str | os.PathLike) -> FileInfo:
        """Commits a copy of the local file `local_path` at `target` (streamed)."""

    @abc.abstractmethod
    def write_bytes(self, target: str, data: bytes) -> FileInfo:
        """Commits `data` at `target`."""

    @abc.abstractmethod
    def write_with(self, target: str, write: Callable[[str], None]) -> FileInfo:
        """Calls `write(local_path)` to create the file, then commits it at `target`.

        For writers that need a local path (h5py, zipfile, `Model.save`). The
        path ends with the target's name, so writers that check suffixes pass.
        """

    @abc.abstractmethod
    def copy(self, source: str, target: str) -> FileInfo:
        """Commits a copy of the stored file `source` at `target` (no download)."""

    @abc.abstractmethod
    def delete(self, path: str) -> None:
        """Deletes `path`; a missing file is fine."""

    # -- reading -----------------------------------------------------------------

    @abc.abstractmethod
    def info(self, path: str) -> FileInfo | None:
        """The `FileInfo` of the file at `path`, None if there is no file there."""

    @abc.abstractmethod
    def exists(self, path: str) -> bool:
        """Whether a file or folder exists at `path`."""

    @abc.abstractmethod
    def scan(self, directory: str) -> dict[str, FileInfo]:
        """Names of the files directly in `directory` with their `FileInfo`; {} if missing."""

    def list(self, directory: str) -> list[str]:
        """Sorted names of the files directly in `directory`; [] if it does not exist."""
        return sorted(self.scan(directory))

    @abc.abstractmethod
    def read_bytes(self, path: str) -> bytes:
        """The content of `path` (FileNotFoundError if missing)."""

    @abc.abstractmethod
    def local_copy(self, path: str) -> contextlib.AbstractContextManager[str]:
        """A context manager yielding a local path holding the file at `path`.

        The path ends with the file's name (`keras.saving.load_model` checks
        the suffix); a downloaded copy is deleted on exit.
        """

    def _not_writable(self, directory: str, reason: str, error: BaseException) -> PermissionError:
        return PermissionError(
            f"{self.owner} cannot write to {directory} (from {self.argument}={self.url}): "
            f"{reason}: {type(error).__name__}: {error}"
        )


# -- local files -------------------------------------------------------------------


def checkpoint_suffix(path: str | os.PathLike) -> str | None:
    name = os.fspath(path)
    return next((s for s in CHECKPOINT_SUFFIXES if name.endswith(s)), None)


def temporary_name(name: str) -> str:
    """A unique temporary name for the file `name`, keeping its suffix (Keras checks it)."""
    suffix = checkpoint_suffix(name) or os.path.splitext(name)[1]
    stem = name[: -len(suffix)] if suffix else name
    return f"{TMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}-{stem}{suffix}"


def _fsync_file(path: str) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _stat_info(stat: os.stat_result) -> FileInfo:
    return FileInfo(stat.st_size, stat.st_mtime_ns)


class LocalStorage(Storage):
    """Files on a local or POSIX file system (NFS, Lustre, a FUSE mount)."""

    atomic_rename = True
    atomicity = "atomic: temporary file in the same folder, fsync, rename over the target"

    def __init__(self, url: str = ".", *, owner: str = "keras_callbacks_plus", argument: str = "filepath"):
        super().__init__(url, owner=owner, argument=argument)

    @staticmethod
    def _local(path: str | os.PathLike) -> str:
        path = os.fspath(path)
        return path[len("file://") :] if path.startswith("file://") else path

    def join(self, *parts: str) -> str:
        return os.path.join(*(self._local(p) for p in parts))

    def parent(self, path: str) -> str:
        return os.path.dirname(self._local(path).rstrip(os.sep)) or "."

    def name(self, path: str) -> str:
        return os.path.basename(self._local(path).rstrip(os.sep))

    def check_writable(self, directory: str) -> None:
        directory = self._local(directory)
        try:
            os.makedirs(directory, exist_ok=True)
            probe = os.path.join(directory, temporary_name("probe.tmp"))
            with open(probe, "wb"):
                pass
            os.unlink(probe)
        except OSError as error:
            raise self._not_writable(directory, _reason(error), error) from error

    def _commit(self, target: str, write: Callable[[str], None]) -> FileInfo:
        """Calls `write(tmp)`, then fsyncs and renames `tmp` over `target`, then fsyncs the folder."""
        target = self._local(target)
        folder = os.path.dirname(target) or "."
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, temporary_name(os.path.basename(target)))
        try:
            write(tmp)
            _fsync_file(tmp)
            crash_point("fsynced")
            stat = os.stat(tmp)
            os.replace(tmp, target)
            crash_point("renamed")
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        _fsync_dir(folder)
        return _stat_info(stat)

    def write_file(self, target: str, local_path: str | os.PathLike) -> FileInfo:
        return self._commit(target, lambda tmp: shutil.copyfile(local_path, tmp))

    def write_bytes(self, target: str, data: bytes) -> FileInfo:
        return self._commit(target, lambda tmp: Path(tmp).write_bytes(data))

    def write_with(self, target: str, write: Callable[[str], None]) -> FileInfo:
        return self._commit(target, write)

    def copy(self, source: str, target: str) -> FileInfo:
        source = self._local(source)

        def write(tmp: str) -> None:
            try:  # a hard link costs no space and no time
                os.link(source, tmp)
            except OSError:
                shutil.copyfile(source, tmp)

        return self._commit(target, write)

    def delete(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._local(path))

    def info(self, path: str) -> FileInfo | None:
        try:
            stat = os.stat(self._local(path))
        except (FileNotFoundError, NotADirectoryError):
            return None
        return _stat_info(stat) if stat_module.S_ISREG(stat.st_mode) else None

    def exists(self, path: str) -> bool:
        return os.path.exists(self._local(path))

    def scan(self, directory: str) -> dict[str, FileInfo]:
        try:
            entries = list(os.scandir(self._local(directory)))
        except (FileNotFoundError, NotADirectoryError):
            return {}
        found = {}
        for entry in entries:
            with contextlib.suppress(FileNotFoundError):  # deleted meanwhile
                if entry.is_file():
                    found[entry.name] = _stat_info(entry.stat())
        return found

    def read_bytes(self, path: str) -> bytes:
        return Path(self._local(path)).read_bytes()

    @contextlib.contextmanager
    def local_copy(self, path: str) -> Iterator[str]:
        path = self._local(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"No file at {path}")
        yield path


def _reason(error: BaseException) -> str:
    """Why a write probe failed, in words, from the exception alone (no botocore import)."""
    names = {cls.__name__ for cls in type(error).__mro__}
    if names & {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError",
                "TokenRetrievalError", "RefreshError", "DefaultCredentialsError"}:
        return "credentials are missing or invalid"
    if getattr(error, "errno", None) == errno.EROFS:
        return "the file system is read-only"
    if isinstance(error, PermissionError):
        return "access denied (check the credentials and the permissions of the folder or bucket)"
    if isinstance(error, FileNotFoundError):
        return "the folder, bucket or container does not exist"
    if isinstance(error, (ConnectionError, TimeoutError)) or "Connection" in "".join(names):
        return "the store cannot be reached"
    return "the write probe failed"


# -- opening -------------------------------------------------------------------------


def url_protocol(url_or_path: str | os.PathLike) -> str | None:
    """The `scheme` of a `scheme://...` URL, lower case; None for a plain path."""
    if not isinstance(url_or_path, str):
        return None
    match = _SCHEME.match(url_or_path)
    return match.group(1).lower() if match else None


def open_storage(
    url_or_path: str | os.PathLike,
    storage_options: Mapping[str, Any] | None = None,
    *,
    owner: str = "keras_callbacks_plus",
    argument: str = "filepath",
) -> Storage:
    """The storage of a local path or an fsspec URL; no network access.

    Args:
        url_or_path: a local path, a `file://` URL, or an fsspec URL such as
            `s3://bucket/run/model.keras`, `gs://bucket/run` or `memory://run`.
            A path containing ":" without a `scheme://` prefix is local.
        storage_options: keyword arguments of the fsspec file system
            (credentials, `endpoint_url` via `client_kwargs`, ...). Only for
            URLs. Defaults to `None`.
        owner: the class opening it, for messages. Defaults to
            `"keras_callbacks_plus"`.
        argument: the argument `url_or_path` came from, for messages.
            Defaults to `"filepath"`.

    Returns:
        A `LocalStorage` or an `FsspecStorage`. The fsspec file system itself
        is created at first use (some clients look for credentials then).

    Raises:
        ImportError: a URL without fsspec or the protocol's package installed;
            the message names the argument, the URL and what to install.
        ValueError: an unknown protocol, a chained URL, or `storage_options`
            with a local path.

    Example:

    >>> storage = open_storage("/tmp/run/model.keras")
    >>> storage.parent("/tmp/run/model.keras"), storage.atomic_rename
    ('/tmp/run', True)
    """
    url = os.fspath(url_or_path)
    protocol = url_protocol(url)
    if isinstance(url, str) and "::" in url.split("://")[0]:
        raise ValueError(
            f"Invalid value for argument {argument} of {owner}: chained fsspec URLs "
            f"are not supported. Received: {argument}={url!r}"
        )
    if protocol is None or protocol in _LOCAL_PROTOCOLS:
        if storage_options:
            raise ValueError(
                f"Invalid value for argument storage_options of {owner}: it applies to "
                f"fsspec URLs (s3://, gs://, ...), but {argument}={url!r} is a local path. "
                f"Received: storage_options={dict(storage_options)!r}"
            )
        return LocalStorage(url, owner=owner, argument=argument)
    from keras_callbacks_plus import _storage_fsspec  # imports no fsspec yet

    return _storage_fsspec.FsspecStorage.open(
        url, protocol, dict(storage_options or {}), owner=owner, argument=argument
    )

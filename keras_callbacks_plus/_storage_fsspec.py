"""FsspecStorage: object stores (S3, GCS, memory://, ...) through fsspec, with retries.

Imported by `_storage.open_storage` only for a URL; this module imports fsspec
itself only when a storage is opened or used, so a missing fsspec is reported
by `open_storage` with what to install.

Retries: a call that fails with a transient error (connection reset, aborted
or refused, a timeout, HTTP 5xx or 429, S3 `SlowDown` / `Throttling` /
`RequestTimeout` / `InternalError` / `ServiceUnavailable`) is tried again up
to `RETRY_ATTEMPTS` times in all, after `RETRY_BASE_DELAY * 2**n` seconds
(capped at `RETRY_MAX_DELAY`), half of it random. Permanent errors (access
denied, missing bucket or object, missing credentials) are raised at once,
and after the last attempt the original exception is raised. These retries
come on top of the client's own (botocore retries a request up to 5 times,
s3fs retries some errors 5 times): they cover what is left, such as a store
that stays unreachable for a few seconds.
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import logging
import math
import os
import random
import shutil
import tempfile
import threading
import time
from datetime import datetime
from typing import Any, Callable, Iterator, Mapping

from keras_callbacks_plus._storage import FileInfo, Storage, _reason, temporary_name

logger = logging.getLogger(__name__)

# Module-level so tests (and users in a hurry) can change them.
RETRY_ATTEMPTS = 5
RETRY_BASE_DELAY = 0.2
RETRY_MAX_DELAY = 5.0
_sleep = time.sleep  # replaced in tests, which must not patch time.sleep for every thread
# s3fs reads a file smaller than twice its part size (50 MiB by default) into
# memory for a single PUT; smaller parts bound the memory an upload takes.
UPLOAD_CHUNK_BYTES = 8 * 2**20
_MAX_UPLOAD_PARTS = 9_000  # S3 allows 10,000
_CHUNKED_UPLOAD_PROTOCOLS = frozenset({"s3", "s3a"})
# Stores without folders: nothing to create, and creating the "parent" of a
# key there could create a bucket.
_FLAT_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oci", "oss", "memory"})

_TRANSIENT_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottled",
    "RequestThrottledException", "TooManyRequestsException", "RequestLimitExceeded",
    "BandwidthLimitExceeded", "RequestTimeout", "RequestTimeoutException", "InternalError",
    "InternalFailure", "ServiceUnavailable", "OperationAborted", "PriorRequestNotComplete",
})
_TRANSIENT_STATUS = frozenset({429, 500, 502, 503, 504})
_TRANSIENT_NAMES = frozenset({
    "ConnectionError", "TimeoutError", "HTTPClientError", "IncompleteRead", "IncompleteReadError",
    "ResponseParserError", "ResponseStreamingError", "ClientConnectionError", "ClientPayloadError",
    "ServerTimeoutError", "ProtocolError", "TransportError", "ChunkedEncodingError",
    "EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError",
})
_PERMANENT_TYPES = (
    PermissionError, FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError,
)
_PERMANENT_NAMES = frozenset({
    "NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError", "NoRegionError",
    "ParamValidationError", "RefreshError", "DefaultCredentialsError",
})
_TRANSIENT_ERRNOS = frozenset(
    getattr(errno, name) for name in (
        "ECONNRESET", "ECONNABORTED", "ECONNREFUSED", "ETIMEDOUT", "EPIPE", "EAGAIN", "EBUSY",
        "EREMOTEIO", "ENETUNREACH", "ENETDOWN", "EHOSTUNREACH",
    ) if hasattr(errno, name)
)


# The packages a protocol needs, for the message when fsspec itself is missing
# (with fsspec installed, its registry says which).
PROTOCOL_PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs",
                      "az": "adlfs", "abfs": "adlfs", "abfss": "adlfs", "adl": "adlfs"}
_CLOUD_EXTRA = ("s3fs", "gcsfs")


def install_hint(owner: str, argument: str, url: str, packages: list[str]) -> str:
    """The message of the ImportError raised when a URL's packages are missing."""
    extra = "'keras_callbacks_plus[cloud]' (or pip install " if set(packages) & set(_CLOUD_EXTRA) else ""
    return (
        f"{owner}: {argument}={url!r} needs {' and '.join(packages)}: pip install "
        f"{extra}{' '.join(packages)}{')' if extra else ''}"
    )


def _chain(error: BaseException) -> Iterator[BaseException]:
    """`error`, then its causes: s3fs raises an OSError whose cause is botocore's error."""
    seen = set()
    while error is not None and id(error) not in seen and len(seen) < 8:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def _server_verdict(error: BaseException) -> bool | None:
    """Transient or not by what the server answered, None if it did not answer."""
    response = getattr(error, "response", None)
    if isinstance(response, Mapping):
        code = (response.get("Error") or {}).get("Code")
        status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
        if code is not None or status is not None:
            # s3fs-style codes may be bare statuses ("503").
            return code in _TRANSIENT_CODES or status in _TRANSIENT_STATUS or (
                str(code).isdigit() and int(code) in _TRANSIENT_STATUS
            )
    for attribute in ("status", "code"):  # aiohttp's ClientResponseError, gcsfs's HttpError
        status = getattr(error, attribute, None)
        if isinstance(status, int) and 400 <= status < 600:
            return status in _TRANSIENT_STATUS
    return None


def is_transient(error: BaseException) -> bool:
    """Whether retrying may help: network trouble, throttling, a server error.

    Decided without importing the clients, for the error and then each of its
    causes, by the server's answer (a `response` dict's `Error.Code` and HTTP
    status, as botocore's ClientError has), then by exception type names and
    `errno`. Unknown errors are permanent.
    """
    for exc in _chain(error):
        verdict = _server_verdict(exc)
        if verdict is not None:
            return verdict
        names = {cls.__name__ for cls in type(exc).__mro__}
        if isinstance(exc, _PERMANENT_TYPES) or names & _PERMANENT_NAMES:
            return False
        if names & _TRANSIENT_NAMES or getattr(exc, "errno", None) in _TRANSIENT_ERRNOS:
            return True
    return False


def call_with_retries(what: str, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """`function(*args, **kwargs)`, tried again after transient errors (see the module docstring)."""
    attempt = 1
    while True:
        try:
            return function(*args, **kwargs)
        except Exception as error:
            if attempt >= RETRY_ATTEMPTS or not is_transient(error):
                raise
            ceiling = min(RETRY_MAX_DELAY, RETRY_BASE_DELAY * 2 ** (attempt - 1))
            delay = ceiling / 2 + random.uniform(0, ceiling / 2)
            logger.warning(
                "%s failed (%s: %s); retrying in %.2f s (attempt %d of %d)",
                what, type(error).__name__, error, delay, attempt + 1, RETRY_ATTEMPTS,
            )
            _sleep(delay)
            attempt += 1


def _time_ns(value: Any) -> int | None:
    if isinstance(value, datetime):
        return int(value.timestamp() * 1e9)
    if isinstance(value, (int, float)):
        return int(value * 1e9)
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return int(datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp() * 1e9)
    return None


def _file_info(entry: Mapping[str, Any]) -> FileInfo:
    """A `FileInfo` from an fsspec `info`/`ls` entry, the same from either.

    The version key comes from fields that listings and HEAD requests both
    return (ETag, GCS generation), else from size and time.
    """
    size = int(entry.get("size") or 0)
    mtime_ns = next(
        (t for k in ("LastModified", "mtime", "last_modified", "updated", "created")
         if (t := _time_ns(entry.get(k))) is not None),
        None,
    )
    version = next((str(entry[k]).strip('"') for k in ("generation", "ETag", "etag") if entry.get(k)), None)
    return FileInfo(size, mtime_ns, version if version is not None else f"{size}@{mtime_ns}")


class FsspecStorage(Storage):
    """Files in a store reached through fsspec (S3, GCS, Azure, memory://, ...)."""

    atomic_rename = False
    atomicity = (
        "each object is replaced whole (PUT or completed multipart upload); "
        "a checkpoint is committed by its sidecar, written after it"
    )

    def __init__(
        self, url: str, protocol: str, storage_options: dict[str, Any], *, owner: str, argument: str
    ):
        super().__init__(url, owner=owner, argument=argument)
        self.protocol = protocol
        self.storage_options = storage_options
        self._fs = None
        self._pid = os.getpid()
        self._lock = threading.Lock()

    @classmethod
    def open(cls, url: str, protocol: str, storage_options: dict[str, Any], *, owner: str, argument: str):
        """Checks that fsspec knows `protocol` and its package imports; creates no client."""
        try:
            import fsspec  # noqa: F401 (the package first: its registry module may be imported alone)
            from fsspec.registry import known_implementations, registry
        except ImportError as error:
            package = PROTOCOL_PACKAGES.get(protocol)
            raise ImportError(
                install_hint(owner, argument, url, ["fsspec"] + ([package] if package else []))
            ) from error
        known = known_implementations.get(protocol)
        if known is None and protocol not in registry:
            raise ValueError(
                f"Invalid value for argument {argument} of {owner}: fsspec knows no protocol "
                f"{protocol!r}. Expected a local path or a URL such as s3://bucket/path, "
                f"gs://bucket/path or memory://path. Received: {argument}={url!r}"
            )
        if known is not None:
            module = known["class"].rpartition(".")[0]
            try:
                importlib.import_module(module)
            except ImportError as error:
                package = (error.name or module).partition(".")[0]
                raise ImportError(
                    install_hint(owner, argument, url, ["fsspec"] + [package] * (package != "fsspec"))
                ) from error
        return cls(url, protocol, storage_options, owner=owner, argument=argument)

    @property
    def fs(self):
        """The fsspec file system, created at first use and shared by all threads.

        fsspec caches instances per thread for synchronous file systems, so
        one instance is kept here: the background writer and the training
        thread then share its listing cache.
        """
        if self._fs is None or self._pid != os.getpid():
            with self._lock:
                # A forked child gets a client of its own: the parent's event
                # loop and connections do not survive a fork.
                if self._fs is None or self._pid != os.getpid():
                    import fsspec

                    self._fs = fsspec.filesystem(self.protocol, **self.storage_options)
                    self._pid = os.getpid()
        return self._fs

    def _key(self, path: str) -> str:
        return self.fs._strip_protocol(path)

    def _fresh(self, path: str) -> str:
        """The key of `path`, after dropping cached listings of it and its parents.

        s3fs answers `info` and `ls` from listings it cached, which miss what
        another process (or client) wrote since.
        """
        key = self._key(path)
        self.fs.invalidate_cache(key)
        return key

    def _call(self, what: str, path: str, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return call_with_retries(f"{self.owner}: {what} {path}", function, *args, **kwargs)

    # -- paths -------------------------------------------------------------------

    def join(self, *parts: str) -> str:
        joined = parts[0]
        for part in parts[1:]:
            part = part.strip("/")
            if part:
                joined = f"{joined}{part}" if joined.endswith("/") else f"{joined}/{part}"
        return joined

    def parent(self, path: str) -> str:
        scheme, _, rest = path.partition("://")
        rest = rest.rstrip("/")
        return f"{scheme}://{rest.rpartition('/')[0]}"

    def name(self, path: str) -> str:
        return path.rstrip("/").rpartition("/")[2]

    # -- writing -----------------------------------------------------------------

    def check_writable(self, directory: str) -> None:
        step, key = "connect", directory
        try:
            key = self._key(directory)
            if self.protocol not in _FLAT_PROTOCOLS:
                step = "create the folder"
                self._call("create", directory, self.fs.makedirs, key, exist_ok=True)
            probe = self.join(directory, temporary_name("probe.tmp"))
            step = "write a probe object"
            self._call("write", probe, self.fs.pipe_file, self._key(probe), b"")
            step = "delete the probe object (deleting old checkpoints needs it)"
            self._call("delete", probe, self.fs.rm_file, self._key(probe))
        except Exception as error:
            reason = _reason(error)
            if isinstance(error, FileNotFoundError) and self.protocol in _FLAT_PROTOCOLS:
                reason = f"the bucket or container {key.strip('/').partition('/')[0]!r} does not exist"
            raise self._not_writable(directory, f"could not {step}: {reason}", error) from error

    def _written(self, target: str) -> FileInfo:
        info = self.info(target)
        if info is None:
            raise FileNotFoundError(f"{target} is missing right after it was written")
        return info

    def write_file(self, target: str, local_path: str | os.PathLike) -> FileInfo:
        local_path = os.fspath(local_path)
        options = {}
        if self.protocol in _CHUNKED_UPLOAD_PROTOCOLS:
            size = os.path.getsize(local_path)
            options["chunksize"] = max(UPLOAD_CHUNK_BYTES, math.ceil(size / _MAX_UPLOAD_PARTS))
        self._call("upload to", target, self.fs.put_file, local_path, self._key(target), **options)
        return self._written(target)

    def write_bytes(self, target: str, data: bytes) -> FileInfo:
        self._call("write", target, self.fs.pipe_file, self._key(target), data)
        return self._written(target)

    def write_with(self, target: str, write: Callable[[str], None]) -> FileInfo:
        staging = tempfile.mkdtemp(prefix="kcp-staging-")
        try:
            local_path = os.path.join(staging, self.name(target))
            write(local_path)
            return self.write_file(target, local_path)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def copy(self, source: str, target: str) -> FileInfo:
        self._call("copy to", target, self.fs.cp_file, self._key(source), self._key(target))
        return self._written(target)

    def delete(self, path: str) -> None:
        try:
            self._call("delete", path, self.fs.rm_file, self._key(path))
        except FileNotFoundError:
            pass
        self.fs.invalidate_cache(self._key(path))

    # -- reading -----------------------------------------------------------------

    def info(self, path: str) -> FileInfo | None:
        try:
            entry = self._call("stat", path, self.fs.info, self._fresh(path))
        except FileNotFoundError:
            return None
        return _file_info(entry) if entry.get("type") == "file" else None

    def exists(self, path: str) -> bool:
        try:
            self._call("stat", path, self.fs.info, self._fresh(path))
        except FileNotFoundError:
            return False
        return True

    def scan(self, directory: str) -> dict[str, FileInfo]:
        key = self._fresh(directory).rstrip("/")
        try:
            entries = self._call("list", directory, self.fs.ls, key, detail=True)
        except FileNotFoundError:
            return {}
        found = {}
        for entry in entries:
            name = entry["name"].rstrip("/")
            if entry.get("type") == "file" and name != key:
                found[name.rpartition("/")[2]] = _file_info(entry)
        return found

    def read_bytes(self, path: str) -> bytes:
        return self._call("read", path, self.fs.cat_file, self._key(path))

    @contextlib.contextmanager
    def local_copy(self, path: str) -> Iterator[str]:
        staging = tempfile.mkdtemp(prefix="kcp-download-")
        try:
            local_path = os.path.join(staging, self.name(path))
            self._call("download", path, self.fs.get_file, self._key(path), local_path)
            yield local_path
        finally:
            shutil.rmtree(staging, ignore_errors=True)

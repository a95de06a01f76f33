"""Local checkpoint files: the former API, now thin wrappers over `_storage.LocalStorage`.

Kept until `checkpoint.py` uses `_storage` directly; the logic (atomic
writes, sidecars, complete-checkpoint discovery, leftovers) lives in
`_storage`, once for local folders and object stores.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from keras_callbacks_plus import _storage
from keras_callbacks_plus._storage import (  # noqa: F401 (re-exported)
    CHECKPOINT_SUFFIXES,
    SIDECAR_FORMAT,
    SIDECAR_SUFFIX,
    TMP_PREFIX,
    FileInfo,
    checkpoint_suffix,
)

_LOCAL = _storage.LocalStorage()


def temporary_path(target: str | os.PathLike) -> Path:
    """A unique temporary name beside `target`, keeping its suffix (Keras checks it)."""
    target = Path(target)
    return target.with_name(_storage.temporary_name(target.name))


def write_atomic(target: str | os.PathLike, write: Callable[[Path], None]) -> FileInfo:
    """Calls `write(tmp)`, then fsyncs and renames `tmp` over `target`; returns what was written."""
    return _LOCAL.write_with(os.fspath(target), lambda tmp: write(Path(tmp)))


def link_atomic(source: str | os.PathLike, target: str | os.PathLike) -> FileInfo:
    """Makes `target` a copy of the complete file `source`, atomically (hard link if possible)."""
    return _LOCAL.copy(os.fspath(source), os.fspath(target))


def sidecar_path(checkpoint: str | os.PathLike) -> Path:
    return Path(_storage.sidecar_path(os.fspath(checkpoint)))


def write_sidecar(checkpoint: str | os.PathLike, info: FileInfo, record: dict[str, Any]) -> None:
    _storage.write_sidecar(_LOCAL, os.fspath(checkpoint), info, record)


def read_sidecar(checkpoint: str | os.PathLike) -> dict[str, Any] | None:
    """The sidecar of `checkpoint` if both are complete and match, else None."""
    return _storage.read_sidecar(_LOCAL, os.fspath(checkpoint))


def complete_checkpoints(directory: str | os.PathLike) -> list[tuple[Path, dict[str, Any]]]:
    """Complete checkpoints in `directory`, oldest save first."""
    return [(Path(p), r) for p, r in _storage.complete_checkpoints(_LOCAL, os.fspath(directory))]


def remove_leftovers(directory: str | os.PathLike) -> list[Path]:
    """Deletes temporary files a crashed writer left in `directory`; returns them."""
    return [Path(p) for p in _storage.remove_leftovers(_LOCAL, os.fspath(directory))]


def remove_checkpoint(checkpoint: str | os.PathLike) -> None:
    """Deletes a checkpoint, sidecar first so it never describes a missing file."""
    _storage.remove_checkpoint(_LOCAL, os.fspath(checkpoint))

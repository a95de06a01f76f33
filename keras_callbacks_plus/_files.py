"""Checkpoint files on disk: atomic writes, JSON sidecars, and finding the latest complete one.

A checkpoint `model_03.keras` is complete when it was renamed into place
whole and its sidecar `model_03.keras.json` describes that very file (same
size and modification time). Both are written under a temporary name in the
same folder, flushed, fsynced and renamed, so a crash leaves either the old
file or the new one, never a torn one.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable

TMP_PREFIX = ".kcp-tmp-"
SIDECAR_SUFFIX = ".json"
SIDECAR_FORMAT = "keras_callbacks_plus.checkpoint/1"
CHECKPOINT_SUFFIXES = (".weights.h5", ".keras")


def checkpoint_suffix(path: str | os.PathLike) -> str | None:
    name = os.fspath(path)
    return next((s for s in CHECKPOINT_SUFFIXES if name.endswith(s)), None)


def temporary_path(target: str | os.PathLike) -> Path:
    """A unique temporary name beside `target`, keeping its suffix (Keras checks it)."""
    target = Path(target)
    suffix = checkpoint_suffix(target) or target.suffix
    return target.with_name(f"{TMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}-{target.name[: -len(suffix) or None]}{suffix}")


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
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


def write_atomic(target: str | os.PathLike, write: Callable[[Path], None]) -> os.stat_result:
    """Calls `write(tmp)`, then fsyncs and renames `tmp` over `target`.

    Returns:
        The `os.stat` of the file now at `target`.
    """
    target = Path(target)
    tmp = temporary_path(target)
    try:
        write(tmp)
        _fsync_file(tmp)
        stat = tmp.stat()
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)
    return stat


def link_atomic(source: str | os.PathLike, target: str | os.PathLike) -> os.stat_result:
    """Makes `target` a copy of the complete file `source`, atomically (hard link if possible)."""

    def write(tmp: Path) -> None:
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)

    return write_atomic(target, write)


def sidecar_path(checkpoint: str | os.PathLike) -> Path:
    return Path(os.fspath(checkpoint) + SIDECAR_SUFFIX)


def write_sidecar(checkpoint: Path, stat: os.stat_result, record: dict[str, Any]) -> None:
    record = {
        "format": SIDECAR_FORMAT,
        **record,
        "file": checkpoint.name,
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
    }
    data = json.dumps(record, indent=2, sort_keys=True, default=float).encode()
    write_atomic(sidecar_path(checkpoint), lambda tmp: tmp.write_bytes(data))


def read_sidecar(checkpoint: str | os.PathLike) -> dict[str, Any] | None:
    """The sidecar of `checkpoint` if both are complete and match, else None."""
    checkpoint = Path(checkpoint)
    try:
        record = json.loads(sidecar_path(checkpoint).read_text())
        stat = checkpoint.stat()
    except (OSError, ValueError):
        return None
    if record.get("format") != SIDECAR_FORMAT or record.get("file") != checkpoint.name:
        return None
    if (record.get("size"), record.get("mtime_ns")) != (stat.st_size, stat.st_mtime_ns):
        return None  # the file was replaced after this sidecar was written
    return record


def complete_checkpoints(directory: str | os.PathLike) -> list[tuple[Path, dict[str, Any]]]:
    """Complete checkpoints in `directory`, oldest save first."""
    found = []
    for sidecar in Path(directory).glob("*" + SIDECAR_SUFFIX):
        if sidecar.name.startswith(TMP_PREFIX):
            continue
        checkpoint = sidecar.with_name(sidecar.name[: -len(SIDECAR_SUFFIX)])
        record = read_sidecar(checkpoint)
        if record is not None and checkpoint_suffix(checkpoint):
            found.append((checkpoint, record))
    found.sort(key=lambda item: (item[1].get("save_index", -1), item[1]["mtime_ns"]))
    return found


def remove_leftovers(directory: str | os.PathLike) -> list[Path]:
    """Deletes temporary files a crashed writer left in `directory`; returns them."""
    removed = []
    for path in Path(directory).glob(TMP_PREFIX + "*"):
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def remove_checkpoint(checkpoint: str | os.PathLike) -> None:
    """Deletes a checkpoint, sidecar first so it never describes a missing file."""
    sidecar_path(checkpoint).unlink(missing_ok=True)
    Path(checkpoint).unlink(missing_ok=True)

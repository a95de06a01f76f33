"""The commit protocol of checkpoints, once for every store: sidecars and completeness.

A checkpoint `model_03.keras` is complete when its sidecar
`model_03.keras.json` exists and records the size and version (local: mtime;
object stores: ETag / generation) of the very file that is there now. The
sidecar is written after the file, so on stores without rename it is the
commit marker; on local folders both are renamed into place whole.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import re
import string
from typing import Any, Callable, Mapping

from keras_callbacks_plus._storage import (
    SIDECAR_FORMAT,
    SIDECAR_SUFFIX,
    TMP_PREFIX,
    FileInfo,
    Storage,
    checkpoint_suffix,
)

logger = logging.getLogger(__name__)


def sidecar_path(checkpoint: str) -> str:
    return os.fspath(checkpoint) + SIDECAR_SUFFIX


def write_sidecar(storage: Storage, checkpoint: str, info: FileInfo, record: Mapping[str, Any]) -> FileInfo:
    """Commits the checkpoint `checkpoint`: writes its sidecar describing version `info`.

    Args:
        storage: where the checkpoint is.
        checkpoint: the checkpoint's path or URL.
        info: what `write_*`/`copy` returned for it.
        record: JSON-able facts to keep beside it (epoch, states, ...).

    Returns:
        The `FileInfo` of the sidecar.
    """
    record = {
        "format": SIDECAR_FORMAT,
        **record,
        "file": storage.name(checkpoint),
        **info.to_record(),
    }
    # Compact: indented, the resume record's RNG states (~1250 ints) took a
    # line each and doubled the sidecar (issue #21: under 20 KB).
    data = json.dumps(record, sort_keys=True, separators=(",", ":"), default=float).encode()
    return storage.write_bytes(sidecar_path(checkpoint), data)


def read_sidecar(storage: Storage, checkpoint: str, info: FileInfo | None = None) -> dict[str, Any] | None:
    """The sidecar record of `checkpoint` if it describes the checkpoint's current version, else None.

    Args:
        storage: where the checkpoint is.
        checkpoint: the checkpoint's path or URL.
        info: its current `FileInfo` if known (from `scan`), saving a request.
            Defaults to `None`: asked from the store.

    Raises:
        OSError: other than a missing file (e.g. the store is unreachable after
            retries): an unreadable store must not look like "no checkpoint".
    """
    try:
        record = json.loads(storage.read_bytes(sidecar_path(checkpoint)))
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, ValueError):
        return None  # missing, or torn by a non-atomic store
    if not isinstance(record, dict) or record.get("format") != SIDECAR_FORMAT:
        return None
    if record.get("file") != storage.name(checkpoint):
        return None
    info = info if info is not None else storage.info(checkpoint)
    if info is None or not FileInfo.from_record(record).same_version(info):
        return None  # missing, or replaced after this sidecar was written
    return record


def complete_checkpoints(storage: Storage, directory: str) -> list[tuple[str, dict[str, Any]]]:
    """Complete checkpoints in `directory` with their sidecar records, oldest save first.

    Ordered by the record's `save_index`, then modification time.
    """
    entries = storage.scan(directory)
    found = []
    for name, info in entries.items():
        if name.startswith(TMP_PREFIX) or not name.endswith(SIDECAR_SUFFIX):
            continue
        checkpoint = name[: -len(SIDECAR_SUFFIX)]
        if not checkpoint_suffix(checkpoint) or checkpoint not in entries:
            continue
        path = storage.join(directory, checkpoint)
        record = read_sidecar(storage, path, entries[checkpoint])
        if record is not None:
            found.append((path, record))
    found.sort(key=lambda item: (item[1].get("save_index", -1), item[1].get("mtime_ns") or 0))
    return found


def remove_checkpoint(storage: Storage, path: str) -> None:
    """Deletes a checkpoint, sidecar first so it never describes a missing file."""
    storage.delete(sidecar_path(path))
    storage.delete(path)


def template_glob(name_template: str) -> str:
    """A glob matching every file name the `str.format` template `name_template` can give.

    For `remove_leftovers(pattern=...)`: only files a callback could have
    written are candidates.

    Example:

    >>> template_glob("model_{epoch:02d}-{val_loss:.4f}.keras")
    'model_*-*.keras'
    """
    parts = []
    for literal, field, _, _ in string.Formatter().parse(name_template):
        parts.append(re.sub(r"([*?\[])", r"[\1]", literal))
        if field is not None:
            parts.append("*")
    return "".join(parts)


def remove_leftovers(
    storage: Storage,
    directory: str,
    pattern: str | Callable[[str], bool] | None = None,
) -> list[str]:
    """Deletes what a crashed writer left in `directory`; returns the deleted paths.

    Everywhere: temporary files and probes (names starting with `TMP_PREFIX`).
    On stores without atomic rename, also uncommitted checkpoints: files with
    a checkpoint suffix whose name matches `pattern` and whose sidecar is
    missing or describes another version (with their stale sidecar). Local
    stores keep those: a renamed file is always whole.

    Args:
        storage: the store.
        directory: the folder to clean.
        pattern: a glob on file names (`"model_*.keras"`, see `template_glob`)
            or a predicate, built from the callback's file name template so that
            files of other runs are never touched. Defaults to `None`:
            temporary files only.
    """
    entries = storage.scan(directory)
    matches = (lambda n: fnmatch.fnmatchcase(n, pattern)) if isinstance(pattern, str) else pattern
    removed = []
    for name in sorted(entries):
        path = storage.join(directory, name)
        if name.startswith(TMP_PREFIX):
            storage.delete(path)
        elif (
            matches is not None
            and not storage.atomic_rename
            and checkpoint_suffix(name)
            and matches(name)
            and read_sidecar(storage, path, entries[name]) is None
        ):
            remove_checkpoint(storage, path)
        else:
            continue
        removed.append(path)
    if removed:
        logger.info("Removed %d leftover file(s) of an interrupted run in %s", len(removed), directory)
    return removed

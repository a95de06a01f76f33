"""What the worker scripts share; each imports it first: `from _worker import ...`.

Importing it quiets TensorFlow's C++ logs and makes tests/helpers.py
importable. `join_workers()` joins the multi-worker job that
`helpers.launch_workers` describes in the environment (call it before the
backend computes anything); `count_local_writes()` records the files this
process writes; `report(**fields)` prints the one JSON line that
`helpers.assert_workers_succeeded` returns for this worker.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from typing import Any, Iterable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def worker_addresses() -> list[str]:
    return os.environ["KCP_WORKER_ADDRESSES"].split(",")


def worker_index() -> int:
    return int(os.environ["KCP_WORKER_INDEX"])


def join_workers() -> int:
    """Starts this process's multi-worker strategy; returns its worker index."""
    from keras_callbacks_plus import distribute

    distribute.multi_worker_strategy(worker_addresses(), worker_index())
    return worker_index()


def weights_digest(weights: Iterable[Any]) -> str:
    """A SHA-256 of the weights' bytes: equal digests, bit-identical weights."""
    import numpy as np

    return hashlib.sha256(b"".join(np.asarray(w).tobytes() for w in weights)).hexdigest()


def count_local_writes() -> list[str]:
    """Records every file this process writes through the package's local storage.

    Returns the list the paths are appended to (the chief of a job writes;
    the others must not).
    """
    from keras_callbacks_plus import _storage

    writes: list[str] = []
    write_with = _storage.LocalStorage.write_with

    def counting_write_with(self, target, write):
        writes.append(str(target))
        return write_with(self, target, write)

    _storage.LocalStorage.write_with = counting_write_with
    return writes


def report(**fields: Any) -> None:
    """Prints this worker's report: one JSON line, the last of its stdout."""
    print(json.dumps(fields), flush=True)

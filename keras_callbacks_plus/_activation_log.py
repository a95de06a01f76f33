"""The HDF5 and TensorBoard outputs of ActivationLogger, and `read_activation_log`.

An HDF5 log holds one group per run (each `fit` adds one), in it one group
per phase and layer, with resizable datasets that grow by one row per
logged epoch. The writer reopens the file for each epoch, so that another
process can read it while training runs.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import h5py
import numpy as np

STATISTICS = ("mean", "std", "min", "max", "zero_frac", "nonfinite_frac")
_FORMAT = "keras_callbacks_plus.activation_log"
_FORMAT_VERSION = 1

# How long a write waits for a reader that holds the HDF5 file (HDF5 locks it).
LOCK_WAIT_S = 2.0
LOCK_WAIT_AT_END_S = 10.0



class Record(NamedTuple):
    """The statistics of one output in one phase at one logged epoch."""

    phase: str
    name: str
    shape: tuple
    result: dict[str, Any]
    edges: np.ndarray


def versions() -> dict[str, str]:
    found = {"python": sys.version.split()[0]}
    for name in ("keras", "numpy", "h5py", "tensorflow", "tensorflow-cpu", "jax", "jaxlib"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    try:
        from keras_callbacks_plus._version import __version__

        found["keras_callbacks_plus"] = __version__
    except ImportError:
        pass
    return found


def _open_h5(path: str | os.PathLike, mode: str, wait: float) -> h5py.File:
    """Opens `path`, waiting up to `wait` seconds while another process holds it.

    HDF5 locks a file while it is open: a reader blocks the writer and the
    other way round. Writer and readers here keep it open only briefly.
    """
    deadline = time.monotonic() + wait
    delay = 0.01
    while True:
        try:
            return h5py.File(path, mode)
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(delay)
            delay = min(2 * delay, 0.2)


def _group_name(path: str) -> str:
    return path.replace("/", "|")


class H5Log:
    """One run of an HDF5 activation log, written by reopening the file per epoch.

    Closing the file after each epoch flushes it and releases HDF5's lock,
    so another process can read it while training runs. Records that cannot
    be written because a reader holds the file stay pending until the next
    write.
    """

    def __init__(self, path: str | os.PathLike, run_attrs: dict[str, Any], resume: str | None):
        self.path = Path(path)
        # Each layer group repeats these, so that a group read alone says what made it.
        self.layer_attrs = {k: run_attrs[k] for k in ("backend", "versions", "percentile_levels")}
        self.pending: list[tuple[int, list]] = []
        self._warned = False
        parent = self.path.parent
        if not parent.is_dir():
            raise ValueError(
                f"Invalid value for argument h5_path. Its folder {str(parent)!r} "
                f"does not exist. Received: h5_path={str(path)!r}"
            )
        try:
            with _open_h5(self.path, "a", LOCK_WAIT_S) as f:
                if f.attrs.get("format") != _FORMAT:
                    if len(f) or len(f.attrs):
                        raise ValueError(
                            f"Invalid value for argument h5_path. {str(path)!r} is an "
                            "HDF5 file but not an activation log; ActivationLogger "
                            "never overwrites a file. Choose another path."
                        )
                    f.attrs["format"] = _FORMAT
                    f.attrs["format_version"] = _FORMAT_VERSION
                if resume is not None and resume in f:
                    self.run = resume
                else:
                    taken = [int(k[4:]) for k in f if k.startswith("run_") and k[4:].isdigit()]
                    self.run = f"run_{max(taken, default=-1) + 1:03d}"
                    group = f.create_group(self.run)
                    for key, value in run_attrs.items():
                        group.attrs[key] = value
        except ValueError:
            raise
        except OSError as error:
            raise ValueError(
                f"Invalid value for argument h5_path. Cannot write the activation "
                f"log {str(path)!r}: {error}"
            ) from error

    def append(self, epoch: int, records: list[Record]) -> None:
        self.pending.append((epoch, records))
        self.flush(LOCK_WAIT_S)

    def flush(self, wait: float) -> None:
        """Writes the pending records; keeps them if a reader holds the file longer than `wait`."""
        if not self.pending:
            return
        try:
            with _open_h5(self.path, "a", wait) as f:
                run = f[self.run]
                for epoch, records in self.pending:
                    for record in records:
                        self._write(run, epoch, record)
            self.pending.clear()
        except BlockingIOError:
            if not self._warned:
                warnings.warn(
                    f"ActivationLogger: {str(self.path)!r} is held open by another "
                    "process; its records are kept and written at the next epoch. "
                    "Read it with read_activation_log(), which closes it quickly.",
                    stacklevel=3,
                )
                self._warned = True

    def _write(self, run, epoch: int, record: Record) -> None:
        group = run.require_group(record.phase)
        key = _group_name(record.name)
        if key not in group:
            g = group.create_group(key)
            g.attrs.update(self.layer_attrs)
            g.attrs["layer_path"] = record.name
            g.attrs["phase"] = record.phase
            g.attrs["output_shape"] = [-1 if d is None else d for d in record.shape]
            g.attrs["bin_edges"] = record.edges
            bins, levels = len(record.edges) - 1, len(self.layer_attrs["percentile_levels"])
            for field, dtype, width in (
                ("epoch", np.int64, None),
                ("count", np.int64, None),
                *((s, np.float64, None) for s in STATISTICS),
                ("percentiles", np.float64, levels),
                ("histogram", np.int64, bins),
                ("underflow", np.int64, None),
                ("overflow", np.int64, None),
            ):
                shape = (0,) if width is None else (0, width)
                g.create_dataset(field, shape=shape, maxshape=(None, *shape[1:]),
                                 dtype=dtype, chunks=(64, *shape[1:]))
        g = group[key]
        row = g["epoch"].shape[0]
        values = {"epoch": epoch, **record.result}
        for field, dataset in g.items():
            dataset.resize(row + 1, axis=0)
            dataset[row] = values[field]


class TensorBoardWriter:
    """Activation histograms in TensorBoard's format, through tf.summary."""

    def __init__(self, logdir: str | os.PathLike):
        first_import = "tensorflow" not in sys.modules
        import tensorflow as tf

        if first_import:
            # Imported only to write summaries (JAX backend): keep TF off the GPUs.
            try:
                tf.config.set_visible_devices([], "GPU")
            except RuntimeError:
                pass
        self._tf = tf
        self._writer = tf.summary.create_file_writer(str(logdir))
        metadata = tf.compat.v1.SummaryMetadata()
        metadata.plugin_data.plugin_name = "histograms"
        self._metadata = metadata.SerializeToString()

    def write(self, epoch: int, records: list[Record]) -> None:
        tf = self._tf
        with self._writer.as_default():
            for phase, name, _, result, edges in records:
                rows = [[l, r, c] for l, r, c in zip(edges[:-1], edges[1:], result["histogram"])]
                if result["underflow"]:
                    rows.insert(0, [result["min"], edges[0], result["underflow"]])
                if result["overflow"]:
                    rows.append([edges[-1], result["max"], result["overflow"]])
                tf.summary.write(
                    f"activations_{phase}/{name}",
                    tf.constant(rows, tf.float64),
                    step=epoch,
                    metadata=self._metadata,
                )
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()





def read_activation_log(path: str | os.PathLike, *, wait: float = 10.0) -> list[dict[str, Any]]:
    """Reads an HDF5 activation log written by `ActivationLogger`.

    Safe while training writes to it: the file is opened briefly, waiting up
    to `wait` seconds if the writer holds it at that moment.

    Args:
        path: the `.h5` file.
        wait: seconds to wait for the writer's lock. Defaults to 10.

    Returns:
        A list of runs, oldest first (each `fit` with the logger adds one).
        Each run is a dict:

        * `"name"`: `"run_000"`, ...
        * `"attrs"`: `started` (UTC ISO time), `model`, `backend`,
          `versions` (dict), `phases`, `layers`, `percentile_levels`,
          `bins`, `every`, `sample_values` (values per output and batch
          behind percentiles and histogram; 0: all), `probe`.
        * `"layers"`: `{phase: {layer path: record}}`, where each record
          holds NumPy arrays with one row per logged epoch: `epoch` (counted
          from 0), `count`, `mean`, `std`, `min`, `max`, `zero_frac`,
          `nonfinite_frac` (shape `(E,)`), `percentiles` (`(E, P)`),
          `histogram` (`(E, bins)`), `underflow`, `overflow` (`(E,)`); and
          `bin_edges` (`(bins + 1,)`), `percentile_levels` (`(P,)`),
          `output_shape` (tuple, `None` for the batch dimension).

    Raises:
        ValueError: the file is not an activation log.
    """
    with _open_h5(path, "r", wait) as f:
        if f.attrs.get("format") != _FORMAT:
            raise ValueError(f"{str(path)!r} is not an activation log written by ActivationLogger.")
        runs = []
        for name in sorted(k for k in f if k.startswith("run_")):
            group = f[name]
            attrs = {k: _attr(v) for k, v in group.attrs.items()}
            if "versions" in attrs:
                attrs["versions"] = json.loads(attrs["versions"])
            order = {path: i for i, path in enumerate(attrs.get("layers", []))}
            layers: dict[str, dict[str, Any]] = {}
            for phase in attrs.get("phases", sorted(group)):
                if phase not in group:
                    continue
                found = sorted(group[phase].values(),
                               key=lambda g: order.get(str(g.attrs["layer_path"]), len(order)))
                for layer in found:
                    record = {field: dataset[()] for field, dataset in layer.items()}
                    record["bin_edges"] = np.asarray(layer.attrs["bin_edges"])
                    record["percentile_levels"] = np.asarray(layer.attrs["percentile_levels"])
                    record["output_shape"] = tuple(
                        None if d < 0 else int(d) for d in layer.attrs["output_shape"]
                    )
                    layers.setdefault(phase, {})[str(layer.attrs["layer_path"])] = record
            runs.append({"name": name, "attrs": attrs, "layers": layers})
    return runs


def _attr(value: Any) -> Any:
    if isinstance(value, np.ndarray) and value.dtype.kind in "OSU":
        return [str(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value

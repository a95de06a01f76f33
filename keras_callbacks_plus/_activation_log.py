"""The HDF5 and TensorBoard outputs of ActivationLogger, and `read_activation_log`.

An HDF5 log holds one group per run (each `fit` adds one), in it one group
per phase with a dataset per statistic: one row per logged epoch and one
column per logged output (`mean` is `(epochs, outputs)`, `histogram`
`(epochs, outputs, bins)`), so a logged epoch is a dozen writes whatever the
number of layers. Bin edges are `bin_start + j * bin_width` per epoch and
output (`_activation_sketch`). Logs written before (format 1: a group per
layer, edges fixed per run) are still read.

The writer reopens the file for each epoch, so that another process can read
it while training runs. For a URL (`s3://...`, `memory://...`) it writes a
local copy and uploads it after each logged epoch through `_storage`, which
replaces the object whole: readers see the previous epoch's file or this
one's.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping, NamedTuple

import h5py
import numpy as np

from keras_callbacks_plus import _storage

STATISTICS = ("mean", "std", "min", "max", "zero_frac", "nonfinite_frac")
_FORMAT = "keras_callbacks_plus.activation_log"
_FORMAT_VERSION = 2

# How long a write waits for a reader that holds the HDF5 file (HDF5 locks it).
LOCK_WAIT_S = 2.0
LOCK_WAIT_AT_END_S = 10.0


class Record(NamedTuple):
    """The statistics of one output in one phase at one logged epoch."""

    phase: str
    name: str
    shape: tuple
    result: dict[str, Any]  # STATISTICS, count, percentiles, histogram, underflow, overflow
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


class H5Log:
    """One run of an HDF5 activation log, written by reopening the file per epoch.

    Closing the file after each epoch flushes it and releases HDF5's lock,
    so another process can read it while training runs. Records that cannot
    be written because a reader holds the file stay pending until the next
    write. On an object store the file is a local copy, uploaded after each
    write.

    Attributes:
        run: the run's group name (`run_000`, ...).
        last_edges: `{phase: (outputs, bins + 1)}` of the last logged epoch
            of a resumed run, else `{}`.
    """

    def __init__(self, path: str | os.PathLike, run_attrs: dict[str, Any], resume: str | None,
                 storage: _storage.Storage | None = None):
        self.path = os.fspath(path)
        self._storage = storage if storage is not None and not storage.atomic_rename else None
        self.layer_attrs = {k: run_attrs[k] for k in ("backend", "versions", "percentile_levels")}
        self.layers = list(run_attrs["layers"])
        self.pending: list[tuple[int, list]] = []
        self.last_edges: dict[str, np.ndarray] = {}
        self._warned = False
        self._local = self.path
        if self._storage is not None:
            self._local = self._download()
        else:
            parent = Path(self.path).parent
            if not parent.is_dir():
                raise ValueError(
                    f"Invalid value for argument h5_path. Its folder {str(parent)!r} "
                    f"does not exist. Received: h5_path={self.path!r}"
                )
        try:
            with _open_h5(self._local, "a", LOCK_WAIT_S) as f:
                self.run = self._start(f, run_attrs, resume)
        except ValueError:
            raise
        except OSError as error:
            raise ValueError(
                f"Invalid value for argument h5_path. Cannot write the activation "
                f"log {self.path!r}: {error}"
            ) from error
        self._upload()

    def _download(self) -> str:
        """A local working copy of the log at the URL: the stored file, or a new one."""
        self._folder = tempfile.mkdtemp(prefix="kcp-activations-")
        local = os.path.join(self._folder, self._storage.name(self.path) or "activations.h5")
        self._storage.check_writable(self._storage.parent(self.path))
        if self._storage.info(self.path) is not None:
            with self._storage.local_copy(self.path) as stored:
                shutil.copyfile(stored, local)
        return local

    def _start(self, f: h5py.File, run_attrs: dict[str, Any], resume: str | None) -> str:
        if f.attrs.get("format") != _FORMAT:
            if len(f) or len(f.attrs):
                raise ValueError(
                    f"Invalid value for argument h5_path. {self.path!r} is an HDF5 file but "
                    "not an activation log; ActivationLogger never overwrites a file. "
                    "Choose another path."
                )
            f.attrs["format"] = _FORMAT
        f.attrs["format_version"] = _FORMAT_VERSION
        if resume is not None and resume in f and self._continues(f[resume], run_attrs):
            for phase in run_attrs["phases"]:
                group = f[resume].get(phase)
                if group is not None and group["epoch"].shape[0]:
                    self.last_edges[phase] = _edges(group, -1)
            return resume
        taken = [int(k[4:]) for k in f if k.startswith("run_") and k[4:].isdigit()]
        run = f"run_{max(taken, default=-1) + 1:03d}"
        group = f.create_group(run)
        for key, value in run_attrs.items():
            group.attrs[key] = value
        group.attrs["format_version"] = _FORMAT_VERSION
        return run

    @staticmethod
    def _continues(group: h5py.Group, run_attrs: dict[str, Any]) -> bool:
        """Whether a resumed fit can append to `group`: same layout, layers and bins."""
        return (group.attrs.get("format_version") == _FORMAT_VERSION
                and [str(v) for v in group.attrs.get("layers", [])] == list(run_attrs["layers"])
                and int(group.attrs.get("bins", -1)) == int(run_attrs["bins"]))

    def append(self, epoch: int, records: list[Record]) -> None:
        self.pending.append((epoch, records))
        self.flush(LOCK_WAIT_S)

    def flush(self, wait: float) -> None:
        """Writes the pending records; keeps them if a reader holds the file longer than `wait`."""
        if not self.pending:
            return
        try:
            with _open_h5(self._local, "a", wait) as f:
                run = f[self.run]
                for epoch, records in self.pending:
                    by_phase: dict[str, list[Record]] = {}
                    for record in records:
                        by_phase.setdefault(record.phase, []).append(record)
                    for phase, rows in by_phase.items():
                        self._write(run, phase, epoch, rows)
            self.pending.clear()
        except BlockingIOError:
            if not self._warned:
                warnings.warn(
                    f"ActivationLogger: {self.path!r} is held open by another "
                    "process; its records are kept and written at the next epoch. "
                    "Read it with read_activation_log(), which closes it quickly.",
                    stacklevel=3,
                )
                self._warned = True
            return
        self._upload()

    def _upload(self) -> None:
        if self._storage is not None:
            self._storage.write_file(self.path, self._local)

    def close(self) -> None:
        """Removes the local copy of a log stored at a URL."""
        if self._storage is not None:
            shutil.rmtree(self._folder, ignore_errors=True)

    def _write(self, run: h5py.Group, phase: str, epoch: int, records: list[Record]) -> None:
        if phase not in run:
            self._create(run, phase, records)
        group = run[phase]
        results = [r.result for r in records]
        edges = np.stack([r.edges for r in records])
        values = {
            "epoch": epoch,
            **{field: [r[field] for r in results]
               for field in ("count", *STATISTICS, "percentiles", "histogram", "underflow",
                             "overflow")},
            "bin_start": edges[:, 0],
            "bin_width": edges[:, 1] - edges[:, 0],
        }
        row = group["epoch"].shape[0]
        for field, dataset in group.items():
            dataset.resize(row + 1, axis=0)
            dataset[row] = values[field]

    def _create(self, run: h5py.Group, phase: str, records: list[Record]) -> None:
        group = run.create_group(phase)
        group.attrs.update(self.layer_attrs)
        group.attrs["layer_paths"] = [r.name for r in records]
        group.attrs["output_shapes"] = json.dumps(
            [[-1 if d is None else int(d) for d in r.shape] for r in records]
        )
        outputs, bins = len(records), len(records[0].edges) - 1
        levels = len(self.layer_attrs["percentile_levels"])
        for field, dtype, tail in (
            ("epoch", np.int64, ()),
            ("count", np.int64, (outputs,)),
            *((s, np.float64, (outputs,)) for s in STATISTICS),
            ("percentiles", np.float64, (outputs, levels)),
            ("histogram", np.int64, (outputs, bins)),
            ("underflow", np.int64, (outputs,)),
            ("overflow", np.int64, (outputs,)),
            ("bin_start", np.float64, (outputs,)),
            ("bin_width", np.float64, (outputs,)),
        ):
            # A chunk per epoch for the histograms, 64 epochs for the rest.
            rows = 1 if field == "histogram" else 64
            group.create_dataset(field, shape=(0, *tail), maxshape=(None, *tail), dtype=dtype,
                                 chunks=(rows, *tail))


def _edges(group: h5py.Group, row: int | slice) -> np.ndarray:
    """Bin edges of one epoch `(outputs, bins + 1)`, or of all `(epochs, outputs, bins + 1)`."""
    bins = group["histogram"].shape[-1]
    start, width = group["bin_start"][row], group["bin_width"][row]
    return start[..., None] + np.arange(bins + 1) * width[..., None]


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


@contextlib.contextmanager
def _local_log(path: str | os.PathLike, storage_options: Mapping[str, Any] | None) -> Iterator[str]:
    storage = _storage.open_storage(path, storage_options, owner="read_activation_log",
                                    argument="path")
    if storage.atomic_rename:  # a local file: read in place
        yield os.fspath(path)
        return
    with storage.local_copy(os.fspath(path)) as local:
        yield local


def read_activation_log(path: str | os.PathLike, *, wait: float = 10.0,
                        storage_options: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """Reads an HDF5 activation log written by `ActivationLogger`.

    Safe while training writes to it: the file is opened briefly, waiting up
    to `wait` seconds if the writer holds it at that moment. A URL is
    downloaded first (its last uploaded epoch).

    Args:
        path: the `.h5` file, or its URL (`s3://bucket/run/activations.h5`).
        wait: seconds to wait for the writer's lock. Defaults to 10.
        storage_options: for a URL, the fsspec file system's options
            (credentials, `client_kwargs={"endpoint_url": ...}`). Defaults to
            `None`.

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
          `histogram` (`(E, bins)`), `underflow`, `overflow` (`(E,)`),
          `bin_edges` (`(E, bins + 1)`: each epoch's edges); and
          `percentile_levels` (`(P,)`), `output_shape` (tuple, `None` for
          the batch dimension).

    Raises:
        ValueError: the file is not an activation log.
        ImportError: a URL whose fsspec package is not installed.
    """
    with _local_log(path, storage_options) as local, _open_h5(local, "r", wait) as f:
        if f.attrs.get("format") != _FORMAT:
            raise ValueError(f"{str(path)!r} is not an activation log written by ActivationLogger.")
        runs = []
        for name in sorted(k for k in f if k.startswith("run_")):
            group = f[name]
            attrs = {k: _attr(v) for k, v in group.attrs.items()}
            attrs.pop("format_version", None)
            if "versions" in attrs:
                attrs["versions"] = json.loads(attrs["versions"])
            read = _read_phase if group.attrs.get("format_version") == 2 else _read_phase_v1
            layers: dict[str, dict[str, Any]] = {}
            for phase in attrs.get("phases", sorted(group)):
                if phase in group:
                    layers[phase] = read(group[phase], attrs.get("layers", []))
            runs.append({"name": name, "attrs": attrs, "layers": layers})
    return runs


def _read_phase(group: h5py.Group, _order) -> dict[str, dict[str, Any]]:
    data = {field: dataset[()] for field, dataset in group.items()}
    edges = _edges(group, slice(None))
    levels = np.asarray(group.attrs["percentile_levels"])
    shapes = json.loads(group.attrs["output_shapes"])
    layers = {}
    for i, name in enumerate(str(v) for v in group.attrs["layer_paths"]):
        record = {"epoch": data["epoch"]}
        for field, values in data.items():
            if field not in ("epoch", "bin_start", "bin_width"):
                record[field] = values[:, i]
        record["bin_edges"] = edges[:, i]
        record["percentile_levels"] = levels
        record["output_shape"] = tuple(None if d < 0 else int(d) for d in shapes[i])
        layers[name] = record
    return layers


def _read_phase_v1(group: h5py.Group, order_names) -> dict[str, dict[str, Any]]:
    """A phase of a format-1 run: a group per layer, edges fixed for the run."""
    order = {path: i for i, path in enumerate(order_names)}
    found = sorted(group.values(), key=lambda g: order.get(str(g.attrs["layer_path"]), len(order)))
    layers = {}
    for layer in found:
        record = {field: dataset[()] for field, dataset in layer.items()}
        epochs = len(record["epoch"])
        record["bin_edges"] = np.tile(np.asarray(layer.attrs["bin_edges"]), (epochs, 1))
        record["percentile_levels"] = np.asarray(layer.attrs["percentile_levels"])
        record["output_shape"] = tuple(
            None if d < 0 else int(d) for d in layer.attrs["output_shape"]
        )
        layers[str(layer.attrs["layer_path"])] = record
    return layers


def _attr(value: Any) -> Any:
    if isinstance(value, np.ndarray) and value.dtype.kind in "OSU":
        return [str(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value

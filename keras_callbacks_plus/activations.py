"""Statistics of intermediate activations, per epoch, without disturbing training.

Keras 2 users read intermediate outputs with
`K.function([model.input, K.learning_phase()], [layer.output])`, evaluated in
learning phase 0 (test) or 1 (train). Keras 3 removed both, and calling a
model with `training=True` updates BatchNormalization moving statistics and
advances dropout seeds. Here the chosen layers are evaluated with
`Model.stateless_call`: the model's variable values go in, the updates come
back and are dropped, so nothing the model holds changes (`_extract`).

* `intermediate_outputs(model, layers, x, training=False)`: the outputs of
  some layers as NumPy arrays (the successor of the `K.function` recipe).
* `ActivationLogger`: a callback that streams a fixed probe through the chosen
  layers every few epochs, in test and/or train phase, and records
  statistics and histograms to HDF5, TensorBoard and the epoch logs.
* `read_activation_log(path)`: an HDF5 log as NumPy arrays.

Statistics stream over the probe's batches; the host keeps a fixed-size
summary per layer and phase, so memory does not grow with the probe (beyond
one batch) or with the epochs. Min, max, the zero and non-finite counts are
exact; mean and standard deviation are merged in float64 from float32 sums
over rows of 1024 values; percentiles come from a quantile sketch, within
0.39% of NumPy's; percentiles and histogram count a sample of at most
`sample_values` values per output and batch (`_activation_stats`,
`_activation_sketch`). Histogram edges are chosen per logged epoch from the
sketch and kept while the values stay inside them.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import keras
import numpy as np

from keras_callbacks_plus import _storage, distribute
from keras_callbacks_plus._activation_log import (
    LOCK_WAIT_AT_END_S,
    STATISTICS,
    H5Log,
    Record,
    TensorBoardWriter,
    read_activation_log,
    versions,
)
from keras_callbacks_plus._activation_sketch import MAX_BINS, choose_edges
from keras_callbacks_plus._base import PlusCallback
from keras_callbacks_plus._validate import check_int, invalid, is_int
from keras_callbacks_plus._extract import (
    Evaluator,
    check_fits,
    evaluator,
    intermediate_outputs,
    layer_paths,
    output_paths,
)

__all__ = ["ActivationLogger", "intermediate_outputs", "layer_paths", "read_activation_log"]

logger = logging.getLogger(__name__)

PHASES = ("test", "train")
_DEFAULT_SCALARS = ("mean", "std", "zero_frac", "nonfinite_frac")


# ----------------------------------------------------------------- probe


class _Probe:
    """The fixed inputs streamed through the layers, one batch at a time."""

    def __init__(self, probe: Any, batch_size: int):
        self.batch_size = batch_size
        self.kind = "arrays"
        if isinstance(probe, keras.utils.PyDataset):
            if probe.num_batches is None:
                raise ValueError(
                    "Invalid value for argument probe. Expected a PyDataset with a "
                    "bounded number of batches (num_batches is None)."
                )
            self.kind, self.data = "pydataset", probe
        elif hasattr(probe, "cardinality") and hasattr(probe, "element_spec"):
            if int(probe.cardinality()) == -1:  # tf.data.INFINITE_CARDINALITY
                raise ValueError(
                    "Invalid value for argument probe. Expected a dataset with a "
                    "bounded number of batches; this one repeats forever. Use "
                    "dataset.take(n)."
                )
            self.kind, self.data = "dataset", probe
        elif not (isinstance(probe, (list, tuple, dict)) or hasattr(probe, "shape")):
            raise ValueError(
                "Invalid value for argument probe. Expected an array, a tuple or "
                "dict of arrays (multi-input models), a tf.data.Dataset or a "
                "keras.utils.PyDataset with a bounded number of batches; the same "
                f"probe is used every epoch. Received: probe of type {type(probe).__name__}"
            )
        else:
            self.data = keras.tree.map_structure(np.asarray, probe)
            leaves = keras.tree.flatten(self.data)
            rows = {leaf.shape[0] if leaf.ndim else None for leaf in leaves}
            if not leaves or None in rows or len(rows) != 1 or 0 in rows:
                raise ValueError(
                    "Invalid value for argument probe. Expected arrays with the "
                    "same, non-zero number of samples along their first axis. "
                    f"Received shapes: {[leaf.shape for leaf in leaves]}"
                )
            self.samples = rows.pop()

    def batches(self) -> Iterator[Any]:
        if self.kind == "arrays":
            for start in range(0, self.samples, self.batch_size):
                yield keras.tree.map_structure(
                    lambda a: a[start:start + self.batch_size], self.data
                )
            return
        items = (
            (self.data[i] for i in range(self.data.num_batches))
            if self.kind == "pydataset"
            else iter(self.data)
        )
        for item in items:
            x, _, _ = keras.utils.unpack_x_y_sample_weight(item)
            yield keras.tree.map_structure(np.asarray, x)

    def first(self) -> Any:
        for x in self.batches():
            return x
        raise ValueError("Invalid value for argument probe. It yields no batch.")

    def describe(self) -> str:
        if self.kind == "arrays":
            shapes = [tuple(leaf.shape) for leaf in keras.tree.flatten(self.data)]
            return f"arrays {shapes} in batches of {self.batch_size}"
        return type(self.data).__name__


# -------------------------------------------------------------- callback


def _level_name(level: float) -> str:
    return f"p{level:g}"


class ActivationLogger(PlusCallback):
    """Logs statistics of intermediate activations every few epochs, with no effect on training.

    At the end of every `every`-th epoch, the probe goes through the chosen
    layers, batch by batch, in each phase: `"test"` (dropout off,
    BatchNormalization with its moving statistics; learning phase 0 in
    Keras 2) and/or `"train"` (dropout on, batch statistics; learning phase
    1). The layers run through `stateless_call` and their updates are
    dropped: no weight, moving statistic, optimizer variable or seed changes,
    so training with the logger gives the same weights as without it.

    Per layer and phase it records the mean, standard deviation, min, max,
    `percentiles`, the fraction of exact zeros (dead units) and of non-finite
    values, and a histogram over `bins` bins. Mean, std, min, max and
    percentiles are over the finite values, the two fractions over all
    values. Percentiles come from a quantile sketch, within 0.39% of the
    exact values (module docstring).

    Histogram edges follow the distribution: at the first logged epoch they
    cover the sampled 0.1 to 99.9 percentiles plus 10% of that range on each
    side, so a few outliers do not squeeze the bins;
    later epochs keep them, so epochs compare, as long as at most 1% of the
    values fall outside them and the distribution has not shrunk to a
    quarter of their width, else they are chosen again at that epoch. So a
    layer whose scale grows tenfold still has at most about 1% of its values
    outside the edges at every epoch. Values outside are counted as underflow
    and overflow; each epoch's edges are logged. Edges are multiples of a
    power of two (or of three times one) in which the sketch's buckets nest,
    so the histogram counts the sampled values exactly, in half-open bins;
    the price is resolution: a bin is at least 1/256 of the largest edge's
    magnitude wide, and bins span up to 1.5 times a tight fit.

    Percentiles and the histogram are computed from a systematic sample of
    at most `sample_values` values of each output per probe batch (every
    k-th value; all of them when the output is smaller); the other
    statistics use every value. On a CPU, counting every value costs
    several forward passes; 65536 values per batch put percentiles within
    about 0.1 percentage point of their rank. The histogram then counts
    the sampled values (normalise by its sum, underflow and overflow
    included); `sample_values=None` counts every value.

    Cost: per logged epoch and phase, one pass of the probe through the
    model that keeps the chosen outputs, then one small program reduces
    them on the device (on TensorFlow inside the same graph, as one XLA
    cluster). Train begin compiles the forward pass once per phase (on
    TensorFlow a graph without XLA) and the statistics once per batch
    shape: seconds, also for 150 layers.
    `benchmarks/activation_logger_cost.py` measures both.

    Records go to an HDF5 file (`h5_path`, a path or a URL such as
    `s3://bucket/run/activations.h5`; read it with
    `read_activation_log`, draw it with `python -m keras_callbacks_plus
    report`), to TensorBoard (`tensorboard_dir`, histograms
    `activations_<phase>/<layer>`) and, with `log_scalars`, into the epoch
    logs as `act/<layer>/<statistic>` (test phase) and
    `act_train/<layer>/<statistic>` (train phase), for CSVLogger or early
    stopping. Epochs are counted from 0, as in `History.epoch`.

    With a `data_parallel` twin, this worker's replica of the weights is
    evaluated on one device. With several workers only the chief writes; the
    others evaluate (locally) only when `log_scalars` asks for the values, so
    that all workers see the same logs.

    Args:
        probe: the fixed inputs: an array, a tuple or dict of arrays
            (multi-input models), a `tf.data.Dataset` or a
            `keras.utils.PyDataset` with a bounded number of batches (targets
            in its batches are ignored). The same probe every epoch.
        layers: layer names or glob patterns, matched at any depth
            (`"conv*"`), paths from the top (`"backbone/block_3*"`) or
            `"all"` (the rules of every callback here); a nested model named
            by a pattern gives its own output. Only layers with a symbolic
            output count (not those inside a subclassed model). Defaults to
            `None`: every layer with an output but Input layers and nested
            models themselves.
        phases: any of `"test"` and `"train"`. Defaults to `("test",)`.
        every: log every this many epochs (epochs `every - 1`, `2 * every -
            1`, ...). Defaults to 1.
        percentiles: percentiles to record, in [0, 100]. Defaults to
            `(1, 50, 99)`.
        bins: number of histogram bins, from 2 to 512. Defaults to 64.
        h5_path: HDF5 file to append to; an existing log gets a new run,
            anything else there is an error. A local path is written in
            place (readable by another process while training runs); an
            fsspec URL (`s3://...`, `gs://...`, `memory://...`) through a
            local copy, uploaded whole after each logged epoch. Defaults to
            `None`: no file.
        storage_options: for an `h5_path` URL, the fsspec file system's
            options (credentials, `client_kwargs={"endpoint_url": ...}`).
            Defaults to `None`.
        tensorboard_dir: folder for TensorBoard histograms; needs TensorFlow
            importable (any backend), else a warning and no histograms.
            Defaults to `None`.
        log_scalars: `True` for the statistics `mean`, `std`, `zero_frac`
            and `nonfinite_frac` in the epoch logs, or a list of statistic
            names (also `min`, `max`, `p<level>` such as `p99`). Defaults to
            `False`.
        batch_size: rows per batch for an array probe. Defaults to 64:
            one call for a probe of 64, where two of 32 cost more than a
            forward pass of 64 (TensorFlow, MobileNetV3Small: ~4.2 against
            ~3.0 passes per phase). Each batch holds every logged output
            at once: lower it for large models.
        sample_values: at most this many values of each output per probe
            batch go into the percentiles and the histogram; `None` for
            all. Defaults to 65536.
        verbose: 1 to print a line per logged epoch. Defaults to 0.

    Raises:
        ImportError: an `h5_path` URL whose fsspec package (e.g. s3fs) is
            not installed (in the constructor).
        ValueError: bad arguments (in the constructor); at train begin, an
            unknown layer (the message lists close matches and the available
            ones), a probe
            that does not fit the model's inputs, or an `h5_path` that cannot
            be written.
        PermissionError: at train begin, an `h5_path` URL that cannot be
            written (missing bucket, credentials).

    Example:

    ```python
    logger = ActivationLogger(x_val[:256], layers=["conv*", "dense"],
                              phases=("test", "train"), h5_path="activations.h5")
    model.fit(x, y, epochs=10, callbacks=[logger])
    runs = read_activation_log("activations.h5")
    runs[-1]["layers"]["test"]["dense"]["zero_frac"]  # one value per epoch
    ```
    """

    def __init__(
        self,
        probe: Any,
        *,
        layers: str | Sequence[str] | None = None,
        phases: Sequence[str] = ("test",),
        every: int = 1,
        percentiles: Sequence[float] = (1, 50, 99),
        bins: int = 64,
        h5_path: str | os.PathLike | None = None,
        storage_options: Mapping[str, Any] | None = None,
        tensorboard_dir: str | os.PathLike | None = None,
        log_scalars: bool | Sequence[str] = False,
        batch_size: int = 64,
        sample_values: int | None = 65536,
        verbose: int = 0,
    ):
        super().__init__(verbose=verbose)
        self.every = check_int("every", every, 1)
        if not is_int(bins, 2) or bins > MAX_BINS:
            # The sketch behind the histograms resolves no finer.
            raise invalid("bins", f"an int in [2, {MAX_BINS}]", bins)
        self.bins = int(bins)
        self.sample_values = check_int("sample_values", sample_values, 1, allow_none=True)
        self.batch_size = check_int("batch_size", batch_size, 1)
        phases = (phases,) if isinstance(phases, str) else tuple(phases)
        if not phases or any(p not in PHASES for p in phases) or len(set(phases)) != len(phases):
            raise invalid("phases", f"a non-empty list of distinct phases among {PHASES}", phases)
        self.phases = phases
        try:
            levels = tuple(float(p) for p in percentiles)
        except (TypeError, ValueError):
            levels = (math.nan,)
        if not all(0.0 <= p <= 100.0 for p in levels):
            raise invalid("percentiles", "numbers in [0, 100]", percentiles)
        self.percentiles = levels
        if layers is not None and not (
            isinstance(layers, str) or all(isinstance(p, str) for p in layers)
        ) or layers == []:
            raise invalid("layers", "None, a layer name or pattern, or a non-empty list of them",
                          layers)
        self.layers = layers
        scalar_names = (*STATISTICS, *(_level_name(p) for p in levels))
        if log_scalars is True:
            self.log_scalars: tuple[str, ...] = _DEFAULT_SCALARS
        elif log_scalars is False or log_scalars is None:
            self.log_scalars = ()
        else:
            names = (log_scalars,) if isinstance(log_scalars, str) else tuple(log_scalars)
            unknown = [n for n in names if n not in scalar_names]
            if unknown or not names:
                raise invalid("log_scalars",
                              f"True, False or a list of statistics among {scalar_names}",
                              log_scalars)
            self.log_scalars = names
        self.h5_path: Path | str | None = None
        self._storage: _storage.Storage | None = None
        if h5_path is not None:
            self._storage = _storage.open_storage(h5_path, storage_options,
                                                  owner="ActivationLogger", argument="h5_path")
            self.h5_path = (Path(os.fspath(h5_path).removeprefix("file://"))
                            if self._storage.atomic_rename else os.fspath(h5_path))
        self.tensorboard_dir = None if tensorboard_dir is None else Path(tensorboard_dir)
        self._probe = _Probe(probe, self.batch_size)
        self._restored: dict[str, Any] = {}
        self._reset()

    def _reset(self) -> None:
        self._paths: list[str] = []
        self._evaluator: Evaluator | None = None
        # Each phase's edges of the last logged epoch, `(outputs, bins + 1)`.
        self._edges: dict[str, np.ndarray] = {}
        self._h5: H5Log | None = None
        self._tensorboard: TensorBoardWriter | None = None
        self._evaluates = False
        self._writes = False
        self._run: str | None = None

    # -- set-up

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        self._reset()
        error = None
        try:
            self._set_up()
        except Exception as caught:  # re-raised below, after the workers agree
            error = caught
        # Another worker's failure must stop this one too, or it would wait
        # in the first collective of training forever.
        if distribute.num_workers() > 1 and distribute.any_worker(error is not None):
            if error is None:
                raise RuntimeError("ActivationLogger failed at train begin on another worker.")
        if error is not None:
            raise error

    def _set_up(self) -> None:
        model = self.model
        self._paths = output_paths(model, self.layers)
        first = self._probe.first()
        check_fits(model, first)
        self._writes = distribute.is_chief()
        self._evaluates = self._writes or bool(self.log_scalars)
        restored, self._restored = self._restored, {}
        if not self._evaluates:
            return
        self._evaluator = evaluator(model, self._paths)
        # Compile and run once now, so that a layer that cannot run
        # statelessly fails before the first step rather than after an epoch.
        for phase in self.phases:
            self._evaluator.statistics(model, [first], phase == "train", self.sample_values)
        if not self._writes:
            return
        if self.h5_path is not None:
            self._h5 = H5Log(self.h5_path, self._run_attrs(), restored.get("run"), self._storage)
            self._run = self._h5.run
            self._edges = dict(self._h5.last_edges)
        if self.tensorboard_dir is not None:
            try:
                self._tensorboard = TensorBoardWriter(self.tensorboard_dir)
            except ImportError:
                warnings.warn(
                    "ActivationLogger: tensorboard_dir is set but TensorFlow is not "
                    "installed, so no TensorBoard histograms are written "
                    "(pip install tensorflow-cpu). The other outputs are unaffected.",
                    stacklevel=2,
                )

    def _run_attrs(self) -> dict[str, Any]:
        return {
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "model": self.model.name,
            "backend": keras.backend.backend(),
            "versions": json.dumps(versions()),
            "phases": list(self.phases),
            "layers": list(self._evaluator.names),
            "percentile_levels": np.asarray(self.percentiles, np.float64),
            "bins": self.bins,
            "every": self.every,
            "sample_values": 0 if self.sample_values is None else self.sample_values,
            "probe": self._probe.describe(),
        }

    # -- logging

    def on_epoch_end(self, epoch, logs=None):
        if not self._evaluates or (epoch + 1) % self.every or self.preempted:
            return
        start = time.perf_counter()
        model, evaluator, records = self.model, self._evaluator, []
        for phase in self.phases:
            stats = evaluator.statistics(model, self._probe.batches(), phase == "train",
                                         self.sample_values)
            sketch = stats.sketched()
            levels = sketch.percentiles(stats.low, stats.high, self.percentiles)
            edges = choose_edges(sketch, stats.low, stats.high, self.bins,
                                 self._edges.get(phase))
            self._edges[phase] = edges
            histogram, underflow, overflow = sketch.histograms(edges)
            for i, (name, spec) in enumerate(zip(evaluator.names, evaluator.extractor.outputs)):
                result = stats.result(i, levels[i])
                result.update(histogram=histogram[i], underflow=int(underflow[i]),
                              overflow=int(overflow[i]))
                records.append(Record(phase, name, tuple(spec.shape), result, edges[i]))
        if logs is not None and self.log_scalars:
            logs.update(self._scalars(records))
        if self._writes:
            if self._h5 is not None:
                self._h5.append(epoch, records)
            if self._tensorboard is not None:
                self._tensorboard.write(epoch, records)
        self._say(
            f"Epoch {epoch + 1}: ActivationLogger recorded {len(evaluator.names)} outputs "
            f"({', '.join(self.phases)}) in {time.perf_counter() - start:.2f}s"
            + (f" to {self.h5_path}" if self._h5 is not None else "")
        )

    def _scalars(self, records: list[Record]) -> dict[str, float]:
        scalars = {}
        for phase, name, _, result, _ in records:
            prefix = "act" if phase == "test" else f"act_{phase}"
            levels = zip(self.percentiles, result["percentiles"])
            values = {**{s: result[s] for s in STATISTICS},
                      **{_level_name(p): v for p, v in levels}}
            for stat in self.log_scalars:
                scalars[f"{prefix}/{name}/{stat}"] = float(values[stat])
        return scalars

    def on_train_end(self, logs=None):
        try:
            if self._h5 is not None and self._h5.pending:
                self._h5.flush(LOCK_WAIT_AT_END_S)
                if self._h5.pending:
                    warnings.warn(
                        f"ActivationLogger: {len(self._h5.pending)} logged epoch(s) could "
                        f"not be written to {str(self.h5_path)!r}: another process kept "
                        "it open.",
                        stacklevel=2,
                    )
            if self._tensorboard is not None:
                self._tensorboard.close()
        finally:
            if self._h5 is not None:
                self._h5.close()
            super().on_train_end(logs)

    # -- state

    def get_state(self) -> dict[str, Any]:
        """The HDF5 run a resumed fit continues; small, with no side effects.

        The edges it continues with are read back from that run's last
        logged epoch, so no array goes into the state.
        """
        return {"run": self._run}

    def set_state(self, state: dict[str, Any], arrays=None, directory: str | None = None) -> None:
        """Restores `get_state()`: the next fit appends to the same run, with its last edges.

        `arrays` and `directory` are accepted and ignored (the state needs
        neither); states of earlier versions, which also held the edges,
        load too.
        """
        self._restored = {"run": state.get("run")}

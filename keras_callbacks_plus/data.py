"""HDF5Sequence: a PyDataset over HDF5 datasets for data larger than memory."""

from __future__ import annotations

import math
import os
from typing import Any, Sequence

import h5py
import keras
import numpy as np

from keras_callbacks_plus._validate import check_int

__all__ = ["HDF5Sequence"]


def _keys(spec: str | Sequence[str] | None) -> list[str]:
    if spec is None:
        return []
    return [spec] if isinstance(spec, str) else list(spec)


def _dataset_names(f: h5py.File) -> list[str]:
    names = []
    f.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
    return names


class HDF5Sequence(keras.utils.PyDataset):
    """Batches read from HDF5 datasets, one batch of rows at a time.

    The successor of Keras 2's `HDF5Matrix` and of hand-written
    `fit_generator` generators: only the rows of the batch being asked for
    are read, so the file can be far larger than memory. Works as `x` and as
    `validation_data` of `fit`, with `workers` and `use_multiprocessing`
    (each process opens its own file handle).

    Shuffling changes the order of batches every epoch and the order of rows
    within each batch, while each batch is still one contiguous slice of the
    file: fast on chunked and compressed files, where reading rows in random
    order would decompress a chunk per row. The order of an epoch depends only
    on `seed` and the epoch's number, so `set_epoch(epoch)` (which `resume()`
    calls) gives a resumed run the order the interrupted one had.

    Args:
        path: the HDF5 file.
        x: name of the input dataset, or a list of names for a model with
            several inputs. Defaults to `"x"`.
        y: name of the target dataset, a list for several outputs, or `None`
            (inference). Defaults to `"y"`.
        batch_size: rows per batch; the last batch may be smaller. Defaults
            to `32`.
        shuffle: shuffle as described above, anew every epoch. Defaults to
            `True`.
        sample_weight: name of a dataset of per-row weights. Defaults to
            `None`.
        start: first row used. Defaults to `0`.
        stop: one past the last row used. Defaults to `None`: the end. With
            `start`, this splits one file into training and validation sets
            without copying.
        seed: seed of the shuffling. Defaults to `None`: a random one (then a
            resumed run in another process shuffles differently).
        **pydataset_kwargs: `workers`, `use_multiprocessing`,
            `max_queue_size` of `keras.utils.PyDataset`.

    Raises:
        ValueError: a missing dataset (the message lists those in the file),
            datasets of different lengths, `batch_size < 1`, or an empty range.

    Example:

    ```python
    train = HDF5Sequence("data.h5", x="images", y="labels", batch_size=64, stop=50_000)
    val = HDF5Sequence("data.h5", x="images", y="labels", batch_size=256, start=50_000,
                       shuffle=False)
    model.fit(train, validation_data=val, epochs=10)
    ```
    """

    def __init__(
        self,
        path: str | os.PathLike,
        x: str | Sequence[str] = "x",
        y: str | Sequence[str] | None = "y",
        batch_size: int = 32,
        shuffle: bool = True,
        sample_weight: str | None = None,
        start: int = 0,
        stop: int | None = None,
        *,
        seed: int | None = None,
        **pydataset_kwargs: Any,
    ):
        super().__init__(**pydataset_kwargs)
        check_int("batch_size", batch_size, 1)
        self.path = os.fspath(path)
        self.x_keys, self.y_keys = _keys(x), _keys(y)
        if not self.x_keys:
            raise ValueError(f"Invalid value for argument x. Expected a dataset name. Received: x={x!r}")
        self._multi_x = not isinstance(x, str)
        self._multi_y = y is not None and not isinstance(y, str)
        self.sample_weight = sample_weight
        self.batch_size = batch_size
        self.shuffle = shuffle
        with h5py.File(self.path, "r") as f:
            available = _dataset_names(f)
            keys = self.x_keys + self.y_keys + _keys(sample_weight)
            for key in keys:
                if key not in available:
                    raise ValueError(
                        f"Dataset {key!r} not found in {self.path}. Available datasets: "
                        f"{', '.join(available) or '(none)'}."
                    )
            lengths = {key: len(f[key]) for key in keys}
        if len(set(lengths.values())) > 1:
            raise ValueError(
                "The datasets of an HDF5Sequence must have the same number of rows. "
                f"Received: {lengths}"
            )
        rows = next(iter(lengths.values()))
        self.start = start
        self.stop = rows if stop is None else stop
        if not 0 <= self.start < self.stop <= rows:
            raise ValueError(
                f"Invalid row range start={start!r}, stop={stop!r} for {rows} rows in "
                f"{self.path}: expected 0 <= start < stop <= {rows}."
            )
        self.seed = int(np.random.SeedSequence().entropy % 2**63) if seed is None else int(seed)
        self.epoch = 0
        self._new_epoch()
        self._file: h5py.File | None = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return math.ceil((self.stop - self.start) / self.batch_size)

    @property
    def num_rows(self) -> int:
        return self.stop - self.start

    def _new_epoch(self) -> None:
        rng = np.random.default_rng([self.seed, self.epoch])
        self._epoch_seed = int(rng.integers(2**31))
        self._order = rng.permutation(len(self)) if self.shuffle else np.arange(len(self))

    def set_epoch(self, epoch: int) -> None:
        """Gives the next epoch the order of epoch `epoch` (counted from 0, as `fit` counts)."""
        self.epoch = check_int("epoch", epoch, 0)
        self._new_epoch()

    def on_epoch_end(self) -> None:
        self.epoch += 1
        self._new_epoch()

    def _handle(self) -> h5py.File:
        # A handle cannot cross a fork or a pickle: each process opens its own.
        if self._file is None or self._pid != os.getpid():
            self._file = h5py.File(self.path, "r")
            self._pid = os.getpid()
        return self._file

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_file"] = None
        state["_pid"] = None
        return state

    def __getitem__(self, index: int):
        if not 0 <= index < len(self):
            raise IndexError(f"HDF5Sequence index {index} out of range [0, {len(self)}).")
        batch = int(self._order[index])
        lo = self.start + batch * self.batch_size
        hi = min(lo + self.batch_size, self.stop)
        f = self._handle()
        rows = None
        if self.shuffle:
            rows = np.random.default_rng([self._epoch_seed, batch]).permutation(hi - lo)

        def read(key):
            data = f[key][lo:hi]  # one contiguous slice
            return data if rows is None else data[rows]

        x = [read(k) for k in self.x_keys]
        out: tuple = (x if self._multi_x else x[0],)
        if self.y_keys:
            y = [read(k) for k in self.y_keys]
            out += (y if self._multi_y else y[0],)
            if self.sample_weight is not None:
                out += (read(self.sample_weight),)
        return out

    def close(self) -> None:
        """Closes this process's file handle (reopened when read again)."""
        if self._file is not None:
            self._file.close()
            self._file = None

"""Tests of HDF5Sequence, on both backends."""

import multiprocessing
import pickle

import h5py
import keras
import numpy as np
import pytest
from helpers import build_tiny_model, make_tiny_data

from keras_callbacks_plus import HDF5Sequence


@pytest.fixture
def h5_file(tmp_path):
    x, y = make_tiny_data(100)
    path = tmp_path / "data.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("x", data=x, chunks=(16, 8))
        f.create_dataset("y", data=y)
        f.create_dataset("x2", data=x * 2)
        f.create_dataset("w", data=np.linspace(0.5, 1.5, 100, dtype="float32"))
        f.create_dataset("group/short", data=np.zeros(7))
    return path, x, y


def test_batches_are_the_rows_of_the_file(h5_file):
    path, x, y = h5_file
    seq = HDF5Sequence(path, batch_size=32, shuffle=False)
    assert len(seq) == 4
    bx, by = seq[1]
    np.testing.assert_array_equal(bx, x[32:64])
    np.testing.assert_array_equal(by, y[32:64])
    assert seq[3][0].shape == (4, 8)  # the last batch is the remainder
    with pytest.raises(IndexError):
        seq[4]


def test_several_inputs_and_sample_weight(h5_file):
    path, x, y = h5_file
    seq = HDF5Sequence(path, x=["x", "x2"], y="y", sample_weight="w", batch_size=10, shuffle=False)
    (bx, bx2), by, bw = seq[2]
    np.testing.assert_array_equal(bx2, 2 * x[20:30])
    np.testing.assert_allclose(bw, np.linspace(0.5, 1.5, 100)[20:30], rtol=1e-6)
    assert HDF5Sequence(path, y=None, shuffle=False)[0][0].shape == (32, 8)  # inference: x only


def test_shuffle_changes_order_every_epoch_and_reads_contiguous_slices(h5_file):
    path, x, _ = h5_file
    seq = HDF5Sequence(path, y=None, batch_size=10, seed=0)
    row_of = {tuple(row): i for i, row in enumerate(x)}
    epochs = []
    for _ in range(2):
        batches = [[row_of[tuple(r)] for r in seq[i][0]] for i in range(len(seq))]
        rows = [r for b in batches for r in b]
        assert sorted(rows) == list(range(100))  # every row exactly once
        for b in batches:  # one slice of the file per batch, shuffled inside
            assert sorted(b) == list(range(min(b), min(b) + len(b)))
        epochs.append(rows)
        seq.on_epoch_end()
    assert epochs[0] != epochs[1]
    assert [b[0] // 10 for b in [epochs[0][i:i + 10] for i in range(0, 100, 10)]] != list(range(10))


def test_order_of_an_epoch_depends_only_on_seed_and_epoch(h5_file):
    """What resume() relies on: set_epoch(k) gives epoch k's order, in any process."""
    path, _, _ = h5_file

    def order(seq):
        return [seq[i][0][0].tolist() for i in range(len(seq))]

    trained = HDF5Sequence(path, y=None, batch_size=10, seed=3)
    for _ in range(3):
        trained.on_epoch_end()
    resumed = HDF5Sequence(path, y=None, batch_size=10, seed=3)
    resumed.set_epoch(3)
    assert order(resumed) == order(trained) != order(HDF5Sequence(path, y=None, batch_size=10,
                                                                    seed=3))
    with pytest.raises(ValueError, match="Received: epoch=-1"):
        resumed.set_epoch(-1)


def test_start_stop_split_without_copying(h5_file):
    path, x, y = h5_file
    train = HDF5Sequence(path, batch_size=32, stop=80, shuffle=False)
    val = HDF5Sequence(path, batch_size=32, start=80, shuffle=False)
    assert (train.num_rows, val.num_rows) == (80, 20)
    np.testing.assert_array_equal(val[0][0], x[80:])


def test_fit_with_validation_learns(h5_file):
    path, _, _ = h5_file
    model = build_tiny_model()
    model.compile(optimizer=keras.optimizers.Adam(0.02), loss="sparse_categorical_crossentropy")
    train = HDF5Sequence(path, batch_size=16, stop=80, seed=1)
    val = HDF5Sequence(path, batch_size=20, start=80, shuffle=False)
    history = model.fit(train, validation_data=val, epochs=8, verbose=0)
    assert history.history["loss"][-1] < 0.8 * history.history["loss"][0]
    assert len(history.history["val_loss"]) == 8


@pytest.fixture
def spawned_workers():
    """Worker processes started by "spawn", as README's HDF5Sequence section advises: a process
    forked from one whose TensorFlow or JAX threads hold a lock can wait on it forever."""
    method = multiprocessing.get_start_method()
    multiprocessing.set_start_method("spawn", force=True)
    yield
    multiprocessing.set_start_method(method, force=True)


@pytest.mark.parametrize("use_multiprocessing", [False, True])
def test_workers(h5_file, use_multiprocessing, request):
    path, _, _ = h5_file
    if use_multiprocessing:
        request.getfixturevalue("spawned_workers")
    seq = HDF5Sequence(path, batch_size=16, workers=2, use_multiprocessing=use_multiprocessing,
                       seed=2)
    model = build_tiny_model()
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    history = model.fit(seq, epochs=2, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    clone = pickle.loads(pickle.dumps(seq))  # what a worker process receives
    assert clone._file is None
    np.testing.assert_array_equal(clone[0][0], seq[0][0])


def test_bad_input(h5_file):
    path, _, _ = h5_file
    with pytest.raises(ValueError, match=r"'images' not found.*Available datasets: group/short, w, x, x2, y"):
        HDF5Sequence(path, x="images")
    with pytest.raises(ValueError, match="same number of rows"):
        HDF5Sequence(path, x="x", y="group/short")
    with pytest.raises(ValueError, match=r"argument batch_size.*Received: batch_size=0"):
        HDF5Sequence(path, batch_size=0)
    with pytest.raises(ValueError, match="row range"):
        HDF5Sequence(path, start=50, stop=50)

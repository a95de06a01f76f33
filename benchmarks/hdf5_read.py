"""Rows per second read through HDF5Sequence against a numpy memmap of the same rows.

In one run, interleaved: one shuffled epoch of HDF5Sequence over a chunked HDF5
file (contiguous slice per batch, shuffled inside), the same batches read from a
numpy memmap of the same array, and, for contrast, the naive shuffled read of
HDF5 rows in random order. The data is written to a temporary folder first.

    python benchmarks/hdf5_read.py [--quick] [--rows N]
"""

import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _bench  # noqa: E402

args = _bench.parse_args(
    __doc__.splitlines()[0],
    lambda p: (
        p.add_argument("--rows", type=int, default=200_000),
        p.add_argument("--batch-size", type=int, default=128),
        p.add_argument("--repeats", type=int, default=3),
    ),
)

import h5py  # noqa: E402
import numpy as np  # noqa: E402

from keras_callbacks_plus import HDF5Sequence  # noqa: E402

if args.quick:
    args.rows, args.repeats = 4_000, 1
FEATURES = 256
folder = tempfile.mkdtemp(prefix="kcp-hdf5-")
h5_path, npy_path = os.path.join(folder, "data.h5"), os.path.join(folder, "data.npy")
rng = np.random.default_rng(0)
data = rng.normal(size=(args.rows, FEATURES)).astype("float32")
with h5py.File(h5_path, "w") as f:
    f.create_dataset("x", data=data, chunks=(256, FEATURES))
np.save(npy_path, data)
del data

seq = HDF5Sequence(h5_path, y=None, batch_size=args.batch_size, seed=0)
memmap = np.load(npy_path, mmap_mode="r")


def epoch_hdf5():
    for i in range(len(seq)):
        seq[i]
    seq.on_epoch_end()


def epoch_memmap():  # the same batches, in the same way
    for i in range(len(seq)):
        lo = int(seq._order[i]) * args.batch_size
        rows = np.random.default_rng(i).permutation(min(args.batch_size, args.rows - lo))
        np.asarray(memmap[lo : lo + args.batch_size])[rows]


def epoch_naive_h5():  # random rows one batch at a time (h5py needs sorted indices)
    order = np.random.default_rng(1).permutation(args.rows)
    with h5py.File(h5_path, "r") as f:
        for lo in range(0, args.rows, args.batch_size):
            f["x"][np.sort(order[lo : lo + args.batch_size])]


cases = {"HDF5Sequence (shuffled)": epoch_hdf5, "numpy memmap, same batches": epoch_memmap,
         "HDF5 random rows (naive)": epoch_naive_h5}
if args.quick:
    cases.pop("HDF5 random rows (naive)")
times = _bench.interleaved(cases, repeats=args.repeats, warmup=1)
reference = _bench.median(times["numpy memmap, same batches"])
rows = [
    {"case": name, "seconds_per_epoch": _bench.median(t), "rows_per_s": args.rows / _bench.median(t),
     "speed_vs_memmap": reference / _bench.median(t)}
    for name, t in times.items()
]
seq.close()
for p in (h5_path, npy_path):
    os.remove(p)
os.rmdir(folder)
_bench.write_results(
    args.out, "hdf5_read",
    {"rows": args.rows, "features": FEATURES, "batch_size": args.batch_size, "rows_table": rows,
     "raw_seconds": times, "quick": args.quick},
    _bench.markdown_table(rows, ["case", "seconds_per_epoch", "rows_per_s", "speed_vs_memmap"]),
)

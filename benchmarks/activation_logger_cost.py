"""ActivationLogger: cost of one logged epoch, in forward passes of the probe, and its memory.

Measures, on a small CNN (Conv2D, BatchNormalization, ReLU blocks; every
layer logged, which is the default):

* `forward`: one inference pass of the probe through the whole model, the
  model's own compiled `predict_on_batch`, batch by batch (the reference);
* `logger_test`, `logger_train`: one logged epoch of `ActivationLogger`
  (`on_epoch_end`) with one phase, HDF5 writing included, in steady state
  (bin edges fixed, functions compiled). Target: at most 2 forward passes;
* `logger_test_relu`: the same for the ReLU outputs only (`layers="relu_*"`,
  one per block), a typical selection;
* `logger_test_exact`: phase test with `sample_values=None`: percentiles and
  histogram count every value instead of a sample of 65536 per output and
  batch (the default);
* `first_epoch_*`: the first logged epoch, which also finds the histogram
  range (one more pass) and compiles;
* memory: resident set size after each of 50 logged epochs, both phases
  (flat means no growth with epochs: the median of the last ten against
  that of epochs 3 to 12), and the host-side peak of one logged epoch
  (tracemalloc) for a probe of N and of 4N samples (flat means no growth
  with the probe beyond one batch).

Run: `python benchmarks/activation_logger_cost.py [--backend jax] [--quick]`.
"""

from __future__ import annotations

import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _bench  # noqa: E402  (sets KERAS_BACKEND before keras is imported)


def _extra(parser):
    parser.add_argument("--epochs", type=int, default=None, help="logged epochs for the memory run")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds")


ARGS = _bench.parse_args(__doc__.splitlines()[0], _extra)

import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_callbacks_plus.activations import ActivationLogger  # noqa: E402

if ARGS.quick:
    SIZE, BLOCKS, FILTERS, PROBE, BATCH = 8, 2, 8, 32, 16
    EPOCHS, REPEATS = ARGS.epochs or 5, ARGS.repeats or 3
else:
    SIZE, BLOCKS, FILTERS, PROBE, BATCH = 32, 4, 32, 512, 128
    EPOCHS, REPEATS = ARGS.epochs or 50, ARGS.repeats or 7


def make_model() -> keras.Model:
    keras.utils.set_random_seed(0)
    inputs = keras.Input((SIZE, SIZE, 3), name="image")
    x = inputs
    for block in range(BLOCKS):
        x = keras.layers.Conv2D(FILTERS * 2 ** (block // 2), 3, padding="same",
                                name=f"conv_{block}")(x)
        x = keras.layers.BatchNormalization(name=f"bn_{block}")(x)
        x = keras.layers.Activation("relu", name=f"relu_{block}")(x)
        if block % 2 == 1:
            x = keras.layers.MaxPooling2D(name=f"pool_{block}")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    x = keras.layers.Dropout(0.3, seed=1, name="dropout")(x)
    outputs = keras.layers.Dense(10, activation="softmax", name="head")(x)
    return keras.Model(inputs, outputs, name="cnn")


def rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        import os

        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def started_logger(model, probe, phases, folder, name, **kwargs) -> ActivationLogger:
    logger = ActivationLogger(probe, phases=phases, batch_size=BATCH,
                              h5_path=Path(folder) / f"{name}.h5", **kwargs)
    logger.set_model(model)
    logger.on_train_begin()
    return logger


def main() -> None:
    model = make_model()
    rng = np.random.default_rng(0)
    probe = rng.normal(size=(PROBE, SIZE, SIZE, 3)).astype("float32")
    batches = [probe[i:i + BATCH] for i in range(0, PROBE, BATCH)]
    folder = tempfile.mkdtemp(prefix="kcp-bench-")

    def forward():
        return [model.predict_on_batch(b) for b in batches]

    loggers, first = {}, {}
    for case, phase, layers, sample in (("test", "test", None, 65536),
                                        ("train", "train", None, 65536),
                                        ("test_relu", "test", "relu_*", 65536),
                                        ("test_exact", "test", None, None)):
        loggers[case] = started_logger(model, probe, (phase,), folder, case, layers=layers,
                                       sample_values=sample)
        start = time.perf_counter()
        loggers[case].on_epoch_end(0, {})
        first[case] = time.perf_counter() - start
    epoch = iter(range(1, 10**6))
    times = _bench.interleaved(
        {
            "forward": forward,
            **{f"logger_{case}": (lambda logger=logger: logger.on_epoch_end(next(epoch), {}))
               for case, logger in loggers.items()},
        },
        repeats=REPEATS,
        warmup=1,
    )
    forward_s = _bench.median(times["forward"])
    rows = [{"measure": "forward pass of the probe (predict_on_batch)", "seconds": forward_s,
             "forward_passes": 1.0}]
    outputs = {case: len(logger._evaluator.names) for case, logger in loggers.items()}
    labels = {"test": "phase test", "train": "phase train", "test_relu": "phase test, relu_* only",
              "test_exact": "phase test, every value counted (sample_values=None)"}
    for case, label in labels.items():
        seconds = _bench.median(times[f"logger_{case}"])
        rows.append({"measure": f"logged epoch, {label} ({outputs[case]} outputs)",
                     "seconds": seconds, "forward_passes": seconds / forward_s})
    for case, label in labels.items():
        rows.append({"measure": f"first logged epoch, {label} (compiles)",
                     "seconds": first[case], "forward_passes": first[case] / forward_s})
    for logger in loggers.values():
        logger.on_train_end()

    # Memory over epochs: both phases, every epoch.
    logger = started_logger(model, probe, ("test", "train"), folder, "memory")
    rss = []
    for e in range(EPOCHS):
        logger.on_epoch_end(e, {})
        rss.append(rss_mb())
    logger.on_train_end()
    # Medians of the first and last ten epochs (after two to settle): RSS has
    # transient peaks when the allocator takes and returns memory.
    window = max(1, min(10, (EPOCHS - 2) // 2))
    early, late = float(np.median(rss[2:2 + window])), float(np.median(rss[-window:]))
    growth = late - early

    # Host-side peak of one logged epoch for a probe of N and 4N samples.
    peaks = {}
    for factor in (1, 4):
        big = np.concatenate([probe] * factor)
        logger = started_logger(model, big, ("test",), folder, f"probe_{factor}")
        logger.on_epoch_end(0, {})
        tracemalloc.start()
        logger.on_epoch_end(1, {})
        peaks[factor] = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
        logger.on_train_end()

    rows.append({"measure": f"RSS growth, median of the last {window} logged epochs minus median "
                            f"of epochs 3..{2 + window} ({EPOCHS} epochs, MB)",
                 "seconds": "", "forward_passes": "", "value": growth})
    rows.append({"measure": "RSS at the first logged epoch (MB)", "seconds": "",
                 "forward_passes": "", "value": rss[0]})
    for factor, peak in peaks.items():
        rows.append({"measure": f"host peak in one logged epoch, probe {factor}x{PROBE} (MB)",
                     "seconds": "", "forward_passes": "", "value": peak})
    record = {
        "model": {"input": [SIZE, SIZE, 3], "blocks": BLOCKS, "filters": FILTERS,
                  "logged_outputs": outputs,
                  "parameters": model.count_params()},
        "probe_samples": PROBE,
        "batch_size": BATCH,
        "repeats": REPEATS,
        "memory_epochs": EPOCHS,
        "quick": ARGS.quick,
        "times_s": times,
        "forward_s": forward_s,
        "forward_passes_per_logged_epoch": {case: _bench.median(times[f"logger_{case}"]) / forward_s
                                            for case in loggers},
        "first_logged_epoch_s": first,
        "target_forward_passes_per_phase": 2.0,
        "rss_mb": rss,
        "rss_growth_mb": growth,
        "host_peak_mb_by_probe_factor": peaks,
        "rows": rows,
    }
    table = _bench.markdown_table(rows, ["measure", "seconds", "forward_passes", "value"])
    _bench.write_results(ARGS.out, "activation_logger_cost", record, table)


if __name__ == "__main__":
    main()

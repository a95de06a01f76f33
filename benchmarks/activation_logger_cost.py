"""ActivationLogger: set-up time, cost of one logged epoch in forward passes of the probe, memory.

Two cases, both in one run (`--cases` picks some):

`mobilenet` (issue #21): `keras.applications.MobileNetV3Small(input_shape=(64,
64, 3), weights=None, include_top=False, pooling="avg")` plus a Dense head,
512 training samples in batches of 64, `ActivationLogger(x[:64], phases=("test",
"train"))` at its defaults (every layer: 158 outputs). Measures:

* `train_epoch`: one epoch of `fit` (median of `--repeats`, after one to
  compile) — the set-up target is at most one such epoch or 10 s, whichever
  is longer;
* `setup`: the logger's `on_train_begin` (extraction model, compiling both
  phases, the first batch run once), the first `on_train_begin` on this model
  in the process;
* `forward`: `predict_on_batch` of the 64-image probe (median, interleaved);
* logged epochs with both phases, the test phase only and the train phase
  only (interleaved with `forward`), in forward passes per phase — target:
  at most 4;
* RSS over 50 logged epochs (both phases);
* the sidecar of a checkpoint written with the logger (one epoch of `fit`
  with `ParallelModelCheckpoint`): its size (target: under 20 KB) and the
  logger's part of it.

`cnn`: the earlier case, kept for comparison.

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

import json
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
    parser.add_argument("--cases", default="mobilenet,cnn",
                        help="comma-separated cases among mobilenet, cnn (default: both)")


ARGS = _bench.parse_args(__doc__.splitlines()[0], _extra)

import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_callbacks_plus.activations import ActivationLogger  # noqa: E402
from keras_callbacks_plus.checkpoint import ParallelModelCheckpoint  # noqa: E402

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


def memory_growth(rss: list[float]) -> tuple[float, int]:
    """Median RSS of the last ten logged epochs minus that of epochs 3..12, and the window.

    Medians (after two epochs to settle): RSS has transient peaks when the
    allocator takes and returns memory.
    """
    window = max(1, min(10, (len(rss) - 2) // 2))
    early, late = float(np.median(rss[2:2 + window])), float(np.median(rss[-window:]))
    return late - early, window


def mobilenet_case(folder: str) -> tuple[list[dict], dict]:
    """The issue's set-up: MobileNetV3Small with a Dense head, every layer logged."""
    size, samples, batch = (32, 64, 16) if ARGS.quick else (64, 512, 64)
    probe_samples = 8 if ARGS.quick else 64
    keras.utils.set_random_seed(0)
    backbone = keras.applications.MobileNetV3Small(
        input_shape=(size, size, 3), weights=None, include_top=False, pooling="avg")
    inputs = keras.Input((size, size, 3))
    outputs = keras.layers.Dense(10, activation="softmax", name="head")(backbone(inputs))
    model = keras.Model(inputs, outputs, name="mobilenet_v3_small_head")
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(samples, size, size, 3)).astype("float32")
    y = rng.integers(0, 10, samples)
    probe = x[:probe_samples]

    start = time.perf_counter()
    model.fit(x, y, batch_size=batch, epochs=1, verbose=0)
    first_fit = time.perf_counter() - start
    epochs = []
    for _ in range(2 if ARGS.quick else 3):
        start = time.perf_counter()
        model.fit(x, y, batch_size=batch, epochs=1, verbose=0)
        epochs.append(time.perf_counter() - start)
    train_epoch = _bench.median(epochs)

    both = ActivationLogger(probe, phases=("test", "train"), h5_path=Path(folder) / "mobilenet.h5")
    both.set_model(model)
    start = time.perf_counter()
    both.on_train_begin()
    setup = time.perf_counter() - start
    outputs = len(both._evaluator.names)
    start = time.perf_counter()
    both.on_epoch_end(0, {})
    first_epoch = time.perf_counter() - start
    single = {}
    for phase in ("test", "train"):  # at the defaults too; compiled already, by `both`
        single[phase] = ActivationLogger(probe, phases=(phase,),
                                         h5_path=Path(folder) / f"mobilenet_{phase}.h5")
        single[phase].set_model(model)
        single[phase].on_train_begin()
    epoch = iter(range(1, 10**6))
    times = _bench.interleaved(
        {
            # predict_on_batch donates the model's state buffers on JAX; the
            # logger reads the state anew at each logged epoch.
            "forward": lambda: model.predict_on_batch(probe),
            "both_phases": lambda: both.on_epoch_end(next(epoch), {}),
            **{f"{phase}_phase": (lambda logger=logger: logger.on_epoch_end(next(epoch), {}))
               for phase, logger in single.items()},
        },
        repeats=REPEATS,
        warmup=1,
    )
    for logger in single.values():
        logger.on_train_end()
    rss = []
    for e in range(EPOCHS):
        both.on_epoch_end(1000 + e, {})
        rss.append(rss_mb())
    both.on_train_end()
    growth, window = memory_growth(rss)

    logger = ActivationLogger(probe, phases=("test", "train"),
                              h5_path=Path(folder) / "mobilenet_checkpointed.h5")
    checkpoint = ParallelModelCheckpoint(str(Path(folder) / "mobilenet_{epoch}.keras"),
                                         async_save=False)
    model.fit(x, y, batch_size=batch, epochs=1, verbose=0, callbacks=[logger, checkpoint])
    sidecar = Path(folder) / "mobilenet_1.keras.json"
    sidecar_bytes = sidecar.stat().st_size
    logger_bytes = len(json.dumps(json.loads(sidecar.read_text())["callbacks"][logger.state_key]))

    forward = _bench.median(times["forward"])
    passes = {
        "both_phases_per_phase": _bench.median(times["both_phases"]) / 2 / forward,
        "test": _bench.median(times["test_phase"]) / forward,
        "train": _bench.median(times["train_phase"]) / forward,
    }
    label = f"MobileNetV3Small {size}x{size}, {outputs} outputs"
    rows = [
        {"measure": f"{label}: one training epoch ({samples} samples, batch {batch})",
         "seconds": train_epoch},
        {"measure": f"{label}: logger set-up, on_train_begin (both phases)", "seconds": setup,
         "value": f"{setup / max(train_epoch, 10.0):.2f} x max(epoch, 10 s)"},
        {"measure": f"{label}: first logged epoch (both phases)", "seconds": first_epoch},
        {"measure": f"{label}: forward pass of the {probe_samples}-image probe "
                    "(predict_on_batch)", "seconds": forward, "forward_passes": 1.0},
        {"measure": f"{label}: logged epoch, both phases, per phase",
         "seconds": _bench.median(times["both_phases"]) / 2,
         "forward_passes": passes["both_phases_per_phase"]},
        {"measure": f"{label}: logged epoch, phase test only", "seconds":
         _bench.median(times["test_phase"]), "forward_passes": passes["test"]},
        {"measure": f"{label}: logged epoch, phase train only", "seconds":
         _bench.median(times["train_phase"]), "forward_passes": passes["train"]},
        {"measure": f"{label}: RSS growth over {EPOCHS} logged epochs, both phases (median of "
                    f"the last {window} minus epochs 3..{2 + window}, MB)", "value": growth},
        {"measure": f"{label}: checkpoint sidecar with the logger (bytes; the logger's state)",
         "value": f"{sidecar_bytes} ({logger_bytes})"},
    ]
    record = {
        "input": [size, size, 3], "samples": samples, "batch_size": batch,
        "probe_samples": probe_samples, "logged_outputs": outputs,
        "parameters": model.count_params(), "first_fit_s": first_fit,
        "train_epoch_s": epochs, "setup_s": setup,
        "setup_target_s": max(train_epoch, 10.0), "first_logged_epoch_s": first_epoch,
        "times_s": times, "forward_s": forward, "forward_passes_per_phase": passes,
        "target_forward_passes_per_phase": 4.0, "rss_mb": rss, "rss_growth_mb": growth,
        "sidecar_bytes": sidecar_bytes, "logger_state_bytes": logger_bytes,
    }
    return rows, record


def main() -> None:
    cases = {c.strip() for c in ARGS.cases.split(",") if c.strip()}
    folder = tempfile.mkdtemp(prefix="kcp-bench-")
    rows, record = [], {"quick": ARGS.quick, "repeats": REPEATS, "memory_epochs": EPOCHS}
    if "mobilenet" in cases:
        case_rows, record["mobilenet"] = mobilenet_case(folder)
        rows += case_rows
    if "cnn" in cases:
        case_rows, record["cnn"] = cnn_case(folder)
        rows += case_rows
    table = _bench.markdown_table(rows, ["measure", "seconds", "forward_passes", "value"])
    _bench.write_results(ARGS.out, "activation_logger_cost", record, table)


def cnn_case(folder: str) -> tuple[list[dict], dict]:
    """The earlier small CNN (17 outputs)."""
    model = make_model()
    rng = np.random.default_rng(0)
    probe = rng.normal(size=(PROBE, SIZE, SIZE, 3)).astype("float32")
    batches = [probe[i:i + BATCH] for i in range(0, PROBE, BATCH)]

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
    rows = [{"measure": "CNN: forward pass of the probe (predict_on_batch)", "seconds": forward_s,
             "forward_passes": 1.0}]
    outputs = {case: len(logger._evaluator.names) for case, logger in loggers.items()}
    labels = {"test": "phase test", "train": "phase train", "test_relu": "phase test, relu_* only",
              "test_exact": "phase test, every value counted (sample_values=None)"}
    for case, label in labels.items():
        seconds = _bench.median(times[f"logger_{case}"])
        rows.append({"measure": f"CNN: logged epoch, {label} ({outputs[case]} outputs)",
                     "seconds": seconds, "forward_passes": seconds / forward_s})
    for case, label in labels.items():
        rows.append({"measure": f"CNN: first logged epoch, {label}",
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
    growth, window = memory_growth(rss)

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

    rows.append({"measure": f"CNN: RSS growth, median of the last {window} logged epochs minus median "
                            f"of epochs 3..{2 + window} ({EPOCHS} epochs, MB)",
                 "seconds": "", "forward_passes": "", "value": growth})
    rows.append({"measure": "CNN: RSS at the first logged epoch (MB)", "seconds": "",
                 "forward_passes": "", "value": rss[0]})
    for factor, peak in peaks.items():
        rows.append({"measure": f"CNN: host peak in one logged epoch, probe {factor}x{PROBE} (MB)",
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
        "target_forward_passes_per_phase": 4.0,
        "rss_mb": rss,
        "rss_growth_mb": growth,
        "host_peak_mb_by_probe_factor": peaks,
        "rows": rows,
    }
    return rows, record


if __name__ == "__main__":
    main()

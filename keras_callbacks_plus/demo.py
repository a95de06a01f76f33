"""The one-command demo: pre-train a small CNN, fine-tune it data-parallel with all four callbacks.

`python -m keras_callbacks_plus demo --out runs/demo` (or `make demo`) runs
`run_demo`, offline, in a few minutes on 2 CPU cores:

1. draws two tasks of 32x32 grey images of shapes (task A: disk, square,
   triangle, plus; task B: ring, frame, cross, diamond) and writes them to
   one HDF5 file;
2. pre-trains a three-block CNN on task A, reading batches through
   `HDF5Sequence`;
3. puts a new head on its backbone and fine-tunes it on task B on a
   `data_parallel` twin over the devices present (every GPU, else two
   emulated CPU devices), with `ProgressiveUnfreezing` (head first, then the
   blocks from the top), `ActivationLogger` (test and train phase, HDF5 and
   a PNG report), `RobustEarlyStopping` and `ParallelModelCheckpoint`
   (template model, async);
4. loads the best checkpoint on one device, scores it on held-out images and
   writes `summary.json`.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

SIZE = 32
TASK_A = ("disk", "square", "triangle", "plus")
TASK_B = ("ring", "frame", "cross", "diamond")
# What the demo writes into --out; only these are replaced by a new run.
OUTPUTS = ("shapes.h5", "checkpoints", "activations.h5", "activations.png", "summary.json")


def _masks(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """`n` boolean SIZE x SIZE masks of one shape kind, random position and size."""
    grid = np.arange(SIZE, dtype=np.float32) + 0.5
    cy, cx = rng.uniform(10, SIZE - 10, (2, n, 1, 1)).astype(np.float32)
    r = rng.uniform(5, 9, (n, 1, 1)).astype(np.float32)
    dy, dx = grid[None, :, None] - cy, grid[None, None, :] - cx
    ay, ax = np.abs(dy), np.abs(dx)
    box = np.maximum(ay, ax)
    dist = np.sqrt(dx**2 + dy**2)
    bar = r / 3.5
    if kind == "disk":
        return dist <= r
    if kind == "square":
        return box <= 0.8 * r
    if kind == "triangle":
        return (dy <= 0.8 * r) & (ax <= (dy + r) * 0.55)
    if kind == "plus":
        return ((ax <= bar) & (ay <= r)) | ((ay <= bar) & (ax <= r))
    if kind == "ring":
        return (dist <= r) & (dist >= 0.55 * r)
    if kind == "frame":
        return (box <= 0.85 * r) & (box >= 0.5 * r)
    if kind == "cross":
        return (box <= 0.8 * r) & ((np.abs(dx - dy) <= bar) | (np.abs(dx + dy) <= bar))
    if kind == "diamond":
        return ax + ay <= r
    raise ValueError(f"Unknown shape: {kind}")


def make_shapes(kinds: tuple[str, ...], n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`n` noisy uint8 images (n, SIZE, SIZE, 1) of `kinds`, balanced and shuffled, and labels."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % len(kinds)).astype(np.int32)
    images = np.empty((n, SIZE, SIZE), np.float32)
    for label, kind in enumerate(kinds):
        rows = np.flatnonzero(labels == label)
        images[rows] = _masks(kind, len(rows), rng)
    background = rng.uniform(0.0, 0.35, (n, 1, 1))
    brightness = rng.uniform(0.5, 0.65, (n, 1, 1))
    images = background + brightness * images + rng.normal(0, 0.08, images.shape)
    images = np.clip(images * 255, 0, 255).astype(np.uint8)
    return images[..., None], labels


def _backbone():
    import keras

    inputs = keras.Input((SIZE, SIZE, 1), name="image")
    x = keras.layers.Rescaling(1 / 255, name="rescale")(inputs)
    for block, filters in enumerate((16, 32, 64), start=1):
        x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False,
                                name=f"block{block}_conv")(x)
        x = keras.layers.BatchNormalization(momentum=0.9, name=f"block{block}_bn")(x)
        x = keras.layers.ReLU(name=f"block{block}_relu")(x)
        x = keras.layers.MaxPooling2D(name=f"block{block}_pool")(x)
    x = keras.layers.GlobalAveragePooling2D(name="features")(x)
    return keras.Model(inputs, x, name="backbone")


def _classifier(backbone, classes: int, name: str):
    import keras

    inputs = keras.Input((SIZE, SIZE, 1), name="image")
    outputs = keras.layers.Dense(classes, activation="softmax", name="head")(backbone(inputs))
    return keras.Model(inputs, outputs, name=name)


def _prepare(out: Path) -> None:
    """Creates `out`, replacing a previous demo's outputs but refusing to touch anything else."""
    out.mkdir(parents=True, exist_ok=True)
    foreign = sorted(p.name for p in out.iterdir() if p.name not in OUTPUTS)
    if foreign:
        raise ValueError(
            f"--out {out} holds files the demo did not write ({', '.join(foreign[:5])}). "
            "Choose an empty or new folder."
        )
    for name in OUTPUTS:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def run_demo(
    out: str | os.PathLike = "runs/demo",
    *,
    samples: int = 4096,
    pretrain_epochs: int = 3,
    epochs: int = 12,
    batch_size: int = 64,
    max_time: float | None = 120.0,
    seed: int = 0,
    verbose: int = 1,
) -> dict[str, Any]:
    """Runs the demo (module docstring) and returns its summary, also written to `summary.json`.

    Call `distribute.emulate_cpu_devices()` before the backend starts to get
    two CPU devices on a machine without accelerators (the command line does).

    Args:
        out: folder for the outputs; created; a previous demo's outputs there
            are replaced, anything else there is an error. Defaults to
            `"runs/demo"`.
        samples: images per task (a multiple of `batch_size`, at least
            `8 * batch_size`). Task B splits them 6/8 training, 1/8
            validation, 1/8 held-out test. Defaults to `4096`.
        pretrain_epochs: epochs on task A. Defaults to `3`.
        epochs: most fine-tuning epochs on task B (early stopping may end
            sooner). Defaults to `12`.
        batch_size: the global batch, split over the devices. Defaults to `64`.
        max_time: fine-tuning time budget in seconds (RobustEarlyStopping's
            `max_time`). Defaults to `120.0`.
        seed: seed of the data and of Keras. Defaults to `0`.
        verbose: 0 for silence, 1 for Keras's progress bars and the
            callbacks' messages. Defaults to `1`.

    Returns:
        The summary: devices, epochs run, stages, stop reason, best value and
        epoch, checkpoint path, held-out accuracies, log and report paths,
        wall time.
    """
    import h5py
    import keras

    from keras_callbacks_plus import (
        ActivationLogger,
        HDF5Sequence,
        ParallelModelCheckpoint,
        ProgressiveUnfreezing,
        RobustEarlyStopping,
        data_parallel,
        distribute,
    )

    if samples % batch_size or samples < 8 * batch_size:
        raise ValueError(
            "Invalid value for argument samples. Expected a multiple of batch_size, at least "
            f"8 * batch_size = {8 * batch_size}. Received: samples={samples}"
        )
    started = time.perf_counter()
    out = Path(out)
    _prepare(out)
    keras.utils.set_random_seed(seed)

    data = out / "shapes.h5"
    with h5py.File(data, "w") as f:
        for task, kinds, offset in (("a", TASK_A, 0), ("b", TASK_B, 1)):
            images, labels = make_shapes(kinds, samples, seed + offset)
            f.create_dataset(f"x_{task}", data=images, chunks=(batch_size, SIZE, SIZE, 1))
            f.create_dataset(f"y_{task}", data=labels)
            f[f"x_{task}"].attrs["classes"] = ",".join(kinds)
    eighth = samples // 8
    train_stop, val_stop = 6 * eighth, 7 * eighth

    def split(task, start, stop, shuffle):
        return HDF5Sequence(data, x=f"x_{task}", y=f"y_{task}", batch_size=batch_size,
                            start=start, stop=stop, shuffle=shuffle, seed=seed)

    fit_verbose = 1 if verbose else 0
    say = print if verbose else (lambda *args, **kwargs: None)

    # 1. Pre-training on task A, one device.
    say(f"\n== Pre-training on task A {TASK_A}")
    backbone = _backbone()
    pretrained = _classifier(backbone, len(TASK_A), "pretrain")
    pretrained.compile(optimizer=keras.optimizers.Adam(3e-3),
                       loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    pretrained.fit(split("a", 0, 7 * eighth, True), epochs=pretrain_epochs, verbose=fit_verbose)
    pretrain_accuracy = pretrained.evaluate(split("a", 7 * eighth, samples, False),
                                            verbose=0, return_dict=True)["accuracy"]

    # 2. Fine-tuning on task B: a new head on the backbone, trained data-parallel.
    devices = distribute.list_devices("gpu") or distribute.list_devices("cpu")
    say(f"\n== Fine-tuning on task B {TASK_B} on {len(devices)} device(s): {', '.join(devices)}")
    model = _classifier(backbone, len(TASK_B), "finetune")  # the template
    twin = data_parallel(model, devices)
    twin.compile(optimizer=keras.optimizers.Adam(2e-3),
                 loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    with h5py.File(data, "r") as f:
        probe = f["x_b"][val_stop:val_stop + 4 * batch_size]
    every = 2
    unfreezing = ProgressiveUnfreezing.gradual(
        ["head", "backbone/block3_*", "backbone/block2_*", "backbone/block1_*"],
        every=every, group_lr_decay=2.6, verbose=verbose)
    activations = ActivationLogger(
        probe, layers=["backbone/block*_relu", "features", "head"], phases=("test", "train"),
        h5_path=out / "activations.h5")
    # No min_delta: the checkpoint's best file and early stopping's best epoch are the same epoch.
    stopping = RobustEarlyStopping("val_accuracy", patience=2, max_time=max_time, verbose=verbose)
    checkpoint = ParallelModelCheckpoint(
        model, out / "checkpoints" / "epoch{epoch:02d}-acc{val_accuracy:.3f}.keras",
        monitor="val_accuracy", save_best_only=True, max_to_keep=2, save_last=True)
    history = twin.fit(split("b", 0, train_stop, True),
                       validation_data=split("b", train_stop, val_stop, False),
                       epochs=epochs, verbose=fit_verbose,
                       callbacks=[unfreezing, activations, stopping, checkpoint])
    epochs_run = len(history.epoch)
    stages = [{"stage": stage, "epoch": start, "layers": list(unfreezing.schedule[start])}
              for stage, start in enumerate(unfreezing.schedule) if start < epochs_run]

    # 3. The best checkpoint, loaded on one device, scored on held-out images.
    restored = keras.saving.load_model(checkpoint.best_path)
    test_accuracy = restored.evaluate(split("b", val_stop, samples, False), verbose=0,
                                      return_dict=True)["accuracy"]
    report = out / "activations.png"
    try:
        from keras_callbacks_plus.report import plot_activation_log

        plot_activation_log(out / "activations.h5", report)
    except ImportError as error:  # matplotlib is the optional `plot` extra.
        report = None
        say(f"No activation report: {error}")

    summary = {
        "backend": keras.backend.backend(),
        "devices": devices,
        "emulated_devices": not distribute.list_devices("gpu") and len(devices) > 1,
        "data": str(data),
        "samples_per_task": samples,
        "pretrain_accuracy": float(pretrain_accuracy),
        "epochs_run": epochs_run,
        "stages": stages,
        "stop_reason": stopping.stop_reason,
        "monitor": stopping.monitor,
        "best": None if stopping.best is None else float(stopping.best),
        "best_epoch": stopping.best_epoch,
        # Shown under `out` as the caller spelled it, like the other paths.
        "checkpoint": str(out / "checkpoints" / Path(checkpoint.best_path).name),
        "last_checkpoint": str(out / "checkpoints" / Path(checkpoint.last_path).name),
        "test_accuracy": float(test_accuracy),
        "chance": 1 / len(TASK_B),
        "activation_log": str(out / "activations.h5"),
        "activation_report": None if report is None else str(report),
        "wall_time_s": round(time.perf_counter() - started, 1),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """The summary as the few lines the command line prints."""
    devices = ", ".join(summary["devices"])
    if summary["emulated_devices"]:
        devices += " (emulated on the same CPU cores: a correctness run, not a speed test)"
    stages = "; ".join(
        f"{s['stage']} from epoch {s['epoch'] + 1}: {', '.join(s['layers'])}"
        for s in summary["stages"]
    )
    reason = summary["stop_reason"] or f"none, all {summary['epochs_run']} epochs ran"
    best = "none" if summary["best"] is None else (
        f"{summary['monitor']} {summary['best']:.4f} at epoch {summary['best_epoch'] + 1}")
    report = summary["activation_report"] or "not drawn (pip install matplotlib)"
    rows = [
        ("backend", f"{summary['backend']} on {devices}"),
        ("data", f"{summary['data']} ({summary['samples_per_task']} images per task, "
                 "read through HDF5Sequence)"),
        ("pre-training", f"task A held-out accuracy {summary['pretrain_accuracy']:.3f}"),
        ("epochs run", str(summary["epochs_run"])),
        ("stages", stages),
        ("stop reason", reason),
        ("best", best + " (weights restored)"),
        ("checkpoint", f"{summary['checkpoint']} (last: {summary['last_checkpoint']})"),
        ("held-out", f"task B accuracy {summary['test_accuracy']:.3f} of the checkpoint loaded "
                     f"on one device (chance {summary['chance']:.2f})"),
        ("activations", f"{summary['activation_log']}; report {report}"),
        ("wall time", f"{summary['wall_time_s']:.1f} s"),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(["", "== Demo summary"] + [f"{n:<{width}}  {v}" for n, v in rows])

"""Test helpers without side effects: a tiny model and data, a multi-process launcher.

Worker scripts in tests/workers import this module too, so it must not set up
devices (conftest.py does that for the test process).
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import keras
import numpy as np

TESTS_DIR = Path(__file__).resolve().parent
WORKERS_DIR = TESTS_DIR / "workers"


def build_tiny_model(
    *,
    batch_norm: bool = False,
    dropout: float = 0.0,
    input_dim: int = 8,
    num_classes: int = 3,
    seed: int = 0,
    name: str = "tiny",
) -> keras.Model:
    """A small real Functional classifier: Dense, [BatchNorm], ReLU, [Dropout], Dense."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((input_dim,), name="features")
    x = keras.layers.Dense(16, name="hidden")(inputs)
    if batch_norm:
        x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.Activation("relu", name="relu")(x)
    if dropout:
        x = keras.layers.Dropout(dropout, seed=seed, name="dropout")(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax", name="head")(x)
    return keras.Model(inputs, outputs, name=name)


def make_tiny_data(
    samples: int = 128, *, input_dim: int = 8, num_classes: int = 3, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Learnable random data: the class is a function of the first features."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(samples, input_dim)).astype("float32")
    y = ((x[:, 0] > 0).astype("int32") + (x[:, 1] > 0.5)) % num_classes
    return x, y


def free_ports(count: int) -> list[int]:
    """`count` distinct free TCP ports on 127.0.0.1."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@dataclasses.dataclass
class WorkerResult:
    index: int
    returncode: int | None
    stdout: str
    stderr: str
    timed_out: bool

    def last_line(self) -> str:
        lines = [line for line in self.stdout.splitlines() if line.strip()]
        return lines[-1] if lines else ""


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def launch_workers(
    script: str | Path,
    num_workers: int = 2,
    *,
    args: Sequence[str] = (),
    timeout: float = 180.0,
    env: dict[str, str] | None = None,
    grace: float = 15.0,
) -> list[WorkerResult]:
    """Runs `script` in `num_workers` Python processes on 127.0.0.1.

    Each process gets `KCP_WORKER_ADDRESSES` (one free `127.0.0.1:port` per
    worker, comma-separated), `KCP_WORKER_INDEX`, and this run's
    `KERAS_BACKEND`; the forced device count of the test process is not
    inherited. Everything still running `timeout` seconds after the start, or
    `grace` seconds after a worker failed (its peers would wait forever in a
    collective), is killed with its children, and its result says `timed_out`.
    """
    script = Path(script)
    if not script.is_absolute():
        script = WORKERS_DIR / script
    addresses = ",".join(f"127.0.0.1:{port}" for port in free_ports(num_workers))
    base_env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "TF_CONFIG")}
    base_env.update(
        KERAS_BACKEND=keras.backend.backend(),
        KCP_WORKER_ADDRESSES=addresses,
        PYTHONPATH=os.pathsep.join(
            filter(None, [str(TESTS_DIR.parent), os.environ.get("PYTHONPATH")])
        ),
    )
    base_env.update(env or {})
    with tempfile.TemporaryDirectory(prefix="kcp-workers-") as logs:
        processes, outputs = [], []
        try:
            for index in range(num_workers):
                out = open(os.path.join(logs, f"{index}.out"), "w+")
                err = open(os.path.join(logs, f"{index}.err"), "w+")
                outputs.append((out, err))
                processes.append(
                    subprocess.Popen(
                        [sys.executable, str(script), *args],
                        env={**base_env, "KCP_WORKER_INDEX": str(index)},
                        stdout=out,
                        stderr=err,
                        text=True,
                        start_new_session=True,
                    )
                )
            deadline = time.monotonic() + timeout
            while any(p.poll() is None for p in processes) and time.monotonic() < deadline:
                if any(p.poll() not in (None, 0) for p in processes):
                    deadline = min(deadline, time.monotonic() + grace)
                time.sleep(0.1)
        finally:
            timed_out = [p.poll() is None for p in processes]
            for process in processes:
                if process.poll() is None:
                    _kill_group(process)
                process.wait()
        results = []
        for index, (process, (out, err)) in enumerate(zip(processes, outputs)):
            out.seek(0)
            err.seek(0)
            results.append(
                WorkerResult(index, process.returncode, out.read(), err.read(), timed_out[index])
            )
            out.close()
            err.close()
        return results



"""Test helpers without side effects: a tiny model and data, a multi-process launcher.

`launch_workers` starts a worker script in several processes;
`assert_workers_succeeded` checks that every one exited cleanly and returns
their JSON reports. `subprocess_env` is the environment of any child Python
process that must import this checkout.

Worker scripts in tests/workers import this module too, so it must not set up
devices (conftest.py does that for the test process).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

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


def _ephemeral_port_range() -> tuple[int, int]:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(v) for v in f.read().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def free_ports(count: int) -> list[int]:
    """`count` distinct TCP ports on 127.0.0.1 that were free a moment ago.

    The ports come from below the kernel's ephemeral range: a port the kernel
    picks there (a `bind` to port 0, any outgoing connection of any process on
    the host) cannot take one of them between this check and the worker's own
    `bind`. Only a process that binds a fixed port in this range could.
    """
    low, _ = _ephemeral_port_range()
    candidates = list(range(max(1024, low - 12_000), low)) if low > 2048 else []
    random.SystemRandom().shuffle(candidates)
    ports: list[int] = []
    for port in candidates:
        if len(ports) == count:
            break
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        ports.append(port)
    if len(ports) < count:  # no usable range: let the kernel choose
        sockets = []
        try:
            for _ in range(count - len(ports)):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                s.bind(("127.0.0.1", 0))
                sockets.append(s)
            ports += [s.getsockname()[1] for s in sockets]
        finally:
            for s in sockets:
                s.close()
    return ports


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


def subprocess_env(**overrides: str) -> dict[str, str]:
    """The environment of a child Python process: this checkout importable, this backend.

    Leaves out `XLA_FLAGS` and `TF_CONFIG`, so the child does not inherit the
    two devices conftest.py forced on the test process; `overrides` come last.
    """
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "TF_CONFIG")}
    env.update(
        KERAS_BACKEND=keras.backend.backend(),
        PYTHONPATH=os.pathsep.join(
            filter(None, [str(TESTS_DIR.parent), os.environ.get("PYTHONPATH")])
        ),
    )
    env.update(overrides)
    return env


def assert_workers_succeeded(results: Sequence[WorkerResult]) -> list[dict[str, Any]]:
    """Asserts every worker exited 0 in time; returns each one's report, in worker order.

    A worker's report is the JSON object on the last non-empty line of its
    stdout. On failure the message shows, for each failing worker, its exit
    status, whether it was killed at the timeout, and the end of its stderr.
    """
    failed = [r for r in results if r.returncode != 0 or r.timed_out]
    if failed:
        raise AssertionError(
            f"{len(failed)} of {len(results)} worker(s) failed:\n"
            + "\n".join(
                f"-- worker {r.index}: exit status {r.returncode}"
                + (" (killed at the timeout)" if r.timed_out else "")
                + f", stderr tail:\n{r.stderr[-3000:]}"
                for r in failed
            )
        )
    reports = []
    for r in results:
        try:
            reports.append(json.loads(r.last_line()))
        except json.JSONDecodeError:
            raise AssertionError(
                f"worker {r.index} exited 0 but its last line is not a JSON report: "
                f"{r.last_line()!r}\nstdout tail:\n{r.stdout[-3000:]}"
            ) from None
    return reports


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
    base_env = {**subprocess_env(KCP_WORKER_ADDRESSES=addresses), **(env or {})}
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




# -- S3: moto's server on 127.0.0.1 --------------------------------------------------------------


def s3_options(port: int, **extra) -> dict:
    """s3fs `storage_options` for the moto server on `port` (dummy credentials)."""
    return {
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}", "region_name": "us-east-1"},
        **extra,
    }


@contextlib.contextmanager
def moto_s3_server():
    """Starts moto's S3 server on 127.0.0.1 on a free port; yields `(server, port)`; stops it.

    Sets dummy credentials meanwhile and turns off the EC2 metadata lookup:
    nothing may leave 127.0.0.1. Skips the test without s3fs / moto.
    """
    import pytest

    pytest.importorskip("s3fs")
    moto_server = pytest.importorskip("moto.server")
    with pytest.MonkeyPatch.context() as patch:
        for name, value in [("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                            ("AWS_DEFAULT_REGION", "us-east-1"), ("AWS_EC2_METADATA_DISABLED", "true")]:
            patch.setenv(name, value)
        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        try:
            yield server, port
        finally:
            with contextlib.suppress(Exception):  # a test may have stopped it already
                server.stop()


def create_bucket(port: int, bucket: str):
    """Creates `bucket` on the moto server; returns a storage of it."""
    from keras_callbacks_plus import _storage

    storage = _storage.open_storage(f"s3://{bucket}", s3_options(port))
    # s3fs's mkdir sends a LocationConstraint, which us-east-1 refuses.
    storage.fs.call_s3("create_bucket", Bucket=bucket)
    return storage

"""Shared fixtures: backend and device setup, a tiny model factory, a process launcher.

The suite runs once per backend (`KERAS_BACKEND=tensorflow`, then `jax`). This
file runs before keras is imported, so it can give each backend two CPU
devices: two logical CPUs on TensorFlow, two host devices on JAX; and on both
an XLA compilation cache for this run and the processes it starts.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
BACKEND = os.environ["KERAS_BACKEND"]
NUM_TEST_DEVICES = 2

if BACKEND == "jax":
    _flag = f"--xla_force_host_platform_device_count={NUM_TEST_DEVICES}"
    if _flag not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()

    import jax

    # Most tests build the same tiny models, so XLA compiles the same programs
    # again and again: a compilation cache shared by this run's tests and the
    # Python processes they start (through the environment; a fresh folder,
    # removed at exit) compiles each once. Every step is still traced and
    # lowered, so the package's code runs as without it. Two processes that
    # compile one program at once may find an entry half written: JAX then
    # warns and compiles it itself.
    _cache = tempfile.mkdtemp(prefix="kcp-tests-xla-cache-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ.update(JAX_COMPILATION_CACHE_DIR=_cache,
                      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    jax.config.update("jax_compilation_cache_dir", _cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
elif BACKEND == "tensorflow":
    # Keras compiles TensorFlow train steps with XLA: the same cache, for the
    # XLA programs of this run and of the Python processes it starts.
    _cache = tempfile.mkdtemp(prefix="kcp-tests-xla-cache-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["TF_XLA_FLAGS"] = " ".join(filter(None, [
        os.environ.get("TF_XLA_FLAGS"), f"--tf_xla_persistent_cache_directory={_cache}"]))

    import tensorflow as tf

    _cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        _cpu, [tf.config.LogicalDeviceConfiguration()] * NUM_TEST_DEVICES
    )

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import (  # noqa: E402
    WorkerResult,
    build_tiny_model,
    launch_workers,
    make_tiny_data,
)


@pytest.fixture
def tiny_model() -> Callable[..., keras.Model]:
    """Factory of small real models (see `build_tiny_model`)."""
    return build_tiny_model


@pytest.fixture
def tiny_data() -> tuple[np.ndarray, np.ndarray]:
    return make_tiny_data()


@pytest.fixture
def two_devices() -> list[str]:
    """Two CPU devices of this process: logical CPUs (TF) or host devices (JAX)."""
    from keras_callbacks_plus import distribute

    devices = distribute.list_devices("cpu")
    assert len(devices) >= NUM_TEST_DEVICES, (
        f"conftest set up {NUM_TEST_DEVICES} CPU devices, the backend shows {devices}"
    )
    return devices[:NUM_TEST_DEVICES]


@pytest.fixture
def launch() -> Callable[..., list[WorkerResult]]:
    """The multi-process launcher (see `launch_workers`)."""
    return launch_workers


@pytest.fixture(scope="session")
def s3_server():
    """Port of a moto S3 server on 127.0.0.1 with the bucket `kcp-test`; stopped at the end."""
    from helpers import create_bucket, moto_s3_server

    with moto_s3_server() as (_, port):
        create_bucket(port, "kcp-test")
        yield port

"""The package imports with one backend installed, and never imports PyTorch."""

import os
import subprocess
import sys

import keras
import pytest
from helpers import subprocess_env

import keras_callbacks_plus

BACKEND = keras.backend.backend()
OTHER_BACKEND_MODULE = {"tensorflow": "jax", "jax": "tensorflow"}[BACKEND]

# Runs in a fresh interpreter where the other backend and torch cannot be
# imported, as on a machine that has only this backend installed.
_PROBE = """
import sys
blocked = set(sys.argv[1:])

class NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in blocked:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, NotInstalled())
import keras
import numpy as np
import keras_callbacks_plus
from keras_callbacks_plus import distribute

model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
twin = distribute.data_parallel(model)
twin.compile(optimizer="sgd", loss="mse")
twin.fit(np.ones((4, 3), "float32"), np.zeros((4, 2), "float32"), batch_size=4, verbose=0)
assert not blocked & set(m.partition(".")[0] for m in sys.modules), "imported a blocked module"
print(keras_callbacks_plus.__version__, keras.backend.backend())
"""


def test_version_is_a_string():
    assert isinstance(keras_callbacks_plus.__version__, str)
    assert keras_callbacks_plus.__version__[0].isdigit()


def test_public_api():
    assert keras_callbacks_plus.data_parallel is keras_callbacks_plus.distribute.data_parallel
    for name in keras_callbacks_plus.__all__:
        assert hasattr(keras_callbacks_plus, name), name


@pytest.mark.slow  # a fresh process that starts a backend
def test_imports_and_trains_with_only_this_backend():
    # This checkout, wherever pytest runs from; the device flags of this process.
    env = {**os.environ, "PYTHONPATH": subprocess_env()["PYTHONPATH"]}
    result = subprocess.run(
        [sys.executable, "-c", _PROBE, OTHER_BACKEND_MODULE, "torch"],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == [keras_callbacks_plus.__version__, BACKEND]


@pytest.mark.parametrize("module", ["torch"])
def test_torch_is_not_imported(module):
    assert module not in sys.modules

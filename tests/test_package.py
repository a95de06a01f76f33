"""The package imports with one backend installed, never imports PyTorch, and keeps its layout."""

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import keras
import pytest
from helpers import subprocess_env

import keras_callbacks_plus
from keras_callbacks_plus import _compat, _lr_multipliers, distribute

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


PACKAGE = Path(keras_callbacks_plus.__file__).resolve().parent
BACKEND_MODULES = {"distribute/_tf.py", "distribute/_jax.py"}


def _modules_matching(pattern: str) -> set[str]:
    return {
        path.relative_to(PACKAGE).as_posix()
        for path in PACKAGE.rglob("*.py")
        if re.search(pattern, path.read_text(), re.MULTILINE)
    }


def test_backend_code_stays_in_the_backend_modules():
    imports = _modules_matching(r"^\s*(import|from)\s+(tensorflow|jax)\b")
    branches = _modules_matching(r"keras\.backend\.backend\(\)\s*[!=]=")
    # _activation_log imports TensorFlow only to write TensorBoard summaries.
    assert imports | branches <= BACKEND_MODULES | {"_activation_log.py"}
    assert BACKEND_MODULES <= imports
    assert _modules_matching(r"keras\.src") == {"_compat.py"}


def test_backend_modules_define_the_same_functions():
    def functions(module: str) -> dict[str, list[str]]:
        tree = ast.parse((PACKAGE / module).read_text())
        return {
            node.name: [arg.arg for arg in node.args.args]
            for node in tree.body
            if isinstance(node, ast.FunctionDef) and not node.name.startswith("_")
        }

    assert functions("distribute/_tf.py") == functions("distribute/_jax.py")


def test_distribute_all_is_the_user_api():
    assert sorted(distribute.__all__) == sorted([
        "data_parallel", "model_parallel", "copy_weights", "multi_worker_strategy", "is_chief",
        "worker_index", "num_workers", "barrier", "any_worker", "broadcast_from_chief", "list_devices",
        "emulate_cpu_devices", "num_replicas", "replica_divergence",
    ])
    for name in ("host_copy", "local_value", "compile_function", "scope", "single_device_copy",
                 "check_same_architecture"):
        assert callable(getattr(distribute, name)), name


def test_private_optimizer_methods_refuse_an_untested_keras(monkeypatch):
    scaling = _lr_multipliers.Scaling(paths=("w",), multipliers=(0.5,))
    monkeypatch.setattr(_compat, "keras_version", lambda: "3.99.0")
    with pytest.raises(
        RuntimeError, match=r"private methods of Keras optimizers.*3\.15\.1.*Installed: Keras 3\.99\.0"
    ):
        _lr_multipliers.scaled_copy(keras.optimizers.AdamW(), scaling)

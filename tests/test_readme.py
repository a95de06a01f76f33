"""Runs the README's migration guide: every block but the Keras 2 ones, on both backends.

In the section "Migrating from the Keras 2 recipes", a block after
`<!-- keras 2 -->` is old code, shown only; a block after `<!-- each worker -->`
runs in two worker processes on 127.0.0.1, after the section's first block (the
shared definitions); a block after `<!-- jax only -->` runs here on JAX and
must raise the clear error on TensorFlow; every other block runs here, in
order, in one namespace.
"""

import re
from pathlib import Path

import keras
import numpy as np
import pytest
from helpers import assert_workers_succeeded

from keras_callbacks_plus import read_activation_log

README = Path(__file__).resolve().parent.parent / "README.md"
SECTION = "## Migrating from the Keras 2 recipes"
BLOCK = re.compile(r"(?:<!-- (keras 2|each worker|jax only) -->\n)?```python\n(.*?)```",
                   re.DOTALL)
# The recipes of the seeds: multi_gpu_model, tf.device, saving the template, K.function,
# frozen / shared layers, EarlyStopping, HDF5Matrix + fit_generator, the parameter server,
# the TF server.
RECIPES = 9


def _blocks() -> list[tuple[str | None, str]]:
    text = README.read_text()
    assert SECTION in text
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    return [(m.group(1), m.group(2)) for m in BLOCK.finditer(section)]


def test_every_recipe_has_old_and_new_code():
    kinds = [kind for kind, _ in _blocks()]
    assert kinds.count("keras 2") == RECIPES
    assert kinds.count("each worker") == 1
    # Two definition blocks, then one or more new blocks after each old one.
    assert kinds[:2] == [None, None]
    for index, kind in enumerate(kinds):
        if kind == "keras 2":
            assert kinds[index + 1] != "keras 2"
    for kind, code in _blocks():
        if kind == "keras 2":
            assert len(code.strip().splitlines()) == 2, code


@pytest.fixture
def in_tmp_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.slow  # ~20 fits of a small CNN on 2 devices; each feature has its own fast test
def test_migration_blocks_run_in_one_process(in_tmp_path):
    namespace = {"__name__": "__readme__"}
    for kind, code in _blocks():
        if kind is None or kind == "jax only" and keras.backend.backend() == "jax":
            exec(compile(code, str(README), "exec"), namespace)
        elif kind == "jax only":
            with pytest.raises(NotImplementedError, match="needs the JAX backend"):
                exec(compile(code, str(README), "exec"), namespace)

    # What the blocks promise, checked on what they left behind.
    model, x = namespace["model"], namespace["x"]
    np.testing.assert_allclose(  # the last checkpoint holds the template's weights
        namespace["restored"].predict(x[:16], verbose=0), model.predict(x[:16], verbose=0),
        atol=1e-6,
    )
    assert namespace["outputs"]["dropout"].shape == (32, 8)
    [run] = read_activation_log(in_tmp_path / "activations.h5")
    assert set(run["layers"]) == {"test", "train"}
    assert len(run["layers"]["train"]["conv"]["mean"]) == 2
    assert namespace["unfreeze"].current_stage == 1
    assert set(namespace["unfreeze"].unfrozen_layers) == {"conv", "head"}
    stopping = namespace["early_stopping"]
    assert stopping.best_epoch is not None
    assert stopping.stop_reason in (None, "patience")
    assert sorted(p.name for p in (in_tmp_path / "ckpt").glob("*.keras")) == [
        "model_01.keras", "model_02.keras"
    ]
    if keras.backend.backend() == "jax":  # the sharded model's template, saved on one device
        np.testing.assert_allclose(
            namespace["restored_sharded"].predict(x[:16], verbose=0),
            namespace["sharded_model"].predict(x[:16], verbose=0), atol=1e-6)
        kernel = namespace["sharded_model"].get_layer("conv").kernel
        assert tuple(kernel.value.sharding.spec) == (None, None, None, "model")


@pytest.mark.multiprocess
def test_multi_worker_block_runs_on_two_workers(tmp_path, launch):
    blocks = _blocks()
    definitions = blocks[0][1]
    [worker_code] = [code for kind, code in blocks if kind == "each worker"]
    code_file = tmp_path / "block.py"
    code_file.write_text(definitions + "\n" + worker_code)
    reports = assert_workers_succeeded(
        launch("readme_block.py", num_workers=2, args=[str(code_file), str(tmp_path)])
    )
    assert [r["is_chief"] for r in reports] == [True, False]
    assert all(r["num_workers"] == 2 for r in reports)
    assert reports[0]["digest"] == reports[1]["digest"]  # the same trained template everywhere
    loaded = keras.saving.load_model(tmp_path / "model.keras")
    assert loaded.count_params() == 8 * 9 + 8 + 8 * 10 + 10


RECIPE = re.compile(r"<!-- preemption recipe -->\n```python\n(.*?)```", re.DOTALL)


def _recipe_script(directory: Path) -> Path:
    """The README's preemption recipe, after the migration guide's shared definitions."""
    text = README.read_text()
    definitions = "\n".join(code for kind, code in _blocks()[:2])
    script = directory / "train.py"
    script.write_text(
        "from keras_callbacks_plus import distribute\n"
        "distribute.emulate_cpu_devices(2)\n" + definitions + RECIPE.search(text).group(1)
    )
    return script


@pytest.mark.slow  # two training processes
def test_preemption_recipe_exits_143_and_resumes_where_it_stopped(tmp_path):
    import json
    import signal
    import subprocess
    import sys
    import time

    from helpers import subprocess_env

    from keras_callbacks_plus import PREEMPTED_EXIT_CODE, _commit, _storage

    script, ckpt = _recipe_script(tmp_path), tmp_path / "ckpt"
    env = subprocess_env(CKPT_DIR=str(ckpt), SAVE_EVERY="1s")
    process = subprocess.Popen([sys.executable, str(script)], cwd=tmp_path,
                               env={**env, "EPOCHS": "100000"}, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not _commit.complete_checkpoints(_storage.LocalStorage(), str(ckpt)):
            assert process.poll() is None, process.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "no checkpoint within 240 s"
            time.sleep(0.2)
        process.send_signal(signal.SIGTERM)  # whatever batch it is at
        out, err = process.communicate(timeout=240)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == PREEMPTED_EXIT_CODE == 143, err[-3000:]
    _, record = _commit.complete_checkpoints(_storage.LocalStorage(), str(ckpt))[-1]
    assert record["preemption"] and json.loads(json.dumps(record["callbacks"]))
    stopped = record["epoch"] + 1  # the epoch in progress, counted from 1
    assert out.splitlines()[-1] == f"epochs 1 to {stopped} preempted"
    # The next run resumes in that epoch and trains one more.
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path,
                            env={**env, "EPOCHS": str(stopped + 1)}, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines()[-1] == f"epochs {stopped} to {stopped + 1} "

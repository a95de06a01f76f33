"""Tests of the one-command demo (`python -m keras_callbacks_plus demo`), on both backends."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import subprocess_env

from keras_callbacks_plus import distribute, read_activation_log
from keras_callbacks_plus.demo import TASK_B, run_demo


@pytest.mark.slow
def test_demo_command_fine_tunes_a_model_that_really_learns(tmp_path):
    out = tmp_path / "demo"
    # A fresh process, as a user runs it: the command splits the CPU itself.
    # Without the default 120 s budget: on a slow host it would end the
    # fine-tuning early, and the stages and the accuracy checked here would
    # depend on the host's speed.
    result = subprocess.run(
        [sys.executable, "-m", "keras_callbacks_plus", "demo", "--out", str(out),
         "--max-time", "1e9"],
        env=subprocess_env(), capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())

    # Fine-tuned on a data-parallel twin over two emulated CPU devices.
    assert summary["devices"] == ["cpu:0", "cpu:1"] and summary["emulated_devices"]
    assert "Epoch 1/12" in result.stdout  # Keras's progress bar
    # It learned: held-out accuracy of the checkpoint loaded on one device.
    assert summary["chance"] == 1 / len(TASK_B)
    assert summary["test_accuracy"] >= 0.8, summary
    assert summary["pretrain_accuracy"] >= 0.8, summary

    # Stages: head first, then the blocks from the top, at the epochs run.
    stages = summary["stages"]
    assert [s["epoch"] for s in stages] == [0, 2, 4, 6][: len(stages)]
    assert stages[0]["layers"] == ["head"] and len(stages) >= 2
    assert stages[1]["layers"] == ["backbone/block3_*"]
    assert all(s["epoch"] < summary["epochs_run"] for s in stages)

    # Early stopping and checkpoint agree on the best epoch.
    assert summary["stop_reason"] in (None, "patience")
    assert summary["epochs_run"] <= 12
    best_file = Path(summary["checkpoint"])
    assert best_file.is_file() and best_file.parent == out / "checkpoints"
    assert f"epoch{summary['best_epoch'] + 1:02d}-" in best_file.name
    assert Path(summary["last_checkpoint"]).is_file()

    # The activation log has both phases for every logged epoch, and its report.
    [run] = read_activation_log(summary["activation_log"])
    assert set(run["layers"]) == {"test", "train"}
    assert len(run["layers"]["test"]["head"]["mean"]) == summary["epochs_run"]
    assert Path(summary["activation_report"]).stat().st_size > 0

    # The printed summary names the same files.
    for key in ("checkpoint", "activation_log", "activation_report"):
        assert summary[key] in result.stdout
    assert "stop reason" in result.stdout and "wall time" in result.stdout


def test_demo_refuses_a_folder_with_other_files(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"did not write \(notes\.txt\)"):
        run_demo(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_demo_checks_its_sizes(tmp_path):
    with pytest.raises(ValueError, match="argument samples"):
        run_demo(tmp_path / "demo", samples=100, batch_size=64)


def test_emulate_cpu_devices_keeps_a_split_cpu():
    # conftest split the CPU before the backend started; a second call changes nothing.
    assert distribute.emulate_cpu_devices(2) == distribute.list_devices("cpu")
    assert len(distribute.list_devices("cpu")) == 2
    with pytest.raises(ValueError, match="argument count"):
        distribute.emulate_cpu_devices(0)

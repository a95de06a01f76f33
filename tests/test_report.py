"""Tests of the activation report (report.py, the `report` command) and of reading older logs."""

import json
from pathlib import Path

import h5py
import keras
import numpy as np
import pytest

from keras_callbacks_plus.__main__ import _storage_options, main
from keras_callbacks_plus.activations import ActivationLogger, read_activation_log

pytest.importorskip("matplotlib")
from keras_callbacks_plus.report import plot_activation_log, write_activation_report  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


def _png_size(path: Path) -> tuple[int, int]:
    header = Path(path).read_bytes()[:24]
    assert header[:8] == PNG
    return int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24], "big")


def _deep_model(layers=9):
    """A stack of small Dense layers under a nested model, so paths have a shared prefix."""
    keras.utils.set_random_seed(0)
    backbone = keras.Sequential(
        [keras.Input((6,))] + [keras.layers.Dense(6, activation="relu", name=f"block_{i}_dense")
                               for i in range(layers - 1)],
        name="a_backbone_with_a_long_name",
    )
    inputs = keras.Input((6,), name="x")
    return keras.Model(inputs, keras.layers.Dense(2, name="head")(backbone(inputs)), name="deep")


@pytest.fixture(scope="module")
def log(tmp_path_factory):
    """A log of 9 layers, both phases, 3 epochs of growing weights."""
    path = tmp_path_factory.mktemp("report") / "act.h5"
    model = _deep_model()
    probe = np.random.default_rng(0).normal(size=(32, 6)).astype("float32")
    logger = ActivationLogger(probe, phases=("test", "train"), h5_path=path)
    logger.set_model(model)
    logger.on_train_begin()
    for epoch in range(3):
        logger.on_epoch_end(epoch, {})
        for variable in model.trainable_variables:
            variable.assign(variable * 1.3)
    logger.on_train_end()
    return path


def test_many_layers_give_an_overview_and_numbered_pages(log, tmp_path, capsys):
    assert main(["report", str(log), "-o", str(tmp_path / "report.png"),
                 "--layers-per-page", "4"]) == 0
    names = ["report.png", "report-p01.png", "report-p02.png", "report-p03.png"]
    assert capsys.readouterr().out.split() == [w for n in names for w in ("Wrote",
                                                                          str(tmp_path / n))]
    overview = _png_size(tmp_path / "report.png")
    pages = [_png_size(tmp_path / n) for n in names[1:]]
    # Four layers a page, the last one holds one; the overview is one page for all nine.
    assert pages[0][1] == pages[1][1] > pages[2][1]
    assert overview[1] < pages[0][1] * 2


def test_few_layers_give_one_page_and_a_pdf_holds_every_page(log, tmp_path):
    single = write_activation_report(log, tmp_path / "one.png")
    assert single == [tmp_path / "one.png"]
    assert plot_activation_log(log, tmp_path / "two.png", layers=["block_1*"]) == \
        tmp_path / "two.png"
    assert write_activation_report(log, tmp_path / "all.pdf", layers_per_page=4) == \
        [tmp_path / "all.pdf"]
    assert (tmp_path / "all.pdf").read_bytes().count(b"/Type /Page\n") + \
        (tmp_path / "all.pdf").read_bytes().count(b"/Type /Page ") >= 4


def test_report_arguments_are_checked(log, tmp_path):
    with pytest.raises(ValueError, match="layers_per_page"):
        write_activation_report(log, tmp_path / "r.png", layers_per_page=0)
    with pytest.raises(ValueError, match="Phases"):
        write_activation_report(log, tmp_path / "r.png", phases=["eval"])
    assert main(["report", str(log), "--storage-option", "anon=true", "-o",
                 str(tmp_path / "r.png")]) == 2  # options for a local path


def test_storage_options_from_the_command_line():
    assert _storage_options(["client_kwargs.endpoint_url=http://127.0.0.1:9", "anon=false",
                             "key=abc", 'config_kwargs={"retries": 1}']) == {
        "client_kwargs": {"endpoint_url": "http://127.0.0.1:9"}, "anon": False, "key": "abc",
        "config_kwargs": {"retries": 1},
    }
    with pytest.raises(ValueError, match="KEY=VALUE"):
        _storage_options(["novalue"])


def test_a_format_1_log_still_reads_and_draws(tmp_path):
    """Logs written before format 2: a group per layer, edges fixed for the run."""
    path = tmp_path / "old.h5"
    edges = np.linspace(-1.0, 1.0, 5)
    with h5py.File(path, "w") as f:
        f.attrs["format"] = "keras_callbacks_plus.activation_log"
        f.attrs["format_version"] = 1
        run = f.create_group("run_000")
        run.attrs.update({"model": "old", "backend": "jax", "phases": ["test"],
                          "layers": ["dense"], "versions": json.dumps({"keras": "3"}),
                          "percentile_levels": np.array([50.0]), "bins": 4})
        layer = run.create_group("test").create_group("dense")
        layer.attrs.update({"layer_path": "dense", "output_shape": [-1, 3], "bin_edges": edges,
                            "percentile_levels": np.array([50.0])})
        for field, value in [("epoch", [0, 1]), ("count", [30, 30]), ("underflow", [0, 1]),
                             ("overflow", [0, 0])]:
            layer[field] = np.array(value, np.int64)
        for field in ("mean", "std", "min", "max", "zero_frac", "nonfinite_frac"):
            layer[field] = np.array([0.1, 0.2])
        layer["percentiles"] = np.array([[0.0], [0.1]])
        layer["histogram"] = np.array([[5, 10, 10, 5], [4, 10, 10, 5]], np.int64)
    record = read_activation_log(path)[0]["layers"]["test"]["dense"]
    assert record["bin_edges"].shape == (2, 5)
    np.testing.assert_array_equal(record["bin_edges"][1], edges)
    assert record["output_shape"] == (None, 3)
    assert write_activation_report(path, tmp_path / "old.png") == [tmp_path / "old.png"]


@pytest.mark.parametrize("low, high", [(5e-5, 1.4), (0.03, 1.2), (0.3, 0.9), (0.31, 0.33),
                                       (1e-9, 1e3)])
def test_log_colorbar_ticks_are_few_and_inside_the_range(low, high):
    """The std colorbar of the MobileNetV3Small overview had 15 overlapping tick labels."""
    from keras_callbacks_plus._report_panels import log_ticks

    ticks = log_ticks(low, high)
    assert 2 <= len(ticks) <= 5
    assert ticks == sorted(ticks) and low <= ticks[0] and ticks[-1] <= high

"""Tests of keras_callbacks_plus.activations (ActivationLogger), report and CLI, on each backend."""

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import keras
import numpy as np
import pytest
from helpers import assert_workers_succeeded, s3_options

from keras_callbacks_plus import (
    _activation_log,
    _activation_stats,
    _extract,
    activations,
    distribute,
)
from keras_callbacks_plus.activations import (
    ActivationLogger,
    intermediate_outputs,
    read_activation_log,
)

BACKEND = keras.backend.backend()
REPO = Path(__file__).resolve().parents[1]
FIT = {"batch_size": 16, "epochs": 2, "shuffle": False, "verbose": 0}


def _state(model):
    """Every variable of the model, seed generator states included, as bytes."""
    return {v.path: np.asarray(v.numpy()).tobytes() for v in model.variables}


def _trained(model, data, epochs=1):
    """The model compiled and trained a little, so BN moving statistics are not trivial."""
    x, y = data
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    model.fit(x, y, **{**FIT, "epochs": epochs})
    return model


def _run_hooks(logger, model, epochs=(0,)):
    """Drives the logger as fit would, without training."""
    logger.set_model(model)
    logger.on_train_begin()
    logs = []
    for epoch in epochs:
        logs.append({})
        logger.on_epoch_end(epoch, logs[-1])
    logger.on_train_end()
    return logs


class Scale(keras.layers.Layer):
    """Multiplies by one weight, elementwise (so a NaN stays where it is), initially 1."""

    def build(self, input_shape):
        self.factor = self.add_weight(shape=(), initializer="ones", name="factor")

    def call(self, x):
        return x * self.factor


def _identity_model(width=8, name="identity"):
    """Input -> Scale: its output is its input times a weight."""
    inputs = keras.Input((width,), name="x")
    return keras.Model(inputs, Scale(name="scale")(inputs), name=name)


def _histogram(values, edges):
    """`(counts, underflow, overflow)` in half-open bins [e_j, e_j+1), as the logger counts."""
    values = values[np.isfinite(values)]
    inside = values[(values >= edges[0]) & (values < edges[-1])]
    counts = np.bincount(np.searchsorted(edges, inside, side="right") - 1,
                         minlength=len(edges) - 1)
    return counts, int(np.sum(values < edges[0])), int(np.sum(values >= edges[-1]))


def _subprocess_env():
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "KERAS_BACKEND": BACKEND}


# ------------------------------------------------------------------ arguments


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"every": 0}, "Invalid value for argument every. Expected an int >= 1. Received: every=0"),
        ({"every": 1.5}, "Invalid value for argument every"),
        ({"phases": ()}, "Invalid value for argument phases"),
        ({"phases": ("test", "eval")}, "Received: phases=('test', 'eval')"),
        ({"bins": 1}, "Invalid value for argument bins. Expected an int in [2, 512]"),
        ({"bins": 513}, "Received: bins=513"),
        ({"percentiles": (50, 101)}, "Invalid value for argument percentiles"),
        ({"sample_values": 0}, "Invalid value for argument sample_values"),
        ({"log_scalars": ["median"]}, "Invalid value for argument log_scalars"),
        ({"layers": []}, "Invalid value for argument layers"),
    ],
)
def test_bad_arguments_fail_in_the_constructor(kwargs, message):
    with pytest.raises(ValueError) as caught:
        ActivationLogger(np.zeros((4, 8), "float32"), **kwargs)
    assert message in str(caught.value)


@pytest.mark.parametrize(
    "probe",
    [None, (row for row in np.zeros((4, 8))), np.zeros((0, 8)),
     (np.zeros((4, 8)), np.zeros((3, 8)))],
    ids=["none", "generator", "empty", "unequal"],
)
def test_bad_probes_fail_in_the_constructor(probe):
    with pytest.raises(ValueError, match="Invalid value for argument probe"):
        ActivationLogger(probe)


# ----------------------------------------------------- bad input at train begin


def _failing_fit(model, data, logger):
    before = _state(model)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    with pytest.raises(ValueError) as caught:
        model.fit(*data, **FIT, callbacks=[logger])
    assert _state(model) == before, "a training step ran before the error"
    return str(caught.value)


def test_unknown_layer_fails_at_train_begin_and_lists_the_layers(tiny_model, tiny_data):
    logger = ActivationLogger(tiny_data[0][:16], layers=["hidden", "relux"])
    message = _failing_fit(tiny_model(), tiny_data, logger)
    assert "'relux'" in message
    assert "Available layers: hidden, relu, head." in message


def test_probe_that_does_not_fit_fails_at_train_begin(tiny_model, tiny_data):
    message = _failing_fit(tiny_model(), tiny_data, ActivationLogger(np.zeros((16, 5), "float32")))
    assert ("input 'features' expects shape (None, 8), the probe's batch has shape (16, 5)"
            in message)
    message = _failing_fit(
        tiny_model(), tiny_data, ActivationLogger((np.zeros((16, 8)), np.zeros((16, 8))))
    )
    assert "gives 2 array(s), the model has 1 input(s)" in message


def test_unwritable_h5_path_fails_at_train_begin(tmp_path, tiny_model, tiny_data):
    def message(h5_path):
        logger = ActivationLogger(tiny_data[0][:16], h5_path=h5_path)
        return _failing_fit(tiny_model(), tiny_data, logger)

    text = message(tmp_path / "no" / "a.h5")
    assert "Invalid value for argument h5_path" in text and "does not exist" in text
    assert "Cannot write the activation log" in message(tmp_path)  # a folder
    (tmp_path / "notes.h5").write_text("not HDF5")
    assert "Cannot write the activation log" in message(tmp_path / "notes.h5")
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["weights"] = np.ones(3)
    text = message(tmp_path / "other.h5")
    assert "not an activation log" in text and "never overwrites" in text
    with h5py.File(tmp_path / "other.h5", "r") as f:  # untouched
        assert list(f) == ["weights"]


# ------------------------------------------------------------------ statistics


def test_statistics_equal_numpy_on_intermediate_outputs(tmp_path, tiny_model, tiny_data):
    model = _trained(tiny_model(batch_norm=True, dropout=0.5), tiny_data)
    probe = tiny_data[0][:48]  # batches of 32 and 16: the streaming merge and the row padding
    path = tmp_path / "act.h5"
    logger = ActivationLogger(probe, phases=("test",), percentiles=(0, 1, 50, 99, 100), bins=16,
                              h5_path=path, batch_size=32)
    _run_hooks(logger, model)
    expected = intermediate_outputs(model, None, probe)
    assert list(expected) == ["hidden", "bn", "relu", "dropout", "head"]
    run = read_activation_log(path)[-1]
    assert run["attrs"]["layers"] == list(expected)
    for name, values in expected.items():
        values = values.ravel().astype(np.float64)
        record = run["layers"]["test"][name]
        assert record["epoch"].tolist() == [0]
        assert record["count"][0] == values.size
        np.testing.assert_allclose(record["mean"][0], values.mean(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(record["std"][0], values.std(), rtol=1e-4)
        assert record["min"][0] == values.min() and record["max"][0] == values.max()
        assert record["zero_frac"][0] == np.mean(values == 0)
        assert record["nonfinite_frac"][0] == 0.0
        counts, under, over = _histogram(values, record["bin_edges"][0])
        np.testing.assert_array_equal(record["histogram"][0], counts)
        assert (record["underflow"][0], record["overflow"][0]) == (under, over)
        assert under + over <= 0.01 * values.size  # the edges cover all but outliers
        exact = np.percentile(values, [0, 1, 50, 99, 100])
        np.testing.assert_allclose(record["percentiles"][0], exact, rtol=0.004, atol=1e-9)
    # ReLU zeroes about half its inputs; Dropout in test phase changes nothing.
    assert 0.2 < run["layers"]["test"]["relu"]["zero_frac"][0] < 0.8
    np.testing.assert_array_equal(expected["dropout"], expected["relu"])


def test_non_finite_values_zeros_and_tails(tmp_path):
    """A crafted probe through a scaling layer: NaN, inf, zeros, tails; then values grow."""
    rng = np.random.default_rng(1)
    probe = np.concatenate([
        rng.standard_cauchy((30, 8)), np.zeros((5, 8)), rng.normal(size=(5, 8)) * 1e-7,
    ]).astype("float32")
    probe[2, 3], probe[7, 1], probe[11, 0] = np.nan, np.inf, -np.inf
    model = _identity_model()
    path = tmp_path / "act.h5"
    logger = ActivationLogger(probe, percentiles=(5, 25, 50, 75, 95), bins=8, batch_size=16,
                              h5_path=path)
    logger.set_model(model)
    logger.on_train_begin()
    logger.on_epoch_end(0, {})
    model.get_layer("scale").factor.assign(-3.0)  # the next epoch's values leave the first edges
    logger.on_epoch_end(1, {})
    logger.on_train_end()
    record = read_activation_log(path)[-1]["layers"]["test"]["scale"]
    for row, factor in enumerate((1.0, -3.0)):
        values = (probe * np.float32(factor)).astype(np.float64).ravel()
        finite = values[np.isfinite(values)]
        assert record["count"][row] == values.size
        assert record["nonfinite_frac"][row] == 3 / values.size
        assert record["zero_frac"][row] == np.mean(values == 0)
        np.testing.assert_allclose(record["mean"][row], finite.mean(), rtol=1e-5)
        np.testing.assert_allclose(record["std"][row], finite.std(), rtol=1e-4)
        assert (record["min"][row], record["max"][row]) == (finite.min(), finite.max())
        counts, under, over = _histogram(finite, record["bin_edges"][row])
        np.testing.assert_array_equal(record["histogram"][row], counts)
        assert (record["underflow"][row], record["overflow"][row]) == (under, over)
        exact = np.percentile(finite, [5, 25, 50, 75, 95])
        np.testing.assert_allclose(record["percentiles"][row], exact, rtol=0.004, atol=1e-9)
    # Cauchy tails: the edges may leave out the most extreme values, never the bulk.
    assert record["underflow"][0] + record["overflow"][0] <= 0.01 * finite.size + 2



def test_percentiles_from_the_sketch_match_numpy_within_its_documented_error():
    """Heavy tails, both signs, ties, tiny values, many batches: within 0.39% of numpy."""
    rng = np.random.default_rng(2)
    parts = [
        rng.lognormal(0.0, 3.0, 3000), -rng.lognormal(1.0, 2.0, 2000), np.zeros(500),
        rng.normal(0, 1e-6, 500), np.full(300, 2.5), rng.uniform(-1e4, 1e4, 1000),
    ]
    values = rng.permutation(np.concatenate(parts)).astype(np.float32)[:7296]
    probe = values.reshape(-1, 8)
    model = _identity_model()
    stats = _extract.evaluator(model, ["scale"]).statistics(
        model, (probe[i:i + 100] for i in range(0, len(probe), 100)), False,
    )
    levels = [0, 0.1, 1, 5, 10, 25, 33.3, 50, 66.7, 75, 90, 95, 99, 99.9, 100]
    estimate = stats.percentiles(levels)[0]
    exact = np.percentile(values.astype(np.float64), levels)
    sorted_values = np.sort(values.astype(np.float64))
    ranks = (len(values) - 1) * np.asarray(levels) / 100
    # The documented bound: 1/256 of the larger neighbouring order statistic, or 2**-30.
    neighbours = np.maximum(np.abs(sorted_values[np.floor(ranks).astype(int)]),
                            np.abs(sorted_values[np.ceil(ranks).astype(int)]))
    assert np.all(np.abs(estimate - exact) <= neighbours / 256 + 2.0**-30)


@pytest.mark.parametrize("sample_values", [4096, None])
def test_percentiles_and_histogram_from_a_sample_of_each_batch(tmp_path, sample_values):
    """Large outputs: percentiles and histogram count every k-th value, the rest every value."""
    rng = np.random.default_rng(3)
    probe = rng.normal(size=(96, 1000)).astype("float32")
    probe[:, ::7] = 0.0
    probe[0, 0] = np.nan  # flat index 0 of a batch is always in the sample
    path = tmp_path / "act.h5"
    logger = ActivationLogger(probe, percentiles=(0, 10, 50, 90, 100), bins=16, batch_size=32,
                              sample_values=sample_values, h5_path=path)
    _run_hooks(logger, _identity_model(width=1000))
    run = read_activation_log(path)[-1]
    assert run["attrs"]["sample_values"] == (sample_values or 0)
    record = run["layers"]["test"]["scale"]
    values = probe.astype(np.float64).ravel()
    finite = values[np.isfinite(values)]
    # Statistics over every value.
    assert record["count"][0] == values.size
    assert record["nonfinite_frac"][0] == 1 / values.size
    assert record["zero_frac"][0] == np.mean(values == 0)
    np.testing.assert_allclose(record["mean"][0], finite.mean(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(record["std"][0], finite.std(), rtol=1e-5)
    assert (record["min"][0], record["max"][0]) == (finite.min(), finite.max())
    # Percentiles and histogram over the sample: every 9th value of each batch
    # of 32000 (4096 values would take every 8th, but 8 divides 1000 channels).
    stride = _activation_stats.sample_stride(32000, 1000, sample_values)
    assert stride == (9 if sample_values else 1)
    kept = 32000 // stride
    sample = np.concatenate([probe[i:i + 32].astype(np.float64).ravel()[:kept * stride:stride]
                             for i in range(0, 96, 32)])
    sample = sample[np.isfinite(sample)]
    assert sample.size == (3 * 3555 - 1 if sample_values else finite.size)
    counts, under, over = _histogram(sample, record["bin_edges"][0])
    np.testing.assert_array_equal(record["histogram"][0], counts)
    assert (record["underflow"][0], record["overflow"][0]) == (under, over)
    assert counts.sum() + under + over == sample.size
    estimate = record["percentiles"][0]
    assert (estimate[0], estimate[-1]) == (finite.min(), finite.max())
    np.testing.assert_allclose(estimate[1:-1], np.percentile(sample, [10, 50, 90]),
                               rtol=0.004, atol=1e-9)
    # The sample visits every channel, so its percentiles are close to the full data's.
    np.testing.assert_allclose(estimate[1:-1], np.percentile(finite, [10, 50, 90]), atol=0.05)
    channels = np.arange(kept) * stride % 1000
    assert np.bincount(channels, minlength=1000).min() >= kept // 1000


def test_an_output_with_no_values_is_logged_beside_the_others(tmp_path):
    """A zero-sized output gets count 0 and NaN statistics; its neighbours are unaffected."""
    inputs = keras.Input((8,), name="x")
    dense = keras.layers.Dense(4, name="dense")(inputs)
    empty = keras.layers.Lambda(lambda t: t[:, :0], name="empty")(dense)
    model = keras.Model(inputs, keras.layers.Concatenate(name="cat")([dense, empty]))
    probe = np.random.default_rng(4).normal(size=(40, 8)).astype("float32")
    path = tmp_path / "act.h5"
    _run_hooks(ActivationLogger(probe, batch_size=16, h5_path=path), model)
    records = read_activation_log(path)[-1]["layers"]["test"]
    assert records["empty"]["count"][0] == 0
    assert np.isnan(records["empty"]["mean"][0])
    assert np.isnan(records["empty"]["percentiles"][0]).all()
    assert records["empty"]["histogram"][0].sum() == 0
    values = intermediate_outputs(model, "dense", probe)["dense"].astype(np.float64)
    for name in ("dense", "cat"):
        assert records[name]["count"][0] == values.size
        np.testing.assert_allclose(records[name]["mean"][0], values.mean(), rtol=1e-5, atol=1e-7)
        assert records[name]["max"][0] == values.max()


# ----------------------------------------------------------- phases, no effect


def test_train_phase_differs_from_test_phase_and_the_model_does_not_change(
    tmp_path, tiny_model, tiny_data
):
    model = _trained(tiny_model(batch_norm=True, dropout=0.5), tiny_data)
    probe = tiny_data[0][:32]
    before = _state(model)
    assert any("seed_generator" in path for path in before)
    test = intermediate_outputs(model, ["hidden", "bn", "dropout"], probe, training=False)
    train = intermediate_outputs(model, ["hidden", "bn", "dropout"], probe, training=True)
    again = intermediate_outputs(model, ["bn", "dropout"], probe, training=True)
    assert _state(model) == before  # moving statistics and seed state unchanged
    # Train phase: BatchNormalization with the batch's statistics; dropped units.
    bn, hidden = model.get_layer("bn"), train["hidden"]
    batch_normalized = (hidden - hidden.mean(0)) / np.sqrt(hidden.var(0) + bn.epsilon)
    np.testing.assert_allclose(train["bn"], batch_normalized * bn.gamma.numpy() + bn.beta.numpy(),
                               rtol=1e-4, atol=1e-4)
    assert not np.allclose(test["bn"], train["bn"], atol=1e-2)
    assert np.mean(train["dropout"] == 0) > np.mean(test["dropout"] == 0) + 0.15
    np.testing.assert_array_equal(train["dropout"], again["dropout"])  # seeds did not move

    path = tmp_path / "act.h5"
    _run_hooks(ActivationLogger(probe, layers="dropout", phases=("test", "train"), h5_path=path),
               model, epochs=(0, 1))
    assert _state(model) == before
    layers = read_activation_log(path)[-1]["layers"]
    test_zeros = layers["test"]["dropout"]["zero_frac"]
    train_zeros = layers["train"]["dropout"]["zero_frac"]
    assert np.all(train_zeros > test_zeros + 0.15)
    assert test_zeros[0] == np.mean(test["dropout"] == 0)
    assert train_zeros[0] == np.mean(train["dropout"] == 0)


def _fit_weights(tiny_model, tiny_data, callbacks):
    model = tiny_model(batch_norm=True, dropout=0.5)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    keras.utils.set_random_seed(7)
    history = model.fit(*tiny_data, batch_size=16, epochs=3, shuffle=True, verbose=0,
                        validation_split=0.25, callbacks=callbacks)
    variables = model.variables + model.optimizer.variables
    return [(v.path, np.asarray(v.numpy())) for v in variables], history.history


def test_training_with_the_logger_is_bit_identical(tmp_path, tiny_model, tiny_data):
    reference, reference_history = _fit_weights(tiny_model, tiny_data, [])
    logger = ActivationLogger(tiny_data[0][:32], phases=("test", "train"),
                              h5_path=tmp_path / "a.h5", log_scalars=True)
    weights, history = _fit_weights(tiny_model, tiny_data, [logger])
    assert len(weights) == len(reference)
    for (path, value), (_, expected) in zip(weights, reference):
        np.testing.assert_array_equal(value, expected, err_msg=path)
    assert history["loss"] == reference_history["loss"]
    assert history["val_loss"] == reference_history["val_loss"]
    assert len(history["act/dropout/zero_frac"]) == 3
    assert len(history["act_train/dropout/zero_frac"]) == 3
    train_zeros = history["act_train/dropout/zero_frac"]
    assert np.mean(train_zeros) > np.mean(history["act/dropout/zero_frac"])


# ------------------------------------------------------------------ selection


def _nested_model():
    keras.utils.set_random_seed(3)
    backbone = keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(16, name="block_1"),
            keras.layers.BatchNormalization(name="block_2"),
            keras.layers.Activation("relu", name="block_3a"),
            keras.layers.Dense(16, name="block_3b"),
        ],
        name="backbone",
    )
    inputs = keras.Input((8,), name="features")
    outputs = keras.layers.Dense(3, name="head")(backbone(inputs, training=False))
    return keras.Model(inputs, outputs, name="finetune"), backbone


def test_layers_by_name_pattern_and_path_in_nested_models(tiny_data):
    model, backbone = _nested_model()
    probe = tiny_data[0][:32]
    assert activations.layer_paths(model) == [
        "backbone", "backbone/block_1", "backbone/block_2", "backbone/block_3a",
        "backbone/block_3b", "head",
    ]
    out = intermediate_outputs(model, ["backbone/block_3*", "block_1", "head"], probe)
    assert list(out) == ["backbone/block_1", "backbone/block_3a", "backbone/block_3b", "head"]
    inner = keras.Model(backbone.inputs, [backbone.get_layer("block_1").output,
                                          backbone.get_layer("block_3a").output])
    block_1, block_3a = inner.predict(probe, verbose=0)
    np.testing.assert_allclose(out["backbone/block_1"], block_1, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["backbone/block_3a"], block_3a, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["head"], model.predict(probe, verbose=0), rtol=1e-5, atol=1e-6)
    # The default: every layer with an output, nested models entered, not repeated.
    assert list(intermediate_outputs(model, None, probe)) == activations.layer_paths(model)[1:]
    # The train phase is the model's own `training=True` call (which, in Keras 3,
    # overrides the `training=False` of the backbone's call in the graph).
    train_phase = intermediate_outputs(model, "head", probe, training=True)
    np.testing.assert_allclose(train_phase["head"], model(probe, training=True),
                               rtol=1e-5, atol=1e-6)


def test_dataset_probes_give_the_statistics_of_the_same_arrays(tmp_path, tiny_model, tiny_data):
    model = tiny_model()
    x, y = tiny_data[0][:64], tiny_data[1][:64]

    class Batches(keras.utils.PyDataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            return x[32 * i:32 * (i + 1)], y[32 * i:32 * (i + 1)]

    results = []
    for name, probe in [("arrays", x), ("pydataset", Batches())]:
        _run_hooks(ActivationLogger(probe, layers="relu", h5_path=tmp_path / f"{name}.h5",
                                    batch_size=32), model)  # the arrays in the dataset's batches
        results.append(read_activation_log(tmp_path / f"{name}.h5")[-1]["layers"]["test"]["relu"])
    for key in ("mean", "std", "zero_frac", "histogram", "percentiles"):
        np.testing.assert_array_equal(results[0][key], results[1][key])


# ---------------------------------------------------------------- HDF5 file


def test_second_fit_appends_a_new_run_and_resume_continues_one(tmp_path, tiny_model, tiny_data):
    path = tmp_path / "act.h5"
    model = tiny_model()
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    logger = ActivationLogger(tiny_data[0][:32], layers=["relu"], every=2, h5_path=path)
    model.fit(*tiny_data, **{**FIT, "epochs": 4}, callbacks=[logger])
    model.fit(*tiny_data, **{**FIT, "epochs": 2}, callbacks=[logger])
    runs = read_activation_log(path)
    assert [run["name"] for run in runs] == ["run_000", "run_001"]
    assert runs[0]["layers"]["test"]["relu"]["epoch"].tolist() == [1, 3]
    assert runs[1]["layers"]["test"]["relu"]["epoch"].tolist() == [1]  # started clean
    assert runs[0]["attrs"]["backend"] == BACKEND
    assert runs[0]["attrs"]["versions"]["keras"] == keras.version()

    state = json.loads(json.dumps(logger.get_state()))
    assert state == {"run": "run_001"}
    resumed = ActivationLogger(tiny_data[0][:32], layers=["relu"], every=2, h5_path=path)
    resumed.set_state(state)
    model.fit(*tiny_data, **{**FIT, "epochs": 4}, initial_epoch=2, callbacks=[resumed])
    runs = read_activation_log(path)
    assert len(runs) == 2
    record = runs[1]["layers"]["test"]["relu"]
    assert record["epoch"].tolist() == [1, 3]


def test_resume_continues_with_the_last_edges(tmp_path):
    """Values that shrink by half keep their edges in a run, also across a resume."""
    probe = np.random.default_rng(5).normal(size=(64, 8)).astype("float32")
    model = _identity_model()
    path = tmp_path / "act.h5"

    def logged(epochs, state=None, factor=1.0):
        logger = ActivationLogger(probe, h5_path=path)
        if state is not None:
            logger.set_state(json.loads(json.dumps(state)))
        model.get_layer("scale").factor.assign(factor)
        _run_hooks(logger, model, epochs=epochs)
        return logger.get_state(), read_activation_log(path)[-1]["layers"]["test"]["scale"]

    state, first = logged((0,))
    _, resumed = logged((1,), state, factor=0.5)
    _, fresh = logged((0,), factor=0.5)
    assert resumed["epoch"].tolist() == [0, 1]
    np.testing.assert_array_equal(resumed["bin_edges"][1], first["bin_edges"][0])
    # A new run chooses narrower edges for the same values.
    assert fresh["bin_edges"][0, -1] - fresh["bin_edges"][0, 0] < (
        first["bin_edges"][0, -1] - first["bin_edges"][0, 0])
    assert len(json.dumps(state)) < 100


def test_checkpoint_sidecar_stays_small_for_a_model_with_160_outputs(tmp_path):
    """The state names the run; edges and other per-layer arrays stay in the HDF5 log.

    The issue's target: a checkpoint's sidecar under 20 KB with the logger
    on every layer of a model of ~160 outputs (it was 708 KB).
    """
    from keras_callbacks_plus import ParallelModelCheckpoint

    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,), name="x")
    x = inputs
    for i in range(160):
        x = keras.layers.Dense(4, activation="tanh", name=f"dense_{i}")(x)
    model = keras.Model(inputs, x, name="deep")
    model.compile(optimizer="sgd", loss="mse")
    rng = np.random.default_rng(7)
    probe = rng.normal(size=(16, 4)).astype("float32")
    data = (probe, rng.normal(size=(16, 4)).astype("float32"))
    logger = ActivationLogger(probe, phases=("test", "train"), h5_path=tmp_path / "act.h5")
    checkpoint = ParallelModelCheckpoint(str(tmp_path / "m_{epoch}.keras"), async_save=False)
    model.fit(*data, batch_size=16, epochs=2, verbose=0, callbacks=[logger, checkpoint])
    assert len(logger._evaluator.names) == 160
    sidecar = tmp_path / "m_2.keras.json"
    assert sidecar.stat().st_size < 20_000
    state = json.loads(sidecar.read_text())["callbacks"][logger.state_key]
    assert state == {"run": "run_000"}
    resumed = ActivationLogger(probe, phases=("test", "train"), h5_path=tmp_path / "act.h5")
    resumed.set_state(state, arrays=None, directory=str(tmp_path))
    _run_hooks(resumed, model, epochs=(2,))
    runs = read_activation_log(tmp_path / "act.h5")
    assert len(runs) == 1
    record = runs[0]["layers"]["train"]["dense_159"]
    assert record["epoch"].tolist() == [0, 1, 2]
    np.testing.assert_array_equal(record["bin_edges"][2], record["bin_edges"][1])


def test_edges_follow_a_distribution_whose_scale_grows_tenfold(tmp_path):
    """The issue's test: at every epoch at most 5% of the values are outside the edges."""
    probe = np.random.default_rng(6).normal(size=(256, 32)).astype("float32")
    model = _identity_model(width=32)
    path = tmp_path / "act.h5"
    logger = ActivationLogger(probe, h5_path=path, batch_size=128)
    logger.set_model(model)
    logger.on_train_begin()
    factors = np.geomspace(1.0, 10.0, 8)
    for epoch, factor in enumerate(factors):
        model.get_layer("scale").factor.assign(float(factor) + 0.5 * epoch)
        logger.on_epoch_end(epoch, {})
    logger.on_train_end()
    record = read_activation_log(path)[-1]["layers"]["test"]["scale"]
    total = record["histogram"].sum(axis=1) + record["underflow"] + record["overflow"]
    outside = (record["underflow"] + record["overflow"]) / total
    assert np.all(outside <= 0.05), outside
    assert record["max"][-1] > 9 * record["max"][0]
    # Edges are kept while they fit: fewer edge sets than epochs.
    assert 1 < len({tuple(e) for e in record["bin_edges"]}) < len(factors)


@pytest.mark.slow  # fresh processes, one of which starts a backend
def test_hdf5_is_readable_by_another_process_while_training(
    tmp_path, tiny_model, tiny_data, monkeypatch
):
    path = tmp_path / "act.h5"
    reader = (
        "import sys, json\n"
        "from keras_callbacks_plus.activations import read_activation_log\n"
        "run = read_activation_log(sys.argv[1])[-1]\n"
        "print(json.dumps(run['layers']['test']['relu']['epoch'].tolist()))\n"
    )
    holder = (
        "import sys, h5py\n"
        "f = h5py.File(sys.argv[1], 'r')\n"
        "print('open', flush=True)\n"
        "sys.stdin.readline()\n"
        "f.close()\n"
    )
    seen = {}

    class Reader(keras.callbacks.Callback):
        """Runs after the logger: reads the file from another process, mid-run."""

        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 2:  # another process holds the file while the logger writes epoch 2
                self.holder = subprocess.Popen([sys.executable, "-c", holder, str(path)], text=True,
                                               stdin=subprocess.PIPE, stdout=subprocess.PIPE)
                assert self.holder.stdout.readline().strip() == "open"

        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1:
                result = subprocess.run([sys.executable, "-c", reader, str(path)],
                                        capture_output=True, text=True, timeout=120,
                                        env=_subprocess_env())
                assert result.returncode == 0, result.stderr[-2000:]
                seen["mid_run"] = json.loads(result.stdout.splitlines()[-1])
            if epoch == 2:
                self.holder.communicate("close\n", timeout=60)

    monkeypatch.setattr(_activation_log, "LOCK_WAIT_S", 0.2)
    model = tiny_model()
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    logger = ActivationLogger(tiny_data[0][:32], layers="relu", h5_path=path)
    with pytest.warns(UserWarning, match="held open by another process"):
        model.fit(*tiny_data, **{**FIT, "epochs": 4}, callbacks=[logger, Reader()])
    assert seen["mid_run"] == [0, 1]
    # The epoch written while the file was held was kept and written later.
    assert read_activation_log(path)[-1]["layers"]["test"]["relu"]["epoch"].tolist() == [0, 1, 2, 3]


# --------------------------------------------------------------- TensorBoard


def test_tensorboard_histograms(tmp_path, tiny_model, tiny_data):
    tf = pytest.importorskip("tensorflow")
    model = tiny_model()
    logger = ActivationLogger(tiny_data[0][:32], layers=["hidden", "relu"],
                              phases=("test", "train"), bins=10, tensorboard_dir=tmp_path / "tb")
    _run_hooks(logger, model, epochs=(0, 1))
    found = {}
    for event_file in (tmp_path / "tb").glob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(event_file)):
            for value in event.summary.value:
                found[(value.tag, event.step)] = (value.metadata.plugin_data.plugin_name,
                                                  tf.make_ndarray(value.tensor))
    assert set(found) == {(f"activations_{phase}/{layer}", step) for phase in ("test", "train")
                          for layer in ("hidden", "relu") for step in (0, 1)}
    plugin, buckets = found[("activations_test/relu", 1)]
    assert plugin == "histograms"
    assert buckets.shape[1] == 3 and buckets[:, 2].sum() == 32 * 16  # every value in a bucket
    assert np.all(buckets[:, 1] >= buckets[:, 0])


@pytest.mark.slow  # a fresh process that starts a backend
@pytest.mark.skipif(BACKEND != "jax", reason="TensorFlow is the backend: it cannot be absent")
def test_tensorboard_is_skipped_cleanly_without_tensorflow(tmp_path):
    script = """
import sys, warnings
class NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("tensorflow", "tensorboard"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, NotInstalled())
import keras, numpy as np
from keras_callbacks_plus.activations import ActivationLogger, read_activation_log
model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="d")])
model.compile(optimizer="sgd", loss="mse")
logger = ActivationLogger(np.ones((8, 4), "float32"), h5_path=sys.argv[1],
                          tensorboard_dir=sys.argv[2])
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    model.fit(np.ones((8, 4)), np.zeros((8, 3)), epochs=2, verbose=0, callbacks=[logger])
assert any("TensorFlow is not installed" in str(w.message) for w in caught), caught
assert "tensorflow" not in sys.modules
print(read_activation_log(sys.argv[1])[-1]["layers"]["test"]["d"]["epoch"].tolist())
"""
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "a.h5"), str(tmp_path / "tb")],
        capture_output=True, text=True, timeout=180, env=_subprocess_env(),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split("\n")[-2] == "[0, 1]"
    assert not (tmp_path / "tb").exists()


# ------------------------------------------------------------- data parallel


def test_logger_on_a_data_parallel_twin(tmp_path, two_devices, tiny_model, tiny_data):
    template = tiny_model(batch_norm=True, dropout=0.5)
    twin = distribute.data_parallel(template, devices=two_devices)
    twin.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    path = tmp_path / "act.h5"
    probe = tiny_data[0][:32]
    logger = ActivationLogger(probe, layers=["bn", "relu"], phases=("test", "train"),
                              h5_path=path)
    twin.fit(*tiny_data, **FIT, callbacks=[logger])
    assert distribute.replica_divergence(twin) == 0.0
    distribute.copy_weights(twin, template)
    layers = read_activation_log(path)[-1]["layers"]
    for phase in ("test", "train"):
        expected = intermediate_outputs(template, ["bn", "relu"], probe, training=phase == "train")
        for name, values in expected.items():
            record = layers[phase][name]
            np.testing.assert_allclose(record["mean"][-1], values.mean(), rtol=1e-4, atol=1e-6)
            assert record["zero_frac"][-1] == np.mean(values == 0)


# ------------------------------------------------------------- report, bench


@pytest.mark.slow  # a plot (matplotlib), not the callback
def test_report_png_from_the_command_line(tmp_path, tiny_model, tiny_data):
    pytest.importorskip("matplotlib")
    from keras_callbacks_plus.__main__ import main

    path = tmp_path / "act.h5"
    model = tiny_model(batch_norm=True, dropout=0.5)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    logger = ActivationLogger(tiny_data[0][:32], phases=("test", "train"), h5_path=path)
    model.fit(*tiny_data, **{**FIT, "epochs": 3}, callbacks=[logger])
    output = tmp_path / "out" / "report.png"
    assert main(["report", str(path), "-o", str(output)]) == 0
    with open(output, "rb") as f:
        header = f.read(24)
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24], "big")
    assert width > 800 and height > 5 * 100  # five layer rows
    assert main(["report", str(tmp_path / "missing.h5"), "-o", str(output)]) == 2
    assert main(["report", str(path), "--layers", "nothing*", "-o", str(output)]) == 2


@pytest.mark.multiprocess
def test_multi_worker_only_the_chief_writes_and_logs_agree(tmp_path, launch):
    path = tmp_path / "act.h5"
    results = launch("activations_multi_worker.py", 2, args=[str(path)], timeout=240)
    reports = sorted(assert_workers_succeeded(results), key=lambda r: r["index"])
    assert [r["is_chief"] for r in reports] == [True, False]
    assert reports[0]["logs"] == reports[1]["logs"]
    assert len(reports[0]["logs"]["act_train/relu/zero_frac"]) == 2
    runs = read_activation_log(path)
    assert len(runs) == 1
    record = runs[0]["layers"]["test"]["relu"]
    assert record["epoch"].tolist() == [0, 1]
    assert record["zero_frac"].tolist() == reports[0]["logs"]["act/relu/zero_frac"]


# ------------------------------------------------------------- object stores


def _fit_with_a_reader(tiny_model, tiny_data, logger, url, storage_options=None, epochs=3):
    """Fits with `logger`; after each epoch another callback reads the log from the store."""
    seen = []

    class Reader(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            run = read_activation_log(url, storage_options=storage_options)[-1]
            seen.append(run["layers"]["test"]["relu"]["epoch"].tolist())

    model = tiny_model()
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    model.fit(*tiny_data, **{**FIT, "epochs": epochs}, callbacks=[logger, Reader()])
    return seen


def test_log_on_an_object_store_is_readable_between_epochs(tiny_model, tiny_data):
    pytest.importorskip("fsspec")
    import fsspec

    url = f"memory://kcp-activations-{os.getpid()}/runs/act.h5"
    logger = ActivationLogger(tiny_data[0][:32], layers="relu", h5_path=url)
    assert _fit_with_a_reader(tiny_model, tiny_data, logger, url) == [[0], [0, 1], [0, 1, 2]]
    # A second fit appends a run to the stored file; resume continues one.
    state = logger.get_state()
    resumed = ActivationLogger(tiny_data[0][:32], layers="relu", h5_path=url)
    resumed.set_state(state)
    model = tiny_model()
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    model.fit(*tiny_data, **{**FIT, "epochs": 4}, initial_epoch=3, callbacks=[resumed])
    runs = read_activation_log(url)
    assert [r["name"] for r in runs] == ["run_000"]
    assert runs[0]["layers"]["test"]["relu"]["epoch"].tolist() == [0, 1, 2, 3]
    fsspec.filesystem("memory").rm(f"/kcp-activations-{os.getpid()}", recursive=True)


def test_object_store_arguments_fail_in_the_constructor(tmp_path):
    probe = np.zeros((4, 8), "float32")
    with pytest.raises(ImportError, match=r"ActivationLogger: h5_path='gs://b/act.h5' needs .*gcsfs"):
        ActivationLogger(probe, h5_path="gs://b/act.h5")
    with pytest.raises(ValueError, match="Invalid value for argument storage_options"):
        ActivationLogger(probe, h5_path=tmp_path / "a.h5", storage_options={"anon": True})
    pytest.importorskip("fsspec")
    with pytest.raises(ValueError, match="nosuchproto"):
        ActivationLogger(probe, h5_path="nosuchproto://b/act.h5")


def test_log_on_s3_and_the_report_from_its_url(s3_server, tiny_model, tiny_data, tmp_path,
                                               capsys):
    """On moto's S3 server (conftest.py's `s3_server`: 127.0.0.1, bucket `kcp-test`)."""
    options = s3_options(s3_server)
    s3_endpoint = options["client_kwargs"]["endpoint_url"]
    url = "s3://kcp-test/activations/run/act.h5"
    logger = ActivationLogger(tiny_data[0][:32], layers=["hidden", "relu"], h5_path=url,
                              storage_options=options, phases=("test", "train"))
    assert _fit_with_a_reader(tiny_model, tiny_data, logger, url, options, epochs=2) == [
        [0], [0, 1]]
    run = read_activation_log(url, storage_options=options)[-1]
    assert run["layers"]["train"]["hidden"]["count"].tolist() == [32 * 16] * 2
    pytest.importorskip("matplotlib")
    from keras_callbacks_plus.__main__ import main

    output = tmp_path / "report.png"
    assert main(["report", url, "-o", str(output), "--storage-option", "key=testing",
                 "--storage-option", "secret=testing", "--storage-option",
                 f"client_kwargs.endpoint_url={s3_endpoint}", "--storage-option",
                 "client_kwargs.region_name=us-east-1"]) == 0
    assert capsys.readouterr().out.strip() == f"Wrote {output}"
    assert output.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

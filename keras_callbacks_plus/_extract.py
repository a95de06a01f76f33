"""Intermediate outputs of a model, evaluated without side effects.

The chosen layers' outputs become the outputs of a Functional "extractor"
over the model's own layers (shared, never copied; nested models are traced
again so that their inner outputs become tensors of the outer graph). The
extractor runs through `Model.stateless_call`: the model's variable values go
in, the updates come back and are dropped, so nothing the model holds
changes. `Evaluator` compiles it once per phase (and input shape), returning
the outputs or their streamed statistics (`_activation_stats`).

Only layers with a symbolic output can be read: those of a Functional or
Sequential model, and of the graph models nested in it (not the sublayers of
a subclassed model or of a custom layer).
"""

from __future__ import annotations

import weakref
from typing import Any, Mapping, Sequence

import keras
import numpy as np

from keras_callbacks_plus import _layers, distribute
from keras_callbacks_plus._activation_sketch import SIZE as SKETCH_SIZE
from keras_callbacks_plus._activation_stats import ROW, Layout, Stats, stage, summarize

# ---------------------------------------------------------------- layers


def is_graph_model(layer: Any) -> bool:
    """A Functional or Sequential model, whose inner layers have symbolic outputs."""
    if not isinstance(layer, keras.Model):
        return False
    try:
        return layer.outputs is not None and layer.inputs is not None
    except (AttributeError, ValueError):
        return False


def _graph_layers(model: keras.Model) -> list[tuple[str, Any]]:
    """`(path, layer)` for the layers of `model` with a symbolic output, Input layers aside."""
    return _layers.walk(model, enter=is_graph_model)


def layer_paths(model: keras.Model) -> list[str]:
    """Every layer of `model` as a path, nested models included (`"backbone/conv_1"`)."""
    _check_model(model)
    return [path for path, _ in _graph_layers(model)]


def _check_model(model: Any) -> None:
    if not isinstance(model, keras.Model):
        raise TypeError(f"Expected a keras.Model. Received: {type(model).__name__}")
    if not is_graph_model(model):
        raise ValueError(
            f"Model {model.name!r} has no symbolic layer outputs: intermediate "
            "activations need a Functional or Sequential model (a subclassed "
            "model can be used as a layer inside one), built with an Input."
        )


def output_paths(model: keras.Model, layers: str | Sequence[str] | None) -> list[str]:
    """The paths of the layers whose outputs `layers` selects, in model order.

    Patterns as in `_layers` among the layers with a symbolic output; a
    nested model named by a pattern gives its own output. `None`: every
    layer but the nested graph models themselves.
    """
    _check_model(model)
    if layers is None:
        return [path for path, layer in _graph_layers(model) if not is_graph_model(layer)]
    return [path for path, _ in _layers.select(model, layers, enter=is_graph_model)]


def _io(model: keras.Model):
    """The symbolic input and output structures of a graph model."""
    if isinstance(model, keras.Sequential):
        return model.inputs[0], model.outputs[0]
    return model.input, model.output


def _retrace(model: keras.Model, wanted: Sequence[str]):
    """Calls `model`'s layers again on new Inputs; returns (inputs, outputs, {path: tensor}).

    A nested model is replaced by a Functional over its own layers that also
    returns the wanted inner outputs, so that they become tensors of the
    outer graph. Layers are shared, never copied.
    """
    captured: dict[str, Any] = {}
    direct = set(wanted)
    deeper: dict[str, list[str]] = {}
    for path in wanted:
        head, _, rest = path.partition("/")
        if rest:
            deeper.setdefault(head, []).append(rest)

    def call(layer, *args, **kwargs):
        inner = deeper.get(layer.name)
        if inner:
            _, own = _io(layer)
            sub_inputs, sub_outputs, sub_captured = _retrace(layer, inner)
            n_own = len(keras.tree.flatten(own))
            extended = keras.Model(
                sub_inputs,
                [*keras.tree.flatten(sub_outputs), *(sub_captured[p] for p in inner)],
            )
            results = extended(*args, **kwargs)
            outputs = keras.tree.pack_sequence_as(own, list(results[:n_own]))
            for path, tensor in zip(inner, results[n_own:]):
                captured.setdefault(f"{layer.name}/{path}", tensor)
        else:
            outputs = layer(*args, **kwargs)
        if layer.name in direct:
            captured.setdefault(layer.name, outputs)
        return outputs

    inputs, outputs = _io(model)
    shell = keras.Model(inputs, outputs)  # uncompiled, so its clone is not compiled either
    clone = keras.models.clone_model(shell, clone_function=lambda layer: layer, call_function=call)
    return clone.input, clone.output, captured


def _build_extractor(model: keras.Model, paths: Sequence[str]) -> tuple[keras.Model, list[str]]:
    """A Functional from `model`'s inputs to the outputs of `paths`, and their names."""
    by_path = dict(_graph_layers(model))
    inputs, _ = _io(model)
    tensors = None
    if all("/" not in p and not is_graph_model(by_path[p]) for p in paths):
        # The model's own graph, so its layers get no new inbound nodes. A
        # layer first called in another model has its output elsewhere.
        tensors = {p: by_path[p].output for p in paths}
        try:
            keras.Model(inputs, [keras.tree.flatten(t) for t in tensors.values()])
        except ValueError:
            tensors = None
    if tensors is None:
        inputs, _, tensors = _retrace(model, paths)
        missing = [p for p in paths if p not in tensors]
        if missing:
            raise ValueError(
                f"Layers {missing} of model {model.name!r} are not called in its graph, "
                "so they have no output to log."
            )
    outputs, names = [], []
    for path in paths:
        leaves = keras.tree.flatten(tensors[path])
        outputs += leaves
        names += [path] if len(leaves) == 1 else [f"{path}:{i}" for i in range(len(leaves))]
    return keras.Model(inputs, outputs, name=f"{model.name}_activations"), names


# ------------------------------------------------------------ evaluation


def _is_float(variable) -> bool:
    return "float" in str(variable.dtype)


class _Forward:
    """The extractor's stateless forward stage, compiled once per phase and input shape.

    `fn(trainable, non_trainable, x, *args)` returns `(result, non_trainable)`.
    On TensorFlow (one device) the graph reads the weights itself: passing a
    few hundred tensors into a `tf.function` costs more than the forward pass
    of a small model. Only the integer state (seed generators) goes in and
    out, so that it moves on from batch to batch as in a real epoch; the
    updates are dropped after the probe. JAX passes the whole state.
    """

    def __init__(self, extractor: keras.Model, fn, captured: bool):
        self.extractor, self.captured = extractor, captured
        self._trainable = list(extractor.trainable_variables)
        self._non_trainable = list(extractor.non_trainable_variables)
        self._carried = [i for i, v in enumerate(self._non_trainable) if not _is_float(v)]
        if not captured:
            self._function = distribute.graph_function(fn)
            return

        def run(x, carried, *args):
            trainable = [v.value for v in self._trainable]
            non_trainable = [v.value for v in self._non_trainable]
            for i, value in zip(self._carried, carried):
                non_trainable[i] = value
            result, after = fn(trainable, non_trainable, x, *args)
            return result, [after[i] for i in self._carried]

        self._function = distribute.graph_function(run)

    def start(self, local: bool):
        """The state the first batch starts from (this worker's first replica if `local`)."""
        def values(variables):
            if local:
                return [keras.ops.convert_to_tensor(distribute.local_value(v)) for v in variables]
            return [keras.ops.convert_to_tensor(v) for v in variables]

        if self.captured:
            return values([self._non_trainable[i] for i in self._carried])
        return values(self._trainable), values(self._non_trainable)

    def __call__(self, x, state, *args):
        """`(result, state for the next batch)`."""
        if self.captured:
            return self._function(x, state, *args)
        trainable, non_trainable = state
        result, non_trainable = self._function(trainable, non_trainable, x, *args)
        return result, (trainable, non_trainable)


# Where the statistics program runs. On JAX after the forward program, which
# lays the outputs out in one buffer (`stage`) as its layers make them. On
# TensorFlow inside the forward graph (which runs without XLA), as an XLA
# cluster that copies and reduces the outputs: one call per batch, where a
# second call taking 150 outputs as arguments, or copying them in the graph,
# cost a forward pass more per phase (measured on CPU).
def _fused() -> bool:
    return distribute.STATISTICS_IN_FORWARD_GRAPH


_summarize_functions: dict = {}


def _summarize_rows(*args):
    """`summarize`, compiled once per process and traced per buffer shape.

    One program serves both phases and every model with the same layout.
    """
    if "rows" not in _summarize_functions:
        _summarize_functions["rows"] = distribute.compile_function(summarize)
    return _summarize_functions["rows"](*args)


def _summarize_outputs(sample_values: int | None):
    """`summarize` after `stage`, as an XLA function to call inside a TensorFlow graph.

    Traced per model (its outputs' shapes): a few seconds for 150 outputs.
    """
    if sample_values not in _summarize_functions:
        def function(outputs, block_base, tail_rows, accumulator):
            rows, sample, _ = stage(outputs, sample_values)
            return summarize(rows, sample, block_base, tail_rows, accumulator)

        _summarize_functions[sample_values] = distribute.inner_xla_function(function)
    return _summarize_functions[sample_values]


def _shapes(x) -> tuple:
    return tuple(tuple(np.shape(leaf)) for leaf in keras.tree.flatten(x))


class Evaluator:
    """Runs the chosen layers of a model statelessly, compiled once per phase."""

    def __init__(self, model: keras.Model, paths: Sequence[str]):
        self.paths = list(paths)
        self.extractor, self.names = _build_extractor(model, paths)
        self._forwards: dict[tuple, _Forward] = {}
        # (phase, sample_values, input shapes) -> Layout, recorded while tracing.
        self._layouts: dict[tuple, Layout] = {}
        self._indices: dict[tuple, list] = {}

    @staticmethod
    def _local(model: keras.Model) -> bool:
        """Whether to evaluate this worker's first replica (data-parallel twin, several workers).

        Reading it involves no collective, so the evaluation runs on one device.
        """
        return distribute.num_replicas(model) > 1 or distribute.num_workers() > 1

    def _forward(self, training: bool, summary: bool, sample_values: int | None,
                 local: bool) -> _Forward:
        key = (training, summary, sample_values, local)
        if key not in self._forwards:
            extractor = self.extractor

            def run(trainable, non_trainable, x, *accumulator):
                outputs, non_trainable = extractor.stateless_call(
                    trainable, non_trainable, x, training=training
                )
                outputs = keras.tree.flatten(outputs)
                if not summary:
                    return outputs, non_trainable
                key = (training, sample_values, _shapes(x))
                if not _fused():
                    rows, sample, self._layouts[key] = stage(outputs, sample_values)
                    return (rows, sample), non_trainable
                layout = Layout.of([tuple(y.shape) for y in outputs], sample_values)
                self._layouts[key] = layout
                summary_ = _summarize_outputs(sample_values)(
                    outputs, layout.block_base, layout.tail_rows, *accumulator
                )
                return summary_, non_trainable

            captured = _fused() and not local
            self._forwards[key] = _Forward(extractor, run, captured)
        return self._forwards[key]

    def outputs(self, model, x, training: bool) -> list[np.ndarray]:
        local = self._local(model)
        forward = self._forward(training, False, None, local)
        outputs, _ = forward(x, forward.start(local))
        return [keras.ops.convert_to_numpy(y) for y in outputs]

    def statistics(self, model, batches, training: bool,
                   sample_values: int | None = None) -> Stats:
        """Streams `batches` through the layers: the statistics and sketch of every output.

        `sample_values` as in `_activation_stats`.
        """
        local = self._local(model)
        forward = self._forward(training, True, sample_values, local)
        state = forward.start(local)
        stats = Stats(len(self.names))
        accumulator = keras.ops.zeros((len(self.names) * SKETCH_SIZE + 1,), "int32")
        for x in batches:
            before = state
            if _fused():
                (reductions, tails, accumulator), state = forward(x, state, accumulator)
                layout = self._layouts[(training, sample_values, _shapes(x))]
                values = self._recomputed(model, x, training, local, before)
            else:
                (rows, sample), state = forward(x, state)
                key = (training, sample_values, _shapes(x))
                layout = self._layouts[key]
                if key not in self._indices:  # converted once: a conversion per batch costs
                    self._indices[key] = [keras.ops.convert_to_tensor(layout.block_base),
                                          keras.ops.convert_to_tensor(layout.tail_rows)]
                reductions, tails, accumulator = _summarize_rows(
                    rows, sample, *self._indices[key], accumulator
                )
                values = _from_rows(layout, rows)
            stats.add(layout, keras.ops.convert_to_numpy(reductions),
                      keras.ops.convert_to_numpy(tails), values)
        counts = keras.ops.convert_to_numpy(accumulator)[:-1]
        stats.sketch = counts.reshape(len(self.names), SKETCH_SIZE)
        return stats

    def _recomputed(self, model, x, training, local, state):
        """`values(i)` of a batch whose outputs stayed inside the graph: run it again.

        The same state gives the same outputs (seeds included). Only for an
        output with a non-finite value, so rarely.
        """
        found: list = []

        def values(i: int) -> np.ndarray:
            if not found:
                forward = self._forward(training, False, None, local)
                found.append(forward(x, state)[0])
            return keras.ops.convert_to_numpy(found[0][i]).reshape(-1)

        return values


def _from_rows(layout: Layout, rows):
    """`values(i)`: output i's values, read from the rows buffer (on the host)."""
    def values(i: int) -> np.ndarray:
        start = int(layout.row_starts[i]) * ROW
        flat = keras.ops.convert_to_numpy(rows).reshape(-1)
        return flat[start:start + int(layout.sizes[i])]

    return values


# model -> {layer paths: Evaluator}; one compiled evaluator per selection.
_evaluators: "weakref.WeakKeyDictionary[keras.Model, dict]" = weakref.WeakKeyDictionary()


def evaluator(model: keras.Model, paths: Sequence[str]) -> Evaluator:
    """The `Evaluator` of `paths` in `model`, made once per model and selection."""
    cache = _evaluators.setdefault(model, {})
    key = tuple(paths)
    if key not in cache:
        cache[key] = Evaluator(model, paths)
    return cache[key]


def check_fits(model: keras.Model, x: Any) -> None:
    """Raises if the probe batch `x` does not fit the model's inputs."""
    specs = list(model.inputs)
    if isinstance(x, Mapping):
        missing = [t.name for t in specs if t.name not in x]
        if missing:
            raise ValueError(
                f"The probe does not fit model {model.name!r}: it has keys "
                f"{sorted(x)}, the model's inputs are named {[t.name for t in specs]}."
            )
        pairs = [(t, x[t.name]) for t in specs]
    else:
        leaves = keras.tree.flatten(x)
        if len(leaves) != len(specs):
            raise ValueError(
                f"The probe does not fit model {model.name!r}: it gives "
                f"{len(leaves)} array(s), the model has {len(specs)} input(s) "
                f"{[t.name for t in specs]}."
            )
        pairs = list(zip(specs, leaves))
    for spec, array in pairs:
        expected, shape = tuple(spec.shape), tuple(np.shape(array))
        if len(expected) != len(shape) or any(
            e is not None and e != s for e, s in zip(expected, shape)
        ):
            raise ValueError(
                f"The probe does not fit model {model.name!r}: input {spec.name!r} "
                f"expects shape {expected}, the probe's batch has shape {shape}."
            )


def intermediate_outputs(
    model: keras.Model,
    layers: str | Sequence[str] | None,
    x: Any,
    training: bool = False,
) -> dict[str, np.ndarray]:
    """Returns the outputs of some layers of `model` for the inputs `x`.

    The successor of Keras 2's
    `K.function([model.input, K.learning_phase()], [layer.output])([x, phase])`,
    without side effects: with `training=True` dropout is on and
    BatchNormalization normalizes with the batch statistics, but no moving
    statistic, seed or other variable of `model` changes (the layers run
    through `stateless_call` and their updates are dropped). `x` is
    evaluated as one batch.

    Args:
        model: a built Functional or Sequential model (nested models inside
            it are fine).
        layers: a layer name or glob pattern, matched at any depth
            (`"conv*"`), a path from the top (`"backbone/block_3*"`), `"all"`,
            or a list of those; a nested model named by a pattern gives its
            own output. `None` selects every layer with an output except
            Input layers and the nested models themselves.
        x: inputs as the model takes them: an array, or a list or dict of
            arrays for a multi-input model.
        training: `False` for test phase (learning phase 0), `True` for train
            phase (learning phase 1). Defaults to `False`.

    Returns:
        `{layer path: numpy array}` in model order. A layer with several
        outputs gives one entry per output, `"<path>:<index>"`.

    Raises:
        ValueError: no layer matches a pattern (the message lists close
            matches and the layers), or `x` does not fit the model's inputs.

    Example:

    >>> import keras, numpy as np
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="d"),
    ...                           keras.layers.Dropout(0.5, name="drop")])
    >>> out = intermediate_outputs(model, ["d", "drop"], np.ones((2, 4)), training=True)
    >>> sorted(out), out["d"].shape
    (['d', 'drop'], (2, 3))
    """
    paths = output_paths(model, layers)
    x = keras.tree.map_structure(np.asarray, x)
    check_fits(model, x)
    chosen = evaluator(model, paths)
    return dict(zip(chosen.names, chosen.outputs(model, x, bool(training))))

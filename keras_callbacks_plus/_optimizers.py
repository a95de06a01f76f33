"""Re-building a model's optimizer over a new trainable set, keeping its state.

Keras builds an optimizer once, for the variables trainable at that time;
after `layer.trainable` changes mid-`fit`, TensorFlow raises "This optimizer
can only be called for the variables it was originally built with" and JAX
fails on a shape mismatch. The fix: a fresh optimizer from the old one's
config, built over the new trainable set, given every state variable of the
old one that still applies (iteration count, learning rate, the slots of the
variables trainable before), matched by path; then a new train function.
"""

from __future__ import annotations

from typing import Callable

import keras

from keras_callbacks_plus import _base, _layers


def state_keys(optimizer, model: keras.Model | None = None) -> list[str]:
    """Names of `optimizer.variables` that survive re-creating the optimizer.

    A variable's path starts with its optimizer's name, which Keras makes
    unique per instance (`adam`, `adam_1`, ...); a wrapper such as
    LossScaleOptimizer holds variables under two names. The key replaces each
    name by its rank (`0/iteration`, `1/model_dense_kernel_momentum`); the
    rest of the path names the model variable a slot belongs to.

    With `model`, that model variable is named by its index in
    `model.weights` instead (`0/#3_momentum`), so that keys also match
    between copies of a model whose variable paths differ: a `Sequential`
    model built at construction has paths under its own name, one rebuilt
    from its config (a loaded file, a checkpoint's copy) does not.
    """
    index = {}
    if model is not None:
        for i, variable in enumerate(model.weights):
            index.setdefault(variable.path.replace("/", "_"), i)
    ranks: dict[str, int] = {}
    keys = []
    for variable in optimizer.variables:
        prefix, _, rest = variable.path.partition("/")
        keys.append(f"{ranks.setdefault(prefix, len(ranks))}/{_slot_name(rest, index)}")
    return keys


def _slot_name(rest: str, index: dict[str, int]) -> str:
    """`rest` with its longest leading model-variable path replaced by `#<index>`.

    Keras names a slot `<variable path with "/" as "_">_<slot>`.
    """
    cut = len(rest)
    while index and cut > 0:
        cut = rest.rfind("_", 0, cut)
        if cut <= 0:
            break
        found = index.get(rest[:cut])
        if found is not None:
            return f"#{found}{rest[cut:]}"
    return rest


def optimizer_state(optimizer, model: keras.Model | None = None) -> dict[str, object]:
    """`{state key: variable}` of a built optimizer (see `state_keys`)."""
    return dict(zip(state_keys(optimizer, model), optimizer.variables))


def copy_optimizer_state(source, target) -> list[str]:
    """Assigns each variable of `target` the value of `source`'s variable with the same key.

    Slot variables are named after the model variable they belong to, so the
    slots of a variable trainable in both go across; new ones keep their
    fresh values. Returns the keys copied.
    """
    values = optimizer_state(source)
    copied = []
    for key, variable in optimizer_state(target).items():
        value = values.get(key)
        if value is not None and tuple(value.shape) == tuple(variable.shape):
            variable.assign(keras.ops.convert_to_numpy(value))
            copied.append(key)
    return copied


def trainable_signature(model: keras.Model) -> tuple[str, ...]:
    """The paths of `model`'s trainable variables: equal signatures need no rebuild."""
    return tuple(v.path for v in model.trainable_variables)


def rebuild_optimizer(
    model: keras.Model,
    make: Callable[[keras.optimizers.Optimizer], keras.optimizers.Optimizer] | None = None,
) -> keras.optimizers.Optimizer:
    """Gives `model` a new optimizer over its current trainable variables, keeping state.

    Args:
        model: a compiled model (a data-parallel twin or not) whose
            trainable set changed.
        make: builds the new, unbuilt optimizer from the old one. Defaults
            to `None`: the same class from the old one's config.

    Returns:
        The new optimizer, now `model.optimizer`.
    """
    old = model.optimizer
    if old is None:
        raise ValueError(f"Model {model.name!r} is not compiled: it has no optimizer to rebuild.")
    # Made in the twin's scope too: on TensorFlow an optimizer belongs to the
    # strategy it is created under (resume() calls this outside fit).
    with _base.distribution_scope(model):
        new = make(old) if make is not None else old.__class__.from_config(old.get_config())
        new.build(model.trainable_variables)
    if old.built:
        copy_optimizer_state(old, new)
    else:
        new.iterations.assign(keras.ops.convert_to_numpy(old.iterations))
    model.optimizer = new
    model.make_train_function(force=True)
    # Made again when next needed: on JAX under a distribution, a function
    # holds the output shardings of the trainable set it was made for.
    model.test_function = None
    model.predict_function = None
    return new


def trainable_flags(model: keras.Model) -> list[bool]:
    """For each of `model.weights`, whether it is trainable now."""
    trainable = {id(v) for v in model.trainable_variables}
    return [id(v) in trainable for v in model.weights]


def apply_trainable_flags(model: keras.Model, flags: list[bool]) -> None:
    """Makes exactly the weights flagged True trainable, as layer flags where possible.

    A layer all of whose weights are frozen gets `trainable=False` itself, so
    that it behaves as a frozen layer (BatchNormalization in inference mode)
    and a saved `.keras` file records it; only a layer that mixes trainable
    and frozen weights of its own keeps variable-level flags.
    """
    if len(flags) != len(model.weights):
        raise ValueError(
            f"Expected {len(model.weights)} trainable flags for model {model.name!r}. "
            f"Received: {len(flags)}"
        )
    wanted = {id(v): bool(f) for v, f in zip(model.weights, flags)}
    layers = _layers.all_layers(model)
    for layer in layers:  # top down: everything trainable
        _layers.set_trainable(layer, True)
    # Weights that can train at all (not BatchNormalization statistics, say).
    trainable = {id(v) for v in model.weights if v.trainable}
    for layer in reversed(layers):  # bottom up: whole frozen layers and containers
        weights = [v for v in layer.weights if id(v) in trainable]
        if weights and not any(wanted[id(v)] for v in weights):
            _layers.set_trainable(layer, False)
    for variable in model.weights:
        if variable.trainable and not wanted[id(variable)]:
            variable.trainable = False


def restore_optimizer_state(model: keras.Model, values: dict[str, object]) -> None:
    """Puts saved optimizer values into `model.optimizer`, building it as needed.

    `values` is keyed by `state_keys(optimizer, model)` of the model they
    come from (a copy of `model`'s architecture).

    Raises:
        ValueError: some saved variable has no counterpart in the model's
            optimizer (a different optimizer, or another trainable set).
    """
    optimizer = model.optimizer
    if not optimizer.built:
        with _base.distribution_scope(model):
            optimizer.build(model.trainable_variables)
    # `compile_from_config` builds the optimizer over every variable trainable
    # then; a file must hold exactly the slots of the trainable set now, or
    # `load_model` skips the whole optimizer state.
    if set(values) != set(state_keys(optimizer, model)):
        optimizer = rebuild_optimizer(model)
    targets = optimizer_state(optimizer, model)
    missing = set(values) - set(targets)
    if missing:
        raise ValueError(
            f"The saved optimizer state does not fit the optimizer of model {model.name!r}: "
            f"no variable for {sorted(missing)[:3]}. Compile the model with the optimizer "
            "it was trained with."
        )
    for key, value in values.items():
        targets[key].assign(value)

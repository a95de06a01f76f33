"""The backend-neutral part of a data-parallel twin: clone, scoped methods, compile, weights.

A twin is a clone of its template whose methods run under its strategy
(TensorFlow) or distribution (JAX). What differs between the backends (which
strategy, what to check before a method runs) comes in as arguments from
`distribute/__init__.py`, which holds the backend chosen at import.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable

import keras
import numpy as np

from keras_callbacks_plus import _base

# Methods of a twin that must run under its strategy or distribution.
_SCOPED_METHODS = (
    "compile",
    "fit",
    "evaluate",
    "predict",
    "train_on_batch",
    "test_on_batch",
    "predict_on_batch",
)


def check_template(model: Any, owner: str, needs: str) -> None:
    """Raises unless `model` is a built `keras.Model` and not a twin.

    Args:
        model: what was passed as the template.
        owner: the function, for messages (`"data_parallel()"`).
        needs: what it does with the weights (`"replicate"`).
    """
    if not isinstance(model, keras.Model):
        raise TypeError(f"{owner} expects a keras.Model. Received: {type(model).__name__}")
    distribution = _base.twin_distribution(model)
    if distribution is not None:
        kind = ("model-parallel" if isinstance(distribution, keras.distribution.ModelParallel)
                else "data-parallel")
        raise ValueError(
            f"Model {model.name!r} is already a {kind} twin. Pass the template model to {owner}."
        )
    if not model.built:
        raise ValueError(
            f"Model {model.name!r} is not built, so it has no weights to {needs}. Build it or "
            "call it first: model.build(input_shape) or model(x) on one batch, or give it an "
            "Input layer."
        )


def _clone(model: keras.Model, owner: str = "data_parallel()") -> keras.Model:
    try:
        twin = keras.models.clone_model(model, recursive=True)
    except Exception as error:
        if "not the same on each process" in str(error):
            raise ValueError(
                f"{owner} could not create the twin of model {model.name!r}: the JAX "
                "processes drew different initial values. Call keras.utils.set_random_seed() "
                "with the same seed on every process (or on none) before building models."
            ) from error
        raise ValueError(
            f"{owner} could not rebuild model {model.name!r}: {error}. "
            "Functional and Sequential models clone as they are; a subclassed "
            "model needs get_config() (and from_config() if its constructor "
            "takes non-serializable arguments)."
        ) from error
    if len(twin.weights) != len(model.weights):
        # A subclassed model creates its sublayers' weights on its first call.
        shape = (model.get_build_config() or {}).get("input_shape")
        if shape is None:
            raise ValueError(
                f"{owner} could not build the copy of model {model.name!r}: "
                "it has no recorded input shape. Build it by calling it on data "
                f"once (model(x)) before {owner}."
            )
        twin(keras.tree.map_shape_structure(
            lambda s: np.zeros([1 if d is None else d for d in s], "float32"), shape
        ))
    return twin


def _recreate(obj, kind: str):
    """A state-free copy of a metric or unbuilt optimizer, made from its config."""
    try:
        copy = obj.__class__.from_config(obj.get_config())
    except Exception as error:
        raise ValueError(
            f"The {kind} {type(obj).__name__} given to the data-parallel twin's "
            "compile() was created outside the twin's devices and cannot be "
            f"re-created from its config ({error}). Pass it by name, or give "
            "it a get_config() that covers its constructor arguments."
        ) from error
    return copy


def _twin_optimizer(optimizer):
    if not isinstance(optimizer, keras.optimizers.Optimizer):
        return optimizer
    if optimizer.built:
        raise ValueError(
            "The optimizer given to the data-parallel twin's compile() already "
            "holds state for other variables. Pass a new optimizer (or its name)."
        )
    copy = _recreate(optimizer, "optimizer")
    copy.iterations.assign(optimizer.iterations)
    return copy


def _compile_in_scope(method, distribution):
    """`compile` that re-creates optimizer and metric objects on the twin's devices.

    Objects made before (outside) the twin's strategy or distribution own
    variables on one device, which the replicated step cannot use
    (TensorFlow: "Mixing different tf.distribute.Strategy objects"; JAX:
    "incompatible devices"). Before their first step they hold no state but
    their configuration, so a copy from `get_config()` is the same object.
    """
    signature = inspect.signature(method)

    @functools.wraps(method)
    def compile(*args, **kwargs):
        bound = signature.bind_partial(*args, **kwargs)
        with distribution.scope():
            if "optimizer" in bound.arguments:
                bound.arguments["optimizer"] = _twin_optimizer(bound.arguments["optimizer"])
            for key in ("metrics", "weighted_metrics"):
                if bound.arguments.get(key) is not None:
                    bound.arguments[key] = keras.tree.map_structure(
                        lambda m: _recreate(m, "metric")
                        if isinstance(m, keras.metrics.Metric)
                        else m,
                        bound.arguments[key],
                    )
            return method(*bound.args, **bound.kwargs)

    return compile


def _bind_to_distribution(
    twin: keras.Model,
    distribution,
    replicas: int,
    guard_method: Callable[[str, Callable, int], tuple[Callable, Callable | None]],
) -> None:
    """Makes the twin's methods run in its scope, each after the backend's check.

    Args:
        twin: the new twin.
        distribution: its strategy or distribution.
        replicas: how many replicas it trains on.
        guard_method: the backend's `guard_method(name, method, replicas)`,
            which returns the method to call (possibly wrapped) and a check
            of its arguments to run first, or None.
    """
    # Variables created later (optimizer slots at compile or the first step,
    # metrics) must be replicated like the model's: TensorFlow refuses to mix
    # strategies, and JAX reads the distribution from Keras's thread-local
    # state when it creates variables and shards batches. So the twin enters
    # its own scope whenever it runs.
    for name in _SCOPED_METHODS:
        method, check = guard_method(name, getattr(twin, name), replicas)

        if name == "compile":
            object.__setattr__(twin, name, _compile_in_scope(method, distribution))
            continue

        @functools.wraps(method)
        def run_in_scope(*args, _method=method, _check=check, **kwargs):
            if _check is not None:
                _check(args, kwargs)
            with distribution.scope():
                return _method(*args, **kwargs)

        object.__setattr__(twin, name, run_in_scope)


def check_same_architecture(
    a: keras.Model, b: keras.Model, *, roles: tuple[str, str] = ("", "")
) -> None:
    """Raises unless `a` and `b` have as many weights as each other, of the same shapes.

    The message gives the detail only; callers prefix it with what they were
    doing.

    Args:
        a: a model.
        b: the model it must match.
        roles: what to call each model in the message, such as
            `"the template"`. Defaults to `("", "")`: their names.

    Raises:
        ValueError: the weights differ in number or shape.
    """
    role_a, role_b = roles
    if len(a.weights) != len(b.weights):
        raise ValueError(
            f"{_named(role_a, a)} has {len(a.weights)} weights, "
            f"{_named(role_b, b)} has {len(b.weights)}."
        )
    for x, y in zip(a.weights, b.weights):
        if tuple(x.shape) != tuple(y.shape):
            raise ValueError(
                f"weight {x.path!r} of {role_a or repr(a.name)} has shape {tuple(x.shape)}, "
                f"weight {y.path!r} of {role_b or repr(b.name)} has shape {tuple(y.shape)}."
            )


def _named(role: str, model: keras.Model) -> str:
    return f"{role} {model.name!r}" if role else repr(model.name)


def copy_weights(source: keras.Model, target: keras.Model,
                 transfer: Callable[[Any, Any], None] | None = None) -> None:
    """Copies every weight, trainable or not, from `source` to `target`.

    The public `distribute.copy_weights` (which passes `transfer` for
    model-parallel twins).

    Args:
        source: the model to read weights from.
        target: a model of the same architecture to write them into.
        transfer: copies one variable into another. Defaults to `None`:
            `target.set_weights(source.get_weights())`.

    Raises:
        ValueError: the models' weights differ in number or shape.
    """
    try:
        check_same_architecture(source, target)
    except ValueError as error:
        raise ValueError(
            f"copy_weights() needs two models of the same architecture: {error}"
        ) from None
    if transfer is None:
        target.set_weights(source.get_weights())
        return
    for from_variable, to_variable in zip(source.weights, target.weights):
        transfer(from_variable, to_variable)


def scope(model: keras.Model) -> Any:
    """The context a twin's own variables are made in; a no-op for other models.

    Use it to create state for a twin outside its methods, for example
    `with distribute.scope(twin): twin.optimizer.build(twin.trainable_variables)`.
    """
    return _base.distribution_scope(model)

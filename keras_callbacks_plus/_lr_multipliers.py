"""Per-variable learning-rate factors for any Keras optimizer, on TensorFlow and JAX.

ProgressiveUnfreezing needs each variable's update to use
`learning_rate * factor`: a per-group multiplier (discriminative learning
rates, ULMFiT) times a linear warm-up after an unfreeze.

Why not `keras.optimizers.MultiOptimizer` (Keras 3.15 has one)? It gives each group
its own optimizer, so reading or setting `optimizer.learning_rate` raises (Keras's
learning-rate callbacks stop working), each group counts its own iterations,
the slots get other names than those of the optimizer the model was compiled
with (state does not carry over from it, nor into checkpoints written for it),
and it cannot sit inside a LossScaleOptimizer. Scaling gradients instead is
no equivalent: adaptive optimizers (Adam, RMSprop, ...) normalise it away.

What this module does: a copy of the model's own optimizer, from its config,
whose `update_step(gradient, variable, learning_rate)` receives
`learning_rate * factor(variable)` — the hook every Keras optimizer
implements, run per variable in the right replica context on both backends
(under MirroredStrategy too). The override is an instance attribute of that
one copy: its class, config, variables and their paths stay those of the
original, so it saves, loads and checkpoints as the plain optimizer. Decoupled
weight decay (`weight_decay`, as in AdamW) uses the variable's scaled rate
too, as PyTorch parameter groups do; optimizers with their own weight-decay
rule (Muon) keep it unscaled.
"""

from __future__ import annotations

import dataclasses

import keras
from keras import ops

from keras_callbacks_plus import _compat

_MARK = "_keras_callbacks_plus_lr_scaling"


@dataclasses.dataclass(frozen=True)
class Scaling:
    """The learning-rate factors an optimizer copy applies.

    Attributes:
        paths: paths of the variables the optimizer is built on, in order.
        multipliers: one multiplier per path; empty means all 1.
        warmup_start: the optimizer iteration of the warm-up's first step.
        warmup_steps: steps of the linear warm-up; 0 means none. The k-th
            step from `warmup_start` (k = 1, 2, ...) uses `k / warmup_steps`
            of the rate, until it reaches 1.
    """

    paths: tuple[str, ...] = ()
    multipliers: tuple[float, ...] = ()
    warmup_start: int = 0
    warmup_steps: int = 0

    @property
    def neutral(self) -> bool:
        return not self.warmup_steps and all(m == 1.0 for m in self.multipliers)


def scaling_of(optimizer) -> Scaling | None:
    """The `Scaling` that `scaled_copy` gave `optimizer`, or None for any other optimizer."""
    return getattr(optimizer, _MARK, None)


def warmup_factor(scaling: Scaling, iteration: int) -> float:
    """The warm-up factor (0, 1] at optimizer iteration `iteration`, on the host."""
    if not scaling.warmup_steps:
        return 1.0
    done = (iteration - scaling.warmup_start + 1) / scaling.warmup_steps
    return min(1.0, max(done, 1.0 / scaling.warmup_steps))


def scaled_copy(
    optimizer: keras.optimizers.Optimizer, scaling: Scaling
) -> keras.optimizers.Optimizer:
    """An unbuilt copy of `optimizer` (from its config) that applies `scaling`.

    A LossScaleOptimizer is copied with a scaled copy of its inner optimizer.
    Build the copy on exactly the variables of `scaling.paths`, in order.

    Raises:
        ValueError: `optimizer` is a MultiOptimizer and `scaling` is not neutral.
    """
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        config = optimizer.get_config()
        config.pop("inner_optimizer")
        inner = scaled_copy(optimizer.inner_optimizer, scaling)
        copy = keras.optimizers.LossScaleOptimizer(inner, **config)
    else:
        multi = getattr(keras.optimizers, "MultiOptimizer", ())
        if not scaling.neutral and isinstance(optimizer, multi):
            raise ValueError(
                "Per-group learning rates and warm-up need one optimizer for all "
                "variables; received a MultiOptimizer. Compile the model with a "
                "single optimizer, or set group_lr_decay=None and warmup_epochs=0."
            )
        copy = optimizer.__class__.from_config(optimizer.get_config())
        if not scaling.neutral:
            _install(copy, scaling)
    setattr(copy, _MARK, scaling)
    return copy


def _install(optimizer, scaling: Scaling) -> None:
    update_step = optimizer.update_step
    apply_weight_decay = _compat.apply_weight_decay_rule(optimizer)
    # The base rule `w -= w * weight_decay * lr` moves into update_step, where
    # the variable's own rate is known; other rules stay as they are.
    decay_here = _compat.has_base_weight_decay_rule(optimizer)
    multipliers = scaling.multipliers

    def multiplier(variable) -> float:
        return multipliers[_compat.variable_index(optimizer, variable)] if multipliers else 1.0

    def factor(variable):
        value = multiplier(variable)
        if not scaling.warmup_steps:
            return value
        steps = float(scaling.warmup_steps)
        done = ops.cast(optimizer.iterations, "float32") - float(scaling.warmup_start - 1)
        return ops.multiply(ops.clip(done / steps, 1.0 / steps, 1.0), value)

    def scaled(variable) -> bool:
        return bool(scaling.warmup_steps) or multiplier(variable) != 1.0

    def scaled_update_step(gradient, variable, learning_rate):
        if not scaled(variable):
            return update_step(gradient, variable, learning_rate)
        learning_rate = ops.multiply(learning_rate, factor(variable))
        if (
            decay_here
            and optimizer.weight_decay is not None
            and _compat.uses_weight_decay(optimizer, variable)
        ):
            wd = ops.cast(optimizer.weight_decay, variable.dtype)
            optimizer.assign_sub(variable, variable * wd * ops.cast(learning_rate, variable.dtype))
        return update_step(gradient, variable, learning_rate)

    def scaled_weight_decay(variables):
        if decay_here:
            variables = [v for v in variables if not scaled(v)]
        return apply_weight_decay(variables)

    optimizer.update_step = scaled_update_step
    _compat.replace_weight_decay(optimizer, scaled_weight_decay)

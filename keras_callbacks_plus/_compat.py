"""Version-guarded fixes of Keras internals: the only module that imports `keras.src`.

Each fix names the upstream issue it works around and the Keras versions it was
tested on. On any other version it refuses to patch and says so, because a
patch of private code that silently applies to an untested release is worse
than no patch. Private attributes of Keras objects are read and replaced here
too, under the same kind of guard. It imports no backend: the TensorFlow fix
receives the `tf` module from `distribute/_tf.py`.
"""

from __future__ import annotations

import logging
from typing import Callable

import keras

logger = logging.getLogger(__name__)

# keras-team/keras#20585: Keras 3 `fit` under MultiWorkerMirroredStrategy.
MULTI_WORKER_ISSUE = "keras-team/keras#20585"
MULTI_WORKER_TESTED_KERAS = ("3.15.1",)
# Private optimizer methods that per-variable learning rates use (`_lr_multipliers.py`).
OPTIMIZER_INTERNALS_TESTED_KERAS = ("3.15.1",)
_OPTIMIZER_INTERNALS_USE = (
    "Per-variable learning rates (ProgressiveUnfreezing's group_lr_decay and "
    "warm-up) use private methods of Keras optimizers (_apply_weight_decay, "
    "_get_variable_index, _use_weight_decay)"
)

_PATCH_MARK = "_keras_callbacks_plus_patched"


def keras_version() -> str:
    """Returns the installed Keras version (a function so tests can stand in another)."""
    return keras.version()


def _require_tested(need: str, tested: tuple[str, ...]) -> None:
    """Raises `RuntimeError` that `need` was only tested on `tested`, unless Keras is one of them."""
    version = keras_version()
    if version not in tested:
        raise RuntimeError(
            f"{need} that keras_callbacks_plus "
            f"has only tested on Keras {', '.join(tested)}. "
            f"Installed: Keras {version}. Install a tested version "
            f"(pip install keras=={tested[-1]}) or a "
            "keras_callbacks_plus release that lists yours."
        )


def check_multi_worker_supported() -> None:
    """Raises if multi-worker `fit` on TensorFlow was not tested on this Keras.

    Raises:
        RuntimeError: the installed Keras is not one of
            `MULTI_WORKER_TESTED_KERAS`.
    """
    _require_tested(
        "Multi-worker training with the TensorFlow backend needs a fix of "
        f"Keras internals ({MULTI_WORKER_ISSUE})",
        MULTI_WORKER_TESTED_KERAS,
    )


def patch_multi_worker_fit(tf) -> None:
    """Makes `Model.fit` work under `tf.distribute.MultiWorkerMirroredStrategy`.

    Two places of the TensorFlow trainer break with several workers
    (keras-team/keras#20585):

    * `TensorFlowTrainer._maybe_symbolic_build` reduces a whole data batch
      across workers only to learn its shapes; the collective fails. The fix
      takes the first local replica's batch, which has the same structure.
    * `reduce_per_replica` reduces scalar logs with `strategy.reduce("MEAN",
      v, axis=0)` on the multi-worker path, which fails on rank-0 values (and
      would average over a tensor's first axis). The fix averages across
      replicas only (`axis=None`), as the single-worker path does.

    Idempotent.

    Args:
        tf: the `tensorflow` module.

    Raises:
        RuntimeError: the installed Keras is not one of
            `MULTI_WORKER_TESTED_KERAS`.
    """
    check_multi_worker_supported()
    from keras.src.backend.tensorflow import trainer as tf_trainer

    if getattr(tf_trainer.reduce_per_replica, _PATCH_MARK, False):
        return

    original_reduce = tf_trainer.reduce_per_replica
    is_multi_worker = tf_trainer._collective_all_reduce_multi_worker

    def reduce_per_replica(values, strategy, reduction):
        if reduction in ("auto", "mean") and is_multi_worker(strategy):
            return tf.nest.map_structure(
                lambda v: strategy.reduce("MEAN", v, axis=None), values
            )
        return original_reduce(values, strategy, reduction)

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        if self._distribute_strategy is None:
            return
        if iterator is not None:
            for _, _, it in iterator:
                batch = next(it)
                data_batch = tf.nest.map_structure(
                    lambda x: (
                        self.distribute_strategy.experimental_local_results(x)[0]
                        if isinstance(x, tf.distribute.DistributedValues)
                        else x
                    ),
                    batch,
                )
                break
        with self.distribute_strategy.scope():
            self._symbolic_build(data_batch=data_batch)

    setattr(reduce_per_replica, _PATCH_MARK, True)
    tf_trainer.reduce_per_replica = reduce_per_replica
    tf_trainer.TensorFlowTrainer._maybe_symbolic_build = _maybe_symbolic_build
    logger.debug("Patched Keras %s for multi-worker fit (%s).", keras_version(), MULTI_WORKER_ISSUE)


def check_optimizer_internals_supported() -> None:
    """Raises `RuntimeError` unless Keras is one of `OPTIMIZER_INTERNALS_TESTED_KERAS`."""
    _require_tested(_OPTIMIZER_INTERNALS_USE, OPTIMIZER_INTERNALS_TESTED_KERAS)


def apply_weight_decay_rule(optimizer: keras.optimizers.Optimizer) -> Callable:
    """`optimizer`'s own weight-decay step: a function of the list of variables to decay."""
    check_optimizer_internals_supported()
    return optimizer._apply_weight_decay


def has_base_weight_decay_rule(optimizer: keras.optimizers.Optimizer) -> bool:
    """Whether `optimizer`'s class decays weights by Keras's base rule `w -= w * weight_decay * lr`.

    Other classes (Muon) have a rule of their own.
    """
    check_optimizer_internals_supported()
    return type(optimizer)._apply_weight_decay is keras.optimizers.Optimizer._apply_weight_decay


def replace_weight_decay(optimizer: keras.optimizers.Optimizer, fn: Callable) -> None:
    """Makes `fn(variables)` the weight-decay step of this one optimizer object."""
    check_optimizer_internals_supported()
    optimizer._apply_weight_decay = fn


def variable_index(optimizer: keras.optimizers.Optimizer, variable) -> int:
    """The index of `variable` among those `optimizer` is built on.

    How every Keras optimizer finds a variable's slots; it accepts
    TensorFlow's per-replica variables.
    """
    check_optimizer_internals_supported()
    return optimizer._get_variable_index(variable)


def uses_weight_decay(optimizer: keras.optimizers.Optimizer, variable) -> bool:
    """Whether `optimizer` decays `variable` (not excluded by name or by variable)."""
    check_optimizer_internals_supported()
    return optimizer._use_weight_decay(variable)

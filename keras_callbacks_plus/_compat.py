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
import os
import shutil
import tempfile
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



# -- Keras's saving layout ----------------------------------------------------
# ParallelModelCheckpoint writes `.keras` / `.weights.h5` files from host
# arrays in exactly the layout Keras's saving writes. It learns that layout by
# running Keras's own traversal (`saving_lib._save_state`) over a model with a
# store that records what would be written instead of writing it.
SAVING_TESTED_KERAS = ("3.15.1",)


def saving_layout_supported() -> bool:
    """Whether the recorded saving layout was tested on the installed Keras."""
    return keras_version() in SAVING_TESTED_KERAS


class VariableRef:
    """Stands in for `variable.numpy()` while the layout is recorded, so saveables
    that store copies (optimizers do) still name the variable they copy."""

    __slots__ = ("variable",)

    def __init__(self, variable):
        self.variable = variable


def record_saving_layout(model) -> tuple[list[dict], list[str]]:
    """Records what `model.save()` would write into `model.weights.h5`, in Keras's order.

    Runs Keras's saving traversal over `model` with a weights store that
    records instead of writing. Variables are recorded as themselves, also
    where a saveable stores `variable.numpy()` (optimizers): the variables'
    `numpy` is replaced on the instances for the duration of the call, so
    `model` must not be in use elsewhere meanwhile (the checkpoint writer
    records its own copy of the template).

    Returns:
        `groups`: `[{"path": str, "attrs": dict or None, "entries": [(key,
        value)]}]`, where `value` is a Keras variable, or whatever else a
        saveable stored (a computed array). `assets`: paths of saveables
        that wrote assets (a `.keras` file would hold them too).
    """
    from keras.src.saving import saving_lib

    groups: list[dict] = []

    class Recorder(saving_lib.H5IOStore):
        def __init__(self):  # no file: nothing is written
            self.mode = "w"
            self.archive = None

        def __bool__(self):
            return True

        def make(self, path, metadata=None):
            groups.append({"path": path, "attrs": dict(metadata) if metadata else None,
                           "entries": []})
            return self

        def __setitem__(self, key, value):
            if isinstance(value, VariableRef):
                value = value.variable
            groups[-1]["entries"].append((key, value))

        def close(self):
            pass

    class AssetsRecorder(saving_lib.DiskIOStore):
        def __init__(self, scratch):
            self.mode = "w"
            self.archive = None
            self.tmp_dir = None
            self.scratch = scratch
            self.used: list[str] = []

        def make(self, path):
            self.used.append(path)
            folder = os.path.join(self.scratch, str(len(self.used)))
            os.makedirs(folder)
            return folder

        def close(self):
            pass

    optimizer = getattr(model, "optimizer", None)
    variables = list(model.variables) + list(getattr(optimizer, "variables", None) or [])
    for variable in variables:
        object.__setattr__(variable, "numpy", lambda v=variable: VariableRef(v))
    scratch = tempfile.mkdtemp(prefix="kcp-assets-")
    assets = AssetsRecorder(scratch)
    try:
        saving_lib._save_state(model, weights_store=Recorder(), assets_store=assets,
                               inner_path="", visited_saveables=set())
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        for variable in variables:
            try:
                object.__delattr__(variable, "numpy")
            except AttributeError:
                pass
    return groups, assets.used


def model_config_json(model) -> str:
    """`config.json` of a `.keras` file, as Keras's saving serializes `model`."""
    import json

    from keras.src.saving.serialization_lib import ObjectSharingScope

    with ObjectSharingScope():
        return json.dumps(keras.saving.serialize_keras_object(model))


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

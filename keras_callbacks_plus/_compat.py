"""Version-guarded fixes of Keras internals: the only module that imports `keras.src`.

Each fix names the upstream issue it works around and the Keras versions it was
tested on. On any other version it refuses to patch and says so, because a
patch of private code that silently applies to an untested release is worse
than no patch.
"""

import logging

import keras

logger = logging.getLogger(__name__)

# keras-team/keras#20585: Keras 3 `fit` under MultiWorkerMirroredStrategy.
MULTI_WORKER_ISSUE = "keras-team/keras#20585"
MULTI_WORKER_TESTED_KERAS = ("3.15.1",)

_PATCH_MARK = "_keras_callbacks_plus_patched"


def keras_version() -> str:
    """Returns the installed Keras version (a function so tests can stand in another)."""
    return keras.version()


def check_multi_worker_supported() -> None:
    """Raises if multi-worker `fit` on TensorFlow was not tested on this Keras.

    Raises:
        RuntimeError: the installed Keras is not one of
            `MULTI_WORKER_TESTED_KERAS`.
    """
    version = keras_version()
    if version not in MULTI_WORKER_TESTED_KERAS:
        raise RuntimeError(
            "Multi-worker training with the TensorFlow backend needs a fix of "
            f"Keras internals ({MULTI_WORKER_ISSUE}) that keras_callbacks_plus "
            f"has only tested on Keras {', '.join(MULTI_WORKER_TESTED_KERAS)}. "
            f"Installed: Keras {version}. Install a tested version "
            f"(pip install keras=={MULTI_WORKER_TESTED_KERAS[-1]}) or a "
            "keras_callbacks_plus release that lists yours."
        )


def patch_multi_worker_fit() -> None:
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

    Idempotent. Raises `RuntimeError` on an untested Keras version.
    """
    check_multi_worker_supported()
    import tensorflow as tf
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


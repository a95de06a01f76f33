"""What every callback of this package shares: output, state, the fit's siblings, a twin's scope.

Callbacks of this package register with the model they train at
`on_train_begin` and leave at `on_train_end`, so that one of them can reach
the others of the same `fit`: ParallelModelCheckpoint stores their
`get_state()`, ProgressiveUnfreezing announces a new stage to all of them
through the `on_unfreeze_stage` hook, and ParallelModelCheckpoint a
preemption through `on_preemption`.

A callback registers a training batch hook only when a feature needs it
(`_use_batch_hook`): Keras gives up its asynchronous batch-end dispatch for
any callback that overrides `on_train_batch_end` and is not `async_safe`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import weakref
from typing import Any, Callable, Mapping, Sequence

import keras

logger = logging.getLogger("keras_callbacks_plus")

# model -> callbacks of this package taking part in its current fit.
_siblings: "weakref.WeakKeyDictionary[keras.Model, list[Any]]" = weakref.WeakKeyDictionary()
# Where `distribute.data_parallel` records a twin's strategy (TensorFlow) or
# distribution (JAX). Here rather than in `distribute`, so that modules below
# it (`_optimizers`) reach a twin's scope without importing it.
TWIN_ATTR = "_keras_callbacks_plus_distribution"


def twin_distribution(model: keras.Model) -> Any:
    """The strategy or distribution of a `data_parallel` twin; None for any other model."""
    return getattr(model, TWIN_ATTR, None)


def distribution_scope(model: keras.Model) -> contextlib.AbstractContextManager:
    """The context a twin's own variables are made in; a no-op for any other model."""
    distribution = twin_distribution(model)
    return contextlib.nullcontext() if distribution is None else distribution.scope()


def callbacks_of(model: keras.Model) -> list["PlusCallback"]:
    """Returns the callbacks of this package in `model`'s current `fit`, in order."""
    return list(_siblings.get(model, ()))


class PlusCallback(keras.callbacks.Callback):
    """Base class of the callbacks of keras_callbacks_plus.

    Subclasses call `super().on_train_begin(logs)` and
    `super().on_train_end(logs)` so that the sibling registry stays exact.
    """

    def __init__(self, verbose: int = 0):
        super().__init__()
        self.verbose = verbose
        self._batch_hook_async_safe = False
        self.preempted = False

    def _use_batch_hook(self, hook: Callable[[int, dict | None], None], async_safe: bool) -> None:
        """Makes `hook` this callback's `on_train_batch_end`; call it only when a feature needs it.

        Args:
            hook: the batch hook.
            async_safe: whether Keras may run it on its background threads
                (single process only: with several workers every worker must
                see each batch end in order, for its collectives).
        """
        self.on_train_batch_end = hook
        self._batch_hook_async_safe = async_safe

    @property
    def async_safe(self) -> bool:
        """Read by Keras when `fit` starts: whether batch hooks may run on its background threads."""
        if not self._batch_hook_async_safe:
            return False
        from keras_callbacks_plus import distribute

        return distribute.num_workers() == 1

    @property
    def state_key(self) -> str:
        """The key of this callback's state in a checkpoint: the class name and what tells
        two instances apart (as Lightning's `state_key`)."""
        return type(self).__name__ + self._state_key_extra()

    def _state_key_extra(self) -> str:
        return ""

    def _state_key_of(self, **fields: Any) -> str:
        return json.dumps(fields, sort_keys=True, default=str)

    def on_train_begin(self, logs=None):
        siblings = _siblings.setdefault(self.model, [])
        if self.params:
            # A fit gives all its callbacks the same params dict: callbacks of an
            # earlier fit that ended in an exception (no on_train_end) leave.
            siblings[:] = [cb for cb in siblings if not cb.params or cb.params is self.params]
        if self not in siblings:
            siblings.append(self)
        self.preempted = False

    def on_train_end(self, logs=None):
        siblings = _siblings.get(self.model, [])
        if self in siblings:
            siblings.remove(self)

    def get_state(self) -> dict[str, Any]:
        """Returns this callback's state as a JSON-able dict (resume support); no side effects.

        Large arrays stay out of it: `state_arrays()` names them, and the
        checkpoint's writer saves them beside the checkpoint.
        """
        return {}

    def state_arrays(self) -> dict[str, tuple[str, Sequence[Any]]]:
        """Arrays the state needs, as `{name: (version, arrays)}`.

        ParallelModelCheckpoint writes each set beside its checkpoints, once
        per `version` (a string that changes whenever the arrays do), and
        `resume()` passes them back to `set_state`. The arrays must not be
        changed in place afterwards (replace them instead). Defaults to none.
        """
        return {}

    def set_state(self, state: dict[str, Any], arrays: Mapping[str, list] | None = None,
                  directory: str | None = None) -> None:
        """Restores a state returned by `get_state()`; `.get` defaults keep old states loading.

        Args:
            state: the dict `get_state()` returned.
            arrays: `{name: arrays}` of the `state_arrays()` saved with it.
                Defaults to `None`.
            directory: the folder of the checkpoint, for states written by
                earlier versions that refer to files by relative paths.
                Defaults to `None`.
        """

    def on_preemption(self, epoch: int, batch: int | None) -> None:
        """Hook: the job was preempted; training stops after the current step.

        Called on every callback of this package in the same `fit` when
        ParallelModelCheckpoint notices a preemption signal, before it saves.
        The epoch in progress is incomplete: callbacks do not treat its end
        as an epoch end. Sets `preempted`.
        """
        self.preempted = True

    def on_unfreeze_stage(self, stage: int, epoch: int, layers: list[str]) -> None:
        """Hook: ProgressiveUnfreezing started `stage` at `epoch`, unfreezing `layers`.

        Called on every callback of this package in the same `fit`, before
        the epoch's first step. Does nothing by default.
        """

    def _say(self, message: str) -> None:
        """Prints `message` when `verbose`, the way Keras prints its callbacks."""
        if not self.verbose:
            return
        if keras.config.is_interactive_logging_enabled():
            sys.stdout.write(message + "\n")
            sys.stdout.flush()
        else:
            logger.info(message)


def state_keys(callbacks: Sequence[Any]) -> list[str]:
    """Each callback's `state_key` (class name for other callbacks), `#2`, ... for repeats."""
    seen: dict[str, int] = {}
    keys = []
    for callback in callbacks:
        key = getattr(callback, "state_key", type(callback).__name__)
        seen[key] = seen.get(key, 0) + 1
        keys.append(key if seen[key] == 1 else f"{key}#{seen[key]}")
    return keys


def legacy_state_keys(callbacks: Sequence[Any]) -> list[str]:
    """The keys of checkpoints written before `state_key`: class name, then `#2`, ..."""
    seen: dict[str, int] = {}
    keys = []
    for callback in callbacks:
        name = type(callback).__name__
        seen[name] = seen.get(name, 0) + 1
        keys.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
    return keys

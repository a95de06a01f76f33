"""What every callback of this package shares: output, state, the fit's siblings, a twin's scope.

Callbacks of this package register with the model they train at
`on_train_begin` and leave at `on_train_end`, so that one of them can reach
the others of the same `fit`: ParallelModelCheckpoint stores their
`get_state()`, and ProgressiveUnfreezing announces a new stage to all of them
through the `on_unfreeze_stage` hook.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import weakref
from typing import Any

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

    def on_train_begin(self, logs=None):
        siblings = _siblings.setdefault(self.model, [])
        if self not in siblings:
            siblings.append(self)

    def on_train_end(self, logs=None):
        siblings = _siblings.get(self.model, [])
        if self in siblings:
            siblings.remove(self)

    def get_state(self, directory: str | None = None) -> dict[str, Any]:
        """Returns this callback's state as a JSON-able dict (resume support).

        Args:
            directory: a folder where the callback may write files that its
                state refers to (for example best weights), by paths relative
                to it. ParallelModelCheckpoint passes its checkpoint's folder.
                Defaults to `None`: no files; such parts are left out.
        """
        return {}

    def set_state(self, state: dict[str, Any], directory: str | None = None) -> None:
        """Restores a state returned by `get_state()`; `.get` defaults keep old states loading.

        Args:
            state: the dict `get_state()` returned.
            directory: the folder its relative paths refer to. Defaults to `None`.
        """

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

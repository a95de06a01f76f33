"""The host snapshot a checkpoint is written from: one copy of the training state.

Taking it is all a save blocks training for: weights and optimizer variables
are copied once, into host buffers reused from save to save (fresh memory
costs a page fault per page, which for hundreds of MB takes longer than the
copy itself). The writer serializes these buffers directly, so a save must
be written before the next snapshot reuses them; a save that cannot wait (on
preemption) takes a snapshot into spare buffers instead.
"""

from __future__ import annotations

import dataclasses

import keras
import numpy as np

from keras_callbacks_plus import _optimizers, distribute


@dataclasses.dataclass
class Snapshot:
    """One copy of what a checkpoint holds.

    Attributes:
        weights: one array per `model.weights`.
        optimizer: one array per `model.optimizer.variables` (before its
            first step an optimizer has its iteration count and learning rate
            only), or None (weights only, or not compiled).
        optimizer_keys: `_optimizers.state_keys` of those, matching copies of
            the model whose variable paths differ.
        trainable: for each of `model.weights`, whether it trains now.
        extra: small state that only resuming needs: `metrics` (the
            compiled metrics' running totals, so a resumed epoch reports what
            an uninterrupted one would) and `seeds` (seed-generator states,
            dropout masks included).
    """

    weights: list[np.ndarray]
    optimizer: list[np.ndarray] | None
    optimizer_keys: list[str] | None
    trainable: list[bool]
    extra: dict[str, list[np.ndarray]]
    optimizer_built: bool = False


class Snapshotter:
    """Takes snapshots of a model into host buffers it reuses."""

    def __init__(self):
        self._buffers: dict[str, list[np.ndarray]] = {}

    def _copy(self, name: str, variables, spare: bool) -> list[np.ndarray]:
        if spare:
            return distribute.host_copy(variables)
        self._buffers[name] = distribute.host_copy(variables, out=self._buffers.get(name))
        return self._buffers[name]

    def take(self, model: keras.Model, with_optimizer: bool, spare: bool = False) -> Snapshot:
        """Copies `model`'s state to host memory (into new buffers with `spare=True`)."""
        weights = self._copy("weights", model.weights, spare)
        optimizer = keys = None
        opt = getattr(model, "optimizer", None)
        if with_optimizer and opt is not None:
            optimizer = self._copy("optimizer", opt.variables, spare)
            keys = _optimizers.state_keys(opt, model)
        in_weights = {id(v) for v in model.weights}
        seeds = [v for v in model.variables if id(v) not in in_weights]
        extra = {
            "metrics": distribute.host_copy(model.metrics_variables),
            "seeds": distribute.host_copy(seeds),
        }
        return Snapshot(weights, optimizer, keys, _optimizers.trainable_flags(model), extra,
                        optimizer_built=bool(opt is not None and opt.built))

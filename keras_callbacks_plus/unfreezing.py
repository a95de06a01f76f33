"""ProgressiveUnfreezing: unfreeze layer groups as training goes, inside one `fit`.

Fine-tuning recipes (ULMFiT's gradual unfreezing, fastai's `freeze_to`,
Lightning's BackboneFinetuning) train the head first and unfreeze lower
layers later. In Keras 3, changing `layer.trainable` in the middle of `fit`
has no effect or crashes. This callback changes the trainable set at epoch
boundaries and rebuilds the optimizer over it (`_optimizers.rebuild_optimizer`):
the slots of variables that were trainable already, the iteration count and
the learning-rate schedule's position carry over bit for bit; newly unfrozen
variables get fresh slots; the train function is traced again. Per-group
learning rates and the warm-up are factors in the optimizer's update
(`_lr_multipliers`).

A schedule is plain data; the functions before the class turn it into stages.
"""

from __future__ import annotations

import bisect
import dataclasses
from typing import Any, Mapping, Sequence

import keras

from keras_callbacks_plus import _layers, _lr_multipliers, _optimizers
from keras_callbacks_plus._base import PlusCallback, callbacks_of
from keras_callbacks_plus._validate import check_bool, check_int, check_number, is_int

_STATE_VERSION = 1


def normalize_schedule(schedule: Any) -> dict[int, tuple[str, ...]]:
    """Checks a `{epoch: layers}` schedule; returns it sorted, with tuples of patterns.

    Raises:
        ValueError: not a dict, an epoch that is not an int >= 0, no epoch 0,
            or layers that are not a non-empty (list of) string.
    """
    expected = "Invalid value for argument schedule. Expected a dict {epoch: layers} with"
    if not isinstance(schedule, Mapping) or not schedule:
        raise ValueError(f"{expected} at least one entry. Received: schedule={schedule!r}")
    result = {}
    for epoch, layers in schedule.items():
        if not is_int(epoch, 0):
            raise ValueError(
                f"{expected} epochs that are ints >= 0. Received: schedule={schedule!r}"
            )
        patterns = (layers,) if isinstance(layers, str) else layers
        if not isinstance(patterns, (list, tuple)) or not patterns or not all(
            isinstance(p, str) and p for p in patterns
        ):
            raise ValueError(
                f"{expected} layers given as a name, a glob pattern, a path such as "
                f"'backbone/block_3*', 'all', or a non-empty list of those. Received: "
                f"schedule={schedule!r}"
            )
        result[int(epoch)] = tuple(patterns)
    if 0 not in result:
        raise ValueError(
            f"{expected} an entry for epoch 0: the layers that train from the start (every "
            f"other layer is frozen until its epoch). Received: schedule={schedule!r}"
        )
    return dict(sorted(result.items()))


def gradual_schedule(
    groups: Sequence[str | Sequence[str]], every: int = 1
) -> dict[int, tuple[str, ...]]:
    """ULMFiT's order: `groups[0]` (the head) at epoch 0, one more group every `every` epochs."""
    check_int("every", every, 1)
    if isinstance(groups, str) or not isinstance(groups, Sequence) or not groups:
        raise ValueError(
            "Invalid value for argument groups. Expected a non-empty list of layer groups, "
            f"from the top (head) down. Received: groups={groups!r}"
        )
    return normalize_schedule({i * int(every): group for i, group in enumerate(groups)})


def stage_at(starts: Sequence[int], epoch: int) -> int:
    """The stage of `epoch`: the index of the last start epoch <= `epoch` (`starts` sorted)."""
    return max(bisect.bisect_right(starts, epoch) - 1, 0)


@dataclasses.dataclass
class _Unit:
    """A layer and the trainable variables it owns itself (not its sublayers')."""

    path: str
    layer: Any
    variables: list
    leaf: bool
    group: int | None  # the stage that unfreezes it
    batch_norm: bool


def _stage_paths(model: keras.Model, schedule: dict) -> list[set[str]]:
    """For each stage, the paths its patterns select (`_layers.select`; `""`, all, for `"all"`).

    A selected path stands for itself and everything inside it.

    Raises:
        ValueError: a pattern matches no layer; the message lists close matches.
    """
    selected = []
    for epoch, patterns in schedule.items():
        context = f"ProgressiveUnfreezing, schedule epoch {epoch}"
        paths = {path for path, _ in _layers.select(model, patterns, context=context)}
        selected.append({""} if _layers.ALL in patterns else paths)
    return selected


def _units(model: keras.Model, entries: list, selected: list[set[str]]) -> list[_Unit]:
    """The layers that own trainable variables (all flags on), with the stage unfreezing each."""
    units, owned = [], set()
    for path, layer in entries:
        children = _layers.children(layer)
        skip = owned | {id(w) for child in children for w in child.weights}
        own = [v for v in layer.weights if v.trainable and id(v) not in skip]
        owned.update(id(v) for v in own)
        if not own:
            continue
        group = next(
            (i for i, paths in enumerate(selected)
             if any(p == "" or path == p or path.startswith(p + "/") for p in paths)),
            None,
        )
        batch_norm = isinstance(layer, keras.layers.BatchNormalization)
        units.append(_Unit(path or model.name, layer, own, not children, group, batch_norm))
    return units


class ProgressiveUnfreezing(PlusCallback):
    """Unfreezes layer groups at chosen epochs of one `fit`, keeping the optimizer's state.

    At `on_train_begin` every layer is frozen except those of `schedule[0]`;
    at each later epoch of `schedule` its layers become trainable too
    (cumulatively). At each change the optimizer is rebuilt over the new
    trainable set: the slots (Adam's m and v, momentum, ...) of variables
    trainable before, the iteration count and the learning-rate schedule's
    position carry over bit for bit; newly unfrozen variables get fresh slots;
    the train function is traced again. Works with every built-in optimizer,
    `LossScaleOptimizer` (mixed precision), `data_parallel` twins, on
    TensorFlow and JAX.

    Layers are named by name (`"head"`), glob pattern (`"block5_*"`, matched
    against names at any depth), path inside nested models
    (`"backbone/block_3*"`, matched against the whole path) or `"all"`.
    Naming a model or a layer with sublayers names everything inside it.

    Frozen layers keep their weights bit for bit and cost no backward pass;
    frozen BatchNormalization layers run in inference mode and keep their
    moving statistics, unless `train_bn=True`: then every BatchNormalization
    layer trains from the start, as in Lightning's BackboneFinetuning.

    Learning rates: with `group_lr_decay=d`, the layers of stage `k` learn at
    `lr / d**k` (stage 0, the head, at `lr`); BatchNormalization layers that
    `train_bn` trains before any stage names them, at the lowest stage's rate.
    `lr` is the optimizer's own (a float, or a LearningRateSchedule at the
    current step), so other callbacks may still change it. With
    `warmup_epochs=w`, every stage after the first multiplies all rates by a
    linear ramp from `1/W` to 1 over `W = w * steps_per_epoch` steps. A factor
    scales every use of the rate, decoupled weight decay included; the
    optimizer keeps its class, config and variable names.

    `current_stage`, `unfrozen_layers` (paths of the trainable layers) and
    `learning_rates()` show where training is. When a stage starts, every
    callback of this package in the same `fit` gets
    `on_unfreeze_stage(stage, epoch, layers)` with the layers it unfreezes
    (RobustEarlyStopping restarts its patience).

    Resume: `get_state()` / `set_state()`; with `fit(initial_epoch=k)` the
    stage of epoch k is applied before the first step, with its rates and
    warm-up position.

    Args:
        schedule: `{epoch: layers}`; `layers` is a name, pattern or path, or a
            list of them. Must have epoch 0.
        train_bn: keep every BatchNormalization layer trainable (training
            mode). Defaults to `False`.
        group_lr_decay: divide each lower stage's learning rate by this
            (ULMFiT uses 2.6). Defaults to `None`: one rate for all.
        warmup_epochs: epochs of linear warm-up after each unfreeze. Defaults
            to `0`.
        verbose: 1 to print each stage. Defaults to `0`.

    Raises:
        ValueError: an invalid argument here; at `on_train_begin`, a layer
            pattern that matches nothing (with close matches) or a model that
            is not compiled.

    Example:

    ```python
    backbone = keras.applications.MobileNetV3Small(
        input_shape=(96, 96, 3), include_top=False, weights=None, pooling="avg")
    model = keras.Sequential([backbone, keras.layers.Dense(10, activation="softmax", name="head")])
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    unfreeze = ProgressiveUnfreezing(
        {0: "head", 3: "MobileNetV3Small/expanded_conv_10*", 6: "all"},
        group_lr_decay=2.6, warmup_epochs=1, verbose=1)
    model.fit(x, y, epochs=10, callbacks=[unfreeze])
    ```
    """

    def __init__(
        self,
        schedule: Mapping[int, str | Sequence[str]],
        *,
        train_bn: bool = False,
        group_lr_decay: float | None = None,
        warmup_epochs: int = 0,
        verbose: int = 0,
    ):
        super().__init__(verbose)
        self.schedule = normalize_schedule(schedule)
        self.train_bn = check_bool("train_bn", train_bn)
        self.group_lr_decay = check_number("group_lr_decay", group_lr_decay, above=0.0,
                                           allow_none=True, expected="a number > 0")
        self.warmup_epochs = check_int("warmup_epochs", warmup_epochs, 0)
        self.current_stage: int | None = None
        self.unfrozen_layers: list[str] = []
        self._starts = list(self.schedule)
        self._units: list[_Unit] = []
        self._resume_epoch: int | None = None
        self._updates_per_epoch: int | None = None
        self._epoch: int | None = None
        self._epoch_done = False

    @classmethod
    def gradual(
        cls, groups: Sequence[str | Sequence[str]], every: int = 1, **kwargs
    ) -> "ProgressiveUnfreezing":
        """ULMFiT's gradual unfreezing: `groups` from the head down, one more each `every` epochs.

        `ProgressiveUnfreezing.gradual(["head", "block5_*", "block4_*"], every=2)`
        is `ProgressiveUnfreezing({0: "head", 2: "block5_*", 4: "block4_*"})`.
        Other keyword arguments go to the constructor.
        """
        return cls(gradual_schedule(groups, every), **kwargs)

    # -- stages ------------------------------------------------------------------

    def _on(self, unit: _Unit, stage: int) -> bool:
        if unit.batch_norm and self.train_bn:
            return True
        return unit.group is not None and unit.group <= stage

    def _multiplier(self, unit: _Unit) -> float:
        if self.group_lr_decay is None:
            return 1.0
        group = unit.group if unit.group is not None else len(self._starts) - 1
        return 1.0 / self.group_lr_decay**group

    def _iterations(self) -> int:
        return int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))

    def _warmup(self, stage: int, epoch: int) -> tuple[int, int]:
        elapsed = epoch - self._starts[stage]
        if not self.warmup_epochs or stage == 0 or elapsed >= self.warmup_epochs:
            return 0, 0
        steps = (self.params or {}).get("steps")
        if steps:
            optimizer = self.model.optimizer
            inner = getattr(optimizer, "inner_optimizer", optimizer)
            steps = max(1, steps // (getattr(inner, "gradient_accumulation_steps", None) or 1))
        else:
            steps = self._updates_per_epoch
        if not steps:
            raise ValueError(
                f"ProgressiveUnfreezing(warmup_epochs={self.warmup_epochs}) needs the number of "
                f"steps per epoch to warm up stage {stage} at epoch {epoch + 1}, and fit() does "
                "not know it (a dataset of unknown size). Pass steps_per_epoch to fit()."
            )
        return self._iterations() - elapsed * steps, self.warmup_epochs * steps

    def _apply(self, epoch: int, flags_before: tuple[bool, ...]) -> bool:
        """Sets the trainable flags and optimizer of `epoch`'s stage; returns whether it rebuilt."""
        model, stage = self.model, stage_at(self._starts, epoch)
        for unit in self._units:
            if unit.leaf:
                _layers.set_trainable(unit.layer, self._on(unit, stage))
            else:
                for variable in unit.variables:
                    variable.trainable = self._on(unit, stage)
        paths = _optimizers.trainable_signature(model)
        multipliers = ()
        if self.group_lr_decay is not None:
            by_variable = {id(v): self._multiplier(u) for u in self._units for v in u.variables}
            multipliers = tuple(by_variable.get(id(v), 1.0) for v in model.trainable_variables)
        wanted = _lr_multipliers.Scaling(paths, multipliers, *self._warmup(stage, epoch))
        current = _lr_multipliers.scaling_of(model.optimizer)
        if current is None:
            keep = model.optimizer.built and self._built_for == paths and wanted.neutral
        else:
            keep = current == wanted
        if not keep:
            _optimizers.rebuild_optimizer(
                model, make=lambda old: _lr_multipliers.scaled_copy(old, wanted)
            )
        elif self._layer_flags() != flags_before:
            model.make_train_function(force=True)
        self._built_for = paths
        self.current_stage = stage
        self.unfrozen_layers = [u.path for u in self._units if self._on(u, stage)]
        return not keep

    def _layer_flags(self) -> tuple[bool, ...]:
        return tuple(u.layer.trainable for u in self._units)

    def _announce(self, stage: int, epoch: int) -> None:
        before = (lambda u: False) if stage == 0 else (lambda u: self._on(u, stage - 1))
        new = [u.path for u in self._units if self._on(u, stage) and not before(u)]
        group = [u for u in self._units if u.group == stage]
        rate = self._multiplier(group[0]) if group else 1.0
        warm = stage and self.warmup_epochs
        self._say(
            f"Epoch {epoch + 1}: ProgressiveUnfreezing stage {stage}: unfreezing {len(new)} "
            f"layers ({', '.join(new[:5])}{', ...' if len(new) > 5 else ''}); "
            f"{len(self.unfrozen_layers)} of {len(self._units)} layers with weights trainable"
            + (f", learning rate x{rate:.4g} for them" if rate != 1.0 else "")
            + (f", warm-up over {self.warmup_epochs} epochs" if warm else "")
            + "."
        )
        for callback in callbacks_of(self.model):
            callback.on_unfreeze_stage(stage, epoch, new)

    def learning_rates(self) -> dict[str, float]:
        """`{layer path: learning rate}` of the trainable layers for the next step.

        The optimizer's current rate times the layer's group multiplier and
        the warm-up factor.
        """
        if self.model is None or self.current_stage is None:
            return {}
        optimizer = self.model.optimizer
        base = float(keras.ops.convert_to_numpy(optimizer.learning_rate))
        scaling = _lr_multipliers.scaling_of(optimizer)
        warm = _lr_multipliers.warmup_factor(scaling, self._iterations()) if scaling else 1.0
        return {
            u.path: base * self._multiplier(u) * warm
            for u in self._units
            if self._on(u, self.current_stage)
        }

    # -- hooks -------------------------------------------------------------------

    def on_train_begin(self, logs=None):
        model = self.model
        if getattr(model, "optimizer", None) is None:
            raise ValueError(
                f"ProgressiveUnfreezing needs a compiled model; model {model.name!r} has no "
                "optimizer. Call model.compile(optimizer=...) before fit()."
            )
        entries = [("", model)] + _layers.walk(model)
        selected = _stage_paths(model, self.schedule)
        super().on_train_begin(logs)
        flags = {id(layer): layer.trainable for _, layer in entries}
        self._built_for = _optimizers.trainable_signature(model)
        for _, layer in entries:  # a frozen container would hide its sublayers' flags
            _layers.set_trainable(layer, True)
        self._units = _units(model, entries, selected)
        flags_before = tuple(flags[id(u.layer)] for u in self._units)
        self._entry_optimizer = model.optimizer
        # Keras does not tell callbacks its initial_epoch: a resumed state
        # says it, else 0; on_epoch_begin corrects a wrong guess.
        self._guessed_epoch = self._resume_epoch or 0
        self._resume_epoch, self._epoch, self._epoch_iteration = None, None, None
        self._apply(self._guessed_epoch, flags_before)

    def on_epoch_begin(self, epoch, logs=None):
        stage = stage_at(self._starts, epoch)
        if self._epoch is None and epoch != self._guessed_epoch:
            # The guess was wrong (fit(initial_epoch=...) without set_state).
            # No step ran since train begin, so the optimizer met there still
            # holds every slot the guess dropped.
            if self._apply(epoch, self._layer_flags()) and self._entry_optimizer.built:
                _optimizers.copy_optimizer_state(self._entry_optimizer, self.model.optimizer)
        elif self._epoch is not None and stage != self.current_stage:
            self._apply(epoch, self._layer_flags())
        self._entry_optimizer = None
        self._epoch, self._epoch_done = epoch, False
        if not (self.params or {}).get("steps"):
            self._epoch_iteration = self._iterations()
        if epoch in self.schedule:
            self._announce(stage, epoch)

    def on_epoch_end(self, epoch, logs=None):
        if self.preempted:
            return  # an epoch cut short: its updates are no epoch's count
        self._epoch_done = True
        if self._epoch_iteration is not None:
            done = self._iterations() - self._epoch_iteration
            self._updates_per_epoch = done or self._updates_per_epoch

    def on_train_end(self, logs=None):
        self._entry_optimizer = None
        super().on_train_end(logs)

    # -- state -------------------------------------------------------------------

    def get_state(self) -> dict[str, Any]:
        # The epoch a resumed fit starts with: the one in progress, or the next.
        epoch = 0 if self._epoch is None else self._epoch + int(self._epoch_done)
        return {
            "version": _STATE_VERSION,
            "epoch": epoch,
            "stage": self.current_stage,
            "unfrozen_layers": list(self.unfrozen_layers),
            "updates_per_epoch": self._updates_per_epoch,
        }

    def set_state(self, state: dict[str, Any], arrays=None, directory: str | None = None) -> None:
        self._resume_epoch = int(state.get("epoch", 0))
        self.current_stage = state.get("stage")
        self.unfrozen_layers = list(state.get("unfrozen_layers", []))
        self._updates_per_epoch = state.get("updates_per_epoch")

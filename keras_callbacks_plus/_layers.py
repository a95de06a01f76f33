"""Layers inside a model: the one traversal, the one pattern language, `trainable` set reliably.

Every callback of this package names layers the same way:

* a pattern without "/" matches a layer's own name, at any depth: `"head"`,
  `"block5_*"`, `"conv?"`;
* a pattern with "/" matches the whole path from the top:
  `"backbone/block_3*"` (as in `fnmatch`, `*` also matches "/", so
  `"backbone/*"` is every layer inside backbone);
* `"all"` selects every layer.

Globs are `fnmatch` patterns, case-sensitive. A path joins layer names from
the top, the model itself left out: `"backbone/block_3a"`. Naming a container
(a nested model, or a layer with sublayers) selects the container itself;
what that means is the caller's: ProgressiveUnfreezing unfreezes everything
inside it, ActivationLogger logs the container's own output.
"""

from __future__ import annotations

import difflib
import fnmatch
from typing import Any, Callable, Sequence

import keras

ALL = "all"
_LISTED = 60  # layer paths shown at most in a no-match error


def children(layer) -> list:
    """The direct sublayers of `layer`."""
    if isinstance(layer, keras.Model):
        return list(layer.layers)
    # Keras offers `.layers` on models only; the sublayers of a plain layer
    # are its attributes (layers, or lists and dicts of layers), which is also
    # what Keras's own tracking collects.
    found: dict[int, Any] = {}
    for value in vars(layer).values():
        if isinstance(value, dict):
            value = list(value.values())
        for item in value if isinstance(value, (list, tuple)) else (value,):
            if isinstance(item, keras.layers.Layer) and item is not layer:
                found.setdefault(id(item), item)
    return list(found.values())


def walk(
    model: keras.Model, *, enter: Callable[[Any], bool] | None = None
) -> list[tuple[str, Any]]:
    """`(path, layer)` for every layer inside `model`, nested ones included, depth first.

    A path joins layer names from the top: `"backbone/block_3a"`. Input
    layers are left out; a layer used twice keeps its first path.

    Args:
        model: the model.
        enter: which layers to look inside (the sublayers of `model` itself
            are always listed). Defaults to `None`: every layer.
    """
    found, seen = [], {id(model)}

    def visit(layer, prefix):
        for child in children(layer):
            if id(child) not in seen and not isinstance(child, keras.layers.InputLayer):
                seen.add(id(child))
                found.append((prefix + child.name, child))
                if enter is None or enter(child):
                    visit(child, prefix + child.name + "/")

    visit(model, "")
    return found


def all_layers(model: keras.Model) -> list:
    """`model` and every layer inside it."""
    return [model] + [layer for _, layer in walk(model)]


def _matches(pattern: str, path: str) -> bool:
    if pattern == ALL:
        return True
    return fnmatch.fnmatchcase(path if "/" in pattern else path.rpartition("/")[2], pattern)


def _no_match(owner: str, pattern: str, paths: Sequence[str], context: str) -> str:
    candidates = sorted(set(paths) | {path.rpartition("/")[2] for path in paths})
    close = difflib.get_close_matches(pattern, candidates, n=5, cutoff=0.5)
    listed = ", ".join(paths[:_LISTED]) or "none"
    if len(paths) > _LISTED:
        listed += f", ... ({len(paths) - _LISTED} more)"
    return (
        (f"{context}: " if context else "")
        + f"No layer of {owner} matches {pattern!r}. "
        + (f"Close matches: {', '.join(close)}. " if close else "")
        + "Layers are named by name or glob, at any depth ('block5_*'), by path from the "
        f"top ('backbone/block_3*') or '{ALL}'. Available layers: {listed}."
    )


def match(
    paths: Sequence[str], patterns: str | Sequence[str], *, owner: str, context: str = ""
) -> list[str]:
    """The paths that `patterns` select, in the order of `paths` (rules in the module docstring).

    Args:
        paths: layer paths, such as those of `walk` or of an activation log.
        patterns: a pattern or a list of them.
        owner: what the paths belong to, for the error: `"model 'finetune'"`.
        context: what to put before the error, such as the caller. Defaults
            to `""`.

    Raises:
        ValueError: a pattern (other than `"all"`) matches no path; the
            message lists close matches and the paths.
    """
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    chosen: set[str] = set()
    for pattern in patterns:
        hits = {path for path in paths if _matches(pattern, path)}
        if not hits and pattern != ALL:
            raise ValueError(_no_match(owner, pattern, list(paths), context))
        chosen |= hits
    return [path for path in paths if path in chosen]


def select(
    model: keras.Model,
    patterns: str | Sequence[str],
    *,
    enter: Callable[[Any], bool] | None = None,
    context: str = "",
) -> list[tuple[str, Any]]:
    """`(path, layer)` for the layers of `model` that `patterns` select, in `walk` order.

    Args:
        model: the model.
        patterns: a pattern or a list of them (rules in the module docstring).
        enter: as in `walk`: which layers' sublayers are candidates too.
            Defaults to `None`: every layer's.
        context: what to put before the error, such as the caller. Defaults
            to `""`.

    Raises:
        ValueError: a pattern matches no layer (see `match`).
    """
    layers = walk(model, enter=enter)
    chosen = set(match([path for path, _ in layers], patterns,
                       owner=f"model {model.name!r}", context=context))
    return [(path, layer) for path, layer in layers if path in chosen]


def set_trainable(layer, value: bool) -> None:
    """Sets `layer.trainable`, and so its own variables' flags, even if it was `value` already."""
    # Through the property's setter: on TensorFlow, `layer.trainable = True`
    # is skipped when the flag is True already (attribute tracking short-cuts
    # `x.a = x.a`), which would leave its variables' own flags as they are.
    type(layer).trainable.fset(layer, value)

"""Finding every layer inside a model, and setting `trainable` reliably."""

from __future__ import annotations

from typing import Any

import keras


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


def layer_paths(model: keras.Model) -> list[tuple[str, Any]]:
    """`(path, layer)` for every layer inside `model`, nested ones included, depth first.

    A path joins layer names from the top: `"backbone/block_3a"`. A layer used
    twice keeps its first path.
    """
    found, seen = [], {id(model)}

    def visit(layer, prefix):
        for child in children(layer):
            if id(child) not in seen:
                seen.add(id(child))
                found.append((prefix + child.name, child))
                visit(child, prefix + child.name + "/")

    visit(model, "")
    return found


def all_layers(model: keras.Model) -> list:
    """`model` and every layer inside it."""
    return [model] + [layer for _, layer in layer_paths(model)]


def set_trainable(layer, value: bool) -> None:
    """Sets `layer.trainable`, and so its own variables' flags, even if it was `value` already."""
    # Through the property's setter: on TensorFlow, `layer.trainable = True`
    # is skipped when the flag is True already (attribute tracking short-cuts
    # `x.a = x.a`), which would leave its variables' own flags as they are.
    type(layer).trainable.fset(layer, value)

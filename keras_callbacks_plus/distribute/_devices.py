"""Device names: the `"cpu:0"` form this package uses, and the check of a `devices` argument.

Backend-neutral: it reads TensorFlow and JAX device objects by their
attributes, without importing either.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

_DEVICE_PATTERN = re.compile(r"(cpu|gpu|tpu|cuda|rocm):(\d+)$")


def canonical_device(spec: Any) -> str | None:
    """`"cpu:0"` for a device name, TF logical device or JAX device."""
    if hasattr(spec, "platform") and hasattr(spec, "id"):  # a jax.Device
        kind, index = spec.platform, spec.id
    else:
        name = str(getattr(spec, "name", spec)).strip().lower()
        match = _DEVICE_PATTERN.search(name)
        if match is None:
            return None
        kind, index = match.groups()
    kind = {"cuda": "gpu", "rocm": "gpu"}.get(str(kind).lower(), str(kind).lower())
    return f"{kind}:{int(index)}"


def resolve_devices(devices: Sequence[Any] | None, available: list[str]) -> tuple[str, ...]:
    """The canonical names of `devices`, checked against `available`.

    Args:
        devices: what the user passed to `data_parallel`: names or device
            objects, one or a sequence; `None` picks every GPU, else every CPU.
        available: this process's devices, canonical names.

    Returns:
        The device names, in the order given.

    Raises:
        ValueError: `devices` is empty, names a device that does not exist,
            or names one twice.
    """
    if devices is None:
        gpus = [d for d in available if d.startswith("gpu:")]
        return tuple(gpus or [d for d in available if d.startswith("cpu:")])
    if isinstance(devices, (str, bytes)) or not isinstance(devices, Sequence):
        devices = [devices]
    if not devices:
        raise ValueError(
            "Invalid value for argument devices. Expected a non-empty list of "
            f"devices. Received: devices={devices!r}"
        )
    names = []
    for spec in devices:
        name = canonical_device(spec)
        if name is None or name not in available:
            raise ValueError(
                f"Device {spec!r} does not exist. Available devices: "
                f"{', '.join(available)}."
            )
        if name in names:
            raise ValueError(f"Device {spec!r} is listed twice in devices={devices!r}.")
        names.append(name)
    return tuple(names)

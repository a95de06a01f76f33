"""Argument checks with Keras's wording, one place for every callback of the package.

Each check returns the value in its canonical type, or raises
`ValueError("Invalid value for argument NAME. Expected .... Received: NAME=VALUE")`,
the wording of Keras's own argument errors.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np


def invalid(name: str, expected: str, value: Any, of: str = "") -> ValueError:
    """The error for argument `name` (of `of`, e.g. `"Keep"`): what was expected, what came."""
    where = f"argument {name} of {of}" if of else f"argument {name}"
    return ValueError(f"Invalid value for {where}. Expected {expected}. Received: {name}={value!r}")


def is_int(value: Any, minimum: int | None = None) -> bool:
    """An int (NumPy's too, not a bool), at least `minimum` if given."""
    return (not isinstance(value, bool) and isinstance(value, (int, np.integer))
            and (minimum is None or value >= minimum))


def check_int(name: str, value: Any, minimum: int = 0, *, allow_none: bool = False,
              of: str = "") -> int | None:
    """An int >= `minimum` (or None with `allow_none`)."""
    if value is None and allow_none:
        return None
    if not is_int(value, minimum):
        expected = f"an int >= {minimum}"
        raise invalid(name, f"None or {expected}" if allow_none else expected, value, of)
    return int(value)


def check_number(name: str, value: Any, *, above: float | None = None, at_least: float | None = None,
                 allow_none: bool = False, expected: str | None = None) -> float | None:
    """A finite number (not a bool), `> above` / `>= at_least` if given (or None with `allow_none`)."""
    if value is None and allow_none:
        return None
    ok = (not isinstance(value, bool) and isinstance(value, (int, float, np.integer, np.floating))
          and math.isfinite(value)
          and (above is None or value > above) and (at_least is None or value >= at_least))
    if not ok:
        if expected is None:
            bound = (f" > {above:g}" if above is not None else
                     f" >= {at_least:g}" if at_least is not None else "")
            expected = f"a finite number{bound}" if not bound else f"a number{bound}"
            if allow_none:
                expected += " or None"
        raise invalid(name, expected, value)
    return float(value)


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise invalid(name, "a bool", value)
    return bool(value)


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> Any:
    if value not in choices:
        raise invalid(name, f"one of {', '.join(repr(c) for c in choices)}", value)
    return value

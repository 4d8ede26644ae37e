"""One predicate for "a whole number in a range", the check every count, size and limit goes through.

Why one: the same five-part test (not a bool, an integer type, at least ``low``, at most ``high``,
whole floats from JSON files where a file allows them) was written out at each call site, and each
copy was a chance to forget the bool case (``True`` is an ``int``). Callers keep their own messages:
what the value is and where it came from differs at each.
"""
from __future__ import annotations

from numbers import Integral
from typing import Any

import numpy as np


def is_int(value: Any) -> bool:
    """True when ``value`` is an integer of any type (numpy's too), not a bool: a row number, a key."""
    return isinstance(value, Integral) and not isinstance(value, bool)


def is_int_in(value: Any, low: int, high: int | None = None, *, whole_floats: bool = False) -> bool:
    """True when ``value`` is an integer (not a bool) with ``low <= value`` and, if given, ``value <= high``.

    ``whole_floats`` admits floats with no fractional part (``12.0``), as JSON files written by other
    tools may hold them; the caller converts with ``int(value)``.
    """
    if not is_int(value) and not (whole_floats and isinstance(value, float) and value.is_integer()):
        return False
    return bool(low <= value and (high is None or value <= high))


def non_finite_rows(values: Any) -> np.ndarray:
    """Bool mask over the first axis of ``values`` (a numpy array or a torch tensor): rows holding NaN or
    infinity. Integer arrays have none. A tensor on a device is reduced there and only the mask read back.

    The one row check behind "this clip's features/probabilities must not be stored or shown"
    (heads predict and classify, training's naming of bad clips, fusion's run checks).
    """
    n = len(values)
    if hasattr(values, "is_floating_point"):  # a torch tensor; torch itself is not imported here
        if not (values.is_floating_point() or values.is_complex()):
            return np.zeros(n, dtype=bool)
        return (~values.reshape(n, -1).isfinite().all(dim=1)).cpu().numpy()
    arr = np.asarray(values)
    if arr.dtype.kind not in "fc" or n == 0:
        return np.zeros(n, dtype=bool)
    return ~np.isfinite(arr.reshape(n, -1)).all(axis=1)

"""Argument checks shared by the whole package: one wording, one rule for what counts as an int.

An int is a Python or NumPy integer and never a bool; a wrong type raises ``TypeError`` and a value
out of range ``ValueError``; every message names the argument, what it expects and what it got.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["check_int", "check_positive_number"]


def check_int(value: Any, name: str, *, minimum: int | None = None) -> int:
    """``value`` as an int, or a clear error naming ``name``.

    Example:
        >>> check_int(np.int64(3), "seed")
        3
        >>> check_int(1.5, "seed")
        Traceback (most recent call last):
        ...
        TypeError: seed must be an int, got float 1.5
    """
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int{'' if minimum is None else f' >= {minimum}'}, "
                        f"got {type(value).__name__} {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def check_positive_number(value: Any, name: str, *, unit: str = "") -> float:
    """``value`` as a finite float > 0, or a clear error naming ``name``.

    Example:
        >>> check_positive_number(2, "timeout")
        2.0
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a positive number{unit}, got {type(value).__name__} {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive number{unit}, got {value!r}")
    return float(value)

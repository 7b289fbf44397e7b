"""Argument and tensor checks shared by the whole package: one wording, one rule for each kind of value.

* An int is a Python or NumPy integer and never a bool; a real number is any int or float (NumPy's
  included) and never a bool.
* A value of the wrong type raises ``TypeError``; a value of the right type out of range raises
  ``ValueError``.
* Every message names the argument, says what it expects and shows what it got, e.g.
  ``num_bins must be an int >= 2, got 1``.
"""

from __future__ import annotations

import math
import numbers
import sys
import warnings
from collections.abc import Callable, Collection
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "as_float_tensor",
    "caller_level",
    "check_bool",
    "check_choice",
    "check_device",
    "check_finite",
    "check_int",
    "check_positive_number",
    "check_real",
]


def _range_text(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f"{'<' if high_open else '<='} {high:g}"
    return ""


def _shown(value: Any) -> str:
    """``repr`` of a value, NumPy scalars shown as the Python number they hold."""
    return repr(value.item() if isinstance(value, np.generic) else value)


def _none_text(optional: bool | str) -> str:
    if isinstance(optional, str):
        return f"None ({optional}) or "
    return "None or " if optional else ""


def check_int(
    value: Any, name: str, *, minimum: int | None = None, maximum: int | None = None, optional: bool | str = False
) -> int | None:
    """``value`` as a Python int, or a clear error naming ``name``.

    Args:
        value: The argument.
        name: Its name, for the message.
        minimum: Smallest allowed value (inclusive).
        maximum: Largest allowed value (inclusive).
        optional: Accept None (and return it); a string says what None means, for the message.

    Example:
        >>> check_int(np.int64(3), "seed")
        3
        >>> check_int(1.5, "seed")
        Traceback (most recent call last):
        ...
        TypeError: seed must be an int, got float 1.5
        >>> check_int(1, "num_bins", minimum=2, maximum=20)
        Traceback (most recent call last):
        ...
        ValueError: num_bins must be an int in [2, 20], got 1
    """
    if value is None and optional:
        return None
    bounds = _range_text(minimum, maximum, False, False)
    expected = _none_text(optional) + "an int" + (f" {bounds}" if bounds else "")
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be {expected}, got {type(value).__name__} {_shown(value)}")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ValueError(f"{name} must be {expected}, got {_shown(value)}")
    return int(value)


def check_real(
    value: Any,
    name: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    optional: bool | str = False,
) -> float | None:
    """``value`` as a finite float within the given bounds, or a clear error naming ``name``.

    Example:
        >>> check_real(0.1, "alpha", low=0, high=1, low_open=True, high_open=True)
        0.1
        >>> check_real(1.0, "alpha", low=0, high=1, low_open=True, high_open=True)
        Traceback (most recent call last):
        ...
        ValueError: alpha must be a real number in (0, 1), got 1.0
    """
    if value is None and optional:
        return None
    bounds = _range_text(low, high, low_open, high_open)
    expected = _none_text(optional) + "a real number" + (f" {bounds}" if bounds else "")
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {expected}, got {type(value).__name__} {_shown(value)}")
    number = float(value)
    inside = math.isfinite(number)
    if low is not None:
        inside = inside and (number > low if low_open else number >= low)
    if high is not None:
        inside = inside and (number < high if high_open else number <= high)
    if not inside:
        raise ValueError(f"{name} must be {expected}, got {_shown(value)}")
    return number


def check_positive_number(value: Any, name: str, *, unit: str = "") -> float:
    """``value`` as a finite float > 0, or a clear error naming ``name`` (``unit`` ends the expectation).

    Example:
        >>> check_positive_number(2, "timeout")
        2.0
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a positive number{unit}, got {type(value).__name__} {_shown(value)}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive number{unit}, got {_shown(value)}")
    return float(value)


def check_bool(value: Any, name: str) -> bool:
    """``value`` if it is True or False (NumPy's bools too), else a ``TypeError`` naming ``name``.

    Example:
        >>> check_bool(1, "progress")
        Traceback (most recent call last):
        ...
        TypeError: progress must be True or False, got int 1
    """
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {_shown(value)}")
    return bool(value)


def check_choice(value: Any, name: str, choices: Collection[str]) -> str:
    """``value`` if it is one of ``choices``, else a ``ValueError`` listing them.

    Example:
        >>> check_choice("l3", "distance", ("l2", "l1"))
        Traceback (most recent call last):
        ...
        ValueError: distance must be one of 'l2', 'l1', got 'l3'
    """
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in choices)}, got {value!r}")
    return value


def as_float_tensor(value: Any, name: str, *, dtype: torch.dtype, device: torch.device | str,
                    warn_narrowing: bool | Callable[[], bool] = False) -> Tensor:
    """``value`` (a tensor or NumPy array of a floating dtype) as a tensor of ``dtype`` on ``device``.

    With ``warn_narrowing``, casting float64 to a narrower ``dtype`` gives a ``UserWarning`` the first time
    it happens to ``name`` in this process (the package's policy for float64 input: cast, and say so
    once): the values lose digits the caller may have meant to keep. A callable is asked only then
    (e.g. whether the prior's own draws are float64, which costs a draw). The slot is taken even where a
    warnings filter ignores the warning, as Python's own ``"once"`` filter does.

    Raises:
        TypeError: For other types, or integer/boolean data (convert explicitly, e.g. ``x.float()``).

    Example:
        >>> as_float_tensor(np.zeros(2, dtype=np.float32), "x", dtype=torch.float32, device="cpu")
        tensor([0., 0.])
    """
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(value)
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or a numpy array, got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype, got {value.dtype}; convert it, e.g. {name}.float()")
    if (warn_narrowing and value.dtype == torch.float64 and dtype != torch.float64 and name not in _NARROWED
            and (not callable(warn_narrowing) or warn_narrowing())):
        _NARROWED.add(name)
        warnings.warn(f"{name} is float64 and was cast to {dtype}, the flow's dtype (shown once per process); "
                      "call torch.set_default_dtype(torch.float64) before creating NPE to train and evaluate "
                      "in float64", UserWarning, stacklevel=caller_level())
    return value.detach().to(device=device, dtype=dtype)


#: Modules whose frames a warning skips on its way to the user's code (:func:`caller_level`).
_LIBRARY_MODULES = ("sbiflows", "torch", "contextlib", "functools")
#: The argument names :func:`as_float_tensor` has warned about narrowing (each warns once per process).
_NARROWED: set[str] = set()


def caller_level() -> int:
    """The ``stacklevel`` of the first frame outside sbiflows, torch and the decorators of ``contextlib`` and
    ``functools``, so that a warning points at user code.

    Example:
        >>> caller_level() >= 1
        True
    """
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_globals.get("__name__", "").split(".")[0] in _LIBRARY_MODULES:
        frame, level = frame.f_back, level + 1
    return level


def check_finite(value: Tensor, name: str) -> Tensor:
    """``value`` if it holds no NaN or inf, else a ``ValueError`` naming ``name`` and the first bad row.

    Example:
        >>> check_finite(torch.tensor([[0.0, float("nan")]]), "x")
        Traceback (most recent call last):
        ...
        ValueError: x contains NaN or inf (1 of 1 rows, first at row 0)
    """
    bad = ~torch.isfinite(value)
    if bool(bad.any()):
        rows = bad.reshape(len(value), -1).any(-1) if value.ndim else bad.reshape(1)
        first = int(rows.nonzero()[0, 0])
        raise ValueError(f"{name} contains NaN or inf ({int(rows.sum())} of {len(rows)} rows, first at row {first})")
    return value


def check_device(value: Any, name: str = "device") -> torch.device:
    """``value`` as a ``torch.device`` that this torch can use, or a ``ValueError`` naming ``name``.

    Example:
        >>> check_device("cpu")
        device(type='cpu')
        >>> check_device("cud")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: device must be a torch device such as 'cpu' or 'cuda', got 'cud'...
    """
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError, ValueError) as error:
        raise ValueError(f"{name} must be a torch device such as 'cpu' or 'cuda', got {value!r} ({error})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{name}={value!r}, but this torch has no CUDA device (torch.cuda.is_available() is False)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"{name}={value!r}, but this machine has {torch.cuda.device_count()} CUDA device(s), "
                         f"numbered from 0")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{name}={value!r}, but this torch has no MPS device (torch.backends.mps.is_available() "
                         "is False)")
    return device

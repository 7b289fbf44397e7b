"""The name a store records for a simulator, and which recorded names a rerun's simulator matches.

A store refuses to mix its rows with another simulator's, so the name must tell simulators apart:

* a module-level function or class: ``module.qualname`` (editing its body keeps the name, so a run
  resumes after a fix to the simulator);
* a ``functools.partial``: its function's name and a digest of its arguments;
* a lambda or a function defined inside another (``<locals>``): its name plus a digest of its code and
  of the constants among its defaults and closure values, because every lambda of a module has the
  qualname ``<lambda>`` and a function made by a factory has one qualname for every argument of the factory.

Names that earlier versions recorded (a bare ``functools.partial``, a lambda's bare qualname) still
match the simulators that record the longer names now (:func:`same_simulator`).
"""

from __future__ import annotations

import dis
import functools
import hashlib
import re
import types
from collections.abc import Callable

__all__ = ["same_simulator", "simulator_name"]

_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def simulator_name(simulator: Callable) -> str:
    """The name a store records for ``simulator`` (see the module docstring).

    Example:
        >>> simulator_name(len)
        'builtins.len'
        >>> [simulator_name(f).split(" (code")[0] for f in (lambda t: t, lambda t: 2 * t)]
        ['sbiflows.engine.names.<lambda>', 'sbiflows.engine.names.<lambda>']
        >>> simulator_name(lambda t: t) == simulator_name(lambda t: 2 * t)
        False
    """
    if isinstance(simulator, functools.partial):
        arguments = _value_text((simulator.args, sorted(simulator.keywords.items())))
        return f"functools.partial({simulator_name(simulator.func)}, arguments {_digest(arguments)})"
    target = simulator if hasattr(simulator, "__qualname__") else type(simulator)
    name = f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', type(simulator).__name__)}"
    if isinstance(simulator, types.FunctionType) and ("<lambda>" in name or "<locals>" in name):
        return f"{name} (code {_digest(_function_text(simulator))})"
    return name


def same_simulator(recorded: object, name: str) -> bool:
    """Whether a store that recorded ``recorded`` holds rows of the simulator named ``name``: the same name,
    or the shorter name an earlier version recorded for it.

    Example:
        >>> same_simulator("m.<lambda>", "m.<lambda> (code 0123456789ab)"), same_simulator("m.f", "m.g")
        (True, False)
    """
    if recorded == name:
        return True
    if recorded == "functools.partial":
        return name.startswith("functools.partial(")
    return isinstance(recorded, str) and name.startswith(f"{recorded} (code ")


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _function_text(function: types.FunctionType) -> str:
    """What a function computes, without line numbers or addresses: its code, and its defaults' and closure's
    values where they are constants (numbers, strings, tuples of them; other values by their type, since a
    closure over a list or an object that the simulator mutates must keep its name from call to call; a variable
    the function rebinds itself, such as a call counter, not at all)."""
    code = function.__code__
    rebound = {op.argval for op in dis.get_instructions(code) if op.opname == "STORE_DEREF"}
    closure = []
    for name, cell in zip(code.co_freevars, function.__closure__ or ()):
        try:  # a variable the function rebinds itself (``nonlocal calls; calls += 1``) is its state, not a setting
            closure.append(None if name in rebound else cell.cell_contents)
        except ValueError:  # a cell not yet filled (a function that refers to itself before it is defined)
            closure.append(None)
    defaults = [*(function.__defaults__ or ()), *sorted((function.__kwdefaults__ or {}).items())]
    return repr((_code_text(code), [_constant_text(v) for v in defaults],
                 [_constant_text(v) for v in closure]))


def _code_text(code: types.CodeType) -> str:
    constants = [_code_text(c) if isinstance(c, types.CodeType) else _constant_text(c) for c in code.co_consts]
    return repr((code.co_code.hex(), constants, code.co_names, code.co_varnames))


def _constant_text(value: object) -> str:
    if isinstance(value, (int, float, complex, str, bytes, type(None))):
        return repr(value)
    if isinstance(value, tuple):
        return f"tuple({[_constant_text(v) for v in value]})"
    if isinstance(value, frozenset):  # sorted: a set's order depends on the process's string hashing
        return f"frozenset({sorted(_constant_text(v) for v in value)})"
    if isinstance(value, types.FunctionType):  # by name: a function may close over itself
        return f"{value.__module__}.{value.__qualname__}"
    return f"<{type(value).__module__}.{type(value).__qualname__}>"


def _value_text(value: object) -> str:
    """``repr(value)`` without memory addresses (``<Model object at 0x...>``), which differ in every process."""
    return _ADDRESS.sub("", repr(value))

"""The name a store records for a simulator, and which recorded names a rerun's simulator matches.

A store refuses to mix its rows with another simulator's, so the name must tell simulators apart:

* a module-level function or class: ``module.qualname`` (editing its body keeps the name, so a run
  resumes after a fix to the simulator);
* a ``functools.partial``: its function's name and a digest of its arguments;
* a lambda or a function defined inside another (``<locals>``): its name plus a digest of its code and
  of the constants among its defaults and closure values, because every lambda of a module has the
  qualname ``<lambda>`` and a function made by a factory has one qualname for every argument of the factory;
* a method bound to an object, or a callable object: its name plus a digest of the object's class and of
  its attributes whose values are constants, because a method defined on a base class has one qualname for every
  subclass and every instance. Attributes that a method of the class assigns outside ``__init__`` (a call
  counter, a cache) or a ``functools.cached_property`` fills are state, not settings, and stay out of the digest.

Among those values, numeric NumPy arrays and torch tensors (a grid of times, a design matrix) enter by their
contents, as the process first sees them (a buffer the simulator fills in place keeps its name in that process):
the name then ends with ``, arrays DIGEST)``. Keep scratch arrays that hold garbage (``np.empty``) out of a
simulator's attributes: they would give it another name in every process.

Names that earlier versions recorded (a bare ``functools.partial``, a lambda's or a method's bare
qualname, and names without the arrays' digest) still match the simulators that record the longer names now
(:func:`same_simulator`).
"""

from __future__ import annotations

import collections
import dis
import functools
import hashlib
import re
import types
import weakref
from collections.abc import Callable

import numpy as np

__all__ = ["same_simulator", "simulator_name"]

_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
_ARRAYS = re.compile(r", arrays [0-9a-f]{12}\)")


def simulator_name(simulator: Callable) -> str:
    """The name a store records for ``simulator`` (see the module docstring).

    Example:
        >>> simulator_name(len)
        'builtins.len'
        >>> [simulator_name(f).split(" (code")[0] for f in (lambda t: t, lambda t: 2 * t)]
        ['sbiflows.engine.names.<lambda>', 'sbiflows.engine.names.<lambda>']
        >>> simulator_name(lambda t: t) == simulator_name(lambda t: 2 * t)
        False
        >>> class Noisy:
        ...     def __init__(self, scale):
        ...         self.scale = scale
        ...     def simulate(self, theta):
        ...         return theta * self.scale
        >>> simulator_name(Noisy(1.0).simulate) == simulator_name(Noisy(2.0).simulate)
        False
    """
    if isinstance(simulator, functools.partial):
        arguments = _value_text((simulator.args, sorted(simulator.keywords.items())))
        values = [*simulator.args, *(v for _, v in sorted(simulator.keywords.items()))]
        return (f"functools.partial({simulator_name(simulator.func)}, arguments {_digest(arguments)}"
                f"{_arrays_suffix(values)})")
    target = simulator if hasattr(simulator, "__qualname__") else type(simulator)
    name = f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', type(simulator).__name__)}"
    if isinstance(simulator, types.FunctionType) and ("<lambda>" in name or "<locals>" in name):
        return f"{name} (code {_digest(_function_text(simulator))}{_arrays_suffix(_function_values(simulator))})"
    owner = simulator.__self__ if isinstance(simulator, types.MethodType) else simulator
    if not isinstance(owner, (types.FunctionType, types.BuiltinFunctionType, type)) and hasattr(owner, "__dict__"):
        return f"{name} (state {_digest(_object_text(owner))}{_arrays_suffix(_settings(owner).values())})"
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
    if not isinstance(recorded, str):
        return False
    if recorded.endswith(")") and _ARRAYS.sub(")", name) == recorded:  # recorded before arrays entered names
        return True
    return any(name.startswith(f"{recorded} ({kind} ") for kind in ("code", "state"))


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


#: Digests of the arrays this process has named, by identity (see :func:`_array_digest`).
_ARRAY_DIGESTS: dict[int, tuple[weakref.ref, str]] = {}


def _array_digest(value: object) -> str | None:
    """A digest of the dtype, shape and contents of a numeric NumPy array or strided torch tensor; None for any other
    value (object arrays, whose bytes are addresses, and meta or sparse tensors enter a name by their type).

    An array is digested the first time this process names a simulator that holds it, and keeps that digest while
    it lives: a buffer that the simulator fills in place keeps its name from call to call, while an attribute set to
    another array gets the new array's digest.
    """
    entry = _ARRAY_DIGESTS.get(id(value))
    if entry is not None and entry[0]() is value:
        return entry[1]
    try:
        if type(value).__module__ == "numpy" and getattr(value, "ndim", None) is not None:
            array = value
        else:
            import torch

            if not isinstance(value, torch.Tensor) or value.is_meta or value.layout != torch.strided:
                return None
            data = value.detach().cpu()
            array = (data.view(torch.int16) if data.dtype == torch.bfloat16 else data).numpy()
        if array.dtype.kind not in "biufc":
            return None
        digest = hashlib.sha256(repr((str(value.dtype), tuple(value.shape))).encode())
        digest.update(memoryview(np.ascontiguousarray(array)).cast("B"))
    except (ImportError, TypeError, ValueError, RuntimeError):
        return None
    text = digest.hexdigest()
    try:
        key = id(value)
        _ARRAY_DIGESTS[key] = (weakref.ref(value, lambda _, key=key: _ARRAY_DIGESTS.pop(key, None)), text)
    except TypeError:  # an array type without weak references: digested every time
        pass
    return text


def _arrays_suffix(values: object) -> str:
    """``", arrays DIGEST"`` over the numeric arrays and tensors among ``values`` (within tuples and lists too), else
    ``""``."""
    digest, found, seen = hashlib.sha256(), False, set()
    stack = collections.deque(values)
    while stack:
        value = stack.popleft()
        if isinstance(value, (tuple, list)):
            if id(value) not in seen:  # a list that holds itself
                seen.add(id(value))
                stack.extendleft(reversed(value))
            continue
        if isinstance(value, (int, float, complex, str, bytes, type(None))):
            digest.update(b"-")
            continue
        text = _array_digest(value)
        digest.update(b"-" if text is None else text.encode())
        found |= text is not None
    return f", arrays {digest.hexdigest()[:12]}" if found else ""


def _function_values(function: types.FunctionType) -> list[object]:
    """A function's defaults and the closure values it does not rebind (as :func:`_function_text` reads them)."""
    defaults = [*(function.__defaults__ or ()), *(v for _, v in sorted((function.__kwdefaults__ or {}).items()))]
    return defaults + _closure_values(function)


def _settings(owner: object) -> dict[str, object]:
    """An object's attributes less those :func:`_object_text` leaves out as state."""
    cls = type(owner)
    state = set().union(*(_assigned_attributes(klass) for klass in cls.__mro__ if klass is not object))
    return {k: v for k, v in sorted(vars(owner).items()) if k not in state}


def _function_text(function: types.FunctionType) -> str:
    """What a function computes, without line numbers or addresses: its code, and its defaults' and closure's
    values where they are constants (numbers, strings, tuples of them; other values by their type, since a
    closure over a list or an object that the simulator mutates must keep its name from call to call; a variable
    the function rebinds itself, such as a call counter, not at all)."""
    defaults = [*(function.__defaults__ or ()), *sorted((function.__kwdefaults__ or {}).items())]
    return repr((_code_text(function.__code__), [_constant_text(v) for v in defaults],
                 [_constant_text(v) for v in _closure_values(function)]))


def _closure_values(function: types.FunctionType) -> list[object]:
    """The values of a function's closure cells, None for a variable the function rebinds itself (``nonlocal
    calls; calls += 1`` is its state, not a setting) and for a cell not yet filled (a function that refers to
    itself before it is defined)."""
    code = function.__code__
    rebound = {op.argval for op in dis.get_instructions(code) if op.opname == "STORE_DEREF"}
    values = []
    for name, cell in zip(code.co_freevars, function.__closure__ or ()):
        try:
            values.append(None if name in rebound else cell.cell_contents)
        except ValueError:
            values.append(None)
    return values


def _object_text(owner: object) -> str:
    """An object's class and its attributes whose values are constants (numbers, strings, tuples of them), less
    those a method of its class assigns outside ``__init__`` and its ``functools.cached_property`` values: other
    attributes, and those, may appear or change during the object's life (a prior cached on first use), and the
    name must not."""
    cls = type(owner)
    attributes = sorted((k, _constant_text(v)) for k, v in _settings(owner).items() if _constant(v))
    return repr((f"{cls.__module__}.{cls.__qualname__}", attributes))


def _constant(value: object) -> bool:
    """Whether :func:`_constant_text` writes ``value`` out (numbers, strings, bytes, None, tuples and frozensets of
    them), not only its type."""
    if isinstance(value, (tuple, frozenset)):
        return all(_constant(v) for v in value)
    return isinstance(value, (int, float, complex, str, bytes, type(None)))


@functools.cache
def _assigned_attributes(klass: type) -> frozenset[str]:
    """Attribute names that the methods of ``klass`` (``__init__`` and ``__post_init__`` aside) assign."""
    names: set[str] = set()
    for key, member in vars(klass).items():
        if key in ("__init__", "__post_init__", "__new__"):
            continue
        if isinstance(member, functools.cached_property):  # its value lands in the instance's __dict__ when read
            names.add(member.attrname or key)
            continue
        if isinstance(member, (staticmethod, classmethod)):
            member = member.__func__
        functions = [member.fget, member.fset, member.fdel] if isinstance(member, property) else [member]
        for function in functions:
            if isinstance(function, types.FunctionType):
                names |= _stored_attributes(function.__code__)
    return frozenset(names)


def _stored_attributes(code: types.CodeType) -> set[str]:
    names = {op.argval for op in dis.get_instructions(code) if op.opname in ("STORE_ATTR", "DELETE_ATTR")}
    for constant in code.co_consts:  # nested functions and comprehensions
        if isinstance(constant, types.CodeType):
            names |= _stored_attributes(constant)
    return names


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

"""One unit of simulation work (a *job*) and the code that runs it, in whatever process runs it.

A job is either a whole chunk of ``batch_size`` parameter sets or, when a chunk failed, one of its
rows retried alone. :func:`run_job` calls the user's simulator, catches everything it raises and
checks its output, so a job always comes back as an :class:`Outcome`, never as an exception.

Seeding: a simulator with a ``seed`` keyword gets the job's seed; any other simulator runs with
torch's and NumPy's global generators seeded from it, and their previous states are restored
afterwards, so the caller's random streams are left exactly as they were.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from sbiflows.seeding import global_seed

#: ``error_type`` of a row whose simulator call ran past the timeout and was killed.
TIMEOUT = "TimeoutError"
#: ``error_type`` of a row whose worker process died (segfault, out of memory, killed).
WORKER_DIED = "WorkerDied"
#: ``error_type`` of a row whose output had the wrong shape or was not numeric.
BAD_OUTPUT = "BadOutput"


@dataclass(frozen=True)
class Job:
    """Rows ``start .. start + len(theta)`` of chunk ``chunk``.

    Attributes:
        chunk: Index of the chunk the rows belong to.
        start: Index of the first row in the whole run.
        theta: ``(n, theta_dim)`` parameters.
        seeds: One seed for a batched call, or one per row for a per-row simulator.
        retry: True for a row of a failed chunk, run alone.
    """

    chunk: int
    start: int
    theta: Tensor
    seeds: tuple[int, ...]
    retry: bool = False


@dataclass
class Outcome:
    """What came back from a job.

    Attributes:
        x: ``(n, *x_shape)`` simulations (failed rows of a per-row job are NaN), or None when the whole
            call failed.
        errors: ``(row within the job or -1 for the whole call, exception type, message)``.
        seconds: Time spent in the simulator.
    """

    x: np.ndarray | None
    errors: list[tuple[int, str, str]] = field(default_factory=list)
    seconds: float = 0.0

    @classmethod
    def failed(cls, error_type: str, message: str, seconds: float = 0.0) -> Outcome:
        """The outcome of a call that failed as a whole."""
        return cls(None, [(-1, error_type, message)], seconds)


def takes_seed(simulator: Callable) -> bool:
    """Whether ``simulator`` accepts a ``seed`` keyword (then it gets the job's seed).

    A ``torch.nn.Module`` is read by its ``forward`` (its ``__call__`` takes ``**kwargs`` for any module).
    """
    forward = getattr(simulator, "forward", None)
    if isinstance(simulator, torch.nn.Module) and callable(forward):
        simulator = forward
    try:
        parameters = inspect.signature(simulator).parameters
    except (TypeError, ValueError):
        return False
    return "seed" in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())


def run_job(simulator: Callable, job: Job, *, vectorized: bool, seeded: bool) -> Outcome:
    """Run ``job``: one batched call, or one call per row (``vectorized=False``).

    Args:
        simulator: The user's simulator.
        job: What to simulate.
        vectorized: The simulator maps ``(n, D) -> (n, *x_shape)``; otherwise ``(D,) -> x_shape``.
        seeded: The simulator takes a ``seed`` keyword (see :func:`takes_seed`).

    Returns:
        An :class:`Outcome`; exceptions of the simulator are recorded in it, never raised. ``SystemExit`` and
        ``KeyboardInterrupt`` are not exceptions of the simulator but requests to stop (a Ctrl-C, a SIGTERM handler
        that calls ``sys.exit``), so in-process they stop the run, its finished chunks kept; in a worker process a
        ``sys.exit`` ends the worker, which is a failed row (``WorkerDied``) as any death of a worker is.

    Example:
        >>> job = Job(chunk=0, start=0, theta=torch.zeros(3, 2), seeds=(7,))
        >>> run_job(lambda t: t + 1, job, vectorized=True, seeded=False).x.shape
        (3, 2)
        >>> run_job(lambda t: 1 / 0, job, vectorized=True, seeded=False).errors[0][:2]
        (-1, 'ZeroDivisionError')
    """
    start = time.perf_counter()
    if vectorized:
        try:
            x = as_output(_call(simulator, job.theta, job.seeds[0], seeded), rows=len(job.theta))
        except _BadOutput as error:
            return Outcome.failed(BAD_OUTPUT, str(error), time.perf_counter() - start)
        except Exception as error:  # noqa: BLE001 - every failure of the user's code is a recorded row
            return Outcome.failed(type(error).__name__, _message(error), time.perf_counter() - start)
        return Outcome(x, [], time.perf_counter() - start)
    rows: list[np.ndarray | None] = []
    errors: list[tuple[int, str, str]] = []
    for i, seed in enumerate(job.seeds):
        try:
            rows.append(as_output(_call(simulator, job.theta[i], seed, seeded), rows=None))
        except _BadOutput as error:
            rows.append(None)
            errors.append((i, BAD_OUTPUT, str(error)))
        except Exception as error:  # noqa: BLE001
            rows.append(None)
            errors.append((i, type(error).__name__, _message(error)))
    return Outcome(_stack_rows(rows, errors), errors, time.perf_counter() - start)


def as_output(value: object, *, rows: int | None) -> np.ndarray:
    """The simulator's output as a float array: ``(rows, *x_shape)``, or ``x_shape`` for ``rows=None``.

    float64 stays float64; integers, booleans, float16 and bfloat16 become float32 (NaN must fit; integers beyond
    2^24 are rounded: return float64 to keep them).
    """
    try:
        if isinstance(value, Tensor):
            value = value.detach().cpu()
            array = (value.float() if value.dtype == torch.bfloat16 else value).numpy()
        else:
            array = np.asarray(value)
    except (TypeError, ValueError, RuntimeError) as error:
        raise _BadOutput(f"output is not numeric: {error}") from None
    if array.dtype.kind not in "biuf":
        raise _BadOutput(f"output is not numeric (dtype {array.dtype}, type {type(value).__name__})")
    array = array.astype(np.float64 if array.dtype == np.float64 else np.float32, copy=False)
    if rows is None:
        return array.reshape(1) if array.ndim == 0 else array
    if array.ndim == 1 and len(array) == rows:
        array = array[:, None]
    if array.ndim < 2 or array.shape[0] != rows:
        raise _BadOutput(
            f"simulator returned shape {tuple(array.shape)} for {rows} parameter sets; expected ({rows}, ...)"
        )
    return array


class _BadOutput(ValueError):
    """The simulator returned something that is not ``(rows, *x_shape)`` numbers."""


def _call(simulator: Callable, theta: Tensor, seed: int, seeded: bool) -> object:
    if seeded:
        return simulator(theta, seed=seed)
    numpy_state = np.random.get_state()
    with global_seed(seed):
        np.random.seed(seed)
        try:
            return simulator(theta)
        finally:
            np.random.set_state(numpy_state)


def _message(error: BaseException) -> str:
    return str(error) or repr(error)


def _stack_rows(rows: list[np.ndarray | None], errors: list) -> np.ndarray | None:
    shapes = {r.shape for r in rows if r is not None}
    if not shapes:
        return None
    if len(shapes) > 1:  # rows disagree: keep the first row's shape, fail the others
        first = next(r.shape for r in rows if r is not None)
        for i, r in enumerate(rows):
            if r is not None and r.shape != first:
                errors.append((i, BAD_OUTPUT, f"output shape {r.shape} differs from {first} of an earlier row"))
                rows[i] = None
        errors.sort()
    template = next(r for r in rows if r is not None)
    dtype = np.float64 if any(r is not None and r.dtype == np.float64 for r in rows) else np.float32
    out = np.full((len(rows), *template.shape), np.nan, dtype=dtype)
    for i, r in enumerate(rows):
        if r is not None:
            out[i] = r
    return out

"""Running black-box simulators: in parallel, on Dask, with timeouts, into a resumable store; no row lost.

A simulator maps a batch ``theta`` of shape ``(N, theta_dim)`` to ``x`` of shape ``(N, *x_shape)`` (a
tensor or a NumPy array); one written for a single parameter set, ``(theta_dim,) -> x_shape``, works
with ``vectorized=False``. The rows are split into chunks of ``batch_size``, one simulator call each,
and the chunks run

* in this process (``workers`` None or 1), or
* in ``workers`` local worker processes, or
* on any ``concurrent.futures`` executor, or on a ``dask.distributed.Client`` (``executor=``).

**Same seed, same numbers.** Chunk ``c`` gets a seed derived from ``(seed, c)``, and a row retried alone
a seed derived from ``(seed, c, row)``: for a given seed and batch size, the result is bitwise the same
whatever runs it (in-process, local workers, an executor, Dask) and after a resume. A simulator with a
``seed`` keyword receives that seed (a 32-bit int); any other one runs with torch's and NumPy's global
generators seeded with it, which is reproducible in-process and in worker processes but not with a
thread executor (threads share those generators: give such a simulator a ``seed`` keyword). A
simulator that draws from its own unseeded generator (``np.random.default_rng()``) cannot be
reproduced by anyone. Torch's and NumPy's global generator states are the same after a call as before.

**Every failure is a counted row.** An exception (any type), a wrong output shape, a non-numeric output,
a timeout, a worker process that dies: the rows concerned become NaN and are listed in
:attr:`SimulationResult.failures`, and the run goes on. A "wrong" shape is one that differs from the first
result to arrive, which also sets the dtype (later float results are cast to it): with several workers, which
result arrives first depends on timing, so a simulator whose output shape or dtype varies between calls is
reproducible only with one worker. (Results are not held back to wait for the first chunk: that would keep
paid-for simulations out of the store while a slow chunk runs.) A chunk whose call failed is retried row by row
to isolate the bad rows. A simulator that cannot run at all (its first twenty failed rows share one
exception type and nothing succeeded before them in this call) stops the run with
:class:`SimulationError`, also when it resumes a store: a simulator that worked before may be broken now.

**Timeouts kill.** With ``timeout``, the simulator runs in a worker process that is killed (with any
process it started) when a call runs past the limit; with ``workers`` None or 1 that means one worker
process. Its rows fail with ``TimeoutError``.

**Nothing paid for is lost.** With ``store=PATH`` every finished chunk is written at once to a zarr
store; rerunning the same call reads what is there and simulates only the rest, and asking for more
simulations extends it. See :mod:`sbiflows.engine.store` and :func:`load_simulations`. Without a
store, Ctrl-C raises :class:`SimulationInterrupted` holding the finished chunks.
"""

from __future__ import annotations

import inspect
import os
import time
import warnings
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.distributions import Distribution

from sbiflows.checks import check_bool, check_choice, check_finite, check_int, check_positive_number
from sbiflows.engine.backends import is_dask_client, make_backend
from sbiflows.engine.driver import AbortRun, Driver
from sbiflows.engine.jobs import takes_seed
from sbiflows.engine.names import simulator_name
from sbiflows.engine.store import SimulationStore, StoreMismatchError
from sbiflows.priors import as_vector_prior
from sbiflows.seeding import derive_seed, global_seed, kept_generators
from sbiflows.xshape import valid_rows

__all__ = ["SimulationError", "SimulationFailure", "SimulationInterrupted", "SimulationResult", "StoreMismatchError",
           "load_simulations", "simulate", "simulate_from_prior"]


@dataclass
class SimulationFailure:
    """One failed simulation: the row index of its parameters, the exception type and its message."""

    index: int
    error_type: str
    message: str


@dataclass
class SimulationResult:
    """Parameters, simulations and what went wrong.

    Attributes:
        theta: ``(N, theta_dim)`` parameters.
        x: ``(N, *x_shape)`` simulations in the simulator's float dtype; rows of failed simulations are NaN.
        failures: Failed simulations (index, exception type, message), by index.
        seconds: Wall time of the call.
        reused: Rows read from the store instead of simulated.
        complete: False for :func:`load_simulations` of an unfinished store or a partial result.
        store: Path of the store, if any.
        padded_trials: Set it when x holds NaN-padded sets of trials ``(N, trials, features)`` (for a set
            embedding): then all-NaN trials are padding, and only a set without a finite trial (or with
            inf, or NaN inside a trial) counts as invalid (:func:`sbiflows.xshape.valid_rows`).
    """

    theta: Tensor
    x: Tensor
    failures: list[SimulationFailure] = field(default_factory=list)
    seconds: float = 0.0
    reused: int = 0
    complete: bool = True
    store: str | None = None
    padded_trials: bool = False

    @property
    def valid(self) -> Tensor:
        """Boolean ``(N,)``: rows whose simulation is finite (with :attr:`padded_trials`: up to padding)."""
        return valid_rows(self.x, padded_trials=self.padded_trials and self.x.ndim == 3)

    @property
    def num_invalid(self) -> int:
        """Rows with NaN/inf (including the ones that failed)."""
        return int((~self.valid).sum())

    def summary(self) -> str:
        """One line: how many simulations ran, how many are invalid and why."""
        n = len(self.x)
        text = f"{n} simulations in {self.seconds:.1f} s"
        if self.reused:
            text += f" ({self.reused} read from the store)"
        text += f"; {self.num_invalid} invalid ({self.num_invalid / max(n, 1):.1%})"
        if self.failures:
            kinds = {}
            for f in self.failures:
                kinds[f.error_type] = kinds.get(f.error_type, 0) + 1
            first = self.failures[0]
            text += (f", of which {len(self.failures)} failed ("
                     + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items()))
                     + f"; first at theta index {first.index}: {first.error_type}: {first.message})")
        if not self.complete:
            text += "; INCOMPLETE: unfinished chunks are missing"
        return text


class SimulationError(RuntimeError):
    """The run stopped: the simulator cannot run at all, or one failed with ``on_error="raise"``.

    ``partial`` holds the chunks finished before it (they are in the store too, if one was given).
    """

    def __init__(self, message: str, *, index: int, theta: Tensor | None, partial: SimulationResult):
        super().__init__(message)
        self.index, self.theta, self.partial = index, theta, partial


class SimulationInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run; ``partial`` holds the finished chunks (also in the store, if one was given)."""

    def __init__(self, message: str, *, partial: SimulationResult):
        super().__init__(message)
        self.partial = partial


def simulate(
    simulator: Callable,
    theta: Tensor,
    *,
    seed: int = 0,
    batch_size: int = 1000,
    workers: int | None = None,
    executor: object = None,
    timeout: float | None = None,
    store: str | os.PathLike | None = None,
    on_error: str = "nan",
    progress: bool = False,
    vectorized: bool = True,
    retry_failed: bool = False,
) -> SimulationResult:
    """Simulate one ``x`` per row of ``theta`` (see the module docstring for the guarantees).

    Args:
        simulator: ``(N, theta_dim) -> (N, *x_shape)``, or ``(theta_dim,) -> x_shape`` with
            ``vectorized=False``; may take a ``seed`` keyword.
        theta: Parameters, shape ``(N, theta_dim)``.
        seed: Seed of the run; chunk and row seeds derive from it.
        batch_size: Rows per simulator call (a chunk; also the store's chunk size).
        workers: Local worker processes; None or 1 runs in this process.
        executor: A ``concurrent.futures.Executor`` or a ``dask.distributed.Client``.
        timeout: Seconds per simulator call (per chunk of a per-row simulator: ``batch_size`` times
            this), after which the call is killed; None for no limit.
        store: Directory of a zarr store to write finished chunks to and resume from.
        on_error: ``"nan"`` (failed rows become NaN, summary warning) or ``"raise"``
            (:class:`SimulationError` at the first failed row).
        progress: Show progress (a bar in terminals and notebooks, a line every 30 s in logs).
        vectorized: False for a simulator that takes one parameter set at a time.
        retry_failed: Simulate the failed rows of a store again instead of keeping them as failed (rows
            that timed out under a shorter ``timeout`` than this call's always are).

    Returns:
        A :class:`SimulationResult`.

    Raises:
        ValueError, TypeError: Bad arguments (before anything runs).
        StoreMismatchError: The store holds another run.
        SimulationError: The simulator cannot run at all, or ``on_error="raise"`` and a row failed.
        SimulationInterrupted: Ctrl-C.

    Example:
        >>> result = simulate(lambda t: t + 1.0, torch.zeros(5, 2), batch_size=2)
        >>> result.x.shape, result.num_invalid
        (torch.Size([5, 2]), 0)
    """
    _check_theta(theta)
    return _simulate(simulator, theta, seed=seed, batch_size=batch_size, workers=workers, executor=executor,
                     timeout=timeout, store=store, on_error=on_error, progress=progress, vectorized=vectorized,
                     retry_failed=retry_failed)


def simulate_from_prior(simulator: Callable, prior: Distribution, num_simulations: int, *, seed: int = 0,
                        batch_size: int = 1000, **options) -> SimulationResult:
    """Draw ``num_simulations`` parameters from ``prior`` and simulate them (options as :func:`simulate`).

    The parameters of chunk ``c`` are ``prior.sample((batch_size,))`` under a seed derived from
    ``(seed, "prior", c)``, so a larger ``num_simulations`` extends a run (and its store) without
    changing the rows already drawn.

    Example:
        >>> from torch.distributions import Normal, Independent
        >>> prior = Independent(Normal(torch.zeros(2), torch.ones(2)), 1)
        >>> simulate_from_prior(lambda t: 2 * t, prior, 10, seed=1).theta.shape
        torch.Size([10, 2])
    """
    if not isinstance(prior, Distribution):
        raise TypeError(f"prior must be a torch.distributions.Distribution, got {type(prior).__name__}")
    num_simulations = check_int(num_simulations, "num_simulations", minimum=1)
    check_int(batch_size, "batch_size", minimum=1)
    check_int(seed, "seed")
    unknown = sorted(set(options) - set(_SIMULATE_DEFAULTS))
    if unknown:
        raise TypeError(f"simulate_from_prior() got unexpected keyword arguments {unknown}; it takes those of "
                        f"simulate: {sorted(_SIMULATE_DEFAULTS)}")
    _check_options(simulator, seed=seed, batch_size=batch_size, **(_SIMULATE_DEFAULTS | options))  # before drawing
    prior = as_vector_prior(prior)  # a scalar prior or a batch of them as one vector; other shapes refused
    chunks = []
    for c in range(-(-int(num_simulations) // batch_size)):
        with global_seed(derive_seed(seed, f"prior/{c}")):
            chunks.append(prior.sample((batch_size,)))
    theta = torch.cat(chunks)[:num_simulations]
    _check_theta(theta)  # e.g. NaN draws of a broken prior, before any simulation
    return _simulate(simulator, theta, seed=seed, batch_size=batch_size, **options)


def load_simulations(store: str | os.PathLike) -> SimulationResult:
    """The :class:`SimulationResult` kept in a store (finished chunks only; warns if it is incomplete).

    Rows of unfinished or corrupted chunks are left out; ``failures`` keep their row index in the
    full run, and ``complete`` says whether every chunk is there.
    """
    reader = SimulationStore.read(store)
    records, theta, x = reader.read_verified()
    rows = [np.arange(r["start"], r["start"] + r["rows"]) for _, r in sorted(records.items())]
    index = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
    planned = reader.rows
    complete = len(index) >= planned and (planned == 0 or set(range(planned)) <= set(index.tolist()))
    failures = [SimulationFailure(int(i), t, m) for _, r in sorted(records.items()) for i, t, m in r["failures"]]
    x_rows = x[index] if x is not None else np.zeros((0, 0), dtype=np.float32)
    result = SimulationResult(torch.from_numpy(theta[index]), torch.from_numpy(x_rows), failures,
                              reused=len(index), complete=complete, store=str(store))
    if not complete:
        warnings.warn(f"the store {store} is incomplete: {len(index)} of {planned} rows finished (rerun the same "
                      "simulate call to finish it)", UserWarning, stacklevel=2)
    return result


# ------------------------------------------------------------------------------------ internals
def _simulate(simulator, theta, *, seed, batch_size, workers=None, executor=None, timeout=None, store=None,
              on_error="nan", progress=False, vectorized=True, retry_failed=False) -> SimulationResult:
    _check_options(simulator, seed=seed, batch_size=batch_size, workers=workers, executor=executor,
                   timeout=timeout, store=store, on_error=on_error, progress=progress, vectorized=vectorized,
                   retry_failed=retry_failed)
    seed, batch_size = int(seed), int(batch_size)  # NumPy integers pass the checks; the store's JSON takes ints
    theta = theta.detach()  # parameters that require grad are simulated (and stored) as their values
    seeded = takes_seed(simulator)
    if isinstance(executor, ThreadPoolExecutor) and not seeded and timeout is None:
        warnings.warn("threads share torch's and NumPy's global generators: a simulator without a seed keyword is "
                      "not reproducible on a ThreadPoolExecutor", UserWarning, stacklevel=3)
    start = time.perf_counter()
    opened = None
    if store is not None:
        config = {"seed": seed, "batch_size": batch_size, "simulator": simulator_name(simulator),
                  "vectorized": vectorized, "theta_dim": theta.shape[1], "theta_dtype": str(theta.dtype)}
        opened = SimulationStore.open(store, config, rows=len(theta), theta_dim=theta.shape[1],
                                      theta_dtype=theta.cpu().numpy().dtype)
    backend = None
    driver = None
    try:
        backend = make_backend(simulator, workers=workers, executor=executor, timeout=timeout,
                               vectorized=vectorized, seeded=seeded)
        driver = Driver(backend, theta, seed=int(seed), batch_size=batch_size, vectorized=vectorized,
                        on_error=on_error, store=opened, retry_failed=retry_failed, progress=progress,
                        timeout=timeout)
        with kept_generators():  # threads of a ThreadPoolExecutor interleave their calls' seeding
            x = driver.run()
    except AbortRun as stop:
        backend.close(kill=True)
        partial = _partial(driver, start, store)
        raise SimulationError(f"{stop} ({len(partial.x)} simulations finished before it are in .partial"
                              + (f" and in the store {store})" if store else ")"),
                              index=stop.index, theta=theta[stop.index], partial=partial) from None
    except KeyboardInterrupt:
        if backend is not None:
            backend.close(kill=True)
        partial = _partial(driver, start, store)
        where = f"the store {store} keeps them: rerun to resume" if store else "pass store=PATH to be able to resume"
        raise SimulationInterrupted(f"interrupted: {len(partial.x)} simulations finished ({where}); they are in "
                                    ".partial", partial=partial) from None
    finally:
        if backend is not None:
            backend.close()
        if opened is not None:
            opened.close()
    failures = [SimulationFailure(i, t, m) for i, (t, m) in sorted(driver.failures.items())]
    if x is None:
        first = failures[0]
        raise SimulationError(f"all {len(theta)} simulations failed (first: {first.error_type}: {first.message})",
                              index=first.index, theta=theta[first.index], partial=_partial(driver, start, store))
    result = SimulationResult(theta, torch.from_numpy(x), failures, time.perf_counter() - start,
                              reused=driver.reused, store=None if store is None else str(store))
    if driver.batch_only_failures and not driver.batch_calls_succeeded:  # not a few rows that failed by chance
        kind, message = driver.batch_only_reason
        warnings.warn(f"every simulator call of several rows failed as a whole ({driver.batch_only_failures} calls; "
                      f"{kind}: {message}) although each of their rows succeeded alone, so the rows were simulated "
                      "one at a time, up to batch_size times slower. A simulator that takes one parameter set theta "
                      "of shape (theta_dim,) needs vectorized=False", UserWarning, stacklevel=3)
    if failures:
        warnings.warn(result.summary(), UserWarning, stacklevel=3)
    return result


#: The options of :func:`_simulate` that :func:`simulate_from_prior` passes on, with their defaults.
_SIMULATE_DEFAULTS = {name: parameter.default for name, parameter in inspect.signature(_simulate).parameters.items()
                      if parameter.kind is inspect.Parameter.KEYWORD_ONLY and name not in ("seed", "batch_size")}


def _partial(driver: Driver | None, start: float, store) -> SimulationResult:
    theta, x = driver.partial() if driver is not None else (torch.empty(0, 0), None)
    x = torch.empty(0, 0) if x is None else x
    failures = [] if driver is None else [SimulationFailure(i, t, m) for i, (t, m) in sorted(driver.failures.items())]
    return SimulationResult(theta, x, failures, time.perf_counter() - start, complete=False,
                            store=None if store is None else str(store))


def _check_theta(theta) -> None:
    if not isinstance(theta, Tensor):
        raise TypeError(f"theta must be a torch.Tensor of shape (N, theta_dim), got {type(theta).__name__}")
    if theta.ndim != 2 or len(theta) == 0:
        raise ValueError(f"theta must be a non-empty tensor of shape (N, theta_dim), got shape {tuple(theta.shape)}")
    if not theta.is_floating_point():
        raise TypeError(f"theta must have a floating dtype, got {theta.dtype}")
    check_finite(theta, "theta")  # a simulation of NaN parameters is paid for and means nothing


def _check_options(simulator, *, seed, batch_size, workers, executor, timeout, store, on_error, progress,
                   vectorized, retry_failed) -> None:
    if not callable(simulator):
        raise TypeError(f"simulator must be callable, got {type(simulator).__name__}")
    check_int(seed, "seed")
    check_int(batch_size, "batch_size", minimum=1)
    if workers is not None:
        check_int(workers, "workers", minimum=1)
    if executor is not None:
        if not (isinstance(executor, Executor) or is_dask_client(executor)):
            raise TypeError("executor must be a concurrent.futures.Executor or a dask.distributed.Client, got "
                            f"{type(executor).__name__}")
        if workers not in (None, 1):
            raise ValueError(f"give workers or executor, not both (got workers={workers} and an executor)")
    if timeout is not None:
        check_positive_number(timeout, "timeout", unit=" of seconds (or None)")
    if store is not None and not isinstance(store, (str, os.PathLike)):
        raise TypeError(f"store must be a directory path (str or Path) or None, got {type(store).__name__}")
    if store is not None and Path(store).exists() and not Path(store).is_dir():
        raise ValueError(f"store must be a directory, but {store} is a file")
    check_choice(on_error, "on_error", ("nan", "raise"))
    for name, value in (("progress", progress), ("vectorized", vectorized), ("retry_failed", retry_failed)):
        check_bool(value, name)

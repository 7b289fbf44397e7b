"""Running black-box simulators in batches, with invalid outputs and exceptions counted, never hidden.

A simulator is any callable mapping a ``(N, theta_dim)`` tensor to ``(N, x_dim)`` simulations (a tensor
or a NumPy array). If it has a ``seed`` keyword (as :class:`simulators.Task.simulate` does) each batch
gets a child seed; otherwise torch's and NumPy's global generators are seeded per batch, so a run is
reproducible either way.

Failures are kept visible:

* NaN/inf outputs stay in the returned ``x`` and are counted in :attr:`SimulationResult.num_invalid`;
  :class:`~sbiflows.NPE` then excludes them with a warning.
* A batch that raises is re-run row by row to find the failing parameters. With ``on_error="nan"``
  (default) their rows become NaN and a summary warning says "k of N simulations raised ...";
  with ``on_error="raise"`` a :class:`SimulationError` chains the original exception and carries the
  simulations finished so far, so nothing already paid for is lost.
"""

from __future__ import annotations

import inspect
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor
from torch.distributions import Distribution

from sbiflows.seeding import derive_seed


@dataclass
class SimulationFailure:
    """One simulation that raised: the row index of its parameters and the exception."""

    index: int
    error_type: str
    message: str


@dataclass
class SimulationResult:
    """Parameters, simulations and what went wrong.

    Attributes:
        theta: ``(N, theta_dim)`` parameters.
        x: ``(N, x_dim)`` simulations; rows of failed simulations are NaN.
        failures: Simulations that raised (index, exception type, message).
        seconds: Wall time.
    """

    theta: Tensor
    x: Tensor
    failures: list[SimulationFailure] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def valid(self) -> Tensor:
        """Boolean ``(N,)``: rows whose simulation is finite."""
        return torch.isfinite(self.x).all(-1)

    @property
    def num_invalid(self) -> int:
        """Rows with NaN/inf (including the ones that raised)."""
        return int((~self.valid).sum())

    def summary(self) -> str:
        """One line: how many simulations ran, how many are invalid and why."""
        n = len(self.x)
        text = f"{n} simulations in {self.seconds:.1f} s; {self.num_invalid} invalid ({self.num_invalid / max(n, 1):.1%})"
        if self.failures:
            first = self.failures[0]
            text += (
                f", of which {len(self.failures)} raised (first at theta index {first.index}: "
                f"{first.error_type}: {first.message})"
            )
        return text


class SimulationError(RuntimeError):
    """A simulation raised with ``on_error="raise"``; ``partial`` holds the rows finished before it."""

    def __init__(self, message: str, *, index: int, theta: Tensor, partial: SimulationResult):
        super().__init__(message)
        self.index = index
        self.theta = theta
        self.partial = partial


def simulate(
    simulator: Callable,
    theta: Tensor,
    *,
    batch_size: int = 1000,
    seed: int = 0,
    on_error: str = "nan",
    progress: bool = False,
) -> SimulationResult:
    """Simulate one ``x`` per row of ``theta``, in batches.

    Args:
        simulator: Callable ``(N, theta_dim) -> (N, x_dim)``.
        theta: Parameters, shape ``(N, theta_dim)``.
        batch_size: Rows per simulator call.
        seed: Base seed; batch ``b`` runs with ``derive_seed(seed, f"simulate/{b}")`` (see :mod:`sbiflows.seeding`), so
            the simulator's noise never repeats the stream of a generator seeded with ``seed`` itself
            (e.g. the prior draws of :func:`simulate_from_prior`).
        on_error: ``"nan"`` (failed rows become NaN, summary warning) or ``"raise"``.
        progress: Show a progress bar.

    Returns:
        A :class:`SimulationResult`.

    Raises:
        ValueError: On bad arguments or a simulator output of the wrong shape (naming the batch).
        SimulationError: With ``on_error="raise"``, when a simulation raises.

    Example:
        >>> result = simulate(lambda t: t + 1.0, torch.zeros(5, 2), batch_size=2)
        >>> result.x.shape, result.num_invalid
        (torch.Size([5, 2]), 0)
    """
    if on_error not in ("nan", "raise"):
        raise ValueError(f"on_error must be 'nan' or 'raise', got {on_error!r}")
    if not isinstance(theta, Tensor) or theta.ndim != 2 or len(theta) == 0:
        raise ValueError(f"theta must be a non-empty tensor of shape (N, theta_dim), got {_describe(theta)}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    takes_seed = "seed" in _parameters(simulator)
    start = time.perf_counter()
    outputs: list[Tensor | list[Tensor | None]] = []  # a list marks a batch that was run row by row
    failures: list[SimulationFailure] = []
    batches = list(torch.arange(len(theta)).split(batch_size))
    bar = _bar(len(theta)) if progress else None
    try:
        for b, idx in enumerate(batches):
            call = _seeded_call(simulator, takes_seed, derive_seed(seed, f"simulate/{b}"))
            try:
                x = _as_tensor(call(theta[idx]), len(idx), b)
            except ValueError:
                raise
            except Exception:  # noqa: BLE001 - localise the failing rows, below
                x = _row_by_row(call, theta, idx, failures, on_error, outputs, start)
            width = _width(outputs)
            rows = [x] if isinstance(x, Tensor) else [r for r in x if r is not None]
            for r in rows:
                if width is not None and r.shape[-1] != width:
                    raise ValueError(
                        f"simulator returned x with {r.shape[-1]} columns for batch {b}, but earlier batches "
                        f"had {width}"
                    )
            outputs.append(x)
            if bar is not None:
                bar.update(len(idx))
    finally:
        if bar is not None:
            bar.close()
    width = _width(outputs)
    if width is None:
        raise SimulationError(
            f"all {len(theta)} simulations raised (first: {failures[0].error_type}: {failures[0].message})",
            index=failures[0].index, theta=theta[failures[0].index],
            partial=SimulationResult(theta[:0], torch.empty(0, 0), failures, time.perf_counter() - start),
        )
    result = SimulationResult(theta, _stack(outputs, width), failures, time.perf_counter() - start)
    if failures:
        warnings.warn(result.summary(), UserWarning, stacklevel=2)
    return result


def simulate_from_prior(
    simulator: Callable, prior: Distribution, num_simulations: int, *, seed: int = 0, **options
) -> SimulationResult:
    """Draw ``num_simulations`` parameters from ``prior`` (seeded) and simulate them (see :func:`simulate`).

    The prior draws and the simulations use independent streams derived from ``seed``.

    Example:
        >>> from torch.distributions import Normal, Independent
        >>> prior = Independent(Normal(torch.zeros(2), torch.ones(2)), 1)
        >>> simulate_from_prior(lambda t: 2 * t, prior, 10, seed=1).theta.shape
        torch.Size([10, 2])
    """
    if not isinstance(num_simulations, int) or num_simulations < 1:
        raise ValueError(f"num_simulations must be a positive int, got {num_simulations!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "prior"))
        theta = prior.sample((num_simulations,))
    if theta.ndim == 1:
        theta = theta.unsqueeze(-1)
    return simulate(simulator, theta, seed=seed, **options)


# ------------------------------------------------------------------------------------ helpers
def _parameters(fn: Callable) -> set[str]:
    try:
        return set(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return set()


def _seeded_call(simulator: Callable, takes_seed: bool, seed: int) -> Callable[[Tensor], object]:
    if takes_seed:
        return lambda t: simulator(t, seed=seed)

    def call(t: Tensor):
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)
        return simulator(t)

    return call


def _as_tensor(x, rows: int, batch: int) -> Tensor:
    try:
        x = torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x, dtype=torch.float32)
    except (TypeError, ValueError) as error:
        raise ValueError(f"simulator output for batch {batch} is not numeric: {error}") from error
    if x.ndim == 1:
        x = x.unsqueeze(-1)
    if x.ndim != 2 or x.shape[0] != rows:
        raise ValueError(
            f"simulator returned shape {tuple(x.shape)} for batch {batch} of {rows} parameter sets; "
            f"expected ({rows}, x_dim)"
        )
    return x


def _width(outputs: list) -> int | None:
    for x in outputs:
        rows = [x] if isinstance(x, Tensor) else [r for r in x if r is not None]
        if rows:
            return rows[0].shape[-1]
    return None


def _stack(outputs: list, width: int) -> Tensor:
    nan = torch.full((width,), float("nan"))
    parts = [x if isinstance(x, Tensor) else torch.stack([nan if r is None else r for r in x]) for x in outputs]
    return torch.cat(parts)


def _row_by_row(call, theta, idx, failures, on_error, outputs, start) -> list[Tensor | None]:
    """Run the rows of a failed batch one at a time; failed rows are None (NaN later) or re-raised."""
    rows: list[Tensor | None] = []
    for i in idx.tolist():
        try:
            rows.append(_as_tensor(call(theta[i : i + 1]), 1, -1)[0])
        except Exception as error:  # noqa: BLE001 - recorded, then NaN or re-raised
            failures.append(SimulationFailure(i, type(error).__name__, str(error)))
            if on_error == "raise":
                width = _width(outputs)
                done = _stack(outputs, width) if width is not None else torch.empty(0, 0)
                partial = SimulationResult(theta[: len(done)], done, failures, time.perf_counter() - start)
                raise SimulationError(
                    f"simulation of theta index {i} raised {type(error).__name__}: {error} "
                    f"({len(done)} simulations finished before it are in .partial)",
                    index=i, theta=theta[i], partial=partial,
                ) from error
            rows.append(None)
    return rows


def _describe(value) -> str:
    return f"shape {tuple(value.shape)}" if isinstance(value, Tensor) else type(value).__name__


def _bar(total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="simulating", unit="sim", leave=False)

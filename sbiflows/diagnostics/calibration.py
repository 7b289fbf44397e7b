"""SBC, expected coverage and TARP in one call: :func:`calibration`.

Each check draws ``num_posterior_samples`` posterior samples for every dataset; with the same ``seed`` all
three draw the very same samples (and simulate the same datasets), so running them one after another makes
each draw three times. :func:`calibration` runs the three checks as they are, on a posterior (and a
simulator) that remember what they returned for the same inputs *and the same state of torch's generator*:
a repeated call returns the remembered draws and puts the generator where the first call left it. So each
result is exactly what :func:`~sbiflows.diagnostics.sbc`, :func:`~sbiflows.diagnostics.expected_coverage` and
:func:`~sbiflows.diagnostics.tarp` return for the same arguments, at about the cost of the most expensive one.
With ``seed=None`` the generator moves on between the checks, nothing repeats, and each check draws anew.

Only a call that moved torch's generator is remembered: one that did not (a posterior with a generator of its
own, a simulator drawing from NumPy) cannot be told apart from a call that would give other values, so it is
made again each time, as the separate checks would make it (in this order: coverage, SBC, TARP). A posterior's
``sample_and_log_prob_batched`` must return the draws ``sample_batched`` returns from the same generator state
(:class:`sbiflows.Posterior`'s do).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.distributions import Distribution

from sbiflows.diagnostics.coverage import CoverageResult, expected_coverage
from sbiflows.diagnostics.sbc import SBCResult, sbc
from sbiflows.diagnostics.simulations import check_posterior, takes_normalized
from sbiflows.diagnostics.tarp import TARPResult, tarp

__all__ = ["calibration"]


def calibration(
    posterior: object,
    prior: Distribution | None = None,
    simulator: Callable[[Tensor], Tensor] | None = None,
    *,
    theta: Tensor | None = None,
    x: Tensor | None = None,
    num_datasets: int = 1000,
    num_posterior_samples: int = 1000,
    seed: int | None = 0,
    batch_size: int | None = None,
    progress: bool = False,
    parameter_names: Sequence[str] | None = None,
) -> dict[str, SBCResult | CoverageResult | TARPResult]:
    """:func:`~sbiflows.diagnostics.sbc`, :func:`~sbiflows.diagnostics.expected_coverage` and
    :func:`~sbiflows.diagnostics.tarp` with the same arguments, drawing the posterior samples once.

    Args:
        posterior, prior, simulator, theta, x, num_datasets, num_posterior_samples, seed, batch_size, progress:
            As the three checks take them (the posterior needs ``sample_batched`` and ``log_prob``).
        parameter_names: SBC's names of the parameters.

    Returns:
        ``{"sbc": ..., "coverage": ..., "tarp": ...}``: the three results, each equal to its own function's.

    Example:
        >>> prior = torch.distributions.MultivariateNormal(torch.zeros(2), torch.eye(2))
        >>> class Exact:  # the exact posterior N(x / 2, I / 2) of x = theta + noise
        ...     def sample_batched(self, n, xs):
        ...         return xs / 2 + torch.randn(n, *xs.shape) / 2**0.5
        ...     def log_prob(self, theta, x):
        ...         return -(theta - x / 2).square().sum(-1)
        >>> results = calibration(Exact(), prior, lambda t: t + torch.randn_like(t), num_datasets=300)
        >>> {name: result.passed for name, result in results.items()}
        {'sbc': True, 'coverage': True, 'tarp': True}
    """
    check_posterior(posterior, "sample_batched", "log_prob")  # named as the user's, before any simulation
    shared = _RememberedDraws(posterior)
    options: dict[str, Any] = {"theta": theta, "x": x, "num_datasets": num_datasets, "seed": seed,
                               "num_posterior_samples": num_posterior_samples, "batch_size": batch_size,
                               "progress": progress}
    remembered = None if simulator is None else _RememberedSimulator(simulator)
    # coverage first: where the posterior returns densities with its draws, its call makes both at once
    coverage = expected_coverage(shared, prior, remembered, **options)
    return {"sbc": sbc(shared, prior, remembered, parameter_names=parameter_names, **options),
            "coverage": coverage, "tarp": tarp(shared, prior, remembered, **options)}


def _state_key(*tensors: Tensor) -> str:
    """A digest of ``tensors``' values and of torch's generators (:func:`_generator_states`)."""
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(repr((tuple(tensor.shape), tensor.dtype)).encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())  # any dtype
    for state in _generator_states():
        digest.update(state.numpy().tobytes())
    return digest.hexdigest()


def _generator_states() -> list[Tensor]:
    """torch's CPU generator state, and each CUDA device's where CUDA is in use."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    return [torch.get_rng_state(), *cuda]


def _set_generator_states(states: list[Tensor]) -> None:
    torch.set_rng_state(states[0])
    if len(states) > 1:
        torch.cuda.set_rng_state_all(states[1:])


class _Remembered:
    """What a call returned for a key, and torch's generators after it, to give back on the same key."""

    def __init__(self) -> None:
        self._calls: dict[tuple, tuple[Any, list[Tensor]]] = {}

    def recall(self, key: tuple) -> Any:
        """What the call of ``key`` returned (torch's generators then set as it left them), or None."""
        if key not in self._calls:
            return None
        value, states = self._calls[key]
        _set_generator_states(states)
        return value

    def call(self, key: tuple, make: Callable[[], Any]) -> Any:
        """``make()``, or what it returned for ``key`` before (:meth:`recall`). A call that left torch's generators
        as it found them is not remembered: its randomness came from elsewhere (a generator of its own, NumPy),
        and calling it again may give other values."""
        if key in self._calls:
            return self.recall(key)
        before = _generator_states()
        value = make()
        after = _generator_states()
        if not all(torch.equal(one, other) for one, other in zip(before, after)):
            self._calls[key] = (value, after)
        return value


class _RememberedDraws:
    """``posterior`` with ``sample_batched`` (and ``sample_and_log_prob_batched``, where it has it) remembered;
    everything else is the posterior's own."""

    def __init__(self, posterior: object) -> None:
        self._posterior, self._memory = posterior, _Remembered()
        fused = getattr(posterior, "sample_and_log_prob_batched", None)
        if callable(fused):  # with the posterior's keyword normalized where it has it (takes_normalized reads it)
            self.sample_and_log_prob_batched = (self._fused_normalized if takes_normalized(fused)
                                                else self._sample_and_log_prob_batched)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._posterior, name)

    def sample_batched(self, n: int, xs: Tensor) -> Tensor:
        state = _state_key(xs)
        for normalized in (True, False):  # a fused call's draws are the same (the protocol's contract)
            fused = self._memory.recall(("fused", n, state, normalized))
            if fused is not None:
                return fused[0]
        return self._memory.call(("draws", n, state), lambda: self._posterior.sample_batched(n, xs))

    def _sample_and_log_prob_batched(self, n: int, xs: Tensor, **options: bool) -> tuple[Tensor, Tensor]:
        return self._memory.call(("fused", n, _state_key(xs), options.get("normalized", True)),
                                 lambda: self._posterior.sample_and_log_prob_batched(n, xs, **options))

    def _fused_normalized(self, n: int, xs: Tensor, *, normalized: bool = True) -> tuple[Tensor, Tensor]:
        return self._sample_and_log_prob_batched(n, xs, normalized=normalized)  # the posterior takes it too


class _RememberedSimulator:
    """``simulator`` remembered: the same ``theta`` from the same generator state gives the same ``x``."""

    def __init__(self, simulator: Callable[[Tensor], Tensor]) -> None:
        self._simulator, self._memory = simulator, _Remembered()

    def __call__(self, theta: Tensor) -> Tensor:
        return self._memory.call(("x", _state_key(theta)), lambda: self._simulator(theta))

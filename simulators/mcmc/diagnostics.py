"""Convergence diagnostics of MCMC chains: rank-normalized split R-hat and bulk ESS (Vehtari et al. 2021).

Also the :class:`Diagnostics` summary of a run, the ESS of a random subset of the pooled draws
(:func:`_subset_ess`) and the convergence checks and their messages.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np
import torch
from scipy.special import ndtri
from scipy.stats import rankdata
from torch import Tensor

__all__ = [
    "ConvergenceError",
    "ConvergenceWarning",
    "Diagnostics",
    "convergence_message",
    "ess",
    "rhat",
]


class ConvergenceError(RuntimeError):
    """MCMC chains failed the R-hat or effective-sample-size check."""


class ConvergenceWarning(UserWarning):
    """MCMC chains failed the R-hat or effective-sample-size check (``on_failure="warn"``)."""


@dataclass(frozen=True)
class Diagnostics:
    """Convergence summary of a run of :func:`run_chains` (and so of :func:`sample_posterior`).

    Per-parameter entries have shape ``(D,)`` for one dataset and ``(num_datasets, D)`` for
    :func:`sample_posteriors`.

    Attributes:
        rhat: Rank-normalized split R-hat per parameter (want < 1.05; 1 is perfect).
        ess: Bulk effective sample size per parameter, over all kept draws of all chains.
        sample_ess: Estimated effective sample size of the ``num_samples`` returned draws (a random
            subset of the ``P`` kept draws): ``n / (1 + (n - 1) (P / ess - 1) / (P - 1))`` for
            ``n = num_samples``, capped at ``n``. It equals ``ess`` when all draws are returned and
            approaches ``n`` when ``ess`` is much larger than ``n``.
        num_samples: Number of returned samples (per dataset).
        num_chains: Number of parallel chains (per dataset).
        draws_per_chain: Kept draws per chain (after warm-up and thinning).
        thin: Thinning of the kept draws (larger than requested if the chains had to be extended).
        evals_per_step: Mean number of log-density evaluations per chain and sampler step.
        converged: Whether R-hat and ``sample_ess`` passed the checks of the run.
    """

    rhat: Tensor
    ess: Tensor
    sample_ess: Tensor
    num_samples: int
    num_chains: int
    draws_per_chain: int
    thin: int
    evals_per_step: float
    converged: bool

    def to_dict(self) -> dict[str, Any]:
        """Plain Python values (tensors as nested lists), e.g. to store with cached samples."""
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Diagnostics:
        """The inverse of :meth:`to_dict`.

        Raises:
            ValueError: If a field is missing.
        """
        missing = [f.name for f in fields(cls) if f.name not in values]
        if missing:
            raise ValueError(f"diagnostics lack the fields {missing}")
        tensors = {"rhat", "ess", "sample_ess"}
        return cls(**{
            f.name: torch.tensor(values[f.name], dtype=torch.float64) if f.name in tensors else values[f.name]
            for f in fields(cls)
        })

    def select(self, k: int) -> Diagnostics:
        """The diagnostics of dataset ``k`` of a :func:`sample_posteriors` run (``converged`` is the run's)."""
        return replace(self, rhat=self.rhat[k], ess=self.ess[k], sample_ess=self.sample_ess[k])


def _plain(value: Any) -> Any:
    return value.tolist() if isinstance(value, Tensor) else value


def _as_chains(chains: Tensor | np.ndarray, min_draws: int) -> np.ndarray:
    a = np.asarray(chains.detach().cpu() if isinstance(chains, Tensor) else chains, dtype=np.float64)
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[1] < min_draws:
        raise ValueError(
            f"chains must have shape (num_chains, num_steps >= {min_draws}, D), got {a.shape}"
        )
    return a


def _split(a: np.ndarray) -> np.ndarray:
    """Split each chain into halves (dropping the middle draw of odd lengths): (2C, S // 2, D)."""
    half = a.shape[1] // 2
    return np.concatenate([a[:, :half], a[:, -half:]], axis=0)


def _rank_normalize(a: np.ndarray) -> np.ndarray:
    """Replace draws by normal scores of their pooled ranks, per parameter."""
    c, s, d = a.shape
    ranks = rankdata(a.reshape(c * s, d), axis=0)
    return ndtri((ranks - 0.375) / (c * s + 0.25)).reshape(c, s, d)


def _basic_rhat(a: np.ndarray) -> np.ndarray:
    n = a.shape[1]
    within = a.var(axis=1, ddof=1).mean(axis=0)
    between = a.mean(axis=1).var(axis=0, ddof=1)
    var_hat = (n - 1) / n * within + between
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.sqrt(var_hat / within)


def rhat(chains: Tensor | np.ndarray) -> Tensor:
    """Rank-normalized split R-hat (Vehtari et al. 2021), the max of bulk and tail (folded) versions.

    Args:
        chains: Draws of shape ``(num_chains, num_steps, D)`` (or ``(num_chains, num_steps)``).

    Returns:
        R-hat per parameter, shape ``(D,)``; values above 1.05 signal chains that disagree.

    Example:
        >>> float(rhat(torch.randn(8, 500, 1, generator=torch.Generator().manual_seed(0)))[0]) < 1.01
        True
    """
    a = _split(_as_chains(chains, 4))
    bulk = _basic_rhat(_rank_normalize(a))
    folded = np.abs(a - np.median(a.reshape(-1, a.shape[2]), axis=0))
    tail = _basic_rhat(_rank_normalize(folded))
    return torch.from_numpy(np.maximum(bulk, tail))


def _autocovariance(a: np.ndarray) -> np.ndarray:
    """Autocovariance of each chain and parameter at lags 0..S-1 (biased, via FFT): (C, S, D)."""
    s = a.shape[1]
    centred = a - a.mean(axis=1, keepdims=True)
    size = 2 ** math.ceil(math.log2(2 * s))
    spectrum = np.fft.rfft(centred, n=size, axis=1)
    return np.fft.irfft(spectrum * np.conj(spectrum), n=size, axis=1)[:, :s] / s


def ess(chains: Tensor | np.ndarray) -> Tensor:
    """Bulk effective sample size of all draws together (rank-normalized, split chains).

    Multi-chain autocorrelations are truncated with Geyer's initial monotone sequence.

    Args:
        chains: Draws of shape ``(num_chains, num_steps, D)`` (or ``(num_chains, num_steps)``).

    Returns:
        ESS per parameter, shape ``(D,)``, at most about ``num_chains * num_steps`` for independent
        draws (slightly more for antithetic chains).

    Example:
        >>> draws = torch.randn(4, 1000, 2, generator=torch.Generator().manual_seed(0))
        >>> bool((ess(draws) > 3000).all())
        True
    """
    a = _rank_normalize(_split(_as_chains(chains, 4)))
    m, n, _ = a.shape
    acov = _autocovariance(a)
    within = acov[:, 0].mean(axis=0) * n / (n - 1)
    var_hat = within * (n - 1) / n + (a.mean(axis=1).var(axis=0, ddof=1) if m > 1 else 0.0)
    rho = 1.0 - (within - acov.mean(axis=0)) / var_hat  # (n, D) multi-chain autocorrelation
    rho[0] = 1.0
    num_pairs = n // 2
    pairs = rho[: 2 * num_pairs].reshape(num_pairs, 2, -1).sum(axis=1)  # Geyer's P_k
    positive = np.cumprod(pairs > 0, axis=0).astype(bool)  # initial positive sequence
    monotone = np.minimum.accumulate(np.where(positive, pairs, np.inf), axis=0)
    tau = -1.0 + 2.0 * np.where(positive, monotone, 0.0).sum(axis=0)
    tau = np.maximum(tau, 1.0 / math.log10(m * n))  # the cap used by Stan / ArviZ
    return torch.from_numpy(m * n / tau)


def _subset_ess(ess_all: Tensor, pool: int, n: int) -> Tensor:
    """ESS of ``n`` draws picked at random from ``pool`` draws whose bulk ESS is ``ess_all``.

    Every pair of distinct picks is a random pair of the pool, whose mean correlation is
    ``(pool / ess_all - 1) / (pool - 1)``; hence the variance of the subset mean.
    """
    if n <= 1 or pool <= 1:
        return torch.full_like(ess_all, float(n))
    inflation = 1.0 + (n - 1) * (pool / ess_all - 1.0) / (pool - 1)
    return (n / inflation).clamp(max=float(n))


def _failure(diag: Diagnostics, max_rhat: float, min_ess: float) -> str | None:
    """``None`` if the checks pass, else what failed."""
    problems = []
    if not bool((diag.rhat <= max_rhat).all()):
        problems.append(f"max R-hat {float(diag.rhat.max()):.3f} > {max_rhat}")
    if not bool((diag.sample_ess >= min_ess).all()):
        problems.append(
            f"min ESS of the {diag.num_samples} returned samples {float(diag.sample_ess.min()):.0f} < {min_ess:.0f}"
        )
    return "; ".join(problems) if problems else None


def convergence_message(diag: Diagnostics, max_rhat: float, min_ess: float) -> str:
    """A description of the diagnostics and of the failed checks, for errors and warnings.

    For several datasets, the per-parameter values are those of the worst dataset (highest R-hat
    relative to ``max_rhat``, or else lowest ESS).

    Args:
        diag: The diagnostics of a run.
        max_rhat: The R-hat threshold of the run.
        min_ess: The threshold of ``diag.sample_ess``.
    """
    failure = _failure(diag, max_rhat, min_ess) or "all checks passed"
    shown, where = diag, ""
    if diag.rhat.ndim == 2:
        rhat_bad = (diag.rhat > max_rhat).any(1)
        k = int(diag.rhat.amax(1).argmax()) if rhat_bad.any() else int(diag.sample_ess.amin(1).argmin())
        shown, where = diag.select(k), f" (dataset {k} of {len(diag.rhat)})"
    return (
        f"{failure}; R-hat {shown.rhat.numpy().round(3)}, ESS of the returned samples "
        f"{shown.sample_ess.numpy().round(0)}{where}, after {diag.num_chains} chains x {diag.draws_per_chain} "
        f"draws thinned by {diag.thin}"
    )

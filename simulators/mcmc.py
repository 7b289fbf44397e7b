"""Vectorized many-chain slice sampling for reference posteriors, with R-hat and ESS checks.

Used where a task's posterior has no closed form: ``sample_posterior(log_likelihood, prior, n)`` runs
hundreds of chains in parallel (one batched ``log_likelihood`` call per sampler iteration), in the
unconstrained space ``z = biject_to(prior.support).inv(theta)`` with the log-abs-det correction, so
bounded priors are handled exactly. Chains start from prior draws, resampled by likelihood
(``init="sir"``) or not (``init="prior"``). :func:`sample_posteriors` does the same for several
datasets at once (each dataset gets its own chains, all evaluated in the same batched calls), which
is how the calibration of the sampler is tested on many simulated datasets.

The kernel is slice sampling (Neal 2003, stepping out and shrinkage) along lines: each step sweeps
over the directions ``L u_1, ..., L u_D``, with ``u_k`` a random orthonormal basis per chain and ``L``
the Cholesky factor of the chains' covariance, re-estimated during warm-up (it starts at the prior's).
It needs no step size, is robust to a wrong scale and adapts to correlated posteriors. Diagnostics
follow Vehtari et al. (2021): rank-normalized split R-hat and bulk effective sample size.

Near-independent draws: the returned samples are a random subset of the pooled chains, and their
effective sample size (:attr:`Diagnostics.sample_ess`, estimated from the chains' bulk ESS) must be
at least ``ess_fraction * num_samples`` (default one half). If it is not, or R-hat is too high, the
chains are run longer and thinned more (up to ``max_thin``) before the check fails.

Example:
    >>> import torch
    >>> from torch.distributions import Independent, Uniform
    >>> prior = Independent(Uniform(-torch.ones(2), torch.ones(2)), 1)
    >>> log_lik = lambda theta: -0.5 * ((theta - 0.5) ** 2).sum(-1) / 0.1**2
    >>> samples = sample_posterior(log_lik, prior, 1000, generator=torch.Generator().manual_seed(0))
    >>> samples.shape
    torch.Size([1000, 2])
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, fields, replace
from typing import Any, Callable, Literal

import numpy as np
import torch
from scipy.special import ndtri
from scipy.stats import rankdata
from torch import Tensor
from torch.distributions import Distribution, biject_to

LogProbFn = Callable[[Tensor], Tensor]
#: A log density of chains that differ by dataset: ``(points (N, D), dataset index (N,)) -> (N,)``.
IndexedLogProbFn = Callable[[Tensor, Tensor], Tensor]

#: Kept draws per chain are at least this many, so that R-hat and ESS are meaningful.
MIN_DRAWS = 50
#: Default of ``ess_fraction``: the returned samples' ESS must be at least this fraction of their number.
ESS_FRACTION = 0.5
#: Default of ``max_thin`` as a multiple of ``thin``: how much longer chains may run to pass the checks.
MAX_EXTENSION = 8

__all__ = [
    "ConvergenceError",
    "ConvergenceWarning",
    "Diagnostics",
    "convergence_message",
    "ess",
    "rhat",
    "run_chains",
    "sample_posterior",
    "sample_posteriors",
    "slice_chains",
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


# ------------------------------------------------------------------------------ diagnostics
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


# ------------------------------------------------------------------------------- sampler
def _safe_log_prob(fn: IndexedLogProbFn, z: Tensor, rows: Tensor) -> Tensor:
    """``fn(z, rows)`` with NaN mapped to ``-inf``; ``rows`` are the chains the points belong to."""
    out = fn(z, rows)
    if out.shape != z.shape[:1]:
        raise ValueError(f"log_prob_fn must return shape ({z.shape[0]},), got {tuple(out.shape)}")
    out = out.to(z.dtype)
    return torch.where(torch.isnan(out), torch.full_like(out, -math.inf), out)


def _slice_along(
    fn: IndexedLogProbFn,
    z: Tensor,
    logp: Tensor,
    direction: Tensor,
    width: float,
    generator: torch.Generator,
    max_steps: int = 50,
) -> tuple[Tensor, Tensor, int]:
    """Slice-sample every chain along its line ``z + t * direction``; returns (z, log p, #evals)."""
    n = z.shape[0]
    opts = {"generator": generator, "dtype": z.dtype}
    level = logp - torch.empty(n, dtype=z.dtype).exponential_(generator=generator)
    left = -width * torch.rand(n, **opts)
    right = left + width
    evals = 0
    # Stepping out (Neal 2003, fig. 3): move each end outwards while it is inside the slice, at most
    # max_steps - 1 moves in all, split at random between the ends so that the kernel stays
    # reversible. Both ends of all chains still stepping are evaluated in one batched call.
    ends = torch.stack([left, right])  # (2, n)
    left_limit = torch.floor(max_steps * torch.rand(n, **opts))
    limits = torch.stack([left_limit, max_steps - 1 - left_limit])
    moves = torch.zeros(2, n, dtype=z.dtype)
    active = moves < limits
    sign = torch.tensor([[-1.0], [1.0]], dtype=z.dtype)
    while bool(active.any()):
        side, chain = active.nonzero(as_tuple=True)
        points = z[chain] + ends[side, chain, None] * direction[chain]
        inside = _safe_log_prob(fn, points, chain) > level[chain]
        evals += len(chain)
        active[side[~inside], chain[~inside]] = False
        ends = ends + width * sign * active
        moves = moves + active
        active = active & (moves < limits)
    left, right = ends[0].clone(), ends[1].clone()
    new_z, new_logp = z.clone(), logp.clone()
    active = torch.arange(n)
    for _ in range(200):  # shrinkage; terminates with probability one
        t = left[active] + (right[active] - left[active]) * torch.rand(len(active), **opts)
        proposal = z[active] + t[:, None] * direction[active]
        lp = _safe_log_prob(fn, proposal, active)
        evals += len(active)
        accept = lp > level[active]
        new_z[active[accept]], new_logp[active[accept]] = proposal[accept], lp[accept]
        shrink_left = ~accept & (t < 0)
        left[active[shrink_left]] = t[shrink_left]
        shrink_right = ~accept & (t >= 0)
        right[active[shrink_right]] = t[shrink_right]
        active = active[~accept]
        if len(active) == 0:
            break
    return new_z, new_logp, evals  # chains still active after 200 shrinks keep their state


def _sweep(
    fn: IndexedLogProbFn, z: Tensor, logp: Tensor, chol: Tensor, width: float, generator: torch.Generator
) -> tuple[Tensor, Tensor, int]:
    """Slice-sample along D random orthogonal directions of each chain's whitened space.

    ``chol`` is the Cholesky factor of all chains, ``(D, D)``, or one per chain, ``(n, D, D)``.
    """
    n, d = z.shape
    evals = 0
    basis: list[Tensor] = []
    for _ in range(d):
        # Gram-Schmidt on Gaussian vectors, batched over chains: a Haar-random orthonormal basis
        # (much cheaper than a batched QR of tiny matrices).
        u = torch.randn(n, d, generator=generator, dtype=z.dtype)
        for b in basis:
            u = u - (u * b).sum(-1, keepdim=True) * b
        u = u / u.norm(dim=-1, keepdim=True)
        basis.append(u)
        direction = u @ chol.T if chol.ndim == 2 else (chol @ u.unsqueeze(-1)).squeeze(-1)
        z, logp, e = _slice_along(fn, z, logp, direction, width, generator)
        evals += e
    return z, logp, evals


def _cholesky_of(points: Tensor) -> Tensor:
    d = points.shape[1]
    cov = torch.atleast_2d(torch.cov(points.T))
    jitter = 1e-8 * cov.diagonal().mean().clamp_min(1e-12)
    return torch.linalg.cholesky(cov + jitter * torch.eye(d, dtype=points.dtype))


class _Chains:
    """The state of parallel slice-sampling chains, which can be advanced again after a first run.

    Chains are split into groups (datasets); the chains of a group share a direction covariance,
    estimated from them during warm-up, and ``fn`` gets the chain index of every point it evaluates.
    """

    def __init__(
        self,
        fn: IndexedLogProbFn,
        init: Tensor,
        *,
        groups: Tensor,
        scale_tril: Tensor | None,
        width: float,
        generator: torch.Generator,
    ) -> None:
        self.fn, self.width, self.generator = fn, width, generator
        self.z = init.detach().to(torch.float64).clone()
        num_chains, d = self.z.shape
        self.logp = _safe_log_prob(fn, self.z, torch.arange(num_chains))
        if not torch.isfinite(self.logp).all():
            raise ValueError("init: every starting point must have a finite log density")
        self.groups = groups
        num_groups = int(groups.max()) + 1
        chol = torch.eye(d, dtype=torch.float64) if scale_tril is None else scale_tril.to(torch.float64)
        self.chol = chol.expand(num_groups, d, d).clone() if chol.ndim == 2 else chol.clone()
        self.evals = 0
        self.steps = 0

    @property
    def evals_per_step(self) -> float:
        """Mean number of log-density evaluations per chain and step so far."""
        return self.evals / max(self.steps * self.z.shape[0], 1)

    def _step(self) -> None:
        chol = self.chol[0] if len(self.chol) == 1 else self.chol[self.groups]
        self.z, self.logp, evals = _sweep(self.fn, self.z, self.logp, chol, self.width, self.generator)
        self.evals += evals
        self.steps += 1

    def warm_up(self, num_steps: int) -> None:
        """Run ``num_steps`` discarded steps; re-estimate the covariances at 1/4, 1/2 and 3/4 of them."""
        window = num_steps // 4
        history: list[Tensor] = []
        for step in range(1, num_steps + 1):
            self._step()
            history.append(self.z)
            if window > 0 and step in (window, 2 * window, 3 * window):
                recent = torch.stack(history[-window:])  # (window, num_chains, D)
                for g in range(len(self.chol)):
                    points = recent[:, self.groups == g].reshape(-1, self.z.shape[1])
                    if len(points) > 1:
                        self.chol[g] = _cholesky_of(points)

    def draw(self, num_draws: int, thin: int) -> Tensor:
        """Run ``num_draws * thin`` steps and keep every ``thin``-th: shape ``(num_chains, num_draws, D)``."""
        kept = []
        for step in range(1, num_draws * thin + 1):
            self._step()
            if step % thin == 0:
                kept.append(self.z)
        return torch.stack(kept, dim=1)


def slice_chains(
    log_prob_fn: LogProbFn,
    init: Tensor,
    *,
    num_draws: int,
    warmup: int,
    thin: int = 1,
    width: float = 3.0,
    scale_tril: Tensor | None = None,
    generator: torch.Generator,
) -> tuple[Tensor, float]:
    """Run parallel slice-sampling chains on an unconstrained log density.

    Each step is a sweep of slice-sampling updates along ``D`` random orthogonal directions of the
    space whitened by the estimated posterior covariance.

    Args:
        log_prob_fn: Unnormalized log density, ``(N, D) -> (N,)``; ``-inf``/NaN mean zero density.
        init: Starting points ``(num_chains, D)`` with finite log density.
        num_draws: Draws kept per chain.
        warmup: Discarded initial steps; the direction covariance is re-estimated at 1/4, 1/2 and 3/4
            of them from the chains' recent states.
        thin: Keep every ``thin``-th step after warm-up.
        width: Initial slice bracket in units of the estimated posterior scale.
        scale_tril: Cholesky factor of the initial direction covariance, e.g. the prior's (too wide
            is cheap for a slice sampler, too narrow is not); default: the identity.
        generator: Source of all randomness.

    Returns:
        ``(chains, evals_per_step)``: draws of shape ``(num_chains, num_draws, D)`` and the mean number
        of log-density evaluations per chain and step.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> chains, _ = slice_chains(lambda z: -0.5 * (z**2).sum(-1), torch.zeros(8, 2),
        ...                          num_draws=100, warmup=50, generator=g)
        >>> chains.shape
        torch.Size([8, 100, 2])
    """
    chains = _Chains(
        lambda z, rows: log_prob_fn(z),
        init,
        groups=torch.zeros(len(init), dtype=torch.long),
        scale_tril=scale_tril,
        width=width,
        generator=generator,
    )
    chains.warm_up(warmup)
    draws = chains.draw(num_draws, thin)
    return draws, chains.evals_per_step


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


def run_chains(
    log_prob_fn: IndexedLogProbFn,
    init: Tensor,
    num_samples: int,
    *,
    num_datasets: int = 1,
    warmup: int,
    thin: int = 1,
    max_thin: int | None = None,
    scale_tril: Tensor | None = None,
    transform: Callable[[Tensor], Tensor] | None = None,
    max_rhat: float = 1.05,
    min_ess: float,
    generator: torch.Generator,
) -> tuple[Tensor, Diagnostics]:
    """Sample until R-hat and the returned samples' ESS pass, or the thinning reaches ``max_thin``.

    The chains warm up, then keep ``max(ceil(num_samples / num_chains), 50)`` draws each, every
    ``thin``-th step. While a check fails and the thinning may still grow, they are run ``k`` times
    longer and every ``k``-th kept draw is retained (``k`` from the ESS shortfall, at least 2), so
    that the kept draws become less correlated at a constant number. The checks are recorded in
    :attr:`Diagnostics.converged`; raising or warning is up to the caller.

    Args:
        log_prob_fn: Unnormalized log density of the chains' space, ``(points (N, D), dataset index
            (N,)) -> (N,)``; ``-inf``/NaN mean zero density.
        init: Starting points ``(num_datasets * num_chains, D)`` with finite log density; rows
            ``k * num_chains ... (k + 1) * num_chains - 1`` are the chains of dataset ``k``.
        num_samples: Samples returned per dataset.
        num_datasets: Number of datasets (groups of chains with their own covariance adaptation).
        warmup: Discarded steps, with covariance adaptation at 1/4, 1/2 and 3/4 of them.
        thin: Initial thinning.
        max_thin: Largest thinning the chains may be extended to (default ``8 * thin``); at most
            ``max_thin / thin`` times the initial sampling steps are run.
        scale_tril: Initial direction Cholesky factor, ``(D, D)`` or ``(num_datasets, D, D)``.
        transform: Map from the chains' space to the returned space (e.g. ``exp``), applied before
            the diagnostics; default: the identity.
        max_rhat: R-hat threshold.
        min_ess: Threshold of :attr:`Diagnostics.sample_ess` (e.g. ``0.5 * num_samples``).
        generator: Source of all randomness.

    Returns:
        ``(samples, diagnostics)``: samples of shape ``(num_datasets, num_samples, D)``, float32, a
        random subset of the pooled kept draws of each dataset; diagnostics with entries of shape
        ``(num_datasets, D)``.

    Raises:
        ValueError: On a bad ``init``, ``thin`` or ``max_thin``.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> samples, diag = run_chains(lambda z, k: -0.5 * (z**2).sum(-1), torch.zeros(8, 2), 400,
        ...                            warmup=20, min_ess=200, generator=g)
        >>> samples.shape, diag.converged
        (torch.Size([1, 400, 2]), True)
    """
    if not isinstance(num_datasets, int) or num_datasets < 1:
        raise ValueError(f"num_datasets must be a positive int, got {num_datasets!r}")
    num_chains, d = init.shape[0] // num_datasets, init.shape[-1]
    if init.ndim != 2 or num_chains < 2 or init.shape[0] != num_chains * num_datasets:
        raise ValueError(
            f"init must have shape (num_datasets * num_chains, D) with num_chains >= 2, got {tuple(init.shape)} "
            f"for {num_datasets} datasets"
        )
    max_thin = MAX_EXTENSION * thin if max_thin is None else max_thin
    if not isinstance(thin, int) or thin < 1 or not isinstance(max_thin, int) or max_thin < thin:
        raise ValueError(f"thin and max_thin must be ints with 1 <= thin <= max_thin, got {thin} and {max_thin}")
    transform = transform or (lambda z: z)
    groups = torch.arange(num_chains * num_datasets) // num_chains
    chains = _Chains(
        lambda z, rows: log_prob_fn(z, groups[rows]),
        init,
        groups=groups,
        scale_tril=scale_tril,
        width=3.0,
        generator=generator,
    )
    chains.warm_up(warmup)
    draws = max(math.ceil(num_samples / num_chains), MIN_DRAWS)
    kept = chains.draw(draws, thin)
    while True:
        theta = transform(kept).reshape(num_datasets, num_chains, draws, d)
        chain_ess = torch.stack([ess(t) for t in theta])
        diag = Diagnostics(
            rhat=torch.stack([rhat(t) for t in theta]),
            ess=chain_ess,
            sample_ess=_subset_ess(chain_ess, num_chains * draws, num_samples),
            num_samples=num_samples,
            num_chains=num_chains,
            draws_per_chain=draws,
            thin=thin,
            evals_per_step=chains.evals_per_step,
            converged=False,
        )
        if _failure(diag, max_rhat, min_ess) is None:
            diag = replace(diag, converged=True)
            break
        factor = min(_extension_factor(diag, min_ess), max_thin // thin)
        if factor < 2:
            break
        more = chains.draw(draws * (factor - 1), thin)
        kept = torch.cat([kept, more], dim=1)[:, factor - 1 :: factor]
        thin *= factor
    pooled = theta.reshape(num_datasets, num_chains * draws, d)
    picks = torch.stack([torch.randperm(num_chains * draws, generator=generator)[:num_samples]
                         for _ in range(num_datasets)])
    samples = torch.gather(pooled, 1, picks[..., None].expand(-1, -1, d))
    return samples.to(torch.float32), diag


def _extension_factor(diag: Diagnostics, min_ess: float) -> int:
    """How many times longer to run (and thin) so that ``sample_ess`` reaches ``min_ess``, with margin.

    Thinning ``k`` times multiplies the chains' ESS by about ``k`` until the draws are independent.
    A failure of R-hat alone doubles the run.
    """
    if bool((diag.sample_ess >= min_ess).all()):
        return 2
    pool, n = diag.num_chains * diag.draws_per_chain, diag.num_samples
    # Invert _subset_ess: the chain ESS at which the subset reaches min_ess.
    denominator = 1.0 + (n / max(min_ess, 1e-12) - 1.0) * (pool - 1) / max(n - 1, 1)
    if denominator <= 0:
        return 2**62  # unreachable by thinning: as long as allowed
    needed = pool / denominator
    return max(2, math.ceil(1.2 * needed / float(diag.ess.clamp_min(1e-12).min())))


def _prior_draws(prior: Distribution, num: int, generator: torch.Generator) -> Tensor:
    """``prior.sample`` uses torch's global RNG: seed it from ``generator`` and restore it after."""
    state = torch.get_rng_state()
    torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
    try:
        return prior.sample((num,))
    finally:
        torch.set_rng_state(state)


def _initial_points(logp: Tensor, z: Tensor, num_chains: int, init: str, generator: torch.Generator) -> Tensor:
    """Starting points from unconstrained prior draws ``z`` with log densities ``logp``: the first
    finite ones, or SIR."""
    finite = torch.isfinite(logp)
    if int(finite.sum()) < (num_chains if init == "prior" else 1):
        raise RuntimeError(f"only {int(finite.sum())} of {len(z)} prior draws have finite likelihood")
    if init == "prior":
        return z[finite][:num_chains]
    # SIR: prior draws resampled by likelihood, distinct ones where possible so that the chains
    # start dispersed (which R-hat relies on to detect chains stuck apart).
    weights = torch.softmax(logp, dim=0)
    distinct = int((weights > 0).sum()) >= num_chains
    return z[torch.multinomial(weights, num_chains, replacement=not distinct, generator=generator)]


def sample_posteriors(
    log_likelihood: IndexedLogProbFn,
    prior: Distribution,
    num_datasets: int,
    num_samples: int,
    *,
    num_chains: int = 100,
    warmup: int = 100,
    thin: int = 1,
    max_thin: int | None = None,
    generator: torch.Generator | None = None,
    init: Literal["sir", "prior"] = "sir",
    max_rhat: float = 1.05,
    ess_fraction: float = ESS_FRACTION,
    min_ess: float | None = None,
    on_failure: Literal["raise", "warn"] = "raise",
    return_diagnostics: bool = False,
    dtype: torch.dtype = torch.float64,
) -> Tensor | tuple[Tensor, Diagnostics]:
    """Sample the posteriors of ``num_datasets`` datasets at once, ``num_chains`` chains each.

    Like :func:`sample_posterior`, but ``log_likelihood(theta, k)`` gets the dataset index ``k`` (a long
    tensor of shape ``(N,)``) of every row of ``theta``, so that all chains of all datasets are
    evaluated in the same batched call. Each dataset gets its own starting points and direction
    covariance; the checks apply to every dataset, and the chains of all of them are extended together.

    Args:
        log_likelihood: ``(theta (N, D), k (N,)) -> (N,)``, the log-likelihood of dataset ``k[j]`` at
            ``theta[j]``; it gets ``theta`` as ``dtype`` inside the prior's support. NaN counts as ``-inf``.
        prior: A torch distribution with event shape ``(D,)`` and a support ``biject_to`` knows.
        num_datasets: Number of datasets.
        num_samples: Number of posterior samples returned per dataset.
        num_chains: Parallel chains per dataset.
        warmup: See :func:`sample_posterior`, as are ``thin``, ``max_thin``, ``generator``, ``init``,
            ``max_rhat``, ``ess_fraction``, ``min_ess``, ``on_failure``, ``return_diagnostics`` and ``dtype``.

    Returns:
        Samples of shape ``(num_datasets, num_samples, D)``, float32; with ``return_diagnostics``, a
        tuple ``(samples, diagnostics)`` with diagnostics entries of shape ``(num_datasets, D)``.

    Raises:
        ValueError: On invalid arguments.
        ConvergenceError: If a check fails for some dataset and ``on_failure="raise"``.

    Example:
        >>> from torch.distributions import MultivariateNormal
        >>> prior = MultivariateNormal(torch.zeros(1), torch.eye(1))
        >>> x = torch.tensor([[-2.0], [2.0]], dtype=torch.float64)
        >>> s = sample_posteriors(lambda t, k: -0.5 * ((t - x[k]) ** 2).sum(-1), prior, 2, 500,
        ...                       num_chains=20, generator=torch.Generator().manual_seed(0))
        >>> s.shape, s.mean(1).round().flatten().tolist()
        (torch.Size([2, 500, 1]), [-1.0, 1.0])
    """
    if not isinstance(num_datasets, int) or num_datasets < 1:
        raise ValueError(f"num_datasets must be a positive int, got {num_datasets!r}")
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    if not isinstance(num_chains, int) or num_chains < 2:
        raise ValueError(f"num_chains must be an int >= 2, got {num_chains!r}")
    if init not in ("sir", "prior"):
        raise ValueError(f"init must be 'sir' or 'prior', got {init!r}")
    if on_failure not in ("raise", "warn"):
        raise ValueError(f"on_failure must be 'raise' or 'warn', got {on_failure!r}")
    if not 0 <= ess_fraction <= 1:
        raise ValueError(f"ess_fraction must be in [0, 1], got {ess_fraction!r}")
    if generator is None:
        generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,))))
    transform = biject_to(prior.support)
    num_candidates = max(10 * num_chains, 10_000) if init == "sir" else 4 * num_chains
    candidates = _prior_draws(prior, num_candidates, generator)
    prior_dtype = candidates.dtype

    def log_prob_z(z: Tensor, index: Tensor) -> Tensor:
        theta = transform(z)
        out = torch.full(z.shape[:1], -math.inf, dtype=z.dtype)
        inside = prior.support.check(theta)  # saturated bijections can land on the boundary
        if inside.any():
            t = theta[inside]
            ll = log_likelihood(t.to(dtype), index[inside])
            if not isinstance(ll, Tensor) or ll.shape != t.shape[:1]:
                got = tuple(ll.shape) if isinstance(ll, Tensor) else type(ll).__name__
                raise ValueError(f"log_likelihood must return shape ({len(t)},), got {got}")
            lp = ll.to(z.dtype) + prior.log_prob(t.to(prior_dtype))
            out[inside] = lp + transform.log_abs_det_jacobian(z[inside], t)
        return out

    candidates_z = transform.inv(candidates.to(torch.float64))
    starts = []
    for k in range(num_datasets):
        index = torch.full((len(candidates_z),), k, dtype=torch.long)
        logp = torch.cat([_safe_log_prob(log_prob_z, chunk, rows)
                          for chunk, rows in zip(candidates_z.split(10_000), index.split(10_000))])
        starts.append(_initial_points(logp, candidates_z, num_chains, init, generator))
    finite = torch.isfinite(candidates_z).all(-1)
    min_ess = ess_fraction * num_samples if min_ess is None else min_ess
    samples, diag = run_chains(
        log_prob_z,
        torch.cat(starts),
        num_samples,
        num_datasets=num_datasets,
        warmup=warmup,
        thin=thin,
        max_thin=max_thin,
        scale_tril=_cholesky_of(candidates_z[finite]),  # the prior's scale, until adapted
        transform=transform,
        max_rhat=max_rhat,
        min_ess=min_ess,
        generator=generator,
    )
    if not diag.converged:
        shown = diag.select(0) if num_datasets == 1 else diag
        message = (
            f"MCMC did not converge ({convergence_message(shown, max_rhat, min_ess)}); "
            "try more warmup, thin, max_thin or num_chains"
        )
        if on_failure == "raise":
            raise ConvergenceError(message)
        warnings.warn(message, ConvergenceWarning, stacklevel=3)
    return (samples, diag) if return_diagnostics else samples


def sample_posterior(
    log_likelihood: LogProbFn,
    prior: Distribution,
    num_samples: int,
    *,
    num_chains: int = 100,
    warmup: int = 100,
    thin: int = 1,
    max_thin: int | None = None,
    generator: torch.Generator | None = None,
    init: Literal["sir", "prior"] = "sir",
    max_rhat: float = 1.05,
    ess_fraction: float = ESS_FRACTION,
    min_ess: float | None = None,
    on_failure: Literal["raise", "warn"] = "raise",
    return_diagnostics: bool = False,
    dtype: torch.dtype = torch.float64,
) -> Tensor | tuple[Tensor, Diagnostics]:
    """Sample ``p(theta | x) ∝ exp(log_likelihood(theta)) * prior(theta)`` with many parallel chains.

    Args:
        log_likelihood: ``theta (N, D) -> (N,)``, the log-likelihood of the fixed observation; it gets
            ``theta`` as ``dtype`` inside the prior's support. NaN counts as ``-inf``.
        prior: A torch distribution with event shape ``(D,)`` and a support ``biject_to`` knows.
        num_samples: Number of posterior samples returned.
        num_chains: Parallel chains (each log-likelihood call is batched over them).
        warmup: Discarded steps per chain.
        thin: Keep every ``thin``-th step after warm-up (initially, see ``max_thin``).
        max_thin: If a check fails, the chains are run longer and thinned more, up to this thinning
            (default ``8 * thin``; ``thin`` disables the extension).
        generator: Source of all randomness (``None``: seeded from torch's global RNG).
        init: ``"sir"`` starts chains at prior draws resampled by likelihood; ``"prior"`` at prior draws.
        max_rhat: Fail if any parameter's R-hat exceeds it.
        ess_fraction: Fail if the estimated ESS of the returned samples (:attr:`Diagnostics.sample_ess`)
            is below ``ess_fraction * num_samples`` for any parameter: 1 means independent draws.
        min_ess: An absolute threshold of the returned samples' ESS instead of ``ess_fraction``.
        on_failure: ``"raise"`` a :class:`ConvergenceError` or ``"warn"`` with a
            :class:`ConvergenceWarning` when a check fails (after the extension).
        return_diagnostics: Also return a :class:`Diagnostics`.
        dtype: Floating dtype of ``theta`` passed to ``log_likelihood``.

    Returns:
        Samples of shape ``(num_samples, D)`` in the prior's space (randomly drawn from the pooled
        chains), float32; with ``return_diagnostics``, a tuple ``(samples, diagnostics)``.

    Raises:
        ValueError: On invalid arguments.
        ConvergenceError: If a check fails and ``on_failure="raise"``.

    Example:
        >>> from torch.distributions import MultivariateNormal
        >>> prior = MultivariateNormal(torch.zeros(2), torch.eye(2))
        >>> s = sample_posterior(lambda t: -0.5 * ((t - 1.0) ** 2).sum(-1), prior, 500,
        ...                      generator=torch.Generator().manual_seed(1))
        >>> bool(((s.mean(0) - 0.5).abs() < 0.1).all())
        True
    """
    samples, diag = sample_posteriors(
        lambda theta, index: log_likelihood(theta),
        prior,
        1,
        num_samples,
        num_chains=num_chains,
        warmup=warmup,
        thin=thin,
        max_thin=max_thin,
        generator=generator,
        init=init,
        max_rhat=max_rhat,
        ess_fraction=ess_fraction,
        min_ess=min_ess,
        on_failure=on_failure,
        return_diagnostics=True,
        dtype=dtype,
    )
    return (samples[0], diag.select(0)) if return_diagnostics else samples[0]

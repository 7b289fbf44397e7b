"""Vectorized many-chain slice sampling for reference posteriors, with R-hat and ESS checks.

Used where a task's posterior has no closed form: ``sample_posterior(log_likelihood, prior, n)`` runs
hundreds of chains in parallel (one batched ``log_likelihood`` call per sampler iteration), in the
unconstrained space ``z = biject_to(prior.support).inv(theta)`` with the log-abs-det correction, so
bounded priors are handled exactly. Chains start from prior draws, resampled by likelihood
(``init="sir"``) or not (``init="prior"``).

The kernel is slice sampling (Neal 2003, stepping out and shrinkage) along lines: each step sweeps
over the directions ``L u_1, ..., L u_D``, with ``u_k`` a random orthonormal basis per chain and ``L``
the Cholesky factor of the chains' covariance, re-estimated during warm-up (it starts at the prior's).
It needs no step size, is robust to a wrong scale and adapts to correlated posteriors. Diagnostics
follow Vehtari et al. (2021): rank-normalized split R-hat and bulk effective sample size.

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
from dataclasses import dataclass
from typing import Callable, Literal

import numpy as np
import torch
from scipy.special import ndtri
from scipy.stats import rankdata
from torch import Tensor
from torch.distributions import Distribution, biject_to

LogProbFn = Callable[[Tensor], Tensor]

__all__ = [
    "ConvergenceError",
    "ConvergenceWarning",
    "Diagnostics",
    "ess",
    "rhat",
    "sample_posterior",
    "slice_chains",
]


class ConvergenceError(RuntimeError):
    """MCMC chains failed the R-hat or effective-sample-size check."""


class ConvergenceWarning(UserWarning):
    """MCMC chains failed the R-hat or effective-sample-size check (``on_failure="warn"``)."""


@dataclass(frozen=True)
class Diagnostics:
    """Convergence summary of a run of :func:`sample_posterior`.

    Attributes:
        rhat: Rank-normalized split R-hat per parameter (want < 1.05; 1 is perfect).
        ess: Bulk effective sample size per parameter, over all kept draws.
        num_chains: Number of parallel chains.
        draws_per_chain: Kept draws per chain (after warm-up and thinning).
        evals_per_step: Mean number of log-density evaluations per chain and sampler step.
    """

    rhat: Tensor
    ess: Tensor
    num_chains: int
    draws_per_chain: int
    evals_per_step: float


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
def _safe_log_prob(fn: LogProbFn, z: Tensor) -> Tensor:
    out = fn(z)
    if out.shape != z.shape[:1]:
        raise ValueError(f"log_prob_fn must return shape ({z.shape[0]},), got {tuple(out.shape)}")
    out = out.to(z.dtype)
    return torch.where(torch.isnan(out), torch.full_like(out, -math.inf), out)


def _slice_along(
    fn: LogProbFn,
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
        inside = _safe_log_prob(fn, points) > level[chain]
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
        lp = _safe_log_prob(fn, proposal)
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
    fn: LogProbFn, z: Tensor, logp: Tensor, chol: Tensor, width: float, generator: torch.Generator
) -> tuple[Tensor, Tensor, int]:
    """Slice-sample along D random orthogonal directions of the whitened space, per chain."""
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
        z, logp, e = _slice_along(fn, z, logp, u @ chol.T, width, generator)
        evals += e
    return z, logp, evals


def _cholesky_of(points: Tensor) -> Tensor:
    d = points.shape[1]
    cov = torch.atleast_2d(torch.cov(points.T))
    jitter = 1e-8 * cov.diagonal().mean().clamp_min(1e-12)
    return torch.linalg.cholesky(cov + jitter * torch.eye(d, dtype=points.dtype))


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
    z = init.detach().to(torch.float64).clone()
    logp = _safe_log_prob(log_prob_fn, z)
    if not torch.isfinite(logp).all():
        raise ValueError("init: every starting point must have a finite log density")
    d = z.shape[1]
    chol = torch.eye(d, dtype=z.dtype) if scale_tril is None else scale_tril.to(z.dtype)
    adapt_at = {warmup // 4: warmup // 4, warmup // 2: warmup // 4, 3 * warmup // 4: warmup // 4}
    history: list[Tensor] = []
    kept: list[Tensor] = []
    total_evals = 0
    num_steps = warmup + num_draws * thin
    for step in range(1, num_steps + 1):
        z, logp, evals = _sweep(log_prob_fn, z, logp, chol, width, generator)
        total_evals += evals
        if step <= warmup:
            history.append(z)
            window = adapt_at.get(step, 0)
            if window > 0:
                chol = _cholesky_of(torch.cat(history[-window:]))
        elif (step - warmup) % thin == 0:
            kept.append(z)
    return torch.stack(kept, dim=1), total_evals / (num_steps * z.shape[0])


def _prior_draws(prior: Distribution, num: int, generator: torch.Generator) -> Tensor:
    """``prior.sample`` uses torch's global RNG: seed it from ``generator`` and restore it after."""
    state = torch.get_rng_state()
    torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
    try:
        return prior.sample((num,))
    finally:
        torch.set_rng_state(state)


def _initial_points(
    log_prob_z: LogProbFn, z: Tensor, num_chains: int, init: str, generator: torch.Generator
) -> Tensor:
    """Starting points from unconstrained prior draws ``z``: the first finite ones, or SIR."""
    logp = torch.cat([_safe_log_prob(log_prob_z, chunk) for chunk in z.split(10_000)])
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


def sample_posterior(
    log_likelihood: LogProbFn,
    prior: Distribution,
    num_samples: int,
    *,
    num_chains: int = 100,
    warmup: int = 100,
    thin: int = 1,
    generator: torch.Generator | None = None,
    init: Literal["sir", "prior"] = "sir",
    max_rhat: float = 1.05,
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
        thin: Keep every ``thin``-th step after warm-up.
        generator: Source of all randomness (``None``: seeded from torch's global RNG).
        init: ``"sir"`` starts chains at prior draws resampled by likelihood; ``"prior"`` at prior draws.
        max_rhat: Fail if any parameter's R-hat exceeds it.
        min_ess: Fail if any parameter's bulk ESS is below it (default ``min(num_samples, 1000) / 10``,
            at least 50).
        on_failure: ``"raise"`` a :class:`ConvergenceError` or ``"warn"`` with a
            :class:`ConvergenceWarning` when a check fails.
        return_diagnostics: Also return a :class:`Diagnostics`.
        dtype: Floating dtype of ``theta`` passed to ``log_likelihood``.

    Returns:
        Samples of shape ``(num_samples, D)`` in the prior's space (randomly drawn from the pooled
        chains), float32; with ``return_diagnostics``, a tuple ``(samples, diagnostics)``.

    Example:
        >>> from torch.distributions import MultivariateNormal
        >>> prior = MultivariateNormal(torch.zeros(2), torch.eye(2))
        >>> s = sample_posterior(lambda t: -0.5 * ((t - 1.0) ** 2).sum(-1), prior, 500,
        ...                      generator=torch.Generator().manual_seed(1))
        >>> bool(((s.mean(0) - 0.5).abs() < 0.1).all())
        True
    """
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    if not isinstance(num_chains, int) or num_chains < 2:
        raise ValueError(f"num_chains must be an int >= 2, got {num_chains!r}")
    if init not in ("sir", "prior"):
        raise ValueError(f"init must be 'sir' or 'prior', got {init!r}")
    if on_failure not in ("raise", "warn"):
        raise ValueError(f"on_failure must be 'raise' or 'warn', got {on_failure!r}")
    if generator is None:
        generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,))))
    transform = biject_to(prior.support)
    num_candidates = max(10 * num_chains, 10_000) if init == "sir" else 4 * num_chains
    candidates = _prior_draws(prior, num_candidates, generator)
    prior_dtype = candidates.dtype

    def log_prob_z(z: Tensor) -> Tensor:
        theta = transform(z)
        out = torch.full(z.shape[:1], -math.inf, dtype=z.dtype)
        inside = prior.support.check(theta)  # saturated bijections can land on the boundary
        if inside.any():
            t = theta[inside]
            ll = log_likelihood(t.to(dtype))
            if not isinstance(ll, Tensor) or ll.shape != t.shape[:1]:
                got = tuple(ll.shape) if isinstance(ll, Tensor) else type(ll).__name__
                raise ValueError(f"log_likelihood must return shape ({len(t)},), got {got}")
            lp = ll.to(z.dtype) + prior.log_prob(t.to(prior_dtype))
            out[inside] = lp + transform.log_abs_det_jacobian(z[inside], t)
        return out

    candidates_z = transform.inv(candidates.to(torch.float64))
    z0 = _initial_points(log_prob_z, candidates_z, num_chains, init, generator)
    finite = torch.isfinite(candidates_z).all(-1)
    draws = max(math.ceil(num_samples / num_chains), 50)  # enough for a meaningful R-hat
    chains_z, evals = slice_chains(
        log_prob_z,
        z0,
        num_draws=draws,
        warmup=warmup,
        thin=thin,
        scale_tril=_cholesky_of(candidates_z[finite]),  # the prior's scale, until adapted
        generator=generator,
    )
    chains = transform(chains_z)
    diag = Diagnostics(rhat(chains), ess(chains), num_chains, draws, evals)
    threshold = max(min(num_samples, 1000) / 10, 50) if min_ess is None else min_ess
    problems = []
    if not bool((diag.rhat <= max_rhat).all()):
        problems.append(f"max R-hat {float(diag.rhat.max()):.3f} > {max_rhat}")
    if not bool((diag.ess >= threshold).all()):
        problems.append(f"min ESS {float(diag.ess.min()):.0f} < {threshold:.0f}")
    if problems:
        message = (
            f"MCMC did not converge ({'; '.join(problems)}; R-hat {diag.rhat.numpy().round(3)}, "
            f"ESS {diag.ess.numpy().round(0)}); try more warmup, thin or num_chains"
        )
        if on_failure == "raise":
            raise ConvergenceError(message)
        warnings.warn(message, ConvergenceWarning, stacklevel=2)
    pooled = chains.reshape(-1, chains.shape[-1])
    pick = torch.randperm(len(pooled), generator=generator)[:num_samples]
    samples = pooled[pick].to(torch.float32)
    return (samples, diag) if return_diagnostics else samples

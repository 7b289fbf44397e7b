"""Vectorized many-chain slice sampling (Neal 2003) along random directions of a whitened space.

Each step sweeps over the directions ``L u_1, ..., L u_D``, with ``u_k`` a random orthonormal basis per
chain and ``L`` the Cholesky factor of the chains' covariance, re-estimated during warm-up.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterable, Iterator
from typing import Callable

import torch
from torch import Tensor

LogProbFn = Callable[[Tensor], Tensor]
#: A log density of chains that differ by dataset: ``(points (N, D), dataset index (N,)) -> (N,)``.
IndexedLogProbFn = Callable[[Tensor, Tensor], Tensor]

__all__ = ["IndexedLogProbFn", "LogProbFn", "show_progress", "slice_chains"]


#: Whether the samplers show progress bars (set by :func:`show_progress`).
_PROGRESS: contextvars.ContextVar[bool] = contextvars.ContextVar("mcmc_progress", default=False)


@contextlib.contextmanager
def show_progress(enabled: bool = True) -> Iterator[None]:
    """Within the block, slice samplers show a progress bar over their steps (when ``enabled``)."""
    token = _PROGRESS.set(bool(enabled))
    try:
        yield
    finally:
        _PROGRESS.reset(token)


def _steps(num_steps: int, label: str) -> Iterable[int]:
    steps = range(1, num_steps + 1)
    if not _PROGRESS.get():
        return steps
    from tqdm.auto import tqdm

    return tqdm(steps, desc=label, unit="step", leave=False, disable=None)  # silent off a terminal


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
        for step in _steps(num_steps, "MCMC warm-up"):
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
        for step in _steps(num_draws * thin, "MCMC draws"):
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

"""Reference posteriors by MCMC: chains started from the prior, extended until they pass the checks.

:func:`run_chains` runs the slice sampler until R-hat and the returned samples' ESS pass (or the
thinning reaches its limit); :func:`sample_posterior` and :func:`sample_posteriors` wrap it for a
prior and a likelihood, in the prior's unconstrained space.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import replace
from typing import Callable, Literal

import torch
from torch import Tensor
from torch.distributions import Distribution, biject_to

from simulators.mcmc.diagnostics import (
    ConvergenceError,
    ConvergenceWarning,
    Diagnostics,
    _failure,
    _subset_ess,
    convergence_message,
    ess,
    rhat,
)
from simulators.mcmc.slice import (
    IndexedLogProbFn,
    LogProbFn,
    _Chains,
    _cholesky_of,
    _safe_log_prob,
)

#: Kept draws per chain are at least this many, so that R-hat and ESS are meaningful.
MIN_DRAWS = 50
#: Default of ``ess_fraction``: the returned samples' ESS must be at least this fraction of their number.
ESS_FRACTION = 0.5
#: Default of ``max_thin`` as a multiple of ``thin``: how much longer chains may run to pass the checks.
MAX_EXTENSION = 8

__all__ = [
    "ESS_FRACTION",
    "MAX_EXTENSION",
    "MIN_DRAWS",
    "run_chains",
    "sample_posterior",
    "sample_posteriors",
]


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

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

The implementation is split into :mod:`simulators.mcmc.diagnostics` (R-hat, ESS, :class:`Diagnostics`),
:mod:`simulators.mcmc.slice` (the sampler) and :mod:`simulators.mcmc.run` (:func:`run_chains`,
:func:`sample_posterior`, :func:`sample_posteriors`); their public names are re-exported here.
"""

from __future__ import annotations

from simulators.mcmc.diagnostics import (
    ConvergenceError,
    ConvergenceWarning,
    Diagnostics,
    convergence_message,
    ess,
    rhat,
)
from simulators.mcmc.diagnostics import _subset_ess as _subset_ess  # for the tests
from simulators.mcmc.run import ESS_FRACTION as ESS_FRACTION
from simulators.mcmc.run import MAX_EXTENSION as MAX_EXTENSION
from simulators.mcmc.run import MIN_DRAWS as MIN_DRAWS
from simulators.mcmc.run import (
    run_chains,
    sample_posterior,
    sample_posteriors,
)
from simulators.mcmc.slice import IndexedLogProbFn as IndexedLogProbFn
from simulators.mcmc.slice import LogProbFn as LogProbFn
from simulators.mcmc.slice import slice_chains

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

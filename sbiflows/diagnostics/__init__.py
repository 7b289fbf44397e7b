"""Diagnostics for simulation-based inference: is the posterior accurate and calibrated?

* :func:`c2st` -- classifier two-sample test between two sample sets (e.g. posterior samples
  vs reference samples): accuracy 0.5 = indistinguishable, 1.0 = disjoint; :func:`c2st_batched` runs
  it for several pairs at once (the same results up to float rounding, a fraction of the time).
* :func:`sbc` -- simulation-based calibration: ranks of true parameters among posterior draws
  (per-parameter calibration; catches bias and, via the histogram shape, dispersion errors).
* :func:`expected_coverage` -- coverage of highest-posterior-density regions (over- or
  under-confidence of the joint posterior; needs ``log_prob``).
* :func:`calibration` -- SBC, expected coverage and TARP in one call, drawing the posterior samples
  once (each result equal to its own function's).
* :func:`tarp` -- coverage of random-reference balls (joint calibration from samples only).
* :func:`posterior_predictive` -- is the observation typical of data simulated from the posterior?
* :func:`verdict` / :func:`overall` -- a check's result (or several) in words: calibrated,
  conservative, over-confident or biased.

The calibration checks share a call form ``check(posterior, prior, simulator, *, num_datasets=...,
num_posterior_samples=..., seed=...)`` and accept precomputed pairs via ``theta=..., x=...`` so
that several checks can reuse the same simulations (see :func:`simulate_datasets`). Every check
returns a result object with ``.passed``, the statistics behind it and a readable ``str()``.

Example:
    >>> import torch
    >>> from sbiflows.diagnostics import simulate_datasets, sbc, tarp
    >>> prior = torch.distributions.MultivariateNormal(torch.zeros(2), torch.eye(2))
    >>> simulator = lambda t: t + torch.randn_like(t)
    >>> class Exact:  # the exact posterior N(x / 2, I / 2) of this model
    ...     def sample_batched(self, n, xs):
    ...         return xs / 2 + torch.randn(n, *xs.shape) / 2**0.5
    >>> theta, x = simulate_datasets(prior, simulator, 500, seed=1)
    >>> sbc(Exact(), theta=theta, x=x).passed and tarp(Exact(), theta=theta, x=x).passed
    True
"""

from sbiflows.diagnostics.c2st import C2STResult, c2st, c2st_batched
from sbiflows.diagnostics.calibration import calibration
from sbiflows.diagnostics.coverage import CoverageResult, expected_coverage
from sbiflows.diagnostics.predictive import PredictiveResult, posterior_predictive
from sbiflows.diagnostics.sbc import SBCResult, rank_statistics, sbc
from sbiflows.diagnostics.simulations import simulate_datasets
from sbiflows.diagnostics.tarp import TARPResult, tarp
from sbiflows.diagnostics.verdict import overall, verdict

__all__ = [
    "C2STResult",
    "CoverageResult",
    "PredictiveResult",
    "SBCResult",
    "TARPResult",
    "c2st",
    "calibration",
    "c2st_batched",
    "expected_coverage",
    "overall",
    "posterior_predictive",
    "rank_statistics",
    "sbc",
    "simulate_datasets",
    "tarp",
    "verdict",
]

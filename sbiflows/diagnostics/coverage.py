"""Expected coverage of highest-posterior-density (HPD) regions (Hermans et al. 2022).

"A trust crisis in simulation-based inference?" (arXiv:2110.06581) checks whether the HPD region
of credibility ``1 - alpha`` contains the true parameter in a fraction ``1 - alpha`` of cases. With
``L`` posterior draws given ``x_i``, the HPD rank of ``theta_i`` is the fraction of draws whose
density exceeds that of ``theta_i``; ``theta_i`` lies in the HPD region of level ``c`` exactly when
its HPD rank is below ``c``. The empirical coverage at level ``c`` is the fraction of datasets for
which this holds.

Reading the result:

* empirical coverage below the nominal level: over-confident -- credible regions are too small
  (the posterior is too narrow, or biased: the truth often sits in a low-density region);
* above the nominal level: under-confident (conservative) -- regions are too large. Hermans et
  al. argue that this is the acceptable failure, hence ``one_sided=True``.

The verdict compares the empirical coverage with a band around the diagonal of half-width
``num_sigmas * sqrt(c (1 - c) / N) + tolerance``: the binomial standard error of a coverage
estimate from ``N`` datasets, plus a margin for the Monte-Carlo error of ranks from ``L`` draws.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.distributions import Distribution

from sbiflows.checks import check_real
from sbiflows.diagnostics.simulations import (
    Simulator,
    batched_log_prob,
    calibration_pairs,
    padded_trials,
    check_num_posterior_samples,
    check_posterior,
    draws_and_log_prob,
    seeded,
    takes_normalized,
)
from sbiflows.threads import torch_threads

__all__ = ["CoverageResult", "expected_coverage"]

DEFAULT_LEVELS = tuple(round(0.05 * i, 2) for i in range(1, 20))  # 0.05, 0.10, ..., 0.95


@dataclass(frozen=True)
class CoverageResult:
    """Outcome of :func:`expected_coverage`.

    Attributes:
        levels: Nominal credibility levels, shape ``(K,)``.
        empirical: Fraction of datasets whose true parameter lies in the HPD region of each level.
        band: Half-width of the accepted band around the diagonal at each level.
        hpd_ranks: Per dataset, the truth's randomised HPD rank (:func:`hpd_rank`: about the fraction of posterior
            draws with higher density than the truth; uniform on [0, 1] if calibrated), shape ``(N,)``.
        num_posterior_samples: Posterior draws per dataset.
        one_sided: If true, only under-coverage (over-confidence) fails the check.
        verdict: "calibrated", "over-confident", "under-confident" or "mis-calibrated" (both).
        passed: No level falls below the band (and, unless ``one_sided``, none above it).
        num_invalid: Simulations excluded because they contained NaN/inf.
    """

    levels: Tensor
    empirical: Tensor
    band: Tensor
    hpd_ranks: Tensor
    num_posterior_samples: int
    one_sided: bool
    verdict: str
    passed: bool
    num_invalid: int = 0

    @property
    def num_datasets(self) -> int:
        """Number of (valid) datasets ``N``."""
        return self.hpd_ranks.shape[0]

    @property
    def deviation(self) -> Tensor:
        """Empirical minus nominal coverage at each level (negative = over-confident)."""
        return self.empirical - self.levels

    def __str__(self) -> str:
        worst = int((self.deviation.abs() / self.band.clamp_min(1e-12)).argmax())  # vs the band
        shown = sorted({int((self.levels - c).abs().argmin()) for c in (0.1, 0.25, 0.5, 0.75, 0.9)})
        table = "  ".join(f"{self.levels[i]:.2f}:{self.empirical[i]:.3f}" for i in shown)
        lines = [
            f"Expected coverage of HPD regions: {self.num_datasets} datasets, "
            f"{self.num_posterior_samples} posterior draws each"
            + (f" ({self.num_invalid} invalid simulations excluded)" if self.num_invalid else ""),
            f"  nominal:empirical  {table}",
            f"  worst deviation {self.deviation[worst]:+.3f} at level {self.levels[worst]:.2f} of "
            f"{len(self.levels)} levels (band ±{self.band[worst]:.3f}); verdict: {self.verdict}",
        ]
        meaning = {
            "calibrated": "credible regions contain the truth as often as they claim.",
            "over-confident": "credible regions contain the truth less often than claimed: the "
            "posterior is too narrow or biased.",
            "under-confident": "credible regions contain the truth more often than claimed: the "
            "posterior is too wide (conservative: safe to report, not as sharp as it could be).",
            "mis-calibrated": "coverage is too low at some levels and too high at others: the "
            "posterior has the wrong shape.",
        }[self.verdict]
        status = "PASSED" if self.passed else ("CONSERVATIVE" if self.verdict == "under-confident" else "FAILED")
        sided = " (one-sided: only over-confidence fails)" if self.one_sided else ""
        lines.append(f"  {status}{sided}: {meaning}")
        return "\n".join(lines)


@torch_threads()
def expected_coverage(
    posterior: object,
    prior: Distribution | None = None,
    simulator: Simulator | None = None,
    *,
    theta: Tensor | None = None,
    x: Tensor | None = None,
    num_datasets: int = 1000,
    num_posterior_samples: int = 1000,
    seed: int | None = 0,
    levels: Sequence[float] | Tensor = DEFAULT_LEVELS,
    num_sigmas: float = 3.0,
    tolerance: float = 0.02,
    one_sided: bool = False,
    batch_size: int | None = None,
    progress: bool = False,
) -> CoverageResult:
    """Empirical coverage of the posterior's HPD regions at a grid of credibility levels.

    Args:
        posterior: Implements ``sample_batched`` and ``log_prob_batched`` (or ``log_prob``, called
            once per dataset as a fallback).
        prior: Prior with event shape ``(D,)``; needed unless ``theta`` and ``x`` are given.
        simulator: Maps ``theta`` (N, D) to ``x`` (N, *x_shape); needed unless ``theta``, ``x`` given.
        theta: Precomputed true parameters ``(N, D)`` (e.g. from :func:`simulate_datasets`).
        x: Precomputed simulations ``(N, *x_shape)`` matching ``theta``.
        num_datasets: Number of datasets to simulate (ignored with ``theta``/``x``).
        num_posterior_samples: Posterior draws per dataset.
        seed: Seeds the simulations and posterior draws (torch's global generator is restored
            afterwards); ``None`` uses and advances it.
        levels: Credibility levels in (0, 1), increasing; default 0.05, 0.10, ..., 0.95.
        num_sigmas: Binomial standard errors in the band's half-width.
        tolerance: Extra half-width for the Monte-Carlo error of the ranks.
        one_sided: Fail only on under-coverage (over-confidence).
        batch_size: At most this many datasets per batched posterior call; ``None`` = one call.
        progress: Show a progress bar over the posterior calls (one call unless ``batch_size`` splits the
            datasets); the result is the same with or without it.

    Returns:
        A :class:`CoverageResult`; ``print`` it for a readable report.

    Raises:
        TypeError: If the posterior lacks ``sample_batched`` or ``log_prob``, or inputs are not
            tensors.
        ValueError: On inconsistent shapes or options out of range.

    Example:
        >>> prior = torch.distributions.MultivariateNormal(torch.zeros(2), torch.eye(2))
        >>> class Exact:  # x = theta + N(0, 1) noise: posterior N(x / 2, I / 2)
        ...     def sample_batched(self, n, xs):
        ...         return xs / 2 + torch.randn(n, *xs.shape) / 2**0.5
        ...     def log_prob_batched(self, theta, xs):
        ...         return -(theta - xs / 2).square().sum(-1)  # up to a constant: enough here
        ...     def log_prob(self, theta, x):
        ...         return self.log_prob_batched(theta, x)
        >>> expected_coverage(Exact(), prior, lambda t: t + torch.randn_like(t), num_datasets=300).verdict
        'calibrated'
    """
    check_posterior(posterior, "sample_batched", "log_prob")
    grid = _check_levels(levels)
    check_real(num_sigmas, "num_sigmas", low=0.0)  # finite: inf would pass any posterior as calibrated
    check_real(tolerance, "tolerance", low=0.0)
    check_num_posterior_samples(num_posterior_samples, "expected_coverage")
    with seeded(seed):
        theta, x, num_invalid = calibration_pairs(
            prior, simulator, theta=theta, x=x, num_datasets=num_datasets, check="expected_coverage",
            padded_trials=padded_trials(posterior), theta_dim=getattr(posterior, "theta_dim", None)
        )
        # HPD ranks compare densities of one observation: a posterior that can skip its normalizer does
        normalized = not _skips_normalizer(posterior)
        draws, log_q_draws = draws_and_log_prob(posterior, num_posterior_samples, x, batch_size=batch_size,
                                                progress="coverage draws" if progress else None,
                                                normalized=normalized)  # (L, N, D), (L, N)
        jitter = torch.rand(len(theta), dtype=torch.float64)  # randomises the ranks' discrete values and ties
    if draws.shape[2] != theta.shape[1]:
        raise ValueError(
            f"posterior draws have {draws.shape[2]} parameters but theta has {theta.shape[1]}"
        )
    if log_q_draws is None:  # a posterior without sample_and_log_prob_batched: evaluate the draws
        log_q_draws = batched_log_prob(posterior, draws, x, batch_size=batch_size, normalized=normalized,
                                       progress="coverage densities" if progress else None)  # (L, N)
    log_q_truth = batched_log_prob(posterior, theta.unsqueeze(0), x, batch_size=batch_size,
                                   normalized=normalized)  # (1, N)
    hpd_ranks = hpd_rank(log_q_draws, log_q_truth, jitter)  # (N,)
    empirical = (hpd_ranks.unsqueeze(0) < grid.unsqueeze(1)).double().mean(1)  # (K,)
    num = hpd_ranks.shape[0]
    band = num_sigmas * (grid * (1 - grid) / num).sqrt() + tolerance
    too_low = bool((empirical < grid - band).any())
    too_high = bool((empirical > grid + band).any())
    verdict = {
        (False, False): "calibrated",
        (True, False): "over-confident",
        (False, True): "under-confident",
        (True, True): "mis-calibrated",
    }[(too_low, too_high)]
    return CoverageResult(
        levels=grid,
        empirical=empirical,
        band=band,
        hpd_ranks=hpd_ranks,
        num_posterior_samples=num_posterior_samples,
        one_sided=bool(one_sided),
        verdict=verdict,
        passed=not too_low and (one_sided or not too_high),
        num_invalid=num_invalid,
    )


def hpd_rank(log_q_draws: Tensor, log_q_truth: Tensor, jitter: Tensor) -> Tensor:
    """The truth's randomised HPD rank per dataset: ``(k + U (t + 1)) / (L + 1)`` for ``k`` of the ``L`` draws
    denser than the truth, ``t`` as dense (ties) and ``jitter`` ``U ~ Uniform(0, 1)``.

    Under a calibrated posterior ``k`` is uniform on ``0..L`` (with ties, the truth's place among them is), so the
    rank is uniform on [0, 1] and the coverage ``P(rank < c)`` is ``c`` at any ``L``. The plain fraction ``k / L``
    compared with ``< c`` gives ``ceil(c L) / (L + 1)``, below ``c``: a calibrated posterior looked over-confident
    at small ``L``, and one with flat densities (every draw tying with the truth) looked under-confident.

    Example:
        >>> hpd_rank(torch.tensor([[0.0], [1.0], [1.0], [2.0]]), torch.tensor([[1.0]]), torch.tensor([0.5]))
        tensor([0.5000], dtype=torch.float64)
    """
    greater = (log_q_draws > log_q_truth).sum(0).cpu().double()
    ties = (log_q_draws == log_q_truth).sum(0).cpu().double()
    return (greater + jitter * (ties + 1)) / (log_q_draws.shape[0] + 1)


def _skips_normalizer(posterior: object) -> bool:
    """Whether every batched density method the check will call takes ``normalized`` (then it passes False)."""
    methods = [getattr(posterior, name, None) for name in ("sample_and_log_prob_batched", "log_prob_batched")]
    if not callable(methods[1]):
        return False  # log_prob once per dataset
    return all(takes_normalized(method) for method in methods if callable(method))


def _check_levels(levels: Sequence[float] | Tensor) -> Tensor:
    try:
        grid = torch.as_tensor(levels, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(f"levels must be a sequence of floats in (0, 1), got {levels!r}") from err
    if grid.ndim != 1 or grid.numel() == 0:
        raise ValueError(f"levels must be a non-empty 1-D sequence, got shape {tuple(grid.shape)}")
    if not ((grid > 0) & (grid < 1)).all() or not (grid[1:] > grid[:-1]).all():
        raise ValueError(f"levels must be increasing values in (0, 1), got {grid.tolist()}")
    return grid

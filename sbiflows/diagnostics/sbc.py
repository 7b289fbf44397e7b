"""Simulation-based calibration (SBC; Talts et al. 2018, arXiv:1804.06788).

For ``theta_i ~ prior`` and ``x_i ~ simulator(theta_i)``, the rank of each true parameter among
``L`` posterior draws given ``x_i``, ``r_i = #{l : theta_l^(i) < theta_i}``, is uniform on
``{0, ..., L}`` for every parameter if the posterior is exact (the data-averaged posterior equals
the prior). The shape of the rank histogram says how it fails:

* ∪-shaped (too many ranks in both outer tails): over-confident, posterior too narrow;
* ∩-shaped (too few in both tails): under-confident, posterior too wide;
* skewed (mean rank away from the middle): biased; a mean rank above 0.5 means the truth lies
  above most draws, i.e. the posterior underestimates the parameter.

The verdict uses a Kolmogorov-Smirnov test of the randomised normalised ranks ``(r + U) / (L + 1)``,
``U ~ Uniform(0, 1)`` drawn under the check's seed, against Uniform(0, 1) per parameter, with a Bonferroni
threshold ``alpha / D``. Randomising makes them exactly uniform when the posterior is calibrated, whatever
``L``: the midpoints ``(r + 1/2) / (L + 1)`` that sbi tests are discrete, and a KS test of discrete values
rejects exactly uniform ranks once ``N`` is large against ``L`` (the shape labels suffer the same at small
``L``). A chi-square
test on binned ranks is reported alongside, or used instead with ``test="chi2"``: KS is the more
sensitive to shifts (bias), chi-square to ∪/∩ shapes (dispersion).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import scipy.stats
import torch
from torch import Tensor
from torch.distributions import Distribution

from sbiflows.checks import check_choice, check_int, check_real
from sbiflows.diagnostics.simulations import (
    Simulator,
    calibration_pairs,
    padded_trials,
    check_num_posterior_samples,
    check_posterior,
    posterior_draws,
    seeded,
)
from sbiflows.threads import torch_threads

__all__ = ["SBCResult", "sbc", "rank_statistics"]

#: Outer-tail width and the |z| a tail or mean-rank deviation needs to count as a shape.
TAIL = 0.1
Z_SHAPE = 3.0


@dataclass(frozen=True)
class SBCResult:
    """Outcome of :func:`sbc`.

    Attributes:
        ranks: Ranks of the true parameters among the posterior draws, shape ``(N, D)``, integers in
            ``0..num_posterior_samples``.
        num_posterior_samples: Posterior draws per dataset, ``L``.
        ks_pvalues: KS p-value of each parameter's randomised normalised ranks against Uniform(0, 1).
        chi2_pvalues: Chi-square p-value of each parameter's binned ranks (``num_bins`` bins).
        num_bins: Bins of the chi-square test (and the default for rank histograms).
        mean_ranks: Mean randomised normalised rank per parameter (0.5 if calibrated).
        lower_tail: Fraction of randomised normalised ranks below 0.1, per parameter (0.1 if calibrated).
        upper_tail: Fraction of randomised normalised ranks above 0.9, per parameter (0.1 if calibrated).
        shapes: Per parameter: "uniform", "∪-shaped", "∩-shaped", "skewed ..." or "non-uniform"; a parameter
            that failed with no summary beyond 3 standard deviations gets the "weakly ..." shape it leans to.
        alpha: Family-wise significance level; each parameter is tested at ``alpha / D``.
        test: Which p-values decide: "ks" or "chi2".
        passed: No parameter's p-value is below ``alpha / D``.
        parameter_names: One name per parameter.
        num_invalid: Simulations excluded because they contained NaN/inf.
    """

    ranks: Tensor
    num_posterior_samples: int
    ks_pvalues: Tensor
    chi2_pvalues: Tensor
    num_bins: int
    mean_ranks: Tensor
    lower_tail: Tensor
    upper_tail: Tensor
    shapes: tuple[str, ...]
    alpha: float
    test: str
    passed: bool
    parameter_names: tuple[str, ...]
    num_invalid: int = 0

    @property
    def num_datasets(self) -> int:
        """Number of (valid) datasets ``N``."""
        return self.ranks.shape[0]

    @property
    def threshold(self) -> float:
        """The Bonferroni-corrected per-parameter threshold ``alpha / D``."""
        return self.alpha / self.ranks.shape[1]

    @property
    def pvalues(self) -> Tensor:
        """The p-values that decide the verdict (``ks_pvalues`` or ``chi2_pvalues``)."""
        return self.ks_pvalues if self.test == "ks" else self.chi2_pvalues

    @property
    def failed_parameters(self) -> tuple[str, ...]:
        """Names of the parameters whose ranks are not uniform."""
        return tuple(n for n, p in zip(self.parameter_names, self.pvalues) if p < self.threshold)

    def __str__(self) -> str:
        test = "Kolmogorov-Smirnov" if self.test == "ks" else f"chi-square ({self.num_bins} bins)"
        lines = [
            f"SBC: ranks of the true parameters among {self.num_posterior_samples} posterior draws, "
            f"{self.num_datasets} datasets"
            + (f" ({self.num_invalid} invalid simulations excluded)" if self.num_invalid else ""),
            f"  {test} test of rank uniformity per parameter, threshold alpha/D = {self.threshold:.3g}",
        ]
        width = max(len(n) for n in self.parameter_names)
        for i, name in enumerate(self.parameter_names):
            mark = "FAIL" if self.pvalues[i] < self.threshold else "ok"
            lines.append(
                f"  {name:<{width}}  KS p={self.ks_pvalues[i]:.3g}  chi2 p={self.chi2_pvalues[i]:.3g}  "
                f"mean rank {self.mean_ranks[i]:.3f}  tails {self.lower_tail[i]:.3f}/"
                f"{self.upper_tail[i]:.3f}  {mark}: {self.shapes[i]}"
            )
        if self.passed:
            lines.append("  PASSED: rank histograms are consistent with uniform (calibrated marginals).")
        else:
            lines.append(
                f"  FAILED for {', '.join(self.failed_parameters)}; read the shapes: ∪-shaped = "
                "over-confident (posterior too narrow), ∩-shaped = under-confident (too wide), "
                "skewed = biased."
            )
        return "\n".join(lines)


@torch_threads()
def sbc(
    posterior: object,
    prior: Distribution | None = None,
    simulator: Simulator | None = None,
    *,
    theta: Tensor | None = None,
    x: Tensor | None = None,
    num_datasets: int = 1000,
    num_posterior_samples: int = 1000,
    seed: int | None = 0,
    alpha: float = 0.01,
    test: Literal["ks", "chi2"] = "ks",
    num_bins: int | None = None,
    parameter_names: Sequence[str] | None = None,
    batch_size: int | None = None,
    progress: bool = False,
) -> SBCResult:
    """Simulation-based calibration of a posterior over ``num_datasets`` simulated datasets.

    Args:
        posterior: Implements ``sample_batched(n, xs) -> (n, B, D)``.
        prior: Prior with event shape ``(D,)``; needed unless ``theta`` and ``x`` are given.
        simulator: Maps ``theta`` (N, D) to ``x`` (N, *x_shape); needed unless ``theta``, ``x`` given.
        theta: Precomputed true parameters ``(N, D)`` (e.g. from :func:`simulate_datasets`).
        x: Precomputed simulations ``(N, *x_shape)`` matching ``theta``.
        num_datasets: Number of datasets to simulate (ignored with ``theta``/``x``).
        num_posterior_samples: Posterior draws per dataset, ``L``.
        seed: Seeds the simulations and posterior draws (torch's global generator is restored
            afterwards); ``None`` uses and advances it.
        alpha: Family-wise significance level, in (0, 1).
        test: "ks" (default) or "chi2" decides the verdict; both p-values are reported.
        num_bins: Bins of the chi-square test; default ``min(20, N // 10, L + 1)``, at least 2.
        parameter_names: Names for the report; default ``theta_1, ..., theta_D``.
        batch_size: At most this many datasets per ``sample_batched`` call; ``None`` = one call.
        progress: Show a progress bar over the posterior calls (one call unless ``batch_size`` splits the
            datasets); the result is the same with or without it.

    Returns:
        An :class:`SBCResult`; ``print`` it for a readable report.

    Raises:
        TypeError: If the posterior lacks ``sample_batched`` or inputs are not tensors.
        ValueError: On inconsistent shapes or options out of range.

    Example:
        >>> prior = torch.distributions.MultivariateNormal(torch.zeros(2), torch.eye(2))
        >>> class Exact:  # x = theta + N(0, 1) noise: posterior N(x / 2, I / 2)
        ...     def sample_batched(self, n, xs):
        ...         return xs / 2 + torch.randn(n, *xs.shape) / 2**0.5
        >>> result = sbc(Exact(), prior, lambda t: t + torch.randn_like(t), num_datasets=300)
        >>> result.passed
        True
    """
    check_posterior(posterior, "sample_batched")
    _check_options(alpha, test)
    check_num_posterior_samples(num_posterior_samples, "sbc")
    with seeded(seed):
        theta, x, num_invalid = calibration_pairs(
            prior, simulator, theta=theta, x=x, num_datasets=num_datasets, check="sbc",
            padded_trials=padded_trials(posterior), theta_dim=getattr(posterior, "theta_dim", None)
        )
        draws = posterior_draws(posterior, num_posterior_samples, x, batch_size=batch_size,
                                progress="SBC draws" if progress else None)
        jitter_seed = int(torch.randint(0, 2**62, ()))  # the rank randomisation's, from the same stream
    if draws.shape[2] != theta.shape[1]:
        raise ValueError(
            f"posterior draws have {draws.shape[2]} parameters but theta has {theta.shape[1]}"
        )
    ranks = (draws < theta.unsqueeze(0)).sum(0)  # (N, D)
    names = _parameter_names(parameter_names, theta.shape[1])
    stats = rank_statistics(ranks, num_posterior_samples, num_bins=num_bins, seed=jitter_seed)
    pvalues = stats["ks_pvalues"] if test == "ks" else stats["chi2_pvalues"]
    threshold = alpha / theta.shape[1]
    stats["shapes"] = tuple(  # a failed parameter whose shape reads "uniform" at Z_SHAPE: the side it leans to
        _lean(*(float(stats[k][i]) for k in ("mean_ranks", "lower_tail", "upper_tail")), len(ranks))
        if shape == "uniform" and pvalues[i] < threshold else shape for i, shape in enumerate(stats["shapes"]))
    return SBCResult(
        ranks=ranks,
        num_posterior_samples=num_posterior_samples,
        alpha=float(alpha),
        test=test,
        passed=bool((pvalues >= threshold).all()),
        parameter_names=names,
        num_invalid=num_invalid,
        **stats,
    )


def rank_statistics(
    ranks: Tensor, num_posterior_samples: int, *, num_bins: int | None = None, seed: int = 0
) -> dict:
    """Uniformity tests and shape summaries of SBC ranks ``(N, D)`` in ``0..num_posterior_samples``.

    The KS test, the mean rank and the tail fractions use the randomised normalised ranks
    ``(r + U) / (L + 1)`` with ``U ~ Uniform(0, 1)`` from a generator seeded with ``seed``: uniform on
    (0, 1) exactly when the ranks are uniform on ``0..L``. The chi-square test bins the integer ranks.

    Returns a dict with ``ks_pvalues``, ``chi2_pvalues``, ``num_bins``, ``mean_ranks``,
    ``lower_tail``, ``upper_tail`` (tensors of shape ``(D,)``) and ``shapes`` (one label each).

    Example:
        >>> ranks = torch.randint(0, 101, (500, 2), generator=torch.Generator().manual_seed(0))
        >>> stats = rank_statistics(ranks, 100)
        >>> stats["shapes"]
        ('uniform', 'uniform')
    """
    if not isinstance(ranks, Tensor) or ranks.ndim != 2:
        got = tuple(ranks.shape) if isinstance(ranks, Tensor) else type(ranks).__name__
        raise ValueError(f"ranks must be a tensor of shape (N, D), got {got}")
    check_int(num_posterior_samples, "num_posterior_samples", minimum=1)
    if ranks.numel() and (int(ranks.min()) < 0 or int(ranks.max()) > num_posterior_samples):
        raise ValueError(f"ranks must lie in 0..num_posterior_samples = 0..{num_posterior_samples}, got "
                         f"{int(ranks.min())}..{int(ranks.max())}")
    num, _ = ranks.shape
    num_levels = num_posterior_samples + 1
    if num_bins is None:
        num_bins = max(2, min(20, num // 10, num_levels))
    check_int(num_bins, "num_bins (at most L + 1)", minimum=2, maximum=num_levels)
    check_int(seed, "seed", minimum=0)
    ranks_np = ranks.numpy().astype(np.int64)
    jitter = torch.rand(ranks.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    unit = (ranks_np + jitter.numpy()) / num_levels  # randomised ranks, exactly uniform if calibrated
    ks = scipy.stats.ks_1samp(unit, scipy.stats.uniform.cdf, axis=0).pvalue

    # Chi-square with exact expected counts: bin b holds the ranks k with k * bins // (L + 1) == b.
    levels_per_bin = np.bincount(np.arange(num_levels) * num_bins // num_levels, minlength=num_bins)
    bin_of = ranks_np * num_bins // num_levels  # (N, D)
    observed = np.stack([np.bincount(col, minlength=num_bins) for col in bin_of.T], axis=1)
    expected = num * levels_per_bin[:, None] / num_levels
    chi2 = scipy.stats.chisquare(observed, expected, axis=0).pvalue

    mean = unit.mean(0)
    lower, upper = (unit < TAIL).mean(0), (unit > 1 - TAIL).mean(0)
    shapes = tuple(_shape(m, lo, hi, num) for m, lo, hi in zip(mean, lower, upper))
    return {
        "ks_pvalues": torch.as_tensor(np.atleast_1d(ks), dtype=torch.float64),
        "chi2_pvalues": torch.as_tensor(np.atleast_1d(chi2), dtype=torch.float64),
        "num_bins": num_bins,
        "mean_ranks": torch.as_tensor(mean, dtype=torch.float64),
        "lower_tail": torch.as_tensor(lower, dtype=torch.float64),
        "upper_tail": torch.as_tensor(upper, dtype=torch.float64),
        "shapes": shapes,
    }


def _z_scores(mean: float, lower: float, upper: float, num: int) -> tuple[float, float, float, float]:
    """z-scores under uniformity of the mean rank, each tail fraction and the two tails together."""
    z_mean = (mean - 0.5) / np.sqrt(1.0 / (12.0 * num))
    tail_sd = np.sqrt(TAIL * (1 - TAIL) / num)
    z_lower, z_upper = (lower - TAIL) / tail_sd, (upper - TAIL) / tail_sd
    z_outer = (lower + upper - 2 * TAIL) / np.sqrt(2 * TAIL * (1 - 2 * TAIL) / num)
    return z_mean, z_lower, z_upper, z_outer


def _lean(mean: float, lower: float, upper: float, num: int) -> str:
    """The label of a parameter whose test failed while no summary passed :data:`Z_SHAPE`: the larger of the mean's
    and the tails' deviations says which way it leans.

    Example:
        >>> _lean(0.5, 0.11, 0.12, 1000)
        'weakly ∪-shaped (leans over-confident: posterior too narrow)'
    """
    z_mean, _, _, z_outer = _z_scores(mean, lower, upper, num)
    if abs(z_mean) >= abs(z_outer):
        side = "above" if z_mean > 0 else "below"
        return f"weakly skewed: truth {side} most draws (leans biased)"
    if z_outer > 0:
        return "weakly ∪-shaped (leans over-confident: posterior too narrow)"
    return "weakly ∩-shaped (leans under-confident: posterior too wide)"


def _shape(mean: float, lower: float, upper: float, num: int) -> str:
    """Label a rank histogram from its mean and tail fractions (z-scores under uniformity)."""
    z_mean, z_lower, z_upper, z_outer = _z_scores(mean, lower, upper, num)
    labels = []
    # Dispersion raises (∪) or lowers (∩) both tails; bias raises one tail and lowers the other.
    if z_outer > Z_SHAPE and min(z_lower, z_upper) > 0:
        labels.append("∪-shaped (over-confident: posterior too narrow)")
    elif z_outer < -Z_SHAPE and max(z_lower, z_upper) < 0:
        labels.append("∩-shaped (under-confident: posterior too wide)")
    if z_mean > Z_SHAPE:
        labels.append("skewed: truth above most draws (biased, posterior underestimates)")
    elif z_mean < -Z_SHAPE:
        labels.append("skewed: truth below most draws (biased, posterior overestimates)")
    if labels:
        return "; ".join(labels)
    return "uniform" if max(abs(z_outer), abs(z_mean)) <= Z_SHAPE else "non-uniform"


def _parameter_names(names: Sequence[str] | None, dim: int) -> tuple[str, ...]:
    if names is None:
        return tuple(f"theta_{i + 1}" for i in range(dim))
    names = tuple(str(n) for n in names)
    if len(names) != dim:
        raise ValueError(f"parameter_names must have {dim} entries (one per parameter), got {len(names)}")
    return names


def _check_options(alpha: float, test: str) -> None:
    check_real(alpha, "alpha", low=0, high=1, low_open=True, high_open=True)
    check_choice(test, "test", ("ks", "chi2"))

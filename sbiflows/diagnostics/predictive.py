"""Posterior predictive check: does the observation look like data the fitted posterior predicts?

Draw ``theta_j ~ q(theta | x_o)`` and simulate ``x_j ~ simulator(theta_j)``; then ask whether
``x_o`` is extreme among the ``x_j``:

* per dimension, the quantile of ``x_o`` among the predictive draws (ties count half);
* jointly, the distance of ``x_o`` from the predictive mean -- Mahalanobis with the predictive
  covariance (pseudo-inverse, so constant summaries do not break it) or Euclidean on standardised
  dimensions -- compared with the same distance of every predictive draw:
  ``p = (1 + #{j : d(x_j) >= d(x_o)}) / (n + 1)``.

Rule: the check passes if ``p >= alpha`` and no dimension's quantile lies outside
``[alpha / (2 x_dim), 1 - alpha / (2 x_dim)]`` (a two-sided, Bonferroni-corrected tail test; with
``n`` draws a quantile resolves ``1 / n``, so with many dimensions this flags an ``x_o`` outside
the range of all draws). A failure means the posterior puts its mass where the simulator cannot
reproduce the observation: a poor posterior, or a misspecified simulator. A posterior predictive
check uses ``x_o`` twice and is therefore conservative: passing does not prove calibration.

With a posterior whose embedding takes NaN-padded sets of trials (``posterior.net.padded_trials``, the
set embedding), ``x`` of shape ``(trials, features)`` is a set: the check compares the statistics of
each set that do not depend on the trials' order or padding -- its number of trials and each feature's
mean and standard deviation over its trials -- instead of the values trial by trial.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from sbiflows.checks import check_choice, check_int, check_real
from sbiflows.diagnostics.simulations import MIN_POSTERIOR_SAMPLES, check_posterior, padded_trials, seeded
from sbiflows.threads import torch_threads
from sbiflows.xshape import trial_mask, valid_rows

__all__ = ["PredictiveResult", "posterior_predictive"]


@dataclass(frozen=True)
class PredictiveResult:
    """Outcome of :func:`posterior_predictive`.

    Attributes:
        x_o: The observation, shape ``(x_dim,)``, or the posterior's ``x_shape`` (compared value by value,
            a set by its statistics).
        predictive: Valid posterior-predictive simulations, shape ``(n, *x_shape)``.
        quantiles: Per compared value (dimension of ``x``, or statistic of a set), the fraction of
            predictive draws below ``x_o``.
        extreme_dimensions: Indices of the compared values whose quantile is outside the accepted range.
        distance: Distance of ``x_o`` from the predictive mean.
        distances: The same distance for each predictive draw, shape ``(n,)``.
        distance_pvalue: ``(1 + #{distances >= distance}) / (n + 1)``.
        metric: "mahalanobis" or "standardized".
        alpha: Significance level.
        passed: ``distance_pvalue >= alpha`` and no extreme dimension.
        num_invalid: Predictive simulations excluded because they contained NaN/inf (for sets: outside
            padding trials, or no finite trial).
        statistics: Names of the compared values for sets (``"trials"``, ``"mean[j]"``, ``"std[j]"``);
            ``None`` when ``x`` is compared value by value.
    """

    x_o: Tensor
    predictive: Tensor
    quantiles: Tensor
    extreme_dimensions: tuple[int, ...]
    distance: float
    distances: Tensor
    distance_pvalue: float
    metric: str
    alpha: float
    passed: bool
    num_invalid: int = 0
    statistics: tuple[str, ...] | None = None

    @property
    def num_samples(self) -> int:
        """Number of valid predictive simulations."""
        return self.predictive.shape[0]

    def __str__(self) -> str:
        dims = self.quantiles.numel()
        shown = ", ".join(f"{q:.3f}" for q in self.quantiles[:8]) + (" ..." if dims > 8 else "")
        lines = [
            f"Posterior predictive check: x_o ({f'a set: {dims} statistics' if self.statistics else f'{dims}-D'}) "
            f"against {self.num_samples} simulations from "
            "posterior draws"
            + (f" ({self.num_invalid} invalid simulations excluded)" if self.num_invalid else ""),
            f"  {self.metric} distance of x_o from the predictive mean {self.distance:.3f}; "
            f"fraction of draws at least as far p = {self.distance_pvalue:.3g} (alpha {self.alpha:.3g})",
            f"  quantile of x_o per {'set statistic' if self.statistics else 'dimension'}: {shown}",
        ]
        if self.extreme_dimensions:
            extreme = [self.statistics[i] for i in self.extreme_dimensions] if self.statistics \
                else list(self.extreme_dimensions)
            lines.append(f"  extreme {'statistics' if self.statistics else 'dimensions'} (quantile in the outer "
                         f"alpha/(2 x_dim) tails): {extreme}")
        if self.passed:
            lines.append("  PASSED: x_o is typical of the data the posterior predicts.")
        else:
            lines.append(
                "  FAILED: x_o is extreme under the posterior predictive; the posterior (or the "
                "simulator) does not reproduce the observation."
            )
        return "\n".join(lines)


@torch_threads()
def posterior_predictive(
    posterior: object,
    simulator: Callable[[Tensor], Tensor],
    x_o: Tensor,
    *,
    num_samples: int = 1000,
    seed: int | None = 0,
    alpha: float = 0.01,
    metric: Literal["mahalanobis", "standardized"] = "mahalanobis",
) -> PredictiveResult:
    """Compare ``x_o`` with simulations from posterior draws given ``x_o``.

    Args:
        posterior: Implements ``sample(n, x=x_o) -> (n, D)``.
        simulator: Maps ``theta`` (n, D) to ``x`` (n, x_dim).
        x_o: The observation, shape ``(x_dim,)``, or the posterior's ``x_shape`` (compared value by value,
            a set by its statistics).
        num_samples: Posterior draws, one simulation each (must exceed ``x_dim`` for
            ``metric="mahalanobis"``).
        seed: Seeds the posterior draws and simulations (torch's global generator is restored
            afterwards); ``None`` uses and advances it.
        alpha: Significance level, in (0, 1).
        metric: "mahalanobis" (predictive covariance) or "standardized" (per-dimension sd).

    Returns:
        A :class:`PredictiveResult`; ``print`` it for a readable report.

    Raises:
        TypeError: If the posterior lacks ``sample`` or inputs are not tensors.
        ValueError: On wrong shapes, non-finite ``x_o`` or options out of range.

    Example:
        >>> class Exact:  # x = theta + N(0, 1) noise, prior N(0, I): posterior N(x / 2, I / 2)
        ...     def sample(self, n, x):
        ...         return x / 2 + torch.randn(n, x.shape[-1]) / 2**0.5
        >>> simulator = lambda t: t + torch.randn_like(t)
        >>> posterior_predictive(Exact(), simulator, torch.tensor([0.3, -0.5])).passed
        True
    """
    check_posterior(posterior, "sample")
    if not callable(simulator):
        raise TypeError(
            f"simulator must be callable (theta (n, D) -> x (n, x_dim)), got {type(simulator).__name__}"
        )
    if not isinstance(x_o, Tensor):
        raise TypeError(f"x_o must be a torch.Tensor of shape (x_dim,), got {type(x_o).__name__}")
    if not x_o.is_floating_point():
        raise TypeError(f"x_o must have a floating-point dtype, got {x_o.dtype}")
    structure = tuple(getattr(posterior, "x_shape", None) or ())  # a posterior trained on structured x
    if len(structure) == 1 and tuple(x_o.shape) != structure:
        raise ValueError(f"x_o must have the posterior's x shape {structure}, got {tuple(x_o.shape)}")
    if len(structure) > 1:
        if tuple(x_o.shape) != structure or not x_o.is_floating_point():
            raise ValueError(
                f"x_o must be a floating-point tensor of the posterior's x_shape {structure}, got {x_o.dtype} "
                f"{tuple(x_o.shape)}"
            )
    elif x_o.ndim != 1 or not x_o.is_floating_point():
        raise ValueError(
            f"x_o must be a floating-point tensor of shape (x_dim,), got {x_o.dtype} {tuple(x_o.shape)}"
        )
    sets = padded_trials(posterior) and x_o.ndim == 2
    if not bool(valid_rows(x_o[None], padded_trials=sets).all()):
        raise ValueError("x_o contains NaN/inf values" + (
            " outside all-NaN padding trials, or no finite trial" if sets else ""))
    check_int(num_samples, "num_samples", minimum=2)
    check_real(alpha, "alpha", low=0, high=1, low_open=True, high_open=True)
    check_choice(metric, "metric", ("mahalanobis", "standardized"))
    x_shape = tuple(x_o.shape)

    with seeded(seed):
        theta = posterior.sample(num_samples, x=x_o)  # type: ignore[attr-defined]
        if not isinstance(theta, Tensor) or theta.ndim != 2 or theta.shape[0] != num_samples:
            got = tuple(theta.shape) if isinstance(theta, Tensor) else type(theta).__name__
            raise ValueError(
                f"posterior.sample({num_samples}, x=x_o) must return shape ({num_samples}, D), got {got}"
            )
        theta = theta.detach().cpu()  # the simulator gets CPU tensors, whatever the posterior's device
        predictive = simulator(theta)
    if not isinstance(predictive, Tensor) or predictive.shape != (num_samples, *x_shape):
        got = tuple(predictive.shape) if isinstance(predictive, Tensor) else type(predictive).__name__
        wanted = ", ".join(map(str, (num_samples, *x_shape)))
        raise ValueError(f"simulator must return shape ({wanted}) matching x_o, got {got}")
    predictive = predictive.detach().double()
    valid = valid_rows(predictive, padded_trials=sets)
    num_invalid = int((~valid).sum())
    if num_invalid:
        warnings.warn(
            f"posterior_predictive: excluded {num_invalid} of {num_samples} predictive simulations "
            "with NaN/inf values",
            UserWarning,
            stacklevel=2,
        )
        predictive = predictive[valid]
    statistics = set_statistic_names(x_shape[1]) if sets else None
    # structured x is compared value by value (flat indices in extreme_dimensions); a set by its statistics
    compared = set_statistics(predictive) if sets else predictive.reshape(len(predictive), -1)
    obs = (set_statistics(x_o.detach().double()[None]) if sets else x_o.detach().double().reshape(1, -1))[0]
    x_dim = obs.numel()
    num = predictive.shape[0]
    if num < 2:
        raise ValueError(f"posterior_predictive: only {num} valid predictive simulations; need at least 2")
    if num < MIN_POSTERIOR_SAMPLES:
        warnings.warn(
            f"posterior_predictive: only {num} valid predictive simulations; use at least "
            f"{MIN_POSTERIOR_SAMPLES} for a reliable verdict",
            UserWarning,
            stacklevel=2,
        )
    if metric == "mahalanobis" and num <= x_dim:
        raise ValueError(
            f"metric='mahalanobis' needs more valid predictive simulations ({num}) than data "
            f"dimensions ({x_dim}); raise num_samples or use metric='standardized'"
        )

    quantiles = ((compared < obs).double().mean(0) + 0.5 * (compared == obs).double().mean(0))
    edge = alpha / (2 * x_dim)
    extreme = tuple(int(i) for i in torch.nonzero((quantiles < edge) | (quantiles > 1 - edge)).flatten())
    distances, distance = _distances(compared, obs, metric)
    pvalue = (1 + int((distances >= distance).sum())) / (num + 1)
    return PredictiveResult(
        x_o=x_o.detach(),
        predictive=predictive.to(x_o.dtype),
        quantiles=quantiles,
        extreme_dimensions=extreme,
        distance=distance,
        distances=distances,
        distance_pvalue=pvalue,
        metric=metric,
        alpha=float(alpha),
        passed=pvalue >= alpha and not extreme,
        num_invalid=num_invalid,
        statistics=statistics,
    )


def set_statistics(x: Tensor) -> Tensor:
    """``(N, 1 + 2 F)``: per set of ``x`` ``(N, trials, F)``, its number of finite trials and each feature's
    mean and standard deviation (``1 / n``) over them; NaN-padded trials are left out.

    Example:
        >>> x = torch.tensor([[[1.0, 4.0], [3.0, 8.0], [float("nan"), float("nan")]]])
        >>> set_statistics(x)
        tensor([[2., 2., 6., 1., 2.]])
    """
    mask = trial_mask(x).unsqueeze(-1)  # (N, trials, 1)
    count = mask.sum(1).to(x.dtype)  # (N, 1)
    filled = torch.where(mask, x, torch.zeros_like(x))
    mean = filled.sum(1) / count
    spread = torch.where(mask, x - mean.unsqueeze(1), torch.zeros_like(x))
    std = (spread.square().sum(1) / count).sqrt()
    return torch.cat([count, mean, std], dim=1)


def set_statistic_names(num_features: int) -> tuple[str, ...]:
    """Names of :func:`set_statistics`' columns for sets of ``num_features`` features."""
    return ("trials", *(f"mean[{j}]" for j in range(num_features)), *(f"std[{j}]" for j in range(num_features)))


def _distances(predictive: Tensor, obs: Tensor, metric: str) -> tuple[Tensor, float]:
    """Distances of every predictive draw and of ``obs`` from the predictive mean."""
    mean = predictive.mean(0)
    diffs = torch.cat([predictive, obs.unsqueeze(0)]) - mean  # (n + 1, x_dim); last row is x_o
    if metric == "mahalanobis":
        precision = torch.linalg.pinv(torch.cov(predictive.T).reshape(mean.numel(), -1), hermitian=True)
        sq = ((diffs @ precision) * diffs).sum(1).clamp_min(0)
    else:
        std = predictive.std(0)
        scaled = diffs / torch.where(std > 0, std, torch.ones_like(std))
        # A constant dimension: zero distance if x_o matches it, infinitely far otherwise.
        scaled = torch.where((std > 0) | (diffs == 0), scaled, torch.full_like(scaled, torch.inf))
        sq = scaled.square().sum(1)
    dist = sq.sqrt()
    return dist[:-1], float(dist[-1])

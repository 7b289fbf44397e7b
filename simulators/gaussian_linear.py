"""Gaussian linear tasks: a 10-D Gaussian location model under a Gaussian or a uniform prior.

Also home of :func:`sample_truncated_normal`, the exact inverse-CDF sampler that the closed-form
reference posteriors of ``gaussian_linear_uniform`` and ``gaussian_mixture`` are built on.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.distributions import Distribution, Independent, MultivariateNormal, Uniform

from simulators.base import Task

__all__ = ["GaussianLinear", "GaussianLinearUniform", "sample_truncated_normal"]

DIM = 10
#: Variance of the simulator noise (sbibm: precision matrix ``inverse(0.1 * I)``).
NOISE_VARIANCE = 0.1


def _names(dim: int) -> tuple[str, ...]:
    return tuple(rf"$\theta_{{{k}}}$" for k in range(1, dim + 1))


def sample_truncated_normal(
    loc: Tensor,
    scale: Tensor | float,
    low: Tensor | float,
    high: Tensor | float,
    num_samples: int,
    *,
    generator: torch.Generator,
) -> Tensor:
    """Exact samples of independent normals ``N(loc, scale^2)`` truncated to ``[low, high]``.

    Inverse-CDF sampling in float64 (intervals in the upper tail are reflected to the lower tail,
    where the normal CDF keeps its relative precision), rounded to float32 inside ``[low, high)``,
    so that every sample has positive density under ``torch.distributions.Uniform(low, high)``.

    Args:
        loc: Means, shape ``(D,)``.
        scale: Standard deviations, broadcastable to ``(D,)``.
        low: Lower bounds, broadcastable to ``(D,)``.
        high: Upper bounds, broadcastable to ``(D,)``.
        num_samples: Number of samples.
        generator: Source of randomness.

    Returns:
        Samples of shape ``(num_samples, D)``, float32.

    Example:
        >>> s = sample_truncated_normal(torch.zeros(2), 1.0, 0.0, 1.0, 5,
        ...                             generator=torch.Generator().manual_seed(0))
        >>> bool(((s >= 0) & (s <= 1)).all())
        True
    """
    loc = torch.as_tensor(loc, dtype=torch.float64)
    a = (torch.as_tensor(low, dtype=torch.float64) - loc) / scale
    b = (torch.as_tensor(high, dtype=torch.float64) - loc) / scale
    a, b = torch.broadcast_tensors(a, b)
    flip = a > 0
    a, b = torch.where(flip, -b, a), torch.where(flip, -a, b)
    cdf_a, cdf_b = torch.special.ndtr(a), torch.special.ndtr(b)
    if not bool((cdf_b > cdf_a).all()):
        raise ValueError("truncation interval has (numerically) zero probability mass")
    u = torch.rand(num_samples, a.shape[-1], generator=generator, dtype=torch.float64)
    z = torch.special.ndtri(cdf_a + u * (cdf_b - cdf_a))
    samples = (loc + scale * torch.where(flip, -z, z)).to(torch.float32)
    low32 = torch.as_tensor(low, dtype=torch.float32)
    high32 = torch.as_tensor(high, dtype=torch.float32)
    return torch.minimum(torch.maximum(samples, low32), torch.nextafter(high32, low32))


class _GaussianLinearBase(Task):
    """Shared simulator and likelihood: ``x ~ N(theta, 0.1 I)`` in 10 dimensions."""

    theta_dim = DIM
    x_dim = DIM
    parameter_names = _names(DIM)

    def _simulate(self, theta: Tensor, generator: torch.Generator) -> Tensor:
        noise = torch.randn(theta.shape, generator=generator, dtype=theta.dtype)
        return theta + math.sqrt(NOISE_VARIANCE) * noise

    def log_likelihood(self, theta: Tensor, x: Tensor) -> Tensor:
        """``log N(x; theta, 0.1 I)``, shape ``(N,)``, for theta ``(N, 10)`` and x ``(10,)`` or ``(N, 10)``."""
        theta, x = self._check_likelihood_args(theta, x)
        squared = ((x - theta) ** 2).sum(-1) / NOISE_VARIANCE
        return -0.5 * squared - 0.5 * DIM * math.log(2 * math.pi * NOISE_VARIANCE)


class GaussianLinear(_GaussianLinearBase):
    r"""Gaussian linear (sbibm ``gaussian_linear``): infer the mean of a 10-D Gaussian.

    .. math::
        \theta \sim \mathcal N(0, 0.1\, I_{10}), \qquad x \mid \theta \sim \mathcal N(\theta, 0.1\, I_{10}).

    The posterior is Gaussian (conjugacy): :math:`\mathcal N(x_o / 2,\ 0.05\, I_{10})`, sampled exactly.

    Example:
        >>> task = GaussianLinear()
        >>> task.simulate(task.prior.sample((3,)), seed=0).shape
        torch.Size([3, 10])
    """

    name = "gaussian_linear"
    data_folder = "gaussian_linear"
    #: Prior variance (sbibm: precision matrix ``inverse(0.1 * I)``).
    prior_variance = 0.1

    def _prior(self) -> Distribution:
        return MultivariateNormal(torch.zeros(DIM), self.prior_variance * torch.eye(DIM))

    def analytic_posterior(self, x: Tensor) -> MultivariateNormal:
        """The exact posterior ``p(theta | x)`` for one observation ``x`` of shape ``(10,)``.

        Precisions add: ``cov = (1/0.1 + 1/0.1)^-1 I = 0.05 I`` and ``mean = cov (x / 0.1) = x / 2``.
        """
        if not isinstance(x, Tensor) or x.shape != (DIM,):
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x must be a tensor of shape ({DIM},), got {got}")
        variance = 1.0 / (1.0 / self.prior_variance + 1.0 / NOISE_VARIANCE)
        loc = variance * x.to(torch.float32) / NOISE_VARIANCE
        return MultivariateNormal(loc, variance * torch.eye(DIM))

    def _reference_posterior(self, i: int, num_samples: int, generator: torch.Generator) -> Tensor:
        posterior = self.analytic_posterior(self.observation(i))
        noise = torch.randn(num_samples, DIM, generator=generator)
        return posterior.loc + noise @ posterior.scale_tril.T


class GaussianLinearUniform(_GaussianLinearBase):
    r"""Gaussian linear uniform (sbibm ``gaussian_linear_uniform``): the mean under a box prior.

    .. math::
        \theta \sim \mathcal U([-1, 1]^{10}), \qquad x \mid \theta \sim \mathcal N(\theta, 0.1\, I_{10}).

    The posterior is :math:`\mathcal N(x_o, 0.1\, I)` truncated to the box, independent across
    dimensions, and is sampled exactly per dimension by inverse CDF (sbibm rejection-samples it).

    Example:
        >>> task = GaussianLinearUniform()
        >>> task.reference_posterior(1, 4).shape
        torch.Size([4, 10])
    """

    name = "gaussian_linear_uniform"
    data_folder = "gaussian_linear_uniform"
    prior_bound = 1.0

    def _prior(self) -> Distribution:
        bound = torch.full((DIM,), self.prior_bound)
        return Independent(Uniform(-bound, bound), 1)

    def _reference_posterior(self, i: int, num_samples: int, generator: torch.Generator) -> Tensor:
        return sample_truncated_normal(
            self.observation(i),
            math.sqrt(NOISE_VARIANCE),
            -self.prior_bound,
            self.prior_bound,
            num_samples,
            generator=generator,
        )

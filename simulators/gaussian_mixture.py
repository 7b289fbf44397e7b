"""Gaussian mixture (sbibm ``gaussian_mixture``): a broad and a narrow Gaussian around ``theta``."""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.distributions import Distribution, Independent, Uniform

from simulators.base import Task
from simulators.gaussian_linear import sample_truncated_normal

__all__ = ["GaussianMixture"]

#: Standard deviations and weights of the two mixture components.
SCALES = (1.0, 0.1)
WEIGHTS = (0.5, 0.5)


class GaussianMixture(Task):
    r"""Gaussian mixture: infer the common mean of a two-component mixture in 2-D.

    .. math::
        \theta \sim \mathcal U([-10, 10]^2), \qquad
        x \mid \theta \sim 0.5\, \mathcal N(\theta, I_2) + 0.5\, \mathcal N(\theta, 0.01\, I_2).

    The mixture component is drawn per simulation (sbibm drew one component per batch, a bug fixed
    upstream in sbibm PR #54).

    Posterior: :math:`\propto 0.5\, \mathcal N(\theta; x_o, I) + 0.5\, \mathcal N(\theta; x_o, 0.01 I)`
    on the box, i.e. a two-component mixture of box-truncated Gaussians whose weights are
    ``0.5 * Z_k`` renormalized, ``Z_k`` being component ``k``'s mass inside the box. Sampled exactly
    (component by weight, then inverse CDF per dimension).

    Example:
        >>> task = GaussianMixture()
        >>> task.simulate(torch.zeros(3, 2), seed=0).shape
        torch.Size([3, 2])
    """

    name = "gaussian_mixture"
    theta_dim = 2
    x_dim = 2
    parameter_names = (r"$\theta_1$", r"$\theta_2$")
    data_folder = "gaussian_mixture"
    prior_bound = 10.0

    def _prior(self) -> Distribution:
        bound = torch.full((2,), self.prior_bound)
        return Independent(Uniform(-bound, bound), 1)

    def _simulate(self, theta: Tensor, generator: torch.Generator) -> Tensor:
        narrow = torch.rand(theta.shape[0], 1, generator=generator, dtype=theta.dtype) < WEIGHTS[1]
        scale = torch.where(narrow, SCALES[1], SCALES[0]).to(theta.dtype)
        return theta + scale * torch.randn(theta.shape, generator=generator, dtype=theta.dtype)

    def log_likelihood(self, theta: Tensor, x: Tensor) -> Tensor:
        """``log p(x | theta)``, shape ``(N,)``, for theta ``(N, 2)`` and x ``(2,)`` or ``(N, 2)``."""
        theta, x = self._check_likelihood_args(theta, x)
        squared = ((x - theta) ** 2).sum(-1)
        components = [
            math.log(w) - 0.5 * squared / s**2 - self.x_dim * math.log(math.sqrt(2 * math.pi) * s)
            for w, s in zip(WEIGHTS, SCALES)
        ]
        return torch.logaddexp(*components)

    def _component_masses(self, x: Tensor) -> Tensor:
        """``Z_k``: the mass of ``N(x, s_k^2 I)`` inside the prior box, for both components: (2,)."""
        x = x.to(torch.float64)
        masses = []
        for s in SCALES:
            upper = torch.special.ndtr((self.prior_bound - x) / s)
            lower = torch.special.ndtr((-self.prior_bound - x) / s)
            masses.append(torch.prod(upper - lower))
        return torch.stack(masses)

    def _reference_posterior(self, i: int, num_samples: int, generator: torch.Generator) -> Tensor:
        x = self.observation(i)
        weights = torch.tensor(WEIGHTS, dtype=torch.float64) * self._component_masses(x)
        component = torch.multinomial(weights, num_samples, replacement=True, generator=generator)
        draws = [
            sample_truncated_normal(
                x, s, -self.prior_bound, self.prior_bound, num_samples, generator=generator
            )
            for s in SCALES
        ]
        return torch.where((component == 1)[:, None], draws[1], draws[0])

"""Two moons (sbibm ``two_moons``): a crescent-shaped, bimodal posterior in 2-D."""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.distributions import Distribution, Independent, Uniform

from simulators.base import Task

__all__ = ["TwoMoons"]

A_LOW, A_HIGH = -math.pi / 2, math.pi / 2
R_LOC, R_SCALE = 0.1, 0.01
OFFSET = 0.25
_SQRT2 = math.sqrt(2.0)


class TwoMoons(Task):
    r"""Two moons: a noisy half circle, shifted by a folded rotation of ``theta``.

    .. math::
        \theta \sim \mathcal U([-1, 1]^2), \quad a \sim \mathcal U(-\tfrac\pi2, \tfrac\pi2), \quad
        r \sim \mathcal N(0.1, 0.01^2), \quad p = (r \cos a + 0.25,\ r \sin a),

        x = p + \Bigl(-\tfrac{|\theta_1 + \theta_2|}{\sqrt 2},\ \tfrac{-\theta_1 + \theta_2}{\sqrt 2}\Bigr).

    Likelihood: with ``(u, v) = p - (0.25, 0)`` recovered from ``x`` and ``theta``, the polar change
    of variables gives the density of ``p`` as
    :math:`\mathcal N(\pm\sqrt{u^2+v^2};\ 0.1, 0.01^2)\, /\, (\pi \sqrt{u^2+v^2})`, with the sign of
    ``u`` (``u < 0`` needs ``r < 0``, ten standard deviations away). sbibm's likelihood keeps only the
    Gaussian factor in ``r`` and sets ``u < 0`` to zero; this one is the exact density.

    Reference posterior: exact, by inverting the simulator. Draw ``p``; ``|z_1| = p_1 - x_1`` (rejected
    if negative) and ``z_2 = x_2 - p_2`` with a random sign for ``z_1``; rotate back
    ``theta = ((z_1 - z_2) / sqrt 2, (z_1 + z_2) / sqrt 2)`` and reject draws outside the prior box.
    (sbibm does the same without rejecting ``p_1 < x_1``.)

    Example:
        >>> task = TwoMoons()
        >>> task.simulate(torch.zeros(3, 2), seed=0).shape
        torch.Size([3, 2])
    """

    name = "two_moons"
    theta_dim = 2
    x_dim = 2
    parameter_names = (r"$\theta_1$", r"$\theta_2$")
    data_folder = "two_moons"
    prior_bound = 1.0

    def _prior(self) -> Distribution:
        bound = torch.full((2,), self.prior_bound)
        return Independent(Uniform(-bound, bound), 1)

    @staticmethod
    def _moon(num: int, generator: torch.Generator, dtype: torch.dtype) -> Tensor:
        """Draws of ``p``, the moon before the parameter-dependent shift: ``(num, 2)``."""
        a = A_LOW + (A_HIGH - A_LOW) * torch.rand(num, generator=generator, dtype=dtype)
        r = R_LOC + R_SCALE * torch.randn(num, generator=generator, dtype=dtype)
        return torch.stack([r * torch.cos(a) + OFFSET, r * torch.sin(a)], dim=-1)

    @staticmethod
    def _shift(theta: Tensor) -> Tensor:
        """The shift ``x - p = (-|theta_1 + theta_2| / sqrt 2, (theta_2 - theta_1) / sqrt 2)``."""
        z1 = (theta[..., 0] + theta[..., 1]) / _SQRT2
        z2 = (theta[..., 1] - theta[..., 0]) / _SQRT2
        return torch.stack([-z1.abs(), z2], dim=-1)

    def _simulate(self, theta: Tensor, generator: torch.Generator) -> Tensor:
        return self._moon(theta.shape[0], generator, theta.dtype) + self._shift(theta)

    def log_likelihood(self, theta: Tensor, x: Tensor) -> Tensor:
        """Exact ``log p(x | theta)``, shape ``(N,)``, for theta ``(N, 2)`` and x ``(2,)`` or ``(N, 2)``."""
        theta, x = self._check_likelihood_args(theta, x)
        p = x - self._shift(theta)
        u, v = p[..., 0] - OFFSET, p[..., 1]
        radius = torch.sqrt(u**2 + v**2)
        signed_r = torch.where(u < 0, -radius, radius)
        log_normal = -0.5 * ((signed_r - R_LOC) / R_SCALE) ** 2 - math.log(
            math.sqrt(2 * math.pi) * R_SCALE
        )
        return log_normal - math.log(math.pi) - torch.log(radius)

    def _reference_posterior(self, i: int, num_samples: int, generator: torch.Generator) -> Tensor:
        x = self.observation(i).to(torch.float64)
        accepted: list[Tensor] = []
        count, tries = 0, 0
        while count < num_samples:
            tries += 1
            if tries > 1000:
                raise RuntimeError(f"two_moons observation {i}: posterior rejection sampler stalled")
            batch = max(2 * (num_samples - count), 1024)
            p = self._moon(batch, generator, torch.float64)
            z1 = p[:, 0] - x[0]  # |z_1|
            z2 = x[1] - p[:, 1]
            sign = torch.where(torch.rand(batch, generator=generator) < 0.5, -1.0, 1.0)
            z1 = sign.to(torch.float64) * z1
            theta = torch.stack([(z1 - z2) / _SQRT2, (z1 + z2) / _SQRT2], dim=-1).to(torch.float32)
            inside = (p[:, 0] >= x[0]) & (theta.abs() < self.prior_bound).all(-1)
            accepted.append(theta[inside])
            count += int(inside.sum())
        return torch.cat(accepted)[:num_samples]

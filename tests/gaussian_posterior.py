"""An exact analytic posterior for the diagnostics tests, with knobs to make it wrong on purpose.

Model: ``theta ~ N(0, I_D)``, ``x | theta ~ N(theta, sigma^2 I_D)``. The posterior is
``N(m(x), s^2 I_D)`` with ``s^2 = sigma^2 / (1 + sigma^2)`` and ``m(x) = x / (1 + sigma^2)``.

:class:`GaussianPosterior` implements the posterior protocol of ``sbiflows.diagnostics`` for the
distorted posterior ``N(m(x) + shift * s, (scale * s)^2 I_D)``:

* ``scale < 1``: too narrow (over-confident); ``scale > 1``: too wide (under-confident);
* ``shift != 0``: biased by ``shift`` posterior standard deviations, in every coordinate.

``scale=1, shift=0`` is the exact posterior.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.distributions import MultivariateNormal


class GaussianLinearModel:
    """Prior ``N(0, I_D)`` and simulator ``x = theta + sigma * noise``; also a plain callable."""

    def __init__(self, dim: int = 2, sigma: float = 0.5) -> None:
        self.dim = dim
        self.sigma = sigma
        self.prior = MultivariateNormal(torch.zeros(dim), torch.eye(dim))
        self.parameter_names = tuple(f"theta_{i + 1}" for i in range(dim))

    def __call__(self, theta: Tensor) -> Tensor:
        return theta + self.sigma * torch.randn_like(theta)

    def posterior(
        self, *, scale: float = 1.0, shift: float = 0.0, batched_log_prob: bool = True
    ) -> GaussianPosterior:
        """The (possibly distorted) posterior; ``batched_log_prob=False`` hides ``log_prob_batched``."""
        cls = GaussianPosterior if batched_log_prob else GaussianPosteriorNoBatchedLogProb
        return cls(self.sigma, scale=scale, shift=shift)


class GaussianPosterior:
    """``N(x / (1 + sigma^2) + shift * s, (scale * s)^2 I)`` with ``s^2 = sigma^2 / (1 + sigma^2)``."""

    def __init__(self, sigma: float, *, scale: float = 1.0, shift: float = 0.0) -> None:
        self.post_sd = sigma / math.sqrt(1.0 + sigma**2)
        self.gain = 1.0 / (1.0 + sigma**2)
        self.scale = scale
        self.shift = shift

    def _loc(self, x: Tensor) -> Tensor:
        return self.gain * x + self.shift * self.post_sd

    @property
    def _sd(self) -> float:
        return self.scale * self.post_sd

    def sample(self, n: int, x: Tensor) -> Tensor:
        """``n`` draws given one ``x`` of shape ``(x_dim,)`` -> ``(n, D)``."""
        loc = self._loc(x)
        return loc + self._sd * torch.randn(n, loc.shape[-1])

    def sample_batched(self, n: int, xs: Tensor) -> Tensor:
        """``n`` draws given each row of ``xs`` (B, x_dim) -> ``(n, B, D)``."""
        loc = self._loc(xs)
        return loc + self._sd * torch.randn(n, *loc.shape)

    def log_prob(self, theta: Tensor, x: Tensor) -> Tensor:
        """``theta`` (N, D) given one ``x`` (x_dim,) -> ``(N,)``."""
        return self._log_normal(theta, self._loc(x))

    def log_prob_batched(self, theta: Tensor, xs: Tensor) -> Tensor:
        """``theta`` (n, B, D) given ``xs`` (B, x_dim) -> ``(n, B)``."""
        return self._log_normal(theta, self._loc(xs))

    def _log_normal(self, theta: Tensor, loc: Tensor) -> Tensor:
        z = (theta - loc) / self._sd
        dim = theta.shape[-1]
        return -0.5 * z.square().sum(-1) - dim * (math.log(self._sd) + 0.5 * math.log(2 * math.pi))


class GaussianPosteriorNoBatchedLogProb(GaussianPosterior):
    """The same posterior without ``log_prob_batched`` (exercises the per-dataset fallback)."""

    log_prob_batched = None  # type: ignore[assignment]

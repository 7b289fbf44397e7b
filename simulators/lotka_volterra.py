"""Lotka-Volterra predator-prey model with log-normal observation noise (sbibm ``lotka_volterra``).

Example:
    >>> task = LotkaVolterra()
    >>> task.simulate(task.true_parameters(1), seed=0).shape
    torch.Size([1, 20])
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor
from torch.distributions import Distribution, Independent, LogNormal

from simulators.ode import ODETask

NOISE_SCALE = 0.1
#: sbibm clamps the solution to this range before taking its log as the noise location.
CLAMP = (1e-10, 1e4)


class LotkaVolterra(ODETask):
    """Lotka-Volterra predator-prey dynamics: infer ``(alpha, beta, gamma, delta)``.

    Prior: ``alpha, gamma ~ LogNormal(-0.125, 0.5)``, ``beta, delta ~ LogNormal(-3, 0.5)``, independent.

    Dynamics (prey ``u``, predator ``v``; ``u(0) = 30``, ``v(0) = 1``)::

        du/dt =  alpha u - beta u v
        dv/dt = -gamma v + delta u v

    Observation: 10 times ``t_j = 2.1 j``, ``j = 0..9`` (sbibm saves ``t = 0, 0.1, ..., 20`` and keeps
    every 21st point: 0, 2.1, ..., 18.9); ``x = (u(t_0..t_9), v(t_0..t_9))`` (prey first) with independent
    noise ``x_k ~ LogNormal(log clip(mean_k, 1e-10, 1e4), 0.1)``.

    Numerics: solved in ``(log u, log v)`` per row with adaptive Dormand-Prince steps
    (``rtol = atol = 1e-8`` on the logs, about 1e-6 relative accuracy of the populations); see
    :class:`simulators.ode.ODETask` for failure handling. The likelihood is the exact log-normal density
    given that solution.

    Example:
        >>> task = LotkaVolterra()
        >>> task.noise_free(task.true_parameters(1))[0, [0, 10]].round(decimals=6).tolist()  # u(0), v(0)
        [30.0, 1.0]
    """

    name = "lotka_volterra"
    theta_dim = 4
    x_dim = 20
    #: Two channels (prey, predator) of 10 time points: the flat x is prey then predator.
    structure = (2, 10)
    default_embedding = "cnn1d"
    parameter_names = (r"$\alpha$", r"$\beta$", r"$\gamma$", r"$\delta$")
    data_folder = "lotka_volterra"
    cache_reference = True
    times = 2.1 * np.arange(10)

    def _prior(self) -> Distribution:
        loc = torch.tensor([-0.125, -3.0, -0.125, -3.0])
        return Independent(LogNormal(loc, torch.full((4,), 0.5)), 1)

    def _log_initial_state(self) -> np.ndarray:
        return np.log([30.0, 1.0])

    def _rhs_params(self, theta: np.ndarray) -> np.ndarray:
        alpha, beta, gamma, delta = theta.T
        return np.stack([alpha, -gamma, -beta, delta], axis=1)

    def _log_rhs(self, log_y: np.ndarray, params: np.ndarray) -> np.ndarray:
        # d(log u)/dt = alpha - beta v,  d(log v)/dt = -gamma + delta u  (params from _rhs_params)
        return params[:, :2] + params[:, 2:] * np.exp(log_y[:, ::-1])

    def _mean(self, log_y: np.ndarray) -> Tensor:
        """Populations at the 10 times, prey then predator, clipped as in sbibm: (N, 20)."""
        populations = np.exp(log_y).transpose(0, 2, 1).reshape(len(log_y), -1)
        return torch.from_numpy(populations).clamp(*CLAMP)

    def _sample_noise(self, mean: Tensor, generator: torch.Generator) -> Tensor:
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype)
        return torch.exp(mean.log() + NOISE_SCALE * noise)

    def _noise_log_prob(self, mean: Tensor, x: Tensor) -> Tensor:
        """Log-normal log density summed over the 20 entries; ``-inf`` if any ``x <= 0``."""
        log_x = torch.where(x > 0, x, 1.0).log()
        z = (log_x - mean.log()) / NOISE_SCALE
        terms = -log_x - math.log(NOISE_SCALE) - 0.5 * math.log(2 * math.pi) - 0.5 * z**2
        return torch.where((x > 0).all(-1), terms.sum(-1), -math.inf)

"""SIR epidemic model observed through binomial samples of the infected fraction (sbibm ``sir``).

Example:
    >>> task = SIR()
    >>> x = task.simulate(task.true_parameters(1), seed=0)
    >>> x.shape
    torch.Size([1, 10])
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor
from torch.distributions import Distribution, Independent, LogNormal

from simulators.ode import ODETask

POPULATION = 1_000_000.0
TOTAL_COUNT = 1000


class SIR(ODETask):
    """SIR epidemic: infer the contact rate ``beta`` and recovery rate ``gamma`` (1/days).

    Prior: ``beta ~ LogNormal(log 0.4, 0.5)``, ``gamma ~ LogNormal(log 1/8, 0.2)``, independent.

    Dynamics (``N = 10^6``; ``S(0) = N - 1``, ``I(0) = 1``, ``R(0) = 0``)::

        dS/dt = -beta S I / N
        dI/dt =  beta S I / N - gamma I
        dR/dt =  gamma I

    Observation: ``x_j ~ Binomial(1000, clip(I(t_j) / N, 0, 1))`` independently at the 10 days
    ``t_j = 17 j``, ``j = 0..9`` (sbibm saves days 0..160 and keeps every 17th: 0, 17, ..., 153).

    Numerics: the ODE is solved in ``(log S, log I)`` (``R`` is not observed) per row with adaptive
    Dormand-Prince steps (``rtol = atol = 1e-8`` on the logs, i.e. about 1e-7 relative accuracy of
    ``I``); see :class:`simulators.ode.ODETask` for failure handling. The likelihood is the exact
    binomial pmf given that solution.

    Example:
        >>> task = SIR()
        >>> float(task.log_likelihood(task.true_parameters(1), task.observation(1))[0]) < 0
        True
    """

    name = "sir"
    theta_dim = 2
    x_dim = 10
    #: A one-channel series of the 10 days, for a 1-D CNN.
    structure = (1, 10)
    default_embedding = "cnn1d"
    parameter_names = (r"$\beta$", r"$\gamma$")
    data_folder = "sir"
    cache_reference = True
    times = 17.0 * np.arange(10)

    def _prior(self) -> Distribution:
        loc = torch.tensor([math.log(0.4), math.log(0.125)])
        return Independent(LogNormal(loc, torch.tensor([0.5, 0.2])), 1)

    def _log_initial_state(self) -> np.ndarray:
        return np.log([POPULATION - 1.0, 1.0])

    def _rhs_params(self, theta: np.ndarray) -> np.ndarray:
        beta, gamma = theta[:, 0], theta[:, 1]
        return np.stack([np.zeros_like(beta), -gamma, -beta / POPULATION, beta / POPULATION], axis=1)

    def _log_rhs(self, log_y: np.ndarray, params: np.ndarray) -> np.ndarray:
        # d(log S)/dt = -beta I / N,  d(log I)/dt = -gamma + beta S / N  (params from _rhs_params)
        return params[:, :2] + params[:, 2:] * np.exp(log_y[:, ::-1])

    def _mean(self, log_y: np.ndarray) -> Tensor:
        """Infected fraction ``I(t_j) / N``, clipped to [0, 1]."""
        return torch.from_numpy(np.exp(log_y[:, :, 1]) / POPULATION).clamp(0.0, 1.0)

    def _sample_noise(self, mean: Tensor, generator: torch.Generator) -> Tensor:
        return torch.binomial(torch.full_like(mean, float(TOTAL_COUNT)), mean, generator=generator)

    def _noise_log_prob(self, mean: Tensor, x: Tensor) -> Tensor:
        """Binomial(1000, mean) log pmf summed over the 10 days; ``-inf`` if ``x`` is not a valid count."""
        n = float(TOTAL_COUNT)
        valid = ((x >= 0) & (x <= n) & (x == x.round())).all(-1)
        x = x.clamp(0.0, n).round()
        log_choose = math.lgamma(n + 1) - torch.lgamma(x + 1) - torch.lgamma(n - x + 1)
        terms = log_choose + torch.xlogy(x, mean) + torch.special.xlog1py(n - x, -mean)
        return torch.where(valid, terms.sum(-1), -math.inf)

"""Bernoulli GLM tasks: a spiking neuron driven by a white-noise stimulus (sbibm ``bernoulli_glm(_raw)``).

Both tasks share the model and therefore the posterior; they differ in what is observed: the
10-dimensional sufficient statistic (``bernoulli_glm``) or the 100-bin spike train (``bernoulli_glm_raw``).

Example:
    >>> task = BernoulliGLM()
    >>> task.simulate(task.prior.sample((4,)), seed=0).shape
    torch.Size([4, 10])
"""

from __future__ import annotations

from functools import cache

import numpy as np
import torch
from torch import Tensor
from torch.distributions import Distribution, MultivariateNormal
from torch.nn.functional import softplus

from simulators.base import Task, data_path

NUM_BINS = 100
NUM_FILTER = 9


@cache
def design_matrix() -> Tensor:
    """The fixed design matrix ``V`` of shape (100, 10), float64 (shipped as package data).

    Column 0 is the intercept (all ones); column ``1 + j`` is the white-noise stimulus delayed by ``j``
    bins (zero before the stimulus starts), so ``(V theta)_t = beta_0 + sum_{j=0..8} h_j I_{t-j}``.
    """
    with data_path("bernoulli_glm", "design_matrix.csv").open() as fh:
        matrix = torch.from_numpy(np.loadtxt(fh, delimiter=",", dtype=np.float64))
    if matrix.shape != (NUM_BINS, 1 + NUM_FILTER):
        raise RuntimeError(f"packaged design matrix has shape {tuple(matrix.shape)}, expected (100, 10)")
    return matrix


def prior_precision() -> Tensor:
    """The prior precision matrix of sbibm, shape (10, 10), float64.

    ``beta_0`` has precision 0.5 (variance 2) and is independent of the filter. The filter ``h`` has
    precision ``F^T F`` with ``F = D^2 + diag(sqrt(j / 9))``, ``j = 0..8``, where ``D`` is the first-difference
    matrix (ones on the diagonal, -1 below it): ``D^2`` penalizes second differences (smooth filters) and
    the growing diagonal term shrinks the later filter taps towards zero.
    """
    eye = torch.eye(NUM_FILTER, dtype=torch.float64)
    first_diff = eye - torch.diag(torch.ones(NUM_FILTER - 1, dtype=torch.float64), -1)
    f = first_diff @ first_diff + torch.diag(torch.sqrt(torch.arange(NUM_FILTER, dtype=torch.float64) / NUM_FILTER))
    precision = torch.zeros(1 + NUM_FILTER, 1 + NUM_FILTER, dtype=torch.float64)
    precision[0, 0] = 0.5
    precision[1:, 1:] = f.T @ f
    return precision


class _BernoulliGLMBase(Task):
    """Model, prior, simulator and likelihood shared by both observation formats.

    Model (``t = 1..100``, ``V`` = :func:`design_matrix`)::

        theta = (beta_0, h_0..h_8) ~ N(0, prior_precision()^{-1})   (offset, stimulus filter)
        psi = V theta
        y_t ~ Bernoulli(sigmoid(psi_t)),  independently

    ``log p(y | theta) = y^T psi - sum_t softplus(psi_t) = theta^T (V^T y) - sum_t softplus((V theta)_t)``,
    so ``V^T y`` (spike count and spike-triggered stimulus sum) is a sufficient statistic.
    """

    theta_dim = 1 + NUM_FILTER
    parameter_names = (r"$\beta_0$",) + tuple(rf"$h_{j}$" for j in range(NUM_FILTER))
    data_folder = "bernoulli_glm"
    cache_reference = True
    #: Options of :func:`simulators.mcmc.sample_posterior` for the reference posterior (10,000 samples:
    #: 100 chains x 100 draws; observations 1-10: max R-hat 1.003, min ESS of the returned samples
    #: 9,700). Part of the cache key (see :meth:`Task.reference_posterior`).
    mcmc_options: dict = {"num_chains": 100, "warmup": 200, "thin": 2}

    def _prior(self) -> Distribution:
        loc = torch.zeros(self.theta_dim)
        return MultivariateNormal(loc, precision_matrix=prior_precision().to(torch.float32))

    def _spikes(self, theta: Tensor, generator: torch.Generator) -> Tensor:
        """Spike trains ``y`` of shape (N, 100), float32 zeros and ones (float32 as in sbibm, for speed)."""
        psi = theta.to(torch.float32) @ design_matrix().to(torch.float32).T
        uniform = torch.rand(psi.shape, generator=generator)
        return (uniform < torch.sigmoid(psi)).to(torch.float32)

    def _log_likelihood_from_statistic(self, theta: Tensor, statistic: Tensor) -> Tensor:
        """``theta^T s - sum_t softplus((V theta)_t)`` for ``s = V^T y``; shape (N,), theta's dtype."""
        matrix = design_matrix().to(theta.dtype)
        return (theta * statistic).sum(-1) - softplus(theta @ matrix.T).sum(-1)

    def _reference_posterior(self, i: int, num_samples: int, generator: torch.Generator) -> Tensor:
        # MCMC on the exact raw-data likelihood (sbibm uses Polya-Gamma Gibbs sampling instead).
        from simulators.mcmc import sample_posterior

        statistic = design_matrix().T @ BernoulliGLMRaw().observation(i).to(torch.float64)
        samples, self.last_diagnostics = sample_posterior(
            lambda theta: self._log_likelihood_from_statistic(theta, statistic.to(theta.dtype)),
            self.prior,
            num_samples,
            generator=generator,
            return_diagnostics=True,
            **self.mcmc_options,
        )
        return samples


class BernoulliGLM(_BernoulliGLMBase):
    """Bernoulli GLM observed through its sufficient statistic ``x = V^T y`` (10-D).

    ``x_1`` is the spike count ``sum_t y_t``; ``x_{2..10}`` is the spike-triggered stimulus sum
    ``sum_t y_t I_{t-j}``, ``j = 0..8`` (sbibm computes it as a padded ``conv1d``; the packaged observations
    equal ``V^T y_obs`` to float32 precision). See :class:`_BernoulliGLMBase` for the model.

    Likelihood: ``x`` is discrete, and ``p(x | theta) = sum_{y: V^T y = x} p(y | theta)
    = c(x) exp(theta^T x - sum_t softplus((V theta)_t))`` with ``c(x) = #{y : V^T y = x}``. The map
    ``y -> V^T y`` is injective for this (continuous, random) stimulus almost surely, so ``c(x) = 1`` on the
    support, but :meth:`log_likelihood` returns ``theta^T x - sum_t softplus((V theta)_t)``, which is exact
    only *up to the additive constant* ``log c(x)``: it does not depend on ``theta``, so likelihood ratios,
    posteriors and MCMC are exact; it does not check that ``x`` is attainable (where the truth is ``-inf``).

    Example:
        >>> task = BernoulliGLM()
        >>> task.log_likelihood(task.true_parameters(1), task.observation(1)).shape
        torch.Size([1])
    """

    name = "bernoulli_glm"
    x_dim = 1 + NUM_FILTER
    observation_file = "observation.csv"

    def _simulate(self, theta: Tensor, generator: torch.Generator) -> Tensor:
        return self._spikes(theta, generator).to(torch.float64) @ design_matrix()

    def log_likelihood(self, theta: Tensor, x: Tensor) -> Tensor:
        """``log p(x | theta)`` up to a ``theta``-independent constant (see the class docstring).

        Args:
            theta: Shape (N, 10) or (10,); differentiable.
            x: Sufficient statistics, shape (10,) or (N, 10).

        Returns:
            Shape (N,), in ``theta``'s dtype.
        """
        theta, x = self._check_likelihood_args(theta, x)
        return self._log_likelihood_from_statistic(theta, x)


class BernoulliGLMRaw(_BernoulliGLMBase):
    """Bernoulli GLM observed as the raw 100-bin spike train ``x = y`` (100-D, zeros and ones).

    See :class:`_BernoulliGLMBase` for the model; the likelihood is exact:
    ``log p(y | theta) = sum_t [y_t psi_t - softplus(psi_t)]``, ``psi = V theta``.

    Example:
        >>> task = BernoulliGLMRaw()
        >>> y = task.simulate(task.true_parameters(1), seed=0)
        >>> sorted(set(y.flatten().tolist())) == [0.0, 1.0]
        True
    """

    name = "bernoulli_glm_raw"
    x_dim = NUM_BINS
    observation_file = "observation_raw.csv"
    #: As a set of 100 exchangeable trials (stimulus row ``V[t, 1:]``, spike ``y_t``): the likelihood
    #: ``prod_t Bernoulli(y_t | sigmoid(V_t theta))`` depends on the pairs only, not on their order.
    structure = (NUM_BINS, NUM_FILTER + 1)
    default_embedding = "set"

    def structured(self, x: Tensor) -> Tensor:
        """Spike trains ``(..., 100)`` as sets of (stimulus row, spike) pairs ``(..., 100, 10)``.

        The intercept column of the design (all ones) is left out: it carries nothing. NaN spike trains
        (failed simulations) stay all NaN.

        Example:
            >>> task = BernoulliGLMRaw()
            >>> pairs = task.structured(task.observation(1))
            >>> pairs.shape, bool((pairs[:, -1] == task.observation(1)).all())
            (torch.Size([100, 10]), True)
        """
        if x.shape[-1:] != (self.x_dim,):
            raise ValueError(f"x must have shape (..., {self.x_dim}), got {tuple(x.shape)}")
        stimulus = design_matrix()[:, 1:].to(x.dtype).expand(*x.shape[:-1], NUM_BINS, NUM_FILTER)
        failed = torch.isnan(x).any(-1)[..., None, None]
        stimulus = torch.where(failed, torch.full_like(stimulus, float("nan")), stimulus)
        return torch.cat([stimulus, x[..., None]], -1)

    def _simulate(self, theta: Tensor, generator: torch.Generator) -> Tensor:
        return self._spikes(theta, generator)

    def reference_posterior(self, i: int, num_samples: int = 10_000, *, seed: int = 0, progress: bool = False) -> Tensor:
        """The same posterior as :class:`BernoulliGLM` (``V^T y`` is sufficient): shares its samples and cache."""
        task = BernoulliGLM()
        task.mcmc_options = self.mcmc_options
        samples = task.reference_posterior(i, num_samples, seed=seed, progress=progress)
        self.last_diagnostics = task.last_diagnostics
        return samples

    def log_likelihood(self, theta: Tensor, x: Tensor) -> Tensor:
        """Exact ``log p(y | theta)`` of spike trains ``x = y``.

        Args:
            theta: Shape (N, 10) or (10,); differentiable.
            x: Spike trains of zeros and ones, shape (100,) or (N, 100).

        Returns:
            Shape (N,), in ``theta``'s dtype.

        Raises:
            ValueError: If ``x`` has entries other than 0 and 1.
        """
        theta, x = self._check_likelihood_args(theta, x)
        if not bool(((x == 0) | (x == 1)).all()):
            raise ValueError("x must be a spike train of zeros and ones for bernoulli_glm_raw")
        return self._log_likelihood_from_statistic(theta, x @ design_matrix().to(theta.dtype))

"""SLCP (simple likelihood, complex posterior) and its variant with 92 distractor dimensions."""

from __future__ import annotations

import io
import math
from functools import cached_property
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.distributions import Distribution, Independent, Uniform

from simulators.base import Task, data_path
from simulators.mcmc import sample_posteriors

__all__ = ["SLCP", "SLCPDistractors"]

NUM_POINTS = 4
#: Added to the covariance diagonal, as sbibm's simulator does ("to ensure PSD").
JITTER = 1e-6
PRIOR_BOUND = 3.0


def _covariance(theta: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Entries ``(S11, S12, S22)`` of the 2x2 covariance for each row of ``theta``, float64."""
    theta = theta.to(torch.float64)
    s1, s2, rho = theta[:, 2] ** 2, theta[:, 3] ** 2, torch.tanh(theta[:, 4])
    return s1**2 + JITTER, rho * s1 * s2, s2**2 + JITTER


def slcp_log_likelihood(theta: Tensor, x: Tensor) -> Tensor:
    """``log p(x | theta)`` of SLCP for theta ``(N, 5)`` and x ``(N or 1, 8)``, float64 ``(N,)``."""
    s11, s12, s22 = _covariance(theta)
    det = s11 * s22 - s12**2
    d = x.to(torch.float64).reshape(x.shape[0], NUM_POINTS, 2) - theta[:, None, :2].to(torch.float64)
    d1, d2 = d[..., 0], d[..., 1]
    quad = (s22[:, None] * d1**2 - 2 * s12[:, None] * d1 * d2 + s11[:, None] * d2**2) / det[:, None]
    return -0.5 * quad.sum(-1) - NUM_POINTS * (math.log(2 * math.pi) + 0.5 * torch.log(det))


class SLCP(Task):
    r"""SLCP: four 2-D Gaussian draws whose mean and covariance depend nonlinearly on ``theta``.

    .. math::
        \theta \sim \mathcal U([-3, 3]^5), \quad s_1 = \theta_3^2, \quad s_2 = \theta_4^2, \quad
        \rho = \tanh \theta_5,

        x = (x_1, \dots, x_4),\ x_j \overset{iid}\sim \mathcal N\Bigl((\theta_1, \theta_2),
        \begin{pmatrix} s_1^2 + \epsilon & \rho s_1 s_2 \\ \rho s_1 s_2 & s_2^2 + \epsilon \end{pmatrix}
        \Bigr), \quad \epsilon = 10^{-6},

    flattened to 8 numbers ``(x_11, x_12, x_21, ...)``. The jitter ``epsilon`` is sbibm's.

    The posterior is symmetric under ``theta_3 -> -theta_3`` and ``theta_4 -> -theta_4`` (four mirror
    modes). Reference posterior (cached on disk): slice-sampling MCMC (:mod:`simulators.mcmc`) on the
    exact likelihood over the folded prior ``theta_3, theta_4 >= 0``, then independent random signs
    for ``theta_3`` and ``theta_4``: exact by the symmetry, and all four modes get equal weight
    (sbibm used importance resampling and rejection sampling instead).

    Example:
        >>> task = SLCP()
        >>> task.simulate(task.true_parameters(1), seed=0).shape
        torch.Size([1, 8])
    """

    name = "slcp"
    theta_dim = 5
    x_dim = 2 * NUM_POINTS
    parameter_names = tuple(rf"$\theta_{k}$" for k in range(1, 6))
    data_folder = "slcp"
    cache_reference = True
    #: Options of :func:`simulators.mcmc.sample_posterior` for the reference posterior (for 10,000
    #: samples, observations 1-10: max R-hat 1.013, min ESS of the returned samples 5,900, without
    #: extension). Part of the cache key (see :meth:`Task.reference_posterior`).
    mcmc_options: dict[str, Any] = {"num_chains": 100, "warmup": 200, "thin": 4}

    def _prior(self) -> Distribution:
        bound = torch.full((5,), PRIOR_BOUND)
        return Independent(Uniform(-bound, bound), 1)

    def _simulate(self, theta: Tensor, generator: torch.Generator) -> Tensor:
        s11, s12, s22 = _covariance(theta)
        l11 = torch.sqrt(s11)  # Cholesky factor of the 2x2 covariance, in closed form
        l21 = s12 / l11
        l22 = torch.sqrt((s22 - l21**2).clamp_min(0.0))
        eps = torch.randn(theta.shape[0], NUM_POINTS, 2, generator=generator, dtype=torch.float64)
        x1 = theta[:, None, 0].to(torch.float64) + l11[:, None] * eps[..., 0]
        x2 = theta[:, None, 1].to(torch.float64) + l21[:, None] * eps[..., 0] + l22[:, None] * eps[..., 1]
        return torch.stack([x1, x2], dim=-1).reshape(theta.shape[0], 2 * NUM_POINTS).to(theta.dtype)

    def log_likelihood(self, theta: Tensor, x: Tensor) -> Tensor:
        """Exact ``log p(x | theta)``, shape ``(N,)``, for theta ``(N, 5)`` and x ``(8,)`` or ``(N, 8)``."""
        theta, x = self._check_likelihood_args(theta, x)
        return slcp_log_likelihood(theta, x).to(theta.dtype)

    def _reference_posterior(self, i: int, num_samples: int, generator: torch.Generator) -> Tensor:
        return self.posterior_samples(self.observation(i), num_samples, generator)

    def posterior_samples(self, x_o: Tensor, num_samples: int, generator: torch.Generator) -> Tensor:
        """MCMC samples of ``p(theta | x_o)`` for SLCP observations, using the sign symmetry.

        Several observations are sampled at once (chains of all of them share the batched likelihood
        calls); the diagnostics are stored in :attr:`last_diagnostics`.

        Args:
            x_o: One observation, shape ``(8,)``, or ``K`` of them, shape ``(K, 8)``.
            num_samples: Number of samples per observation.
            generator: Source of randomness.

        Returns:
            Shape ``(num_samples, 5)`` for one observation, ``(K, num_samples, 5)`` for ``K``.

        Raises:
            ValueError: If ``x_o`` has another shape.
            simulators.mcmc.ConvergenceError: If the chains fail the checks (with ``mcmc_options``'
                default ``on_failure="raise"``).
        """
        if not isinstance(x_o, Tensor) or x_o.ndim not in (1, 2) or x_o.shape[-1] != 2 * NUM_POINTS:
            got = tuple(x_o.shape) if isinstance(x_o, Tensor) else type(x_o).__name__
            raise ValueError(f"x_o must be a tensor of shape ({2 * NUM_POINTS},) or (K, {2 * NUM_POINTS}), got {got}")
        low = torch.full((5,), -PRIOR_BOUND)
        low[2:4] = 0.0
        folded_prior = Independent(Uniform(low, torch.full((5,), PRIOR_BOUND)), 1)
        x = x_o.reshape(-1, 2 * NUM_POINTS)
        samples, diagnostics = sample_posteriors(
            lambda theta, k: slcp_log_likelihood(theta, x[k]),
            folded_prior,
            len(x),
            num_samples,
            generator=generator,
            return_diagnostics=True,
            **self.mcmc_options,
        )
        signs = torch.where(torch.rand(len(x), num_samples, 2, generator=generator) < 0.5, -1.0, 1.0)
        samples[..., 2:4] *= signs
        if x_o.ndim == 1:
            self.last_diagnostics = diagnostics.select(0)
            return samples[0]
        self.last_diagnostics = diagnostics
        return samples


class SLCPDistractors(SLCP):
    r"""SLCP with 92 uninformative distractor dimensions (sbibm ``slcp_distractors``), 100-D data.

    .. math::
        x = \operatorname{permute}\bigl(\operatorname{concat}(x_{\mathrm{SLCP}}, d)\bigr), \qquad
        d \sim \sum_{k=1}^{20} \tfrac{1}{20}\, t_{2}(\mu_k, L_k L_k^\top),

    with ``d`` independent of ``theta`` from sbibm's mixture of 20 multivariate Student-t (df 2),
    and sbibm's fixed permutation: ``x[:, j] = concat[:, perm[j]]``.

    Likelihood: SLCP's likelihood of the un-permuted first 8 entries plus the distractor log density.
    The posterior equals SLCP's for the extracted 8-D observation, which for the ten published
    observations is exactly SLCP's observation ``i``: the reference samples are SLCP's (same cache).

    Example:
        >>> task = SLCPDistractors()
        >>> task.observation(1).shape
        torch.Size([100])
    """

    name = "slcp_distractors"
    x_dim = 100
    #: Flat on purpose: as a set, which points are the informative ones would be hidden. An MLP picks them out.
    default_embedding = "mlp"
    observation_file = "observation_distractors.csv"

    @cached_property
    def _distractors(self) -> dict[str, Tensor]:
        blob = np.load(io.BytesIO(data_path("slcp", "distractor_gmm.npz").read_bytes()))
        perm_text = data_path("slcp", "permutation_idx.txt").read_text()
        perm = torch.tensor([int(v) for v in perm_text.split()])
        df = float(blob["df"])
        if df != round(df) or df < 1:
            raise ValueError(f"distractor_gmm.npz: df must be a positive integer, got {df}")
        loc, tril = torch.from_numpy(blob["loc"]), torch.from_numpy(blob["scale_tril"])
        inverse_perm = torch.argsort(perm)  # concat column c sits at x column inverse_perm[c]
        columns = inverse_perm[2 * NUM_POINTS :]
        weight_x = torch.zeros(loc.shape[0], loc.shape[1], len(perm))
        weight_x[:, :, columns] = tril.mT.to(torch.float32)
        bias_x = torch.zeros(loc.shape[0], len(perm))
        bias_x[:, columns] = loc.to(torch.float32)
        return {
            "loc": loc.to(torch.float64),  # float64 for the density: scale_tril is ill-conditioned
            "scale_tril": tril.to(torch.float64),
            "loc32": loc.to(torch.float32),  # float32 for sampling
            "scale_tril32": tril.to(torch.float32),
            "weight_x": weight_x,  # scale_tril^T padded to x's 100 permuted columns
            "bias_x": bias_x,
            "df": torch.tensor(df),
            "log_weights": torch.log_softmax(torch.from_numpy(blob["mixture_logits"]).double(), 0),
            "perm": perm,
            "inverse_perm": inverse_perm,
        }

    def _draw_distractors(
        self, num: int, generator: torch.Generator, weight: Tensor, bias: Tensor
    ) -> Tensor:
        """``num`` i.i.d. rows ``bias[k] + t @ weight[k]`` with ``k`` a random component and ``t`` a
        standard multivariate t draw: shape ``(num, weight.shape[-1])``.

        Rows are computed grouped by component (one matmul per component, written in place) and
        then copied to their random row: no per-row gathers of the 92x92 factors.
        """
        gmm = self._distractors
        df = int(gmm["df"])
        component = torch.multinomial(gmm["log_weights"].exp(), num, replacement=True,
                                      generator=generator)
        order = torch.argsort(component, stable=True)  # grouped row j goes to row order[j]
        counts = torch.bincount(component, minlength=len(bias)).tolist()
        normal = torch.randn(num, weight.shape[1], generator=generator)  # i.i.d.: already "grouped"
        chi2 = (torch.randn(num, df, generator=generator) ** 2).sum(-1, keepdim=True)
        normal.mul_(torch.sqrt(df / chi2))  # multivariate t = normal / sqrt(chi2 / df)
        grouped = torch.empty(num, weight.shape[-1])
        for k, (block, target) in enumerate(zip(normal.split(counts), grouped.split(counts))):
            if counts[k]:
                torch.addmm(bias[k], block, weight[k], out=target)
        return torch.empty_like(grouped).index_copy_(0, order, grouped)

    def sample_distractors(self, num: int, generator: torch.Generator) -> Tensor:
        """I.i.d. draws of the 92 distractors from the Student-t mixture, ``(num, 92)``, float32."""
        gmm = self._distractors
        return self._draw_distractors(num, generator, gmm["scale_tril32"].mT, gmm["loc32"])

    def distractor_log_prob(self, d: Tensor) -> Tensor:
        """Log density of the distractor mixture at ``d`` of shape ``(N, 92)``, float64 ``(N,)``."""
        gmm = self._distractors
        d = d.to(torch.float64)
        df, dim = float(gmm["df"]), d.shape[1]
        const = math.lgamma((df + dim) / 2) - math.lgamma(df / 2) - dim / 2 * math.log(df * math.pi)
        per_component = []
        for k in range(gmm["loc"].shape[0]):
            tril = gmm["scale_tril"][k]
            white = torch.linalg.solve_triangular(tril, (d - gmm["loc"][k]).T, upper=False)
            maha = (white**2).sum(0)
            log_det = torch.log(tril.diagonal().abs()).sum()
            per_component.append(const - log_det - (df + dim) / 2 * torch.log1p(maha / df))
        return torch.logsumexp(torch.stack(per_component, -1) + gmm["log_weights"], dim=-1)

    def _simulate(self, theta: Tensor, generator: torch.Generator) -> Tensor:
        gmm = self._distractors
        data = super()._simulate(theta, generator)
        # The distractors are drawn straight into their permuted columns (the factors are padded with
        # zero columns where the SLCP data go), then the data fill those columns.
        x = self._draw_distractors(theta.shape[0], generator, gmm["weight_x"], gmm["bias_x"])
        x[:, gmm["inverse_perm"][: 2 * NUM_POINTS]] = data.to(x.dtype)
        return x.to(theta.dtype)

    def split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Undo the permutation: ``(slcp_data (N, 8), distractors (N, 92))`` from x ``(N, 100)``."""
        unpermuted = x[..., self._distractors["inverse_perm"]]
        return unpermuted[..., : 2 * NUM_POINTS], unpermuted[..., 2 * NUM_POINTS :]

    def log_likelihood(self, theta: Tensor, x: Tensor) -> Tensor:
        """Exact ``log p(x | theta)``, shape ``(N,)``, for theta ``(N, 5)`` and x ``(100,)`` or ``(N, 100)``."""
        theta, x = self._check_likelihood_args(theta, x)
        data, distractors = self.split(x)
        log_lik = slcp_log_likelihood(theta, data) + self.distractor_log_prob(distractors)
        return log_lik.to(theta.dtype)

    def reference_posterior(self, i: int, num_samples: int = 10_000, *, seed: int = 0, progress: bool = False) -> Tensor:
        """SLCP's reference posterior for the 8-D data inside observation ``i`` (shares its cache)."""
        self._check_index(i)
        data, _ = self.split(self.observation(i))
        slcp = SLCP()
        slcp.mcmc_options = self.mcmc_options
        if torch.equal(data, slcp.observation(i)):
            samples = slcp.reference_posterior(i, num_samples, seed=seed, progress=progress)
            self.last_diagnostics = slcp.last_diagnostics
            return samples
        return super().reference_posterior(i, num_samples, seed=seed, progress=progress)

    def _reference_posterior(self, i: int, num_samples: int, generator: torch.Generator) -> Tensor:
        data, _ = self.split(self.observation(i))
        return self.posterior_samples(data, num_samples, generator)

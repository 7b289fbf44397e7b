"""The prior truncated to a posterior's highest-probability region: the proposal of truncated sequential NPE.

Deistler et al. (2022, "Truncated proposals for scalable and hassle-free simulation-based inference")
draw the simulations of round ``r + 1`` from

    p_r(theta)  ∝  p(theta) * 1[ q_r(theta | x_o) >= t_r ],

the prior restricted to the region where the current posterior estimate ``q_r`` has a log-density of
at least ``t_r``, the ``epsilon``-quantile of ``log q_r`` on ``q_r``'s own samples (``epsilon = 1e-4``).
The region then holds ``1 - epsilon`` of ``q_r``'s mass. Inside it the proposal is proportional to the
prior, so NPE's plain maximum-likelihood loss on these simulations still estimates the posterior there:
no importance weights and no atomic loss are needed.

:class:`TruncatedPrior` computes ``t_r`` and the *truncated volume* (the prior mass inside the region)
once, from ``num_threshold_samples`` draws of ``q_r`` (10^6 by default: a 1e-4 quantile from fewer
draws rests on too few points below it). The volume is the importance-sampling estimate
``E_q[p(theta) / q(theta | x_o) * 1[log q >= t]]`` on the same draws; it is unbiased, and its weights
are bounded (``q >= exp(t)`` inside the region), so it is accurate even for a region that holds one
millionth of the prior, where counting prior draws would find none.

Sampling never stalls:

* **Rejection** (the exact method) while the volume is at least ``min_acceptance`` (1e-3): prior draws
  in vectorized batches, kept where ``log q >= t``. If the acceptance turns out far below the estimate,
  the remainder switches to SIR.
* **Sampling-importance-resampling** (SIR, as in the paper) for a tinier region: for each sample,
  ``oversampling`` candidates are drawn from ``q_r`` (which lives on the region by construction), weighted
  by ``p(theta) / q_r(theta | x_o)`` (zero outside the region) and one is resampled. As ``oversampling``
  grows the draws follow the truncated prior exactly; with a finite number they lean towards ``q_r``'s
  high-density part (with one candidate they would be ``q_r`` itself). What this does to the loss: NPE
  trained on draws from a proposal ``p~`` estimates ``p(theta | x) * p~(theta) / p(theta)`` up to
  normalization, so SIR's lean towards ``q_r`` narrows the next posterior slightly towards ``q_r``'s mode
  (the bias of the uncorrected SNPE-A); the effect shrinks like ``1 / oversampling`` and is only
  present in rounds whose region is below ``min_acceptance``. Rejection from ``q`` with the envelope
  ``p / exp(t)`` would be exact, but its acceptance falls exponentially with the dimension (the range of
  ``q`` over its region grows), so SIR, whose cost is fixed, is the fallback that cannot stall. The reported ``acceptance`` of a SIR draw
  is the mean effective sample size of a candidate group divided by ``oversampling`` (1: the weights are
  equal, ``q_r`` matches the truncated prior; small: few candidates carry the draw).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.distributions import Distribution, constraints

from sbiflows.checks import check_int, check_real
from sbiflows.posterior import Posterior
from sbiflows.priors import check_prior, prior_device, prior_dtype, sample_seeded
from sbiflows.seeding import derive_seed

__all__ = ["Draw", "TruncatedPrior"]

#: Rows per vectorized batch of prior draws (rejection) or candidate groups (SIR).
MAX_BATCH = 2**17


@dataclass(frozen=True)
class Draw:
    """How the last :meth:`TruncatedPrior.sample` call went.

    Attributes:
        method: ``"rejection"``, ``"sir"``, or ``"rejection+sir"`` (rejection switched to SIR because its
            acceptance fell far below the estimate).
        num_samples: Samples returned.
        proposed: Prior draws tried by rejection (0 for SIR alone).
        accepted: Of those, the ones inside the region.
        acceptance: ``accepted / proposed`` for rejection; for SIR, the mean effective sample size per
            candidate group over ``oversampling`` (see the module docstring).
    """

    method: str
    num_samples: int
    proposed: int
    accepted: int
    acceptance: float


class TruncatedPrior(Distribution):
    """The prior restricted to ``{theta: log q(theta | x_o) >= t}`` (see the module docstring).

    A ``torch.distributions.Distribution`` with event shape ``(D,)``: ``sample`` draws from it (seeded,
    vectorized, never stalling), ``log_prob`` is the prior's log-density minus ``log(volume)`` inside the
    region and ``-inf`` outside, and :meth:`inside` tests membership.

    Args:
        prior: The prior ``p(theta)`` (as for :class:`~sbiflows.NPE`).
        posterior: The current estimate ``q(theta | x)``, a :class:`~sbiflows.Posterior` trained under ``prior``.
        x_o: The observation; None: the posterior's ``default_x``.
        quantile: ``epsilon``, the share of ``q``'s mass left outside the region, in ``(0, 0.5)``
            (default 1e-4, as in the paper).
        num_threshold_samples: Draws of ``q`` for the threshold and the volume (default 10^6);
            ``quantile * num_threshold_samples`` must be at least 10 (points below the quantile).
        min_acceptance: Rejection from the prior is used while the volume is at least this (default
            1e-3), SIR below it.
        oversampling: SIR candidates per sample (default 1024, as sbi's SIR; each costs one sample and
            one density evaluation of ``q``). Fewer are faster and lean further towards ``q``: on a
            region where ``q`` is peaked, 64 candidates gave a spread about 15% narrower than the
            truncated prior's, 1024 about 2% (``tests/test_truncation.py`` checks 1024).
        seed: Seeds the threshold draws.

    Attributes:
        threshold: ``t``, the log-density threshold.
        volume: The prior mass inside the region (its importance-sampling estimate, at most 1).
        volume_stderr: The standard error of that estimate.
        method: ``"rejection"`` or ``"sir"``: how :meth:`sample` draws.
        last_draw: A :class:`Draw` describing the latest :meth:`sample` call (None before).

    Example:
        >>> from sbiflows import NPE, box_uniform
        >>> prior = box_uniform([-3.0, -3.0], [3.0, 3.0])
        >>> theta = prior.sample((1000,)); x = theta + 0.1 * torch.randn_like(theta)
        >>> post = NPE(prior, transforms=2).fit(theta, x, max_epochs=20, progress=False)
        >>> region = TruncatedPrior(prior, post, torch.zeros(2), quantile=1e-3, num_threshold_samples=20_000)
        >>> region.volume < 0.2, region.method
        (True, 'rejection')
        >>> samples = region.sample((500,), seed=0)
        >>> bool(region.inside(samples).all()), region.last_draw.num_samples
        (True, 500)
    """

    arg_constraints: ClassVar[dict[str, constraints.Constraint]] = {}

    def __init__(
        self,
        prior: Distribution,
        posterior: Posterior,
        x_o: Any = None,
        *,
        quantile: float = 1e-4,
        num_threshold_samples: int = 1_000_000,
        min_acceptance: float = 1e-3,
        oversampling: int = 1024,
        seed: int = 0,
    ):
        self.prior = prior
        self._prior, dim = check_prior(prior)
        # SIR's draws come from the flow: they are cast to the prior's device and dtype
        self._device, self._dtype = prior_device(self._prior), prior_dtype(self._prior)
        if not isinstance(posterior, Posterior):
            raise TypeError(f"posterior must be a sbiflows Posterior, got {type(posterior).__name__}")
        if posterior.theta_dim != dim:
            raise ValueError(f"the posterior has {posterior.theta_dim} parameters but the prior has {dim}")
        self.quantile, self.num_threshold_samples, self.min_acceptance, self.oversampling = self.check_options(
            quantile=quantile, num_threshold_samples=num_threshold_samples, min_acceptance=min_acceptance,
            oversampling=oversampling)
        seed = check_int(seed, "seed")
        self.posterior = posterior
        self.x_o = posterior._single_observation(x_o)[0]  # default_x when None; a clear error if it has none
        draws, log_q = posterior.sample_and_log_prob_batched(self.num_threshold_samples, self.x_o[None],
                                                             seed=derive_seed(seed, "truncation"))
        draws, log_q = draws[:, 0], log_q[:, 0]  # posterior.sample's draws, with their densities from one pass
        k = max(1, int(self.quantile * len(log_q)))
        self.threshold = float(torch.kthvalue(log_q.double().cpu(), k).values)
        log_w = self._prior.log_prob(draws.to(self._device)).to(log_q.device).double() - log_q.double()
        log_w = torch.where(log_q >= self.threshold, log_w, torch.full_like(log_w, -math.inf))
        weights = (log_w - log_w.max()).exp()
        scale = float(log_w.max().exp())
        self.volume = min(1.0, float(weights.mean()) * scale)
        self.volume_stderr = float(weights.std()) * scale / math.sqrt(len(weights))
        self.method = "rejection" if self.volume >= self.min_acceptance else "sir"
        self.last_draw: Draw | None = None
        self._anchor = draws[int(log_q.argmax())].to(self._device)  # a point inside the region
        super().__init__(torch.Size(), torch.Size((dim,)), validate_args=False)

    @staticmethod
    def check_options(
        *, quantile: float, num_threshold_samples: int, min_acceptance: float = 1e-3, oversampling: int = 1024
    ) -> tuple[float, int, float, int]:
        """The options checked (TypeError/ValueError naming the option), without building a region.

        Example:
            >>> TruncatedPrior.check_options(quantile=1e-4, num_threshold_samples=10**6)
            (0.0001, 1000000, 0.001, 1024)
        """
        quantile = check_real(quantile, "quantile", low=0, high=0.5, low_open=True, high_open=True)
        num_threshold_samples = check_int(num_threshold_samples, "num_threshold_samples", minimum=1)
        if quantile * num_threshold_samples < 10:
            raise ValueError(
                f"num_threshold_samples * quantile must be at least 10 (draws below the quantile), got "
                f"{num_threshold_samples} * {quantile:g}; use num_threshold_samples >= {math.ceil(10 / quantile)}"
            )
        min_acceptance = check_real(min_acceptance, "min_acceptance", low=0, high=1, low_open=True)
        return quantile, num_threshold_samples, min_acceptance, check_int(oversampling, "oversampling", minimum=1)

    @constraints.dependent_property(is_discrete=False, event_dim=1)
    def support(self) -> constraints.Constraint:
        """The prior's support (the region is a subset of it; :meth:`inside` tests the region itself)."""
        return self._prior.support

    def __repr__(self) -> str:
        return (f"TruncatedPrior(volume={self.volume:.3g}, threshold={self.threshold:.4g}, quantile={self.quantile:g}, "
                f"method={self.method!r})")

    # --------------------------------------------------------------------------------- density
    def inside(self, theta: Tensor) -> Tensor:
        """Boolean ``theta.shape[:-1]``: inside the prior's support and ``log q(theta | x_o) >= threshold``."""
        theta = torch.as_tensor(theta)
        log_q = self.posterior.log_prob(theta, self.x_o)  # -inf outside the prior's support (and NaN-free)
        return (log_q >= self.threshold).to(theta.device)

    def log_prob(self, value: Tensor) -> Tensor:
        """``log p(theta) - log(volume)`` inside the region, ``-inf`` outside; shape ``value.shape[:-1]``."""
        value = torch.as_tensor(value, device=self._device)
        inside = self.inside(value)
        log_p = self._prior.log_prob(torch.where(inside[..., None], value, self._anchor.to(value.dtype)))
        return torch.where(inside, log_p - math.log(self.volume), torch.full_like(log_p, -math.inf))

    # -------------------------------------------------------------------------------- sampling
    @torch.no_grad()
    def sample(self, sample_shape: Any = (), *, seed: int | None = None) -> Tensor:
        """Draw from the truncated prior: shape ``(*sample_shape, D)``.

        Args:
            sample_shape: As for any ``torch.distributions`` distribution.
            seed: Seeds the draws (the same seed gives the same samples); None: a seed is drawn from
                torch's global generator, so ``torch.manual_seed`` makes the call reproducible.

        :attr:`last_draw` says which method ran and its acceptance.
        """
        shape = torch.Size(sample_shape)
        n = shape.numel()
        if seed is None:
            seed = int(torch.randint(2**62, ()))
        seed = check_int(seed, "seed")
        if n == 0:
            return torch.empty(*shape, self.event_shape[0], device=self._device)
        parts, proposed, accepted = [], 0, 0
        method = self.method
        if method == "rejection":
            # the cap: 20 times the draws the volume estimate predicts (plus a margin for tiny n)
            budget = 20 * n / self.volume + 10_000
            batch = 0
            while accepted < n and proposed < budget:
                m = int(min(MAX_BATCH, max(1_000, 1.2 * (n - accepted) / self.volume)))
                theta = self._prior_draws(m, derive_seed(seed, f"truncation/rejection/{batch}"))
                keep = theta[self.inside(theta).to(theta.device)]
                parts.append(keep[: n - accepted])
                proposed, accepted, batch = proposed + m, accepted + len(keep), batch + 1
            acceptance = accepted / proposed
            if accepted < n:
                method = "rejection+sir"
        got = sum(len(p) for p in parts)
        if got < n:
            sir, acceptance = self._sir(n - got, derive_seed(seed, "truncation/sir"))
            parts.append(sir)
        self.last_draw = Draw(method, n, proposed, min(accepted, n), float(acceptance))
        return torch.cat(parts).reshape(*shape, self.event_shape[0])

    def _prior_draws(self, m: int, seed: int) -> Tensor:
        return sample_seeded(self._prior, (m,), seed)

    def _sir(self, n: int, seed: int) -> tuple[Tensor, float]:
        """``n`` SIR draws (see the module docstring) and the mean effective sample size fraction."""
        k = self.oversampling
        generator = torch.Generator(device=self.posterior.device).manual_seed(seed)
        out, ess, done, empty = [], [], 0, 0
        groups_per_batch = max(1, MAX_BATCH // k)
        while done < n:
            if empty > 100:  # every weight zero 100 batches in a row: q puts (almost) no mass in its own region
                raise RuntimeError("SIR found no candidate inside the truncated region; the posterior is degenerate")
            g = min(groups_per_batch, n - done)
            candidates = self.posterior.sample(g * k, self.x_o, generator=generator)
            log_q = self.posterior.log_prob(candidates, self.x_o)
            log_w = self._prior.log_prob(candidates.to(self._device)).to(log_q.device) - log_q
            log_w = torch.where(log_q >= self.threshold, log_w, torch.full_like(log_w, -math.inf)).reshape(g, k)
            usable = torch.isfinite(log_w).any(1)
            log_w, candidates = log_w[usable], candidates.reshape(g, k, -1)[usable]
            weights = torch.softmax(log_w, dim=1)
            pick = torch.multinomial(weights, 1, generator=generator)[:, 0]
            out.append(candidates[torch.arange(len(pick), device=pick.device), pick])
            ess.append(1.0 / weights.square().sum(1) / k)
            done, empty = done + len(pick), (empty + 1 if len(pick) == 0 else 0)
        return torch.cat(out).to(self._device, self._dtype), float(torch.cat(ess).mean())

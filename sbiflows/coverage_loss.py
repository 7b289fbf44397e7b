"""Calibrated NPE: a training penalty on the coverage of the posterior's highest-density regions.

Falkiewicz et al. (2023, "Calibrating neural simulation-based inference with differentiable coverage
probability") add to NPE's loss a term that measures, on each minibatch, how far the posterior's
expected coverage is from the nominal levels. For a row ``(theta_i, x_i)`` the HPD rank is the share of
posterior draws given ``x_i`` whose density exceeds that of ``theta_i``:

    ``alpha_i = (1 / L) sum_j 1[log q(theta_ij | x_i) > log q(theta_i | x_i)]``,  ``theta_ij ~ q(. | x_i)``.

``theta_i`` lies in the HPD region of level ``gamma`` when ``alpha_i <= gamma``, so a calibrated posterior
has uniform ranks and an over-confident one ranks too many true parameters far out (``alpha`` near 1).
The penalty compares the sorted ranks of ``m`` rows with the uniform quantiles ``(k + 1/2) / m`` and
keeps only the excess, ``mean_k max(0, alpha_(k) - (k + 1/2) / m)^2``: it is zero for a conservative
posterior and pushes an over-confident one wider, like the paper's conservative variant.

Ranks are step functions of the densities. Their forward value is the hard count; their gradient is
that of ``sigmoid(difference / temperature)`` (a straight-through estimator, as in the paper). The
draws are reparameterized (base noise pushed through the flow's inverse with gradients), so the
penalty reaches the weights through the draws' densities and the true parameters' density.

Everything is computed in the space the flow is trained in. Ranks are invariant to a density's
normalizing constant, so the truncated space's normalizer (:mod:`sbiflows.truncated_space`) is not
needed; draws that fall outside a box prior's support are ranked as if they were inside.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sbiflows.checks import check_int, check_real

__all__ = ["CalibratedObjective", "coverage_penalty"]

#: Rows of each minibatch that the penalty ranks (the minibatch is in random order).
DEFAULT_ROWS = 64
#: Posterior draws per ranked row.
DEFAULT_DRAWS = 16


def coverage_penalty(log_q_truth: Tensor, log_q_draws: Tensor, *, temperature: float = 1.0) -> Tensor:
    """The one-sided coverage penalty of ``m`` rows: ``mean_k max(0, alpha_(k) - (k + 1/2) / m)^2``.

    Args:
        log_q_truth: ``(m,)`` log-densities of the true parameters.
        log_q_draws: ``(L, m)`` log-densities of ``L`` posterior draws per row.
        temperature: Width, in nats, of the sigmoid whose gradient stands in for the step's.

    Example:
        >>> truth = torch.zeros(4)
        >>> draws = torch.full((8, 4), -1.0)  # every truth more probable than every draw: ranks 0
        >>> float(coverage_penalty(truth, draws))
        0.0
        >>> float(coverage_penalty(truth, draws + 2.0))  # every truth less probable: ranks 1, over-confident
        0.328125
    """
    difference = (log_q_draws - log_q_truth) / temperature
    soft = torch.sigmoid(difference).mean(0)
    hard = (difference > 0).to(difference.dtype).mean(0)
    ranks = torch.sort(hard + (soft - soft.detach())).values
    m = ranks.shape[0]
    uniform = (torch.arange(m, device=ranks.device, dtype=ranks.dtype) + 0.5) / m
    return torch.relu(ranks - uniform).pow(2).mean()


class CalibratedObjective:
    """A training loss plus ``weight`` times the :func:`coverage_penalty` of part of each minibatch.

    An :data:`~sbiflows.training.Objective` for a :class:`~sbiflows.estimator.PosteriorNet` (the model
    NPE trains). The penalty needs posterior draws, so it is added in training mode only: validation
    (``model.eval()``, which :func:`~sbiflows.training.train` sets) scores the base loss alone, which
    keeps early stopping deterministic.

    Args:
        base: The loss the penalty is added to (e.g. :func:`~sbiflows.training.negative_log_likelihood`).
        weight: The penalty's weight ``>= 0`` (0: the base loss alone).
        rows: How many rows of each minibatch are ranked (``>= 2``; the first ones, which are a random
            subset because minibatches are shuffled); None: :data:`DEFAULT_ROWS`, read when the objective
            is made.
        draws: Posterior draws per ranked row (``>= 1``); None: :data:`DEFAULT_DRAWS`.
        seed: Seeds the draws' base noise (torch's global generator is untouched).

    Example:
        >>> from sbiflows.estimator import PosteriorNet
        >>> from sbiflows.flows import nsf
        >>> from sbiflows.training import negative_log_likelihood
        >>> net = PosteriorNet(nsf(2, 3, transforms=1, hidden_features=(8,)), nn.Identity(), theta_dim=2, x_dim=3)
        >>> u, x = torch.randn(6, 2), torch.randn(6, 3)
        >>> objective = CalibratedObjective(negative_log_likelihood, weight=100.0, rows=4, draws=8)
        >>> loss = objective(net, u, x, torch.arange(6))
        >>> bool(loss >= negative_log_likelihood(net, u, x, torch.arange(6)))
        True
    """

    def __init__(self, base, *, weight: float, rows: int | None = None, draws: int | None = None, seed: int = 0):
        self.base = base
        self.weight = check_real(weight, "coverage_penalty", low=0.0)
        self.rows = check_int(DEFAULT_ROWS if rows is None else rows, "rows", minimum=2)
        self.draws = check_int(DEFAULT_DRAWS if draws is None else draws, "draws", minimum=1)
        self.seed = check_int(seed, "seed", minimum=0)
        self._generator: torch.Generator | None = None

    def __call__(self, model: nn.Module, inputs: Tensor, context: Tensor | None, rows: Tensor) -> Tensor:
        """The base loss of ``rows`` plus, in training mode, ``weight`` times the penalty of their first rows."""
        loss = self.base(model, inputs, context, rows)
        if self.weight == 0 or not model.training or len(rows) < 2:
            return loss
        ranked = rows[: self.rows]
        features = model.context(context[ranked])
        log_q_truth = model.log_prob_given_context(inputs[ranked], features)
        noise = model.flow.base.sample((self.draws, len(ranked)), generator=self._noise_generator(inputs.device))
        log_q_draws = model.flow.from_base(noise, features)[1] - torch.log(model.u_scale).sum()
        return loss + self.weight * coverage_penalty(log_q_truth, log_q_draws)

    def _noise_generator(self, device: torch.device) -> torch.Generator:
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device).manual_seed(self.seed)
        return self._generator

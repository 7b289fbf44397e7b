"""Balanced NPE: a training penalty that pushes the posterior towards conservative (never over-confident).

Delaunoy et al. (2023, "Balancing simulation-based inference for conservative posteriors") read a
posterior estimator ``q(theta | x)`` as a classifier between joint pairs ``(theta, x) ~ p(theta, x)``
and marginal pairs ``(theta, x) ~ p(theta) p(x)``:

    ``d(theta, x) = sigmoid(log q(theta | x) - log p(theta))``.

A classifier is *balanced* when ``E_joint[d] + E_marginal[d] = 1``; the Bayes-optimal one is, and a
balanced classifier cannot be over-confident in the sense of expected coverage (the paper's
Theorem 1 and its NPE variant). Balanced NPE minimizes

    ``-mean log q(theta_i | x_i) + weight * (mean_i d(theta_i, x_i) + mean_i d(theta_j(i), x_i) - 1)^2``,

where ``theta_j(i)`` is another row's parameter in the same minibatch (the minibatch rolled by one:
rows are in random order, so these are draws from ``p(theta) p(x)``). The penalty is zero for the exact
posterior, so it changes the optimum only where the flow cannot reach it; there it trades some
sharpness (C2ST) for coverage. The paper uses ``weight = 100``.

Everything is computed in the flow's unconstrained space ``u`` (see :mod:`sbiflows.unconstrained`):
``log q(theta | x) - log p(theta) = log q_u(u | x) - log p_u(u)`` because the bijection's Jacobian
appears in both densities, so ``log p_u(u) = log p(theta) + log |det dtheta/du|`` is computed once per
training row.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sbiflows.checks import check_real

__all__ = ["BalancedObjective", "balance_penalty"]


def balance_penalty(log_ratio_joint: Tensor, log_ratio_marginal: Tensor) -> Tensor:
    """``(mean sigmoid(joint) + mean sigmoid(marginal) - 1)^2`` for log density ratios ``log q - log p``.

    Example:
        >>> zero = torch.zeros(4)  # q = p: the classifier says 1/2 everywhere, which is balanced
        >>> float(balance_penalty(zero, zero))
        0.0
        >>> round(float(balance_penalty(torch.full((4,), 10.0), torch.full((4,), 10.0))), 4)  # over-confident
        0.9998
    """
    return (torch.sigmoid(log_ratio_joint).mean() + torch.sigmoid(log_ratio_marginal).mean() - 1) ** 2


class BalancedObjective:
    """The balanced NPE loss of one training set, an :data:`~sbiflows.training.Objective`.

    Args:
        log_prior: ``(N,)`` prior log-density of every training row in the space the model is trained
            in (for NPE: ``log p(theta) + log |det dtheta/du|``), indexed like the training rows.
        weight: The penalty's weight ``lambda >= 0`` (0: the plain negative log-likelihood).

    Example:
        >>> from sbiflows.flows import maf
        >>> flow = maf(2, 2, transforms=1, hidden_features=(8,))
        >>> u, x = torch.randn(6, 2), torch.randn(6, 2)
        >>> log_prior = torch.distributions.Normal(0.0, 1.0).log_prob(u).sum(-1)
        >>> loss = BalancedObjective(log_prior, weight=100.0)(flow, u, x, torch.arange(6))
        >>> nll = -flow.log_prob(u, x).mean()
        >>> bool(loss >= nll)
        True
    """

    def __init__(self, log_prior: Tensor, *, weight: float):
        self.weight = check_real(weight, "balancing", low=0.0)
        if not isinstance(log_prior, Tensor) or log_prior.ndim != 1:
            raise ValueError(f"log_prior must be a 1-D tensor (one value per training row), got {log_prior!r:.80}")
        if not bool(torch.isfinite(log_prior).all()):
            raise ValueError("log_prior must be finite for every training row (rows outside the prior's support?)")
        self.log_prior = log_prior

    def __call__(self, model: nn.Module, inputs: Tensor, context: Tensor | None, rows: Tensor) -> Tensor:
        """Mean negative log-likelihood of ``rows`` plus ``weight`` times their balance penalty."""
        context = None if context is None else context[rows]
        log_q = model.log_prob(inputs[rows], context)
        loss = -log_q.mean()
        if self.weight == 0 or len(rows) < 2:
            return loss
        others = rows.roll(1)  # another row's parameter for every x: marginal pairs
        log_q_marginal = model.log_prob(inputs[others], context)
        penalty = balance_penalty(log_q - self.log_prior[rows], log_q_marginal - self.log_prior[others])
        return loss + self.weight * penalty

"""Balanced NPE (NPE(prior, balancing=...)): the penalty, its objective and its effect on training."""

from __future__ import annotations

import pytest
import torch
from torch.distributions import Independent, Normal, Uniform

from sbiflows import NPE, load
from sbiflows.balance import BalancedObjective, balance_penalty
from sbiflows.flows import maf
from sbiflows.training import negative_log_likelihood, train

PRIOR = Independent(Uniform(-torch.ones(2), torch.ones(2)), 1)


def data(n=400, seed=0):
    generator = torch.Generator().manual_seed(seed)
    theta = 2 * torch.rand(n, 2, generator=generator) - 1
    return theta, theta + 0.2 * torch.randn(n, 2, generator=generator)


def test_penalty_is_zero_when_balanced_and_positive_when_over_confident():
    zero = torch.zeros(8)
    assert float(balance_penalty(zero, zero)) == 0.0
    # an over-confident classifier: high density ratio on joint pairs and on marginal pairs alike
    assert float(balance_penalty(torch.full((8,), 5.0), torch.full((8,), 5.0))) > 0.9
    # a perfect classifier (d = 1 on joint, 0 on marginal pairs) is balanced
    assert float(balance_penalty(torch.full((8,), 50.0), torch.full((8,), -50.0))) < 1e-20


def test_objective_adds_the_weighted_penalty_to_the_negative_log_likelihood():
    torch.manual_seed(0)
    flow = maf(2, 2, transforms=1, hidden_features=(8,))
    u, x = torch.randn(16, 2), torch.randn(16, 2)
    log_prior = Normal(0.0, 1.0).log_prob(u).sum(-1)
    rows = torch.arange(16)
    nll = negative_log_likelihood(flow, u, x, rows)
    assert torch.equal(BalancedObjective(log_prior, weight=0.0)(flow, u, x, rows), nll)
    log_q = flow.log_prob(u, x)
    penalty = balance_penalty(log_q - log_prior, flow.log_prob(u.roll(1, 0), x) - log_prior.roll(1))
    torch.testing.assert_close(BalancedObjective(log_prior, weight=7.0)(flow, u, x, rows), nll + 7.0 * penalty)


def test_training_with_an_objective_minimizes_it():
    torch.manual_seed(0)
    x = torch.randn(300, 2)
    u = x + 0.3 * torch.randn(300, 2)
    log_prior = Normal(0.0, 1.0).log_prob(u).sum(-1)
    objective = BalancedObjective(log_prior, weight=100.0)
    flow = maf(2, 2, transforms=1, hidden_features=(8,), seed=0)
    rows = torch.arange(300)
    with torch.no_grad():
        before = float(objective(flow, u, x, rows))
    history = train(flow, u, x, max_epochs=20, batch_size=50, objective=objective)
    with torch.no_grad():
        after = float(objective(flow, u, x, rows))
    assert after < before - 0.05 and history.epochs >= 1


@pytest.mark.slow  # two fits of 300 epochs
def test_balanced_npe_is_more_balanced_than_plain_npe_on_held_out_pairs():
    """In the sigmoid space (whose log_prob is normalized in closed form: the truncated space's Monte Carlo
    normalizer at 2,000 held-out x took a minute), where the objective also carries the space's Jacobian."""
    theta, x = data(100)  # few rows and a large flow trained long: plain NPE is visibly unbalanced
    held_theta, held_x = data(2000, seed=1)
    log_prior = PRIOR.log_prob(held_theta)

    def imbalance(posterior):
        joint = posterior.log_prob_batched(held_theta[None], held_x)[0] - log_prior
        marginal = posterior.log_prob_batched(held_theta.roll(1, 0)[None], held_x)[0] - log_prior.roll(1)
        return float(torch.sigmoid(joint).mean() + torch.sigmoid(marginal).mean() - 1)

    options = {"transforms": 3, "hidden_features": (64, 64), "space": "unconstrained"}
    fit = {"seed": 0, "patience": 100, "max_epochs": 300, "progress": False}
    plain = NPE(PRIOR, **options).fit(theta, x, **fit)
    balanced = NPE(PRIOR, balancing=100.0, **options).fit(theta, x, **fit)
    assert abs(imbalance(balanced)) < 0.6 * abs(imbalance(plain))  # measured: 0.0007 against 0.036
    assert balanced.config["balancing"] == 100.0 and plain.config["balancing"] == 0.0


def test_balancing_is_saved_and_checked(tmp_path):
    theta, x = data(200)
    posterior = NPE(PRIOR, balancing=10, transforms=1, hidden_features=(8,)).fit(theta, x, max_epochs=2,
                                                                                  progress=False)
    posterior.save(tmp_path / "p.pt")
    assert load(tmp_path / "p.pt").config["balancing"] == 10.0
    with pytest.raises(ValueError, match="balancing"):
        NPE(PRIOR, balancing=-1.0)
    with pytest.raises(TypeError, match="balancing"):
        NPE(PRIOR, balancing="much")

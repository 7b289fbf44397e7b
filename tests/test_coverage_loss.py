"""Calibrated NPE (NPE(prior, coverage_penalty=...)): the coverage penalty, its objective and its effect on training."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.distributions import Independent, Uniform

from sbiflows import NPE, TSNPE, load
from sbiflows.coverage_loss import CalibratedObjective, coverage_penalty
from sbiflows.estimator import PosteriorNet
from sbiflows.flows import nsf
from sbiflows.training import negative_log_likelihood

PRIOR = Independent(Uniform(-torch.ones(2), torch.ones(2)), 1)


def data(n=400, seed=0):
    generator = torch.Generator().manual_seed(seed)
    theta = 2 * torch.rand(n, 2, generator=generator) - 1
    return theta, theta + 0.2 * torch.randn(n, 2, generator=generator)


def net(seed=0):
    torch.manual_seed(seed)
    return PosteriorNet(nsf(2, 2, transforms=2, hidden_features=(16,)), nn.Identity(), theta_dim=2, x_dim=2)


def test_penalty_is_zero_for_uniform_or_low_ranks_and_grows_with_over_confidence():
    m, draws = 8, 16
    truth = torch.zeros(m)
    # rank k of row i: k draws above the truth; ranks spread evenly over [0, 1) are calibrated
    spread = torch.stack([torch.where(torch.arange(draws) < 2 * i, 1.0, -1.0) for i in range(m)], 1)
    assert float(coverage_penalty(truth, spread)) == 0.0
    assert float(coverage_penalty(truth, torch.full((draws, m), -1.0))) == 0.0  # conservative: no penalty
    over = float(coverage_penalty(truth, torch.full((draws, m), 1.0)))  # every truth below every draw
    half = float(coverage_penalty(truth, torch.where(torch.arange(draws)[:, None] < 12, 1.0, -1.0).expand(draws, m)))
    assert over > half > 0.0


def test_penalty_gradient_raises_the_truths_density_and_lowers_the_draws():
    truth = torch.zeros(8, requires_grad=True)
    draws = torch.full((16, 8), 0.5, requires_grad=True)  # over-confident: every truth below every draw
    coverage_penalty(truth, draws).backward()
    assert bool((truth.grad < 0).all()) and bool((draws.grad > 0).all())  # descent widens the posterior


def test_objective_adds_the_penalty_in_training_mode_only_and_is_seeded():
    model = net()
    u, x = torch.randn(32, 2), torch.randn(32, 2)
    rows = torch.arange(32)
    nll = negative_log_likelihood(model, u, x, rows)
    model.train()
    assert torch.equal(CalibratedObjective(negative_log_likelihood, weight=0.0)(model, u, x, rows), nll)
    first = CalibratedObjective(negative_log_likelihood, weight=100.0, seed=3)(model, u, x, rows)
    again = CalibratedObjective(negative_log_likelihood, weight=100.0, seed=3)(model, u, x, rows)
    assert torch.equal(first, again) and first.item() >= nll.item()
    model.eval()  # validation scores the base loss: early stopping needs no posterior draws
    torch.testing.assert_close(CalibratedObjective(negative_log_likelihood, weight=100.0)(model, u, x, rows), nll)


def test_minimizing_the_penalty_widens_an_over_confident_flow():
    torch.manual_seed(0)
    model = net().train()
    x = torch.zeros(256, 2)
    u = 3.0 * torch.randn(256, 2)  # true parameters three times wider than the initial flow
    objective = CalibratedObjective(lambda *args: torch.zeros(()), weight=1.0, rows=64, draws=16)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    rows = torch.arange(256)
    with torch.no_grad():
        spread_before = float(model.sample_given_context(2000, model.context(x[:1]))[:, 0].std())
    penalties = []
    for _ in range(60):
        loss = objective(model, u, x, rows[torch.randperm(256)])
        penalties.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        spread_after = float(model.sample_given_context(2000, model.context(x[:1]))[:, 0].std())
    assert spread_after > 1.5 * spread_before
    assert sum(penalties[-10:]) < 0.5 * sum(penalties[:10])


def mean_hpd_rank(posterior, theta, x, draws=200):
    """Mean share of posterior draws more probable than the true parameter (0.5 when calibrated)."""
    samples = posterior.sample_batched(draws, x, seed=0)
    log_q = posterior.log_prob_batched(samples, x)
    log_q_truth = posterior.log_prob_batched(theta[None], x)
    return float((log_q > log_q_truth).double().mean())


@pytest.mark.slow
def test_calibrated_npe_is_less_over_confident_than_plain_npe_on_held_out_pairs():
    theta, x = data(100)  # few rows and a large flow trained long: plain NPE is visibly over-confident
    held_theta, held_x = data(1000, seed=1)
    options = {"transforms": 3, "hidden_features": (64, 64)}
    fit = {"seed": 0, "patience": 100, "max_epochs": 300, "progress": False}
    plain = NPE(PRIOR, ensemble=1, **options).fit(theta, x, **fit)  # one flow each: the penalty is the difference
    calibrated = NPE(PRIOR, ensemble=1, coverage_penalty=200.0, **options).fit(theta, x, **fit)
    plain_rank, calibrated_rank = mean_hpd_rank(plain, held_theta, held_x), mean_hpd_rank(calibrated, held_theta, held_x)
    assert plain_rank > 0.55  # over-confident without the penalty (measured: 0.587)
    assert calibrated_rank < plain_rank - 0.06  # measured: 0.468, slightly conservative
    assert calibrated.config["coverage_penalty"] == 200.0 and plain.config["coverage_penalty"] == 0.0


def test_calibration_is_saved_and_checked(tmp_path):
    theta, x = data(200)
    posterior = NPE(PRIOR, coverage_penalty=10, transforms=1, hidden_features=(8,)).fit(theta, x, max_epochs=2,
                                                                                  progress=False)
    posterior.save(tmp_path / "p.pt")
    assert load(tmp_path / "p.pt").config["coverage_penalty"] == 10.0
    with pytest.raises(ValueError, match="coverage_penalty must be a real number >= 0, got -1"):
        NPE(PRIOR, coverage_penalty=-1.0)
    with pytest.raises(TypeError, match="coverage_penalty"):
        NPE(PRIOR, coverage_penalty="much")
    with pytest.raises(ValueError, match="TSNPE does not take coverage_penalty .* got coverage_penalty=100"):
        TSNPE(PRIOR, coverage_penalty=100.0)

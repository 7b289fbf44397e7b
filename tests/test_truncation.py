"""The truncated prior of TSNPE: threshold, volume, both samplers, density, and bad inputs.

Model: a uniform box prior and ``x = theta + sigma * noise``; for an observation far from the box's
edges the exact posterior is ``N(x_o, sigma^2 I)`` (the box cuts off nothing measurable).
"""

import math

import pytest
import torch

from sbiflows import NPE, box_uniform
from sbiflows.truncation import TruncatedPrior

X_O = torch.tensor([0.5, -0.5])


def trained(half: float, sigma: float):
    prior = box_uniform([-half, -half], [half, half])
    with torch.random.fork_rng():
        torch.manual_seed(0)
        theta = prior.sample((2000,))
        x = theta + sigma * torch.randn_like(theta)
    posterior = NPE(prior, "maf", transforms=3, hidden_features=(32, 32)).fit(theta, x, seed=0, progress=False)
    return prior, posterior


@pytest.fixture(scope="module")
def moderate():
    """Box [-5, 5]^2, sigma 0.3: the region holds a few percent of the prior (rejection)."""
    return trained(5.0, 0.3)


@pytest.fixture(scope="module")
def tiny():
    """Box [-1000, 1000]^2, sigma 0.1: the region holds about 1e-4 of the prior (SIR)."""
    return trained(1000.0, 0.1)


def exact_posterior(n: int, sigma: float) -> torch.Tensor:
    return X_O + sigma * torch.randn(n, 2, generator=torch.Generator().manual_seed(5))


def test_region_holds_the_exact_posterior_and_samples_satisfy_the_threshold(moderate):
    prior, posterior = moderate
    region = TruncatedPrior(prior, posterior, X_O, num_threshold_samples=200_000)
    assert region.method == "rejection" and 1e-3 < region.volume < 0.5
    # the true posterior's mass inside the region: at least 99.9% (20,000 exact draws)
    assert float(region.inside(exact_posterior(20_000, 0.3)).double().mean()) >= 0.999
    samples = region.sample((3000,), seed=1)
    assert samples.shape == (3000, 2)
    assert bool(region.inside(samples).all())
    assert bool((posterior.log_prob(samples, X_O) >= region.threshold).all())
    assert bool(prior.support.check(samples).all())
    draw = region.last_draw
    assert draw.method == "rejection" and draw.num_samples == 3000 and draw.accepted == 3000
    assert abs(draw.acceptance - region.volume) < 0.2 * region.volume  # acceptance of rejection = volume
    assert torch.equal(samples, region.sample((3000,), seed=1))  # seeded
    assert not torch.equal(samples, region.sample((3000,), seed=2))


def test_volume_and_density_agree_with_counting_prior_draws(moderate):
    prior, posterior = moderate
    region = TruncatedPrior(prior, posterior, X_O, num_threshold_samples=200_000)
    draws = prior.sample((200_000,))
    counted = float(region.inside(draws).double().mean())
    counted_se = math.sqrt(counted * (1 - counted) / len(draws))
    assert abs(region.volume - counted) < 4 * math.hypot(region.volume_stderr, counted_se)
    # log_prob is the prior renormalized on the region: E_prior[exp(log_prob - log_prior)] = 1
    ratio = (region.log_prob(draws) - prior.log_prob(draws)).exp().mean()
    assert abs(float(ratio) - 1) < 0.1
    outside = torch.tensor([[4.9, 4.9], [9.0, 0.0]])  # far from x_o; the second outside the prior's support
    assert torch.isneginf(region.log_prob(outside)).all()
    assert not region.inside(outside).any()


def test_quantile_sets_the_mass_of_q_left_outside(moderate):
    prior, posterior = moderate
    region = TruncatedPrior(prior, posterior, X_O, quantile=0.05, num_threshold_samples=20_000)
    fresh = posterior.sample(20_000, X_O, seed=123)
    outside = 1 - float(region.inside(fresh).double().mean())
    assert abs(outside - 0.05) < 0.01


def test_tiny_region_uses_sir_and_finishes(tiny):
    prior, posterior = tiny
    region = TruncatedPrior(prior, posterior, X_O, num_threshold_samples=200_000)
    assert region.method == "sir" and region.volume < 1e-3
    samples = region.sample((1000,), seed=0)
    assert samples.shape == (1000, 2)
    assert bool(region.inside(samples).all()) and bool(prior.support.check(samples).all())
    assert region.last_draw.method == "sir" and 0 < region.last_draw.acceptance <= 1
    assert float(region.inside(exact_posterior(20_000, 0.1)).double().mean()) >= 0.999


def test_sir_draws_more_batches_than_its_give_up_count(tiny, monkeypatch):
    """The guard against a degenerate posterior counted every batch, not the empty ones: a draw needing more
    than 101 batches (13,000 draws at the default sizes) raised "SIR found no candidate"."""
    from sbiflows import truncation

    prior, posterior = tiny
    region = TruncatedPrior(prior, posterior, X_O, num_threshold_samples=200_000, oversampling=8)
    monkeypatch.setattr(truncation, "MAX_BATCH", 64)  # 8 draws per batch: 1,000 draws take 125 batches
    samples = region.sample((1000,), seed=0)
    assert samples.shape == (1000, 2) and bool(region.inside(samples).all())


@pytest.mark.slow
def test_sir_approximates_the_truncated_prior(moderate):
    """Forced SIR against exact rejection on the same region: same mean and spread (a uniform on the
    region), while the posterior q itself is much more concentrated."""
    prior, posterior = moderate
    region = TruncatedPrior(prior, posterior, X_O, num_threshold_samples=200_000)
    exact = region.sample((3000,), seed=0)
    region.method = "sir"
    sir = region.sample((3000,), seed=0)
    assert region.last_draw.method == "sir"
    assert bool(region.inside(sir).all())
    assert (sir.mean(0) - exact.mean(0)).abs().max() < 0.05
    assert ((sir.std(0) / exact.std(0)) - 1).abs().max() < 0.06
    q = posterior.sample(3000, X_O, seed=0)
    assert (q.std(0) / exact.std(0)).max() < 0.7  # the test can tell q from the truncated prior


def test_rejection_falls_back_to_sir_when_acceptance_collapses(moderate):
    prior, posterior = moderate
    region = TruncatedPrior(prior, posterior, X_O, num_threshold_samples=20_000, quantile=0.4)
    assert region.volume < 0.01  # the 60% highest-density region of q
    region.volume = 1.0  # a wildly wrong estimate: rejection's draw cap is hit, and SIR finishes the job
    samples = region.sample((500,), seed=0)
    assert region.last_draw.method == "rejection+sir"
    assert samples.shape == (500, 2) and bool(region.inside(samples).all())


def test_default_x_and_sample_shape(moderate):
    prior, posterior = moderate
    posterior = posterior.copy().set_default_x(X_O)
    region = TruncatedPrior(prior, posterior, quantile=1e-3, num_threshold_samples=20_000)
    assert torch.equal(region.x_o, X_O)
    assert region.sample((3, 4), seed=0).shape == (3, 4, 2)
    assert region.sample().shape == (2,)


def test_bad_inputs(moderate):
    prior, posterior = moderate
    with pytest.raises(ValueError, match="quantile must be a real number in \\(0, 0.5\\)"):
        TruncatedPrior(prior, posterior, X_O, quantile=0.0)
    with pytest.raises(ValueError, match="at least 10.*num_threshold_samples >= 100000"):
        TruncatedPrior(prior, posterior, X_O, num_threshold_samples=1000)
    with pytest.raises(TypeError, match="posterior must be a sbiflows Posterior"):
        TruncatedPrior(prior, object(), X_O)
    with pytest.raises(ValueError, match="prior has 3"):
        TruncatedPrior(box_uniform([0.0] * 3, [1.0] * 3), posterior, X_O)
    with pytest.raises(ValueError, match="x is required"):
        TruncatedPrior(prior, posterior, num_threshold_samples=20_000, quantile=1e-3)
    with pytest.raises(ValueError, match=r"shape \(2,\) or \(1, 2\)"):
        TruncatedPrior(prior, posterior, torch.zeros(3), num_threshold_samples=20_000, quantile=1e-3)
    with pytest.raises(ValueError, match="min_acceptance"):
        TruncatedPrior(prior, posterior, X_O, min_acceptance=0)

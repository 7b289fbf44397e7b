"""Tests of the vectorized slice sampler and its R-hat / ESS diagnostics (simulators.mcmc)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats
from torch.distributions import Independent, MultivariateNormal, Normal, Uniform

from simulators.mcmc import (
    ConvergenceError,
    ConvergenceWarning,
    ess,
    rhat,
    sample_posterior,
    slice_chains,
)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def box(low: float, high: float, dim: int) -> Independent:
    return Independent(Uniform(torch.full((dim,), float(low)), torch.full((dim,), float(high))), 1)


def ar1_chains(rho: float, num_chains: int, num_steps: int, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((num_chains, num_steps))
    out = np.empty_like(noise)
    out[:, 0] = noise[:, 0]
    for t in range(1, num_steps):
        out[:, t] = rho * out[:, t - 1] + math.sqrt(1 - rho**2) * noise[:, t]
    return torch.from_numpy(out)


# ------------------------------------------------------------------------------ diagnostics
def test_rhat_and_ess_of_independent_draws():
    draws = torch.randn(8, 1000, 3, generator=gen())
    assert rhat(draws).shape == (3,)
    assert (rhat(draws) < 1.01).all()
    assert ((ess(draws) > 0.85 * 8000) & (ess(draws) < 1.15 * 8000)).all()


def test_ess_of_ar1_chains_matches_theory():
    rho = 0.8
    expected = 4 * 5000 * (1 - rho) / (1 + rho)
    value = float(ess(ar1_chains(rho, 4, 5000))[0])  # 2-D input: one parameter
    assert 0.8 * expected < value < 1.25 * expected


def test_rhat_flags_chains_that_disagree():
    draws = torch.randn(4, 500, 2, generator=gen())
    draws[0, :, 1] += 3.0  # one chain stuck in another mode, in parameter 1 only
    r = rhat(draws)
    assert r[0] < 1.01 and r[1] > 1.2


def test_rhat_flags_a_drifting_chain():
    draws = torch.randn(4, 500, 1, generator=gen())
    draws[2, :, 0] += torch.linspace(-2, 2, 500)  # non-stationary: split R-hat catches it
    assert rhat(draws)[0] > 1.05


def test_ess_is_small_for_sticky_chains():
    assert ess(ar1_chains(0.99, 4, 2000))[0] < 200


@pytest.mark.parametrize("shape", [(4,), (4, 3, 2, 1), (4, 2, 1)])
def test_diagnostics_reject_bad_shapes(shape):
    with pytest.raises(ValueError, match="num_chains, num_steps"):
        rhat(torch.zeros(shape))
    with pytest.raises(ValueError, match="num_chains, num_steps"):
        ess(torch.zeros(shape))


# ------------------------------------------------------------------------------- sampler
def test_slice_chains_on_standard_normal():
    init = torch.randn(20, 3, generator=gen(1))
    chains, evals = slice_chains(
        lambda z: -0.5 * (z**2).sum(-1), init, num_draws=200, warmup=50, generator=gen(2)
    )
    assert chains.shape == (20, 200, 3)
    flat = chains.reshape(-1, 3)
    assert flat.mean(0).abs().max() < 0.1
    assert (flat.std(0) - 1).abs().max() < 0.1
    assert (rhat(chains) < 1.05).all()
    assert 3 <= evals < 60  # a few evaluations per direction, 3 directions per step


def test_slice_chains_rejects_infinite_start():
    with pytest.raises(ValueError, match="init"):
        slice_chains(
            lambda z: torch.where(z[:, 0] > 0, 0.0, -math.inf).double(),
            torch.tensor([[1.0], [-1.0]]),
            num_draws=10,
            warmup=0,
            generator=gen(),
        )


def test_agrees_with_conjugate_gaussian_posterior():
    # prior N(0, 0.5 I), likelihood N(x_o; theta, 0.2 I): posterior N(x_o * 0.5/0.7, 0.1/0.7 I).
    prior = MultivariateNormal(torch.zeros(3), 0.5 * torch.eye(3))
    x_o = torch.tensor([0.3, -0.6, 1.0], dtype=torch.float64)
    samples, diag = sample_posterior(
        lambda t: -0.5 * ((t - x_o) ** 2).sum(-1) / 0.2,
        prior,
        4000,
        num_chains=40,
        generator=gen(),
        return_diagnostics=True,
    )
    assert samples.shape == (4000, 3) and samples.dtype == torch.float32
    mean, var = x_o * 0.5 / 0.7, 0.1 / 0.7
    assert (samples.double().mean(0) - mean).abs().max() < 4 * math.sqrt(var / 1000)
    assert (samples.double().var(0) / var - 1).abs().max() < 0.1
    for d in range(3):
        ks = stats.kstest(samples[:, d].numpy(), "norm", args=(float(mean[d]), math.sqrt(var)))
        assert ks.pvalue > 0.01 / 3
    assert (diag.rhat < 1.05).all() and (diag.ess > 1000).all()
    assert diag.num_chains == 40 and diag.draws_per_chain == 100


def test_bounded_prior_gives_truncated_normal():
    # Likelihood N(0.8, 0.4^2) under a U(-1, 1)^2 prior: a truncated normal per dimension, with much
    # mass piled against the upper bound.
    samples = sample_posterior(
        lambda t: -0.5 * ((t - 0.8) ** 2).sum(-1) / 0.4**2, box(-1, 1, 2), 3000, generator=gen()
    )
    assert samples.min() >= -1 and samples.max() <= 1
    truncated = stats.truncnorm((-1 - 0.8) / 0.4, (1 - 0.8) / 0.4, loc=0.8, scale=0.4)
    for d in range(2):
        assert stats.kstest(samples[:, d].numpy(), truncated.cdf).pvalue > 0.005


def test_nan_likelihood_counts_as_zero_density():
    def log_lik(theta):
        out = Normal(0.0, 1.0).log_prob(theta).sum(-1)
        return torch.where(theta[:, 0] < 0, torch.nan, out)

    samples = sample_posterior(log_lik, box(-3, 3, 2), 1000, num_chains=20, generator=gen())
    assert (samples[:, 0] >= 0).all()
    assert samples[:, 1].min() < 0


def test_same_generator_seed_reproduces():
    def run(seed):
        return sample_posterior(lambda t: -(t**2).sum(-1), box(-2, 2, 2), 200, num_chains=10,
                                warmup=20, generator=gen(seed))

    assert torch.equal(run(3), run(3))
    assert not torch.equal(run(3), run(4))


def test_global_rng_is_left_untouched():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    sample_posterior(lambda t: -(t**2).sum(-1), box(-2, 2, 2), 100, num_chains=10, warmup=20,
                     generator=gen())
    assert torch.equal(torch.rand(3), expected)


def _bimodal(theta):
    # Two narrow, well separated modes that no local sampler crosses.
    a = Normal(-5.0, 0.1).log_prob(theta[:, 0])
    b = Normal(5.0, 0.1).log_prob(theta[:, 0])
    return torch.logaddexp(a, b)


def test_non_mixing_chains_raise():
    with pytest.raises(ConvergenceError, match="R-hat"):
        sample_posterior(_bimodal, box(-10, 10, 1), 400, num_chains=20, warmup=20, generator=gen())


def test_non_mixing_chains_warn_when_asked():
    with pytest.warns(ConvergenceWarning, match="R-hat"):
        samples = sample_posterior(_bimodal, box(-10, 10, 1), 400, num_chains=20, warmup=20,
                                   generator=gen(), on_failure="warn")
    assert samples.shape == (400, 1)


def test_low_ess_raises():
    with pytest.raises(ConvergenceError, match="ESS"):
        sample_posterior(lambda t: -(t**2).sum(-1), box(-2, 2, 1), 100, num_chains=4, warmup=10,
                         generator=gen(), min_ess=10_000)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_samples": 0}, "num_samples"),
        ({"num_chains": 1}, "num_chains"),
        ({"init": "map"}, "init"),
        ({"on_failure": "ignore"}, "on_failure"),
    ],
)
def test_bad_arguments(kwargs, match):
    args = {"num_samples": 10, **kwargs}
    n = args.pop("num_samples")
    with pytest.raises(ValueError, match=match):
        sample_posterior(lambda t: -(t**2).sum(-1), box(-1, 1, 1), n, **args)


def test_log_likelihood_of_wrong_shape_is_reported():
    with pytest.raises(ValueError, match="log_likelihood must return shape"):
        sample_posterior(lambda t: -(t**2), box(-1, 1, 2), 10, generator=gen())

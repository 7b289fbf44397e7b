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
    Diagnostics,
    _subset_ess,
    ess,
    rhat,
    run_chains,
    sample_posterior,
    sample_posteriors,
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


def test_subset_ess_matches_the_variance_of_subset_means():
    """The ESS of n draws picked at random from AR(1) chains: the variance of their mean over many
    independent replicates is sigma^2 / ESS, as the formula of _subset_ess predicts."""
    rho, chains, steps, n, replicates = 0.9, 10, 1000, 500, 1000
    rng = np.random.default_rng(1)
    noise = rng.standard_normal((replicates, chains, steps))
    draws = np.empty_like(noise)
    draws[..., 0] = noise[..., 0]
    for t in range(1, steps):
        draws[..., t] = rho * draws[..., t - 1] + math.sqrt(1 - rho**2) * noise[..., t]
    pooled = draws.reshape(replicates, -1)
    picks = np.argsort(rng.random(pooled.shape), axis=1)[:, :n]
    subset_means = np.take_along_axis(pooled, picks, axis=1).mean(1)
    empirical = 1.0 / subset_means.var()  # sigma^2 = 1
    # the chains' ESS (theory for AR(1); the estimator is tested above), then the formula
    chain_ess = torch.tensor([chains * steps * (1 - rho) / (1 + rho)], dtype=torch.float64)
    predicted = float(_subset_ess(chain_ess, chains * steps, n)[0])
    # a regime where the formula matters: far from n, from the chains' ESS (526) and from n ESS / P (26)
    assert 0.4 * n < predicted < 0.6 * n
    assert abs(empirical / predicted - 1) < 0.15
    assert float(_subset_ess(chain_ess, chains * steps, chains * steps)[0]) == pytest.approx(float(chain_ess[0]))


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
    assert diag.num_chains == 40 and diag.draws_per_chain == 100 and diag.num_samples == 4000
    assert diag.converged and (diag.sample_ess >= 0.5 * 4000).all() and (diag.sample_ess <= 4000).all()


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
    # running the chains twice as long (max_thin) does not help them cross between the modes
    with pytest.raises(ConvergenceError, match="R-hat"):
        sample_posterior(_bimodal, box(-10, 10, 1), 400, num_chains=20, warmup=20, max_thin=2,
                         generator=gen())


def test_non_mixing_chains_warn_when_asked():
    with pytest.warns(ConvergenceWarning, match="R-hat"):
        samples, diag = sample_posterior(_bimodal, box(-10, 10, 1), 400, num_chains=20, warmup=20,
                                         max_thin=1, generator=gen(), on_failure="warn",
                                         return_diagnostics=True)
    assert samples.shape == (400, 1)
    assert not diag.converged and diag.thin == 1  # max_thin = thin: no extension


def test_low_ess_raises():
    with pytest.raises(ConvergenceError, match="ESS of the 100 returned samples"):
        sample_posterior(lambda t: -(t**2).sum(-1), box(-2, 2, 1), 100, num_chains=4, warmup=10,
                         generator=gen(), min_ess=10_000)


def _sticky_log_density(z: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """A strongly correlated 2-D standard Gaussian (correlation 0.99), slow for a sampler without warm-up."""
    a, b = (z[:, 0] + z[:, 1]) / math.sqrt(2), (z[:, 0] - z[:, 1]) / math.sqrt(2)
    return -0.5 * (a**2 / 1.99 + b**2 / 0.01)


def test_correlated_chains_are_run_longer_until_near_independent():
    # No warm-up, so the direction covariance stays the identity and successive draws are strongly
    # correlated (measured: ESS 70 of 1000 returned draws, R-hat 1.23 at thin 1): the sampler must
    # thin more (measured: 9 times) to reach an ESS of half the returned samples.
    init = torch.randn(20, 2, generator=gen(1)) * 0.02
    samples, diag = run_chains(_sticky_log_density, init, 1000, warmup=0, max_thin=64,
                               min_ess=500, generator=gen(2))
    assert diag.converged and diag.thin > 1 and (diag.sample_ess >= 500).all()
    assert samples.shape == (1, 1000, 2)
    assert stats.kstest(samples[0, :, 0].numpy(), "norm").pvalue > 0.01
    _, short = run_chains(_sticky_log_density, init, 1000, warmup=0, max_thin=1, min_ess=500,
                          generator=gen(2))
    assert not short.converged and short.thin == 1 and (short.sample_ess < 500).any()


def test_sample_posteriors_of_several_datasets_at_once():
    # prior N(0, 0.5 I), likelihood N(x_k; theta, 0.2 I) per dataset: posterior N(x_k / 1.4, 0.1/0.7 I).
    prior = MultivariateNormal(torch.zeros(2), 0.5 * torch.eye(2))
    x = torch.tensor([[3.0, -3.0], [0.0, 0.0], [-2.0, 4.0]], dtype=torch.float64)
    calls = []

    def log_lik(theta, index):
        calls.append(len(theta))
        return -0.5 * ((theta - x[index]) ** 2).sum(-1) / 0.2

    samples, diag = sample_posteriors(log_lik, prior, 3, 2000, num_chains=20, generator=gen(),
                                      return_diagnostics=True)
    assert samples.shape == (3, 2000, 2) and diag.rhat.shape == (3, 2) and diag.sample_ess.shape == (3, 2)
    assert diag.converged and max(calls) > 40  # rows of several datasets share the calls
    var = 0.1 / 0.7
    for k in range(3):
        for d in range(2):
            ks = stats.kstest(samples[k, :, d].numpy(), "norm", args=(float(x[k, d]) / 1.4, math.sqrt(var)))
            assert ks.pvalue > 0.01 / 6, f"dataset {k}, parameter {d}"
    assert torch.equal(diag.select(1).rhat, diag.rhat[1])


def test_diagnostics_round_trip_through_plain_values():
    _, diag = sample_posterior(lambda t: -(t**2).sum(-1), box(-2, 2, 2), 100, num_chains=4,
                               warmup=10, generator=gen(), return_diagnostics=True)
    plain = diag.to_dict()
    assert isinstance(plain["rhat"], list) and isinstance(plain["converged"], bool)
    back = Diagnostics.from_dict(plain)
    assert torch.equal(back.rhat, diag.rhat) and torch.equal(back.sample_ess, diag.sample_ess)
    assert (back.thin, back.converged, back.num_samples) == (diag.thin, diag.converged, 100)
    with pytest.raises(ValueError, match="lack the fields"):
        Diagnostics.from_dict({"rhat": [1.0]})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_samples": 0}, "num_samples"),
        ({"num_chains": 1}, "num_chains"),
        ({"init": "map"}, "init"),
        ({"on_failure": "ignore"}, "on_failure"),
        ({"ess_fraction": 1.5}, "ess_fraction"),
        ({"thin": 4, "max_thin": 2}, "max_thin"),
        ({"thin": 0}, "thin"),
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


def test_slice_sampler_shows_progress_only_when_asked(capsys, monkeypatch):
    import sys

    from simulators.mcmc.slice import show_progress

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # bars are silent off a terminal

    target = lambda z: -0.5 * (z**2).sum(-1)  # noqa: E731
    options = {"num_draws": 20, "warmup": 20, "generator": torch.Generator().manual_seed(0)}
    slice_chains(target, torch.zeros(4, 2), **options)
    assert "MCMC" not in capsys.readouterr().err
    with show_progress():
        chains, _ = slice_chains(target, torch.zeros(4, 2), **options)
    err = capsys.readouterr().err
    assert "MCMC warm-up" in err and "MCMC draws" in err and chains.shape == (4, 20, 2)

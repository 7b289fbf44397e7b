"""Posterior predictive checks on the exact posterior of tests/gaussian_posterior.py and wrong ones."""

from __future__ import annotations

import math

import pytest
import torch
from gaussian_posterior import GaussianLinearModel

from sbiflows.diagnostics import posterior_predictive, simulate_datasets


@pytest.fixture(scope="module")
def model() -> GaussianLinearModel:
    return GaussianLinearModel(dim=2, sigma=0.5)


@pytest.fixture(scope="module")
def pairs(model):
    return simulate_datasets(model.prior, model, 500, seed=1)


class WrongShape:
    def sample_batched(self, n, xs):
        return torch.zeros(n, 2)


def test_predictive_accepts_an_observation_from_the_model(model, pairs):
    x_o = pairs[1][0]
    result = posterior_predictive(model.posterior(), model, x_o, num_samples=1000)
    assert result.passed, str(result)
    assert result.predictive.shape == (1000, 2) and result.distances.shape == (1000,)
    assert ((result.quantiles > 0) & (result.quantiles < 1)).all()
    assert result.distance_pvalue == pytest.approx((1 + int((result.distances >= result.distance).sum())) / 1001)
    assert "PASSED" in str(result)


@pytest.mark.parametrize("metric", ["mahalanobis", "standardized"])
def test_predictive_flags_a_posterior_that_misses_the_observation(model, pairs, metric):
    result = posterior_predictive(model.posterior(shift=-10.0), model, pairs[1][0], metric=metric)
    assert not result.passed
    assert result.extreme_dimensions == (0, 1)
    assert (result.quantiles == 1.0).all()  # x_o is above every predictive draw
    assert result.distance_pvalue == pytest.approx(1 / 1001)
    assert "FAILED" in str(result) and metric in str(result)


def test_predictive_handles_constant_summaries(model):
    def with_constant(theta):
        return torch.cat([model(theta), torch.ones(len(theta), 1)], dim=1)

    class Posterior:
        def sample(self, n, x):
            return model.posterior().sample(n, x[:2])

    x_o = torch.tensor([0.2, -0.1, 1.0])
    for metric in ("mahalanobis", "standardized"):
        assert posterior_predictive(Posterior(), with_constant, x_o, metric=metric).passed
    off = posterior_predictive(Posterior(), with_constant, torch.tensor([0.2, -0.1, 2.0]), metric="standardized")
    assert not off.passed and off.extreme_dimensions == (2,) and math.isinf(off.distance)


def test_predictive_counts_invalid_simulations(model):
    def flaky(theta):
        x = model(theta)
        x[::10, 0] = math.nan
        return x

    with pytest.warns(UserWarning, match="excluded 100 of 1000 predictive simulations"):
        result = posterior_predictive(model.posterior(), flaky, torch.tensor([0.1, 0.2]))
    assert result.num_invalid == 100 and result.num_samples == 900
    assert "100 invalid simulations excluded" in str(result)


@pytest.mark.parametrize(
    ("x_o", "kwargs", "error", "match"),
    [
        ([0.0, 0.0], {}, TypeError, "x_o must be a torch.Tensor"),
        (torch.zeros(1, 2), {}, ValueError, r"x_o must be a floating-point tensor of shape \(x_dim,\)"),
        (torch.tensor([0.0, math.nan]), {}, ValueError, "x_o contains NaN"),
        (torch.zeros(2), {"num_samples": 1}, ValueError, "num_samples must be an int >= 2"),
        (torch.zeros(2), {"alpha": 2.0}, ValueError, r"alpha must be a real number in \(0, 1\), got 2.0"),
        (torch.zeros(2), {"metric": "l1"}, ValueError, "metric must be one of 'mahalanobis', 'standardized', got 'l1'"),
        (torch.zeros(2), {"simulator": lambda t: t[:, :1]}, ValueError, r"simulator must return shape \(1000, 2\) matching x_o, got \(1000, 1\)"),
        (torch.zeros(2), {"num_samples": 2}, ValueError, r"needs more valid predictive simulations \(2\) than"),
    ],
)
def test_predictive_rejects_bad_input(model, x_o, kwargs, error, match):
    simulator = kwargs.pop("simulator", model)
    with pytest.raises(error, match=match):
        if kwargs.get("num_samples") == 2:
            with pytest.warns(UserWarning, match="only 2 valid"):
                posterior_predictive(model.posterior(), simulator, x_o, **kwargs)
        else:
            posterior_predictive(model.posterior(), simulator, x_o, **kwargs)


def test_predictive_requires_sample(model):
    with pytest.raises(TypeError, match="posterior must implement sample"):
        posterior_predictive(WrongShape(), model, torch.zeros(2))


class _SetPosterior:
    """A posterior over a 2-D mean whose embedding takes NaN-padded sets (as the set embedding's ``net`` says)."""

    class net:  # noqa: N801 - stands for the posterior's network attribute
        padded_trials = True

    x_shape = (10, 2)

    def sample(self, n, x):
        return 0.3 + 0.05 * torch.randn(n, 2)


def _padded_sets(theta):
    """Sets of 4 to 10 trials ``theta + N(0, 0.5^2)``, NaN-padded to 10."""
    x = theta[:, None, :] + 0.5 * torch.randn(len(theta), 10, 2)
    trials = torch.randint(4, 11, (len(theta),))
    x[torch.arange(10)[None, :] >= trials[:, None]] = float("nan")
    return x


def test_posterior_predictive_compares_padded_sets_by_their_statistics():
    """A NaN-padded observation was refused ("x_o contains NaN/inf values"), so ``sbiflows fit --embedding set``
    stopped at its predictive check; padded predictive sets would have been dropped as failures."""
    x_o = torch.full((10, 2), float("nan"))
    x_o[:6] = 0.3 + 0.5 * torch.randn(6, 2, generator=torch.Generator().manual_seed(1))
    result = posterior_predictive(_SetPosterior(), _padded_sets, x_o)
    assert result.passed and result.num_invalid == 0 and result.num_samples == 1000
    assert result.statistics == ("trials", "mean[0]", "mean[1]", "std[0]", "std[1]")
    assert result.quantiles.shape == (5,) and result.predictive.shape == (1000, 10, 2)
    assert "a set: 5 statistics" in str(result)
    shifted = x_o + torch.tensor([3.0, 0.0])  # the first feature's mean is far from anything predicted
    flagged = posterior_predictive(_SetPosterior(), _padded_sets, shifted)
    assert not flagged.passed and [flagged.statistics[i] for i in flagged.extreme_dimensions] == ["mean[0]"]
    assert "['mean[0]']" in str(flagged)


def test_posterior_predictive_of_sets_drops_failed_sets_and_refuses_a_broken_observation():
    def failing(theta):
        x = _padded_sets(theta)
        x[:7, 0, 0] = float("inf")  # failed simulations
        x[7:9, 0, 1] = float("nan")  # a NaN inside a trial that is not padding
        return x

    x_o = torch.full((10, 2), float("nan"))
    x_o[:5] = 0.3
    with pytest.warns(UserWarning, match="excluded 9 of 1000"):
        result = posterior_predictive(_SetPosterior(), failing, x_o)
    assert result.num_invalid == 9 and result.num_samples == 991
    x_o[2, 1] = float("nan")
    with pytest.raises(ValueError, match="outside all-NaN padding trials"):
        posterior_predictive(_SetPosterior(), failing, x_o)

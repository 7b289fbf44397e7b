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

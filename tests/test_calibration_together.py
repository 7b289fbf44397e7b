"""diagnostics.calibration: SBC, expected coverage and TARP on draws made once, each result equal to its own
function's for the same arguments."""

from __future__ import annotations

import pytest
import torch
from torch.distributions import Independent, MultivariateNormal, Uniform

from sbiflows import NPE
from sbiflows.diagnostics import calibration, expected_coverage, sbc, simulate_datasets, tarp


def simulator(theta):
    return theta + 0.3 * torch.randn_like(theta)


class Exact:
    """The exact posterior of x = theta + N(0, 0.3^2) under N(0, I), on torch's global generator; counts draws."""

    def __init__(self):
        self.calls = 0

    def sample_batched(self, n, xs):
        self.calls += 1
        return xs / 1.09 + torch.randn(n, *xs.shape) * (0.09 / 1.09) ** 0.5

    def log_prob(self, theta, x):
        return -(theta - x / 1.09).square().sum(-1) / (2 * 0.09 / 1.09)


def posteriors():
    box = Independent(Uniform(-torch.ones(2), torch.ones(2)), 1)
    gaussian = MultivariateNormal(torch.zeros(2), torch.eye(2))
    fitted = {}
    for name, prior, options in (("truncated", box, {}), ("unconstrained", gaussian, {}),
                                 ("ensemble", gaussian, {"ensemble": 2})):
        theta, x = simulate_datasets(prior, simulator, 600, seed=2)
        fitted[name] = (NPE(prior, transforms=1, hidden_features=(16, 16), **options).fit(
            theta, x, max_epochs=3, seed=0, progress=False), prior)
    return fitted


@pytest.fixture(scope="module")
def fitted():
    return posteriors()


def results_as_text(results):
    return {name: str(result) for name, result in results.items()}


@pytest.mark.parametrize("name", ["truncated", "unconstrained", "ensemble"])
@pytest.mark.parametrize("given", [True, False])
def test_each_result_is_its_own_functions(fitted, name, given):
    """Bit for bit, with pairs given or simulated, for the default posterior (truncated space), the unconstrained
    space and an ensemble (which evaluates its draws after drawing them)."""
    posterior, prior = fitted[name]
    pairs = dict(zip(("theta", "x"), simulate_datasets(prior, simulator, 150, seed=5))) if given else {}
    options = dict(num_datasets=150, num_posterior_samples=100, seed=3, **pairs)
    together = calibration(posterior, prior, simulator, **options)
    alone = {"sbc": sbc(posterior, prior, simulator, **options),
             "coverage": expected_coverage(posterior, prior, simulator, **options),
             "tarp": tarp(posterior, prior, simulator, **options)}
    assert list(together) == ["sbc", "coverage", "tarp"]
    assert results_as_text(together) == results_as_text(alone)
    assert torch.equal(together["sbc"].ranks, alone["sbc"].ranks)
    assert torch.equal(together["coverage"].hpd_ranks, alone["coverage"].hpd_ranks)
    assert torch.equal(together["tarp"].coverage_values, alone["tarp"].coverage_values)


@pytest.mark.parametrize("name", ["truncated", "ensemble"])
def test_an_sbiflows_posterior_draws_once_without_its_normalizer(fitted, name, monkeypatch):
    """Coverage's fused call asks for densities up to a constant (normalized=False); SBC and TARP take its draws."""
    posterior, prior = fitted[name]
    calls = []
    fused, plain = posterior.sample_and_log_prob_batched, posterior.sample_batched

    def counted(n, xs, *, normalized=True):  # the keyword as the posterior's own method has it
        calls.append(("fused", normalized))
        return fused(n, xs, normalized=normalized)

    monkeypatch.setattr(posterior, "sample_and_log_prob_batched", counted)
    monkeypatch.setattr(posterior, "sample_batched", lambda n, xs: calls.append("plain") or plain(n, xs))
    calibration(posterior, prior, simulator, num_datasets=120, num_posterior_samples=100, seed=3)
    assert calls == [("fused", False)]


def test_the_draws_and_simulations_are_made_once_and_the_generator_ends_where_the_checks_leave_it():
    prior = MultivariateNormal(torch.zeros(2), torch.eye(2))
    calls = []

    def counted(theta):
        calls.append(len(theta))
        return simulator(theta)

    posterior = Exact()
    torch.manual_seed(11)
    together = calibration(posterior, prior, counted, num_datasets=200, num_posterior_samples=100, seed=4,
                           batch_size=80, parameter_names=["a", "b"])
    after_together = torch.rand(3)
    assert posterior.calls == 3 and calls == [200]  # three chunks of datasets, drawn once; one simulation
    assert together["sbc"].parameter_names == ("a", "b")
    assert all(result.passed for result in together.values())
    torch.manual_seed(11)
    options = dict(num_datasets=200, num_posterior_samples=100, seed=4, batch_size=80)
    alone = [sbc(Exact(), prior, simulator, parameter_names=["a", "b"], **options),
             expected_coverage(Exact(), prior, simulator, **options), tarp(Exact(), prior, simulator, **options)]
    assert torch.equal(torch.rand(3), after_together)  # seeded checks leave torch's generator as they found it
    assert [str(r) for r in alone] == [str(together[k]) for k in ("sbc", "coverage", "tarp")]


def test_without_a_seed_each_check_draws_anew():
    """seed=None: the generator moves on between the checks, so nothing repeats and nothing is reused."""
    prior = MultivariateNormal(torch.zeros(2), torch.eye(2))
    theta, x = simulate_datasets(prior, simulator, 120, seed=1)
    posterior = Exact()
    calibration(posterior, theta=theta, x=x, num_posterior_samples=100, seed=None)
    assert posterior.calls == 3


def test_a_posterior_without_log_prob_is_refused_by_name():
    class DrawsOnly:
        def sample_batched(self, n, xs):
            return torch.randn(n, *xs.shape)

    theta, x = simulate_datasets(MultivariateNormal(torch.zeros(2), torch.eye(2)), simulator, 120, seed=1)
    with pytest.raises(TypeError, match="posterior must implement sample_batched, log_prob.*DrawsOnly lacks log_prob"):
        calibration(DrawsOnly(), theta=theta, x=x, num_posterior_samples=100)


class OwnGenerator(Exact):
    """Draws from a generator of its own: torch's global generator does not say what it will return."""

    def __init__(self):
        super().__init__()
        self.generator = torch.Generator().manual_seed(0)

    def sample_batched(self, n, xs):
        self.calls += 1
        return xs / 1.09 + torch.randn(n, *xs.shape, generator=self.generator) * (0.09 / 1.09) ** 0.5


def test_randomness_outside_torchs_generator_is_drawn_anew_as_the_separate_checks_draw_it():
    """A call that leaves torch's generator as it found it is not remembered: a posterior with its own generator
    and a NumPy simulator give each check what the separate checks get."""
    import numpy as np

    prior = MultivariateNormal(torch.zeros(2), torch.eye(2))
    rng = {"state": None}

    def numpy_simulator(theta):
        noise = rng["state"].normal(size=tuple(theta.shape))
        return theta + 0.3 * torch.as_tensor(noise, dtype=theta.dtype)

    rng["state"] = np.random.default_rng(0)
    posterior = OwnGenerator()
    together = calibration(posterior, prior, numpy_simulator, num_datasets=150, num_posterior_samples=100, seed=2)
    assert posterior.calls == 3
    rng["state"], other = np.random.default_rng(0), OwnGenerator()
    options = dict(num_datasets=150, num_posterior_samples=100, seed=2)
    alone = [expected_coverage(other, prior, numpy_simulator, **options),  # calibration's order: coverage first
             sbc(other, prior, numpy_simulator, **options), tarp(other, prior, numpy_simulator, **options)]
    assert [str(r) for r in alone] == [str(together[k]) for k in ("coverage", "sbc", "tarp")]


def test_observations_of_any_float_dtype_are_remembered():
    prior = MultivariateNormal(torch.zeros(2), torch.eye(2))
    theta, x = simulate_datasets(prior, simulator, 120, seed=1)
    posterior = Exact()
    together = calibration(posterior, theta=theta, x=x.to(torch.bfloat16), num_posterior_samples=100)
    assert posterior.calls == 1
    assert str(together["sbc"]) == str(sbc(Exact(), theta=theta, x=x.to(torch.bfloat16), num_posterior_samples=100))

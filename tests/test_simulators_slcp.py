"""Tests of the slcp and slcp_distractors tasks: likelihoods, simulators, reference sampler and its cache."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from fast_mcmc import FAST_MCMC
from scipy import stats

import simulators
from simulators.base import CACHE_VERSION, NUM_OBSERVATIONS
from simulators.mcmc import ConvergenceWarning
from simulators.slcp import SLCP, SLCPDistractors, slcp_log_likelihood


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def fast_slcp(monkeypatch, tmp_path) -> SLCP:
    """An slcp task with short, unchecked MCMC settings whose reference cache is ``tmp_path``."""
    monkeypatch.setenv("SBIFLOWS_CACHE", str(tmp_path))
    task = SLCP()
    task.mcmc_options = FAST_MCMC
    return task


# ----------------------------------------------------------------------------------- slcp
def test_slcp_likelihood_matches_scipy_and_simulator():
    task = simulators.get("slcp")
    theta = torch.tensor([0.5, -1.0, 1.2, -0.8, 0.7], dtype=torch.float64)
    s1, s2, rho = 1.2**2, 0.8**2, math.tanh(0.7)
    cov = np.array([[s1**2 + 1e-6, rho * s1 * s2], [rho * s1 * s2, s2**2 + 1e-6]])
    x = task.simulate(theta.expand(20_000, -1), seed=0).double()
    points = x.reshape(-1, 4, 2)
    expected = stats.multivariate_normal([0.5, -1.0], cov).logpdf(points[:10].numpy()).sum(-1)
    assert np.allclose(task.log_likelihood(theta.expand(10, -1), x[:10]).numpy(), expected, rtol=1e-8)
    flat = points.reshape(-1, 2)
    assert (flat.mean(0) - torch.tensor([0.5, -1.0], dtype=torch.float64)).abs().max() < 0.03
    assert np.allclose(torch.cov(flat.T).numpy(), cov, atol=0.03, rtol=0.03)


def test_slcp_likelihood_sign_symmetry():
    task = simulators.get("slcp")
    theta = task.prior.sample((100,))
    x = task.observation(4)
    flipped = theta * torch.tensor([1.0, 1.0, -1.0, -1.0, 1.0])
    assert torch.allclose(task.log_likelihood(theta, x), task.log_likelihood(flipped, x))


@pytest.mark.slow
def test_slcp_reference_matches_importance_sampling():
    """MCMC reference vs self-normalized importance sampling from the prior (observation 5, where
    two million prior draws give an importance ESS of several thousand)."""
    task = SLCP()
    task.mcmc_options = {"num_chains": 40, "warmup": 100, "thin": 2}
    x = task.observation(5)
    reference = task.posterior_samples(x, 2000, gen(1)).double()
    theta = task.prior.sample((2_000_000,)).double()
    weights = torch.softmax(task.log_likelihood(theta, x), 0)
    importance_ess = float(1 / (weights**2).sum())
    assert importance_ess > 2000
    for d in range(5):
        mean = float((weights * theta[:, d]).sum())
        std = math.sqrt(float((weights * (theta[:, d] - mean) ** 2).sum()))
        tolerance = 5 * std * math.sqrt(1 / importance_ess + 1 / 1000)  # 1000: MCMC ESS, cautious
        assert abs(float(reference[:, d].mean()) - mean) < tolerance, f"mean of dimension {d}"
        assert abs(float(reference[:, d].std()) - std) < tolerance, f"std of dimension {d}"
    # all four mirror modes (signs of theta_3, theta_4) carry a quarter of the mass
    quadrant = (reference[:, 2] > 0).long() * 2 + (reference[:, 3] > 0).long()
    counts = torch.bincount(quadrant, minlength=4).numpy()
    assert stats.chisquare(counts).pvalue > 0.001


def test_slcp_reference_posterior_cache(fast_slcp, monkeypatch, tmp_path):
    task = fast_slcp
    first = task.reference_posterior(2, 200, seed=0)
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].name.startswith("slcp_obs2_n200_seed0")

    def fail(*args, **kwargs):
        raise AssertionError("the cache was not used")

    monkeypatch.setattr(task, "_reference_posterior", fail)
    assert torch.equal(task.reference_posterior(2, 200, seed=0), first)  # read from the cache

    files[0].write_bytes(b"not a torch file")  # corrupt: recomputed, not trusted
    monkeypatch.undo()
    monkeypatch.setenv("SBIFLOWS_CACHE", str(tmp_path))
    assert torch.equal(task.reference_posterior(2, 200, seed=0), first)
    blob = torch.load(files[0], weights_only=True)
    assert torch.equal(blob["samples"], first)


def test_slcp_cache_with_tampered_samples_is_recomputed(fast_slcp, tmp_path):
    task = fast_slcp
    first = task.reference_posterior(3, 100, seed=0)
    (path,) = tmp_path.iterdir()
    blob = torch.load(path, weights_only=True)
    blob["samples"] = blob["samples"] + 1.0  # checksum no longer matches
    torch.save(blob, path)
    assert torch.equal(task.reference_posterior(3, 100, seed=0), first)


class _CountingSampler:
    """Wraps a task's ``_reference_posterior`` and counts the calls (i.e. cache misses)."""

    def __init__(self, task: simulators.Task) -> None:
        self.calls, self.original = 0, task._reference_posterior

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.original(*args, **kwargs)


def test_slcp_cache_stores_settings_and_diagnostics(fast_slcp, monkeypatch, tmp_path):
    task = fast_slcp
    samples = task.reference_posterior(2, 200, seed=0)
    (path,) = tmp_path.iterdir()
    blob = torch.load(path, weights_only=True)
    assert blob["settings"] == FAST_MCMC and blob["version"] == CACHE_VERSION and blob["seed"] == 0
    diagnostics = blob["diagnostics"]
    assert diagnostics["converged"] is True and diagnostics["num_samples"] == 200
    assert len(diagnostics["rhat"]) == 5 and len(diagnostics["sample_ess"]) == 5
    counter = _CountingSampler(task)
    monkeypatch.setattr(task, "_reference_posterior", counter)
    fresh = SLCP()  # a cache hit also restores the diagnostics
    fresh.mcmc_options = FAST_MCMC
    monkeypatch.setattr(fresh, "_reference_posterior", counter)
    assert torch.equal(fresh.reference_posterior(2, 200, seed=0), samples) and counter.calls == 0
    assert torch.equal(fresh.last_diagnostics.rhat, torch.tensor(diagnostics["rhat"], dtype=torch.float64))


def test_slcp_cache_is_keyed_on_the_mcmc_settings(fast_slcp, monkeypatch, tmp_path):
    task = fast_slcp
    first = task.reference_posterior(2, 100, seed=0)
    counter = _CountingSampler(task)
    monkeypatch.setattr(task, "_reference_posterior", counter)
    task.mcmc_options = {**FAST_MCMC, "on_failure": "warn"}  # not a setting of the samples: cached
    assert torch.equal(task.reference_posterior(2, 100, seed=0), first) and counter.calls == 0
    task.mcmc_options = {**FAST_MCMC, "warmup": 21}  # other settings: recomputed, stored separately
    assert not torch.equal(task.reference_posterior(2, 100, seed=0), first) and counter.calls == 1
    assert len(list(tmp_path.iterdir())) == 2
    # a file whose stored settings disagree with its name is not trusted
    task.mcmc_options = FAST_MCMC
    (path,) = [p for p in tmp_path.iterdir() if torch.load(p, weights_only=True)["settings"] == FAST_MCMC]
    blob = torch.load(path, weights_only=True)
    torch.save({**blob, "settings": {**FAST_MCMC, "warmup": 21}}, path)
    assert torch.equal(task.reference_posterior(2, 100, seed=0), first)  # recomputed: same seed
    assert counter.calls == 2


def test_slcp_unconverged_reference_is_never_served_from_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("SBIFLOWS_CACHE", str(tmp_path))
    task = SLCP()
    # an ESS threshold no run reaches, no extension (fast), and a warning instead of an error
    task.mcmc_options = {**FAST_MCMC, "min_ess": 1e9, "max_thin": 1, "on_failure": "warn"}
    with pytest.warns(ConvergenceWarning, match="ESS of the 100 returned samples"):
        first = task.reference_posterior(2, 100, seed=0)
    (path,) = tmp_path.iterdir()
    assert torch.load(path, weights_only=True)["diagnostics"]["converged"] is False  # saved, flagged
    counter = _CountingSampler(task)
    monkeypatch.setattr(task, "_reference_posterior", counter)
    with pytest.warns(ConvergenceWarning, match="did not converge"):
        assert torch.equal(task.reference_posterior(2, 100, seed=0), first)
    assert counter.calls == 1  # recomputed (and warned again), not served
    with pytest.warns(ConvergenceWarning):  # nor as a subsample
        task.reference_posterior(2, 50, seed=0)
    assert counter.calls == 2


def test_slcp_fewer_samples_are_taken_from_a_larger_cache_file(fast_slcp, monkeypatch, tmp_path):
    task = fast_slcp
    large = task.reference_posterior(4, 300, seed=0)
    counter = _CountingSampler(task)
    monkeypatch.setattr(task, "_reference_posterior", counter)
    assert torch.equal(task.reference_posterior(4, 120, seed=0), large[:120]) and counter.calls == 0
    assert len(list(tmp_path.iterdir())) == 1
    task.reference_posterior(4, 400, seed=0)  # more than any file holds: computed
    task.reference_posterior(4, 300, seed=1)  # another seed: computed
    assert counter.calls == 2


def test_slcp_posterior_samples_rejects_bad_observation():
    with pytest.raises(ValueError, match=r"x_o must be a tensor of shape \(8,\) or \(K, 8\), got \(100,\)"):
        SLCP().posterior_samples(torch.zeros(100), 10, gen())
    with pytest.raises(ValueError, match=r"got \(2, 3, 8\)"):
        SLCP().posterior_samples(torch.zeros(2, 3, 8), 10, gen())


@pytest.mark.slow
def test_slcp_reference_sampler_is_calibrated():
    """Simulation-based calibration of the SLCP reference sampler (folded MCMC plus random signs).

    20 pairs (theta, x) from the prior and the simulator; for each x, 50 draws of
    ``SLCP.posterior_samples`` (all datasets' chains in the same batched calls). If the sampler is
    right, the rank of the true value among the draws is uniform on 0..50, for the five parameters
    and for the log-likelihood (sensitive to a too wide or too narrow posterior). KS test of the
    ranks (jittered to be continuous), Bonferroni-corrected over the six statistics.

    Measured: smallest p-value 0.10 (about 11 s). The same check fails (smallest p-value < 1e-4)
    for draws shifted by 0.5 posterior sd, shrunk or widened around their mean by 0.5 or 2, without
    the random signs, or from MCMC on the likelihood tempered by 0.5 or 2.
    """
    task = SLCP()
    task.mcmc_options = {"num_chains": 20, "warmup": 100, "thin": 2}  # default checks, per dataset
    num_datasets, num_draws = 20, 50
    theta = task.prior.sample((num_datasets,))
    x = task.simulate(theta, seed=1)
    draws = task.posterior_samples(x, num_draws, gen(2)).double()
    assert draws.shape == (num_datasets, num_draws, 5) and task.last_diagnostics.converged
    log_lik = slcp_log_likelihood(draws.reshape(-1, 5), x.repeat_interleave(num_draws, 0))
    statistics = torch.cat([draws, log_lik.reshape(num_datasets, num_draws, 1)], -1)
    truth = torch.cat([theta.double(), slcp_log_likelihood(theta, x)[:, None]], -1)
    ranks = (statistics < truth[:, None, :]).sum(1)
    uniform = (ranks + torch.rand(ranks.shape, generator=gen(3), dtype=torch.float64)) / (num_draws + 1)
    for j in range(6):
        pvalue = stats.kstest(uniform[:, j].numpy(), "uniform").pvalue
        assert pvalue > 0.01 / 6, f"statistic {j}: KS p-value {pvalue:.2g}"


# ---------------------------------------------------------------------- slcp distractors
def test_slcp_distractors_contain_the_slcp_observation():
    task, slcp = SLCPDistractors(), SLCP()
    for i in range(1, NUM_OBSERVATIONS + 1):
        data, distractors = task.split(task.observation(i))
        assert torch.equal(data, slcp.observation(i))
        assert distractors.shape == (92,)


def test_slcp_distractors_simulation_embeds_slcp_simulation():
    task, slcp = SLCPDistractors(), SLCP()
    theta = task.prior.sample((100,))
    data, _ = task.split(task.simulate(theta, seed=5))
    assert torch.equal(data, slcp.simulate(theta, seed=5))  # same generator stream for the data


def test_slcp_distractors_density_matches_pyro():
    """sbibm's distractor distribution as pyro builds it. (scipy's multivariate_t cannot serve: the
    scale matrices have condition numbers up to 1e19, and it factorizes L L^T.) Some diagonal entries
    of sbibm's scale_tril are negative, which pyro's log_prob turns into NaN: flipping the sign of
    those columns gives the same distribution (same L L^T) with a valid Cholesky factor."""
    import pyro.distributions as pdist

    task = SLCPDistractors()
    gmm = task._distractors
    assert (gmm["scale_tril"].diagonal(dim1=-2, dim2=-1) < 0).any()
    cholesky = gmm["scale_tril"] * gmm["scale_tril"].diagonal(dim1=-2, dim2=-1).sign()[:, None, :]
    mixture = pdist.MixtureSameFamily(
        pdist.Categorical(logits=gmm["log_weights"]),
        pdist.MultivariateStudentT(gmm["df"].double(), gmm["loc"], cholesky),
    )
    d = task.sample_distractors(20, gen()).double()
    assert torch.allclose(task.distractor_log_prob(d), mixture.log_prob(d), rtol=1e-7)
    theta = task.prior.sample((5,))
    x = task.simulate(theta, seed=0)
    data, distractors = task.split(x)
    total = SLCP().log_likelihood(theta.double(), data.double()) + task.distractor_log_prob(distractors)
    assert torch.allclose(task.log_likelihood(theta.double(), x.double()), total)


def test_slcp_distractor_sampler_is_the_student_t_mixture():
    """With two far-apart components of known weights, draws have the right component frequencies
    and Mahalanobis distances: ||L^-1 (d - mu)||^2 / 92 ~ F(92, df)."""
    task = SLCPDistractors()
    real = task._distractors
    # well conditioned, unlike the real ones, so that float32 draws can be whitened accurately
    tril = torch.eye(92, dtype=torch.float64) * torch.tensor([[[1.0]], [[2.0]]], dtype=torch.float64)
    tril = tril + 0.1 * torch.randn(2, 92, 92, generator=gen(3), dtype=torch.float64).tril(-1)
    loc = torch.zeros(2, 92, dtype=torch.float64)
    loc[0, 0], loc[1, 0] = -1e6, 1e6
    fake = {
        **real,
        "loc": loc, "scale_tril": tril, "loc32": loc.float(), "scale_tril32": tril.float(),
        "log_weights": torch.tensor([0.3, 0.7], dtype=torch.float64).log(),
    }
    task.__dict__["_distractors"] = fake  # overrides the cached property on this instance only
    d = task.sample_distractors(4000, gen()).double()
    second = d[:, 0] > 0
    assert stats.binomtest(int(second.sum()), 4000, 0.7).pvalue > 0.001
    assert (second[:2000].double().mean() - second[2000:].double().mean()).abs() < 0.06  # shuffled
    df = float(real["df"])
    for k, rows in enumerate([~second, second]):
        white = torch.linalg.solve_triangular(tril[k], (d[rows] - loc[k]).T, upper=False)
        f_stat = (white**2).sum(0) / 92
        assert stats.kstest(f_stat.numpy(), stats.f(92, df).cdf).pvalue > 0.001


def test_slcp_distractors_reference_is_slcps(monkeypatch, tmp_path):
    monkeypatch.setenv("SBIFLOWS_CACHE", str(tmp_path))
    monkeypatch.setattr(SLCP, "mcmc_options", FAST_MCMC)
    samples = SLCPDistractors().reference_posterior(1, 150, seed=2)
    assert torch.equal(samples, SLCP().reference_posterior(1, 150, seed=2))
    assert [p.name.split("_obs")[0] for p in tmp_path.iterdir()] == ["slcp"]  # one shared cache file

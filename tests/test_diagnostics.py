"""Tests of sbiflows.diagnostics on an exact analytic posterior and deliberately wrong versions of it.

The model (tests/gaussian_posterior.py) is theta ~ N(0, I_2), x ~ N(theta, 0.5^2 I_2). The sizes
(500 datasets, 500 posterior draws) make every "detects" test below pass for 50 of 50 seeds
tried (scripted outside the suite); the fixed seeds keep the suite deterministic.
"""

from __future__ import annotations

import doctest
import importlib
import importlib.util
import math
import sys

import pytest
import torch
from gaussian_posterior import GaussianLinearModel

from sbiflows import diagnostics
from sbiflows.diagnostics import (
    expected_coverage,
    rank_statistics,
    sbc,
    simulate_datasets,
    tarp,
)

NUM_DATASETS = 500
NUM_DRAWS = 500


@pytest.fixture(scope="module")
def model() -> GaussianLinearModel:
    return GaussianLinearModel(dim=2, sigma=0.5)


@pytest.fixture(scope="module")
def pairs(model):
    """One set of simulations, shared by all calibration checks (as users are meant to do)."""
    return simulate_datasets(model.prior, model, NUM_DATASETS, seed=1)


def run(check, posterior, pairs, **kwargs):
    theta, x = pairs
    return check(posterior, theta=theta, x=x, num_posterior_samples=NUM_DRAWS, seed=2, **kwargs)


class FixedDraws:
    """A posterior whose draws are given: draws (L, B, D); log_prob = -|theta|^2 (a fixed density)."""

    def __init__(self, draws: torch.Tensor) -> None:
        self.draws = draws
        self.calls: list[int] = []

    def sample_batched(self, n, xs):
        self.calls.append(len(xs))
        return self.draws[:n, : len(xs)]

    def log_prob(self, theta, x):
        return -theta.square().sum(-1)


def test_sbc_passes_for_the_exact_posterior(model, pairs):
    result = run(sbc, model.posterior(), pairs)
    assert result.passed, str(result)
    assert result.ranks.shape == (NUM_DATASETS, 2)
    assert 0 <= int(result.ranks.min()) and int(result.ranks.max()) <= NUM_DRAWS
    assert result.shapes == ("uniform", "uniform")
    assert result.threshold == pytest.approx(0.005)
    assert result.failed_parameters == ()
    assert "PASSED" in str(result) and "Kolmogorov-Smirnov" in str(result)


@pytest.mark.parametrize(("shift", "direction"), [(0.5, "overestimates"), (-0.5, "underestimates")])
def test_sbc_detects_bias_as_skewed_ranks(model, pairs, shift, direction):
    result = run(sbc, model.posterior(shift=shift), pairs)
    assert not result.passed
    assert result.failed_parameters == ("theta_1", "theta_2")
    assert all(direction in shape for shape in result.shapes)
    assert (result.mean_ranks < 0.5).all() if shift > 0 else (result.mean_ranks > 0.5).all()
    text = str(result)
    assert "FAILED for theta_1, theta_2" in text and "skewed" in text


@pytest.mark.parametrize(("scale", "shape"), [(0.75, "∪-shaped (over-confident"), (1.3, "∩-shaped (under-confident")])
def test_sbc_names_dispersion_errors_from_the_rank_histogram(model, pairs, scale, shape):
    result = run(sbc, model.posterior(scale=scale), pairs, test="chi2")
    assert not result.passed
    assert all(s.startswith(shape) for s in result.shapes)
    tails = result.lower_tail + result.upper_tail
    assert (tails > 0.2).all() if scale < 1 else (tails < 0.2).all()
    assert "chi-square" in str(result)


def test_sbc_ranks_count_draws_below_the_truth():
    draws = torch.arange(5.0).view(5, 1, 1).expand(5, 3, 2).clone()  # draws 0..4 for every dataset
    theta = torch.tensor([[-1.0, 0.5], [2.5, 4.5], [10.0, 3.0]])
    with pytest.warns(UserWarning, match="only 3 datasets"), pytest.warns(UserWarning, match="only 5 posterior"):
        result = sbc(FixedDraws(draws), theta=theta, x=torch.zeros(3, 1), num_posterior_samples=5)
    assert result.ranks.tolist() == [[0, 1], [3, 5], [5, 3]]


def test_sbc_is_seeded_and_restores_the_global_generator(model):
    state = torch.get_rng_state()
    first = sbc(model.posterior(), model.prior, model, num_datasets=200, num_posterior_samples=200, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    again = sbc(model.posterior(), model.prior, model, num_datasets=200, num_posterior_samples=200, seed=3)
    assert torch.equal(first.ranks, again.ranks)


def test_sbc_chunks_posterior_sampling_over_datasets():
    draws = torch.randn(150, 300, 2)
    theta, x = torch.randn(300, 2), torch.zeros(300, 1)
    one_call, chunked = FixedDraws(draws), FixedDraws(draws)
    full = sbc(one_call, theta=theta, x=x, num_posterior_samples=150)
    parts = sbc(chunked, theta=theta, x=x, num_posterior_samples=150, batch_size=128)
    assert one_call.calls == [300] and chunked.calls == [128, 128, 44]
    assert torch.equal(full.ranks[:128], parts.ranks[:128])


def test_sbc_excludes_invalid_simulations_with_a_count(model, pairs):
    theta, x = pairs
    x = x[:300].clone()
    x[[3, 50, 77], 1] = torch.tensor([math.nan, math.inf, -math.inf])
    with pytest.warns(UserWarning, match="sbc: excluded 3 of 300 simulations with NaN/inf"):
        result = sbc(model.posterior(), theta=theta[:300], x=x, num_posterior_samples=200)
    assert result.num_invalid == 3 and result.num_datasets == 297
    assert "3 invalid simulations excluded" in str(result)


def test_sbc_warns_about_too_few_datasets_and_draws(model):
    with pytest.warns(UserWarning, match="only 50 datasets; use at least 100"):
        sbc(model.posterior(), model.prior, model, num_datasets=50, num_posterior_samples=200)
    with pytest.warns(UserWarning, match="only 20 posterior samples per dataset"):
        sbc(model.posterior(), model.prior, model, num_datasets=200, num_posterior_samples=20)
    theta, x = torch.zeros(100, 2), torch.zeros(100, 2)
    x[:4] = math.nan  # 4 of 100 fail: one warning says both, not "only 96" after "excluded 4" separately
    with pytest.warns(UserWarning) as caught:
        sbc(model.posterior(), theta=theta, x=x, num_posterior_samples=200)
    assert [str(w.message) for w in caught] == [
        "sbc: only 96 datasets (excluded 4 of 100 simulations with NaN/inf values); use at least 100 for a reliable "
        "verdict"]


def test_rank_statistics_chi_square_uses_exact_expected_counts():
    # L + 1 = 7 rank values in 3 bins hold 3, 2, 2 values; perfectly proportional counts give p = 1.
    ranks = torch.tensor([0, 1, 2, 3, 4, 5, 6] * 30).unsqueeze(1)
    stats = rank_statistics(ranks, 6, num_bins=3)
    assert stats["chi2_pvalues"].item() == pytest.approx(1.0)
    assert stats["mean_ranks"].item() == pytest.approx(0.5, abs=0.03)  # of the randomised ranks


class NoSampleBatched:
    def sample(self, n, x):
        return torch.zeros(n, 2)


class WrongShape:
    def sample_batched(self, n, xs):
        return torch.zeros(n, 2)


@pytest.mark.parametrize(
    ("posterior", "kwargs", "error", "match"),
    [
        (NoSampleBatched(), {}, TypeError, "posterior must implement sample_batched.*lacks sample_batched"),
        (WrongShape(), {}, ValueError, r"must return shape \(200, 300, D\), got \(200, 2\)"),
        (None, {"theta": torch.zeros(300, 2)}, ValueError, "pass both theta and x"),
        (None, {"theta": None, "x": None, "prior_none": True}, ValueError, "needs a prior and a simulator"),
        (None, {"theta": torch.zeros(300, 2), "x": torch.zeros(299, 2)}, ValueError, "same number of rows, got 300 and 299"),
        (None, {"theta": torch.zeros(300), "x": torch.zeros(300, 2)}, ValueError, r"theta must have shape \(N, D\), got \(300,\)"),
        (None, {"theta": [[0.0, 0.0]] * 300, "x": torch.zeros(300, 2)}, TypeError, "theta must be a torch.Tensor"),
        (None, {"theta": torch.zeros(300, 3), "x": torch.zeros(300, 2)}, ValueError, "theta has 3 parameters but the prior's event shape is"),
        (None, {"alpha": 1.0}, ValueError, r"alpha must be a real number in \(0, 1\), got 1.0"),
        (None, {"test": "anderson"}, ValueError, "test must be one of 'ks', 'chi2', got 'anderson'"),
        (None, {"num_bins": 1}, ValueError, r"num_bins \(at most L \+ 1\) must be an int in \[2, 201\], got 1"),
        (None, {"parameter_names": ["a"]}, ValueError, "parameter_names must have 2 entries"),
        (None, {"num_posterior_samples": 0}, ValueError, "num_posterior_samples must be an int >= 1, got 0"),
        (None, {"num_datasets": 0}, ValueError, "num_datasets must be an int >= 1, got 0"),
        (None, {"seed": 1.5}, TypeError, "seed must be None or an int, got float 1.5"),
        (None, {"batch_size": 0}, ValueError, "batch_size must be None or an int >= 1, got 0"),
    ],
)
def test_sbc_rejects_bad_input(model, posterior, kwargs, error, match):
    kwargs = {"num_datasets": 300, "num_posterior_samples": 200, **kwargs}
    prior = None if kwargs.pop("prior_none", False) else model.prior
    with pytest.raises(error, match=match):
        sbc(posterior or model.posterior(), prior, model, **kwargs)


def test_sbc_with_only_invalid_simulations_fails_loudly(model):
    theta, x = torch.zeros(300, 2), torch.full((300, 2), math.nan)
    with pytest.raises(ValueError, match=r"no valid simulations left \(all 300 contain NaN/inf\)"):
        sbc(model.posterior(), theta=theta, x=x)  # the error alone: no warning that repeats it


@pytest.mark.parametrize("check", [sbc, expected_coverage, tarp])
def test_a_prior_of_another_dimension_than_the_posterior_is_refused_before_simulating(model, check):
    posterior, calls = model.posterior(), []
    posterior.theta_dim = 2  # as sbiflows' posteriors say

    def simulator(theta):
        calls.append(len(theta))
        return theta

    prior = torch.distributions.Independent(torch.distributions.Normal(torch.zeros(3), torch.ones(3)), 1)
    with pytest.raises(ValueError, match=r"the prior has event shape \(3,\) but the posterior has 2 parameters"):
        check(posterior, prior, simulator, num_datasets=100, num_posterior_samples=100)
    assert calls == []


def test_simulate_datasets_rejects_bad_input(model):
    with pytest.raises(TypeError, match="prior must be a torch.distributions.Distribution"):
        simulate_datasets("normal", model, 10)
    with pytest.raises(TypeError, match="simulator must be callable"):
        simulate_datasets(model.prior, 3, 10)
    with pytest.raises(ValueError, match=r"simulator must return shape \(N, x_dim\) = \(10, x_dim\)"):
        simulate_datasets(model.prior, lambda t: t[:5], 10)
    with pytest.raises(TypeError, match="simulator must return a torch.Tensor"):
        simulate_datasets(model.prior, lambda t: [0.0] * len(t), 10)
    theta, x = simulate_datasets(model.prior, lambda t: t.numpy(), 10)  # numbers in numpy, as simulate takes
    assert torch.equal(x, theta)
    with pytest.raises(ValueError, match=r"prior must have event shape \(D,\)"):
        square = torch.distributions.Independent(torch.distributions.Normal(torch.zeros(2, 2), 1.0), 2)
        simulate_datasets(square, lambda t: t, 10)
    scalar, _ = simulate_datasets(torch.distributions.Normal(0.0, 1.0), lambda t: t, 10)  # as NPE takes it: D = 1
    assert scalar.shape == (10, 1)


# ----------------------------------------------------------------------------------- coverage
def test_coverage_is_calibrated_for_the_exact_posterior(model, pairs):
    result = run(expected_coverage, model.posterior(), pairs)
    assert result.passed and result.verdict == "calibrated", str(result)
    assert result.levels.shape == result.empirical.shape == result.band.shape == (19,)
    assert (result.deviation.abs() <= result.band).all()
    assert result.hpd_ranks.shape == (NUM_DATASETS,)
    assert "PASSED" in str(result)


@pytest.mark.parametrize(
    ("kwargs", "verdict", "one_sided_passes"),
    [
        ({"scale": 0.8}, "over-confident", False),
        ({"shift": 1.0}, "over-confident", False),
        ({"scale": 1.3}, "under-confident", True),
    ],
)
def test_coverage_detects_dispersion_and_bias(model, pairs, kwargs, verdict, one_sided_passes):
    result = run(expected_coverage, model.posterior(**kwargs), pairs)
    assert not result.passed and result.verdict == verdict, str(result)
    assert result.deviation.mean() < 0 if verdict == "over-confident" else result.deviation.mean() > 0
    status = "CONSERVATIVE" if verdict == "under-confident" else "FAILED"  # too wide is not shouted as a failure
    assert f"verdict: {verdict}" in str(result) and status in str(result)
    one_sided = run(expected_coverage, model.posterior(**kwargs), pairs, one_sided=True)
    assert one_sided.passed == one_sided_passes
    assert one_sided.verdict == verdict


def test_coverage_falls_back_to_log_prob_per_dataset(model, pairs):
    batched = run(expected_coverage, model.posterior(), pairs)
    looped = run(expected_coverage, model.posterior(batched_log_prob=False), pairs)
    assert torch.equal(batched.hpd_ranks, looped.hpd_ranks)


def test_coverage_hpd_rank_counts_denser_draws_randomised():
    # log_prob = -|theta|^2: draws at radii 0..3 are denser than a truth at radius 1.5 for 2 of 4, at 0.5 for 1
    draws = torch.tensor([0.0, 1.0, 2.0, 3.0]).view(4, 1, 1).expand(4, 2, 1).clone()
    theta = torch.tensor([[1.5], [-0.5]])
    with pytest.warns(UserWarning):
        result = expected_coverage(
            FixedDraws(draws), theta=theta, x=torch.zeros(2, 1), num_posterior_samples=4, levels=[0.3, 0.6]
        )
    assert (result.hpd_ranks * 5).floor().tolist() == [2.0, 1.0]  # (k + U) / (L + 1)
    assert result.empirical[1] == 1.0


def test_coverage_is_exact_at_few_draws_and_with_flat_densities():
    """HPD ranks k / L compared with ``< c`` covered ceil(c L) / (L + 1) < c: an exact posterior with 20 draws failed
    as over-confident; with a flat density every draw tied with the truth, ranks were all 0 and it failed as
    under-confident. The randomised rank is uniform for both."""

    class Exact:  # x = theta + N(0, 1): posterior N(x / 2, I / 2)
        def sample_batched(self, n, xs):
            return xs / 2 + torch.randn(n, *xs.shape) / 2**0.5

        def log_prob(self, theta, x):
            return -(theta - x / 2).square().sum(-1)

    class Flat:  # theta ~ U(0, 1) whatever x is: the exact posterior of an uninformative x, density 1 everywhere
        def sample_batched(self, n, xs):
            return torch.rand(n, len(xs), 1)

        def log_prob(self, theta, x):
            return torch.zeros(theta.shape[:-1])

    prior = torch.distributions.MultivariateNormal(torch.zeros(2), torch.eye(2))
    with pytest.warns(UserWarning, match="posterior samples per dataset"):
        exact = [expected_coverage(Exact(), prior, lambda t: t + torch.randn_like(t), num_datasets=2000,
                                   num_posterior_samples=20, seed=seed) for seed in range(3)]
    assert all(result.passed for result in exact)
    assert abs(torch.cat([r.hpd_ranks for r in exact]).mean().item() - 0.5) < 0.02
    box = torch.distributions.Independent(torch.distributions.Uniform(torch.zeros(1), torch.ones(1)), 1)
    with pytest.warns(UserWarning, match="posterior samples per dataset"):
        flat = expected_coverage(Flat(), box, lambda t: torch.randn(len(t), 1), num_datasets=1000,
                                 num_posterior_samples=50, seed=0)
    assert flat.passed and flat.verdict == "calibrated"


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"levels": [0.0, 0.5]}, ValueError, r"increasing values in \(0, 1\)"),
        ({"levels": [0.6, 0.5]}, ValueError, r"increasing values in \(0, 1\)"),
        ({"levels": [[0.5]]}, ValueError, "non-empty 1-D sequence"),
        ({"levels": ["a"]}, TypeError, "levels must be a sequence of floats"),
        ({"num_sigmas": -1.0}, ValueError, "num_sigmas must be"),
        ({"num_sigmas": math.inf}, ValueError, "num_sigmas must be"),  # passed a 4x too narrow posterior
        ({"tolerance": math.inf}, ValueError, "tolerance must be"),
        ({"num_sigmas": "3"}, TypeError, "num_sigmas must be"),  # failed inside a comparison
    ],
)
def test_coverage_rejects_bad_options(model, kwargs, error, match):
    with pytest.raises(error, match=match):
        expected_coverage(model.posterior(), model.prior, model, num_datasets=200, **kwargs)


def test_coverage_requires_log_prob(model):
    with pytest.raises(TypeError, match="lacks log_prob"):
        expected_coverage(WrongShape(), model.prior, model, num_datasets=200)


# --------------------------------------------------------------------------------------- TARP
def test_tarp_passes_for_the_exact_posterior(model, pairs):
    result = run(tarp, model.posterior(), pairs)
    assert result.passed and result.verdict == "calibrated", str(result)
    assert result.credibility.shape == result.ecp.shape == (31,)
    assert result.ecp[0] == 0 and (result.ecp[1:] >= result.ecp[:-1]).all()
    assert result.max_deviation == pytest.approx(float((result.ecp - result.credibility).abs().max()))
    assert result.max_deviation <= 0.1 and result.ks_pvalue >= 0.01
    assert abs(result.atc) < 0.03
    assert "PASSED" in str(result)


@pytest.mark.parametrize(
    ("kwargs", "verdict"),
    [({"scale": 0.5}, "over-confident"), ({"shift": 2.0}, "over-confident"), ({"scale": 2.0}, "under-confident")],
)
def test_tarp_detects_gross_dispersion_and_bias(model, pairs, kwargs, verdict):
    result = run(tarp, model.posterior(**kwargs), pairs)
    assert not result.passed and result.verdict == verdict, str(result)
    assert result.max_deviation > 0.1 and result.ks_pvalue < 1e-6
    assert (result.atc_lower > result.atc) == (verdict == "over-confident")
    if "scale" in kwargs:  # a pure dispersion error also fixes the sign of ATC
        assert result.atc < 0 if verdict == "over-confident" else result.atc > 0
    assert "FAILED" in str(result)


def test_tarp_coverage_values_use_the_given_references():
    # References at 2, draws at 0.5, 1, 3, 5: a truth at 0 (distance 2) has 3 of 4 draws closer.
    draws = torch.tensor([0.5, 1.0, 3.0, 5.0]).view(4, 1, 1).expand(4, 2, 1).clone()
    theta, references = torch.tensor([[0.0], [3.2]]), torch.tensor([[2.0], [2.0]])
    with pytest.warns(UserWarning):
        result = tarp(
            FixedDraws(draws), theta=theta, x=torch.zeros(2, 1), num_posterior_samples=4,
            references=references, normalize=False,
        )
    assert result.coverage_values.tolist() == [0.75, 0.5]  # 3.2 is 1.2 away: only 1 and 3 closer


def test_tarp_normalisation_makes_it_invariant_to_units(model, pairs):
    theta, x = pairs

    class Scaled:
        def __init__(self, factor):
            self.factor, self.inner = factor, model.posterior()

        def sample_batched(self, n, xs):
            return self.factor * self.inner.sample_batched(n, xs)

    small = tarp(Scaled(1.0), theta=theta, x=x, num_posterior_samples=200)
    large = tarp(Scaled(1000.0), theta=theta * 1000.0, x=x, num_posterior_samples=200)
    assert torch.equal(small.coverage_values, large.coverage_values)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"references": torch.zeros(10, 2)}, ValueError, r"references must have shape \(N, D\) = \(200, 2\)"),
        ({"references": [[0.0, 0.0]] * 200}, TypeError, "references must be a torch.Tensor"),
        ({"num_bins": 1}, ValueError, "num_bins must be an int >= 2"),
        ({"distance": "cosine"}, ValueError, "distance must be one of 'l2', 'l1', got 'cosine'"),
        ({"tolerance": 0.0}, ValueError, r"tolerance must be a real number in \(0, 1\], got 0.0"),
        ({"alpha": 0.0}, ValueError, r"alpha must be a real number in \(0, 1\), got 0.0"),
    ],
)
def test_tarp_rejects_bad_options(model, kwargs, error, match):
    with pytest.raises(error, match=match):
        tarp(model.posterior(), model.prior, model, num_datasets=200, num_posterior_samples=200, **kwargs)


def test_checks_reuse_the_same_simulations(model, pairs):
    theta, x = pairs
    for check in (sbc, expected_coverage, tarp):
        result = check(model.posterior(), theta=theta, x=x, num_posterior_samples=200)
        assert result.num_datasets == NUM_DATASETS


# ------------------------------------------------------------------------------------ doctests
@pytest.mark.parametrize("module", ["c2st", "sbc", "coverage", "tarp", "predictive", "simulations"])
def test_docstring_examples_run(module):
    failures, _ = doctest.testmod(importlib.import_module(f"sbiflows.diagnostics.{module}"))
    assert failures == 0


def test_package_docstring_example_runs():
    assert doctest.testmod(diagnostics).failed == 0


def test_calibration_checks_show_progress_on_a_terminal(capsys, monkeypatch):
    """progress=True shows a bar over the datasets on a terminal, silent elsewhere."""
    from sbiflows.diagnostics import expected_coverage, sbc, simulate_datasets, tarp

    prior = torch.distributions.MultivariateNormal(torch.zeros(2), torch.eye(2))
    theta, x = simulate_datasets(prior, lambda t: t + torch.randn_like(t), 120, seed=3)
    for check in (sbc, expected_coverage, tarp):
        check(_GlobalExact(), theta=theta, x=x, num_posterior_samples=100, seed=1, batch_size=50, progress=True)
        assert "dataset" not in capsys.readouterr().err  # not a terminal: silent
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    for check in (sbc, expected_coverage, tarp):
        shown = check(_GlobalExact(), theta=theta, x=x, num_posterior_samples=100, seed=1, batch_size=50, progress=True)
        assert "0/120 " in capsys.readouterr().err, check.__name__  # tqdm writes to stderr
        assert shown.num_datasets == 120 and shown.passed, check.__name__


class _RecordedBar:
    """Stands in for tqdm: records every update of every bar."""

    bars: list = []

    def __init__(self, *, total, desc, **_):
        self.total, self.desc, self.n, self.updates = total, desc, 0, []
        _RecordedBar.bars.append(self)

    def update(self, k):
        self.n += k
        self.updates.append(k)

    def close(self):
        pass


@pytest.mark.filterwarnings("ignore:expected_coverage. only 13 datasets")
def test_the_bar_follows_the_posteriors_own_chunks_without_changing_the_draws(monkeypatch):
    """With no batch_size a check makes one posterior call; an sbiflows posterior reports its chunks of
    observations, so the bar moves during that call (13 datasets, chunks of 3 observations of 100 draws)."""
    import tqdm.auto

    from sbiflows import NPE
    from sbiflows.diagnostics import expected_coverage, simulate_datasets

    prior = torch.distributions.MultivariateNormal(torch.zeros(2), torch.eye(2))
    theta, x = simulate_datasets(prior, lambda t: t + 0.3 * torch.randn_like(t), 200, seed=0)
    posterior = NPE(prior, transforms=1, max_batch_elements=300, ensemble=1).fit(theta, x, max_epochs=2,
                                                                                progress=False)
    quiet = expected_coverage(posterior, theta=theta[:13], x=x[:13], num_posterior_samples=100, seed=1)
    monkeypatch.setattr(tqdm.auto, "tqdm", _RecordedBar)
    _RecordedBar.bars = []
    shown = expected_coverage(posterior, theta=theta[:13], x=x[:13], num_posterior_samples=100, seed=1, progress=True)
    assert torch.equal(shown.hpd_ranks, quiet.hpd_ranks)
    assert _RecordedBar.bars and all(bar.total == 13 and bar.n == 13 for bar in _RecordedBar.bars)
    assert _RecordedBar.bars[0].updates[:5] == [3, 3, 3, 3, 1]  # the draws, chunk by chunk


class _GlobalExact:
    """The exact posterior of x = theta + noise under a standard normal prior, drawn from torch's global generator."""

    def sample_batched(self, n, xs):
        return xs / 2 + torch.randn(n, *xs.shape) / 2**0.5

    def log_prob_batched(self, theta, xs):
        return -(theta - xs / 2).square().sum(-1)

    def log_prob(self, theta, x):
        return -(theta - x / 2).square().sum(-1)


@pytest.mark.parametrize("batch_size", [None, 40])
def test_a_progress_bar_does_not_change_a_checks_result(batch_size):
    """The draws follow the posterior calls, so the calls must not depend on progress: a bar that split them into
    chunks of 50 gave other ranks (``sbiflows fit`` without ``--quiet`` reported TARP over-confident, KS p = 0.004,
    where the same posterior with ``--quiet`` had p = 0.82). Both a posterior on torch's global generator and an
    sbiflows posterior, over more datasets than one such chunk."""
    from sbiflows import NPE
    from sbiflows.diagnostics import expected_coverage, sbc, simulate_datasets, tarp

    prior = torch.distributions.MultivariateNormal(torch.zeros(2), torch.eye(2))
    theta, x = simulate_datasets(prior, lambda t: t + torch.randn_like(t), 120, seed=3)
    trained = NPE(prior, transforms=1, hidden_features=(8, 8)).fit(theta, x, max_epochs=2, seed=0, progress=False)
    for posterior in (_GlobalExact(), trained):
        for check in (sbc, expected_coverage, tarp):
            quiet, shown = (check(posterior, theta=theta, x=x, num_posterior_samples=100, seed=1, batch_size=batch_size,
                                  progress=progress) for progress in (False, True))
            assert str(quiet) == str(shown), (type(posterior).__name__, check.__name__)


@pytest.mark.parametrize(
    "scale,shift,expected",
    [(1.0, 0.0, "calibrated"), (1.6, 0.0, "conservative"), (0.5, 0.0, "over-confident"), (1.0, 1.0, "biased")],
)
def test_verdict_words_for_exact_wide_narrow_and_shifted_posteriors(model, pairs, scale, shift, expected):
    """Issue 15: the report's words, from the synthetic posteriors with a known error."""
    from sbiflows.diagnostics import overall, verdict

    posterior = model.posterior(scale=scale, shift=shift)
    words = {check.__name__: verdict(run(check, posterior, pairs)) for check in (sbc, expected_coverage, tarp)}
    assert overall(words.values()) == expected, words
    if expected != "biased":  # a shift is what SBC names; coverage and TARP call it over-confident
        assert set(words.values()) <= {expected, "calibrated"}, words


def test_coverage_skips_the_truncated_spaces_normalizer_and_ranks_the_same(monkeypatch):
    """HPD ranks compare densities of one observation, so expected_coverage asks an sbiflows posterior for
    densities without the truncated space's Monte Carlo normalizer (most of the check's cost): the ranks are
    those of the normalized densities, and the normalizer is never computed."""
    import sbiflows.diagnostics.coverage as coverage_module
    from sbiflows import NPE, box_uniform
    from sbiflows.diagnostics import simulate_datasets

    prior = box_uniform([-1.0, -1.0], [1.0, 1.0])
    theta, x = simulate_datasets(prior, lambda t: t + 0.5 * torch.randn_like(t), 300, seed=0)
    posterior = NPE(prior, transforms=1, space="truncated", ensemble=1).fit(theta, x, max_epochs=3, progress=False)
    held_theta, held_x = simulate_datasets(prior, lambda t: t + 0.5 * torch.randn_like(t), 150, seed=1)
    calls = []
    normalizer = posterior._normalizer
    monkeypatch.setattr(posterior, "_normalizer", lambda *args: calls.append(1) or normalizer(*args))
    fast = expected_coverage(posterior, theta=held_theta, x=held_x, num_posterior_samples=200, seed=2)
    assert calls == []
    monkeypatch.setattr(coverage_module, "_skips_normalizer", lambda _: False)
    normalized = expected_coverage(posterior, theta=held_theta, x=held_x, num_posterior_samples=200, seed=2)
    assert calls  # the normalized densities did compute it
    assert (fast.hpd_ranks - normalized.hpd_ranks).abs().max() <= 1 / 200  # equal up to a float tie
    assert fast.verdict == normalized.verdict


def test_coverage_passes_normalized_only_where_every_density_method_takes_it():
    from sbiflows.diagnostics.coverage import _skips_normalizer

    class Plain:
        def sample_batched(self, n, xs): ...
        def log_prob_batched(self, theta, xs): ...

    class Both(Plain):
        def sample_and_log_prob_batched(self, n, xs, *, normalized=True): ...
        def log_prob_batched(self, theta, xs, *, normalized=True): ...

    class FusedPlain(Both):
        def sample_and_log_prob_batched(self, n, xs): ...

    class OnlyLogProb:
        def sample_batched(self, n, xs): ...
        def log_prob(self, theta, x, normalized=True): ...

    assert [_skips_normalizer(p()) for p in (Plain, Both, FusedPlain, OnlyLogProb)] == [False, True, False, False]


@pytest.mark.parametrize(("space", "ensemble"), [("truncated", 1), ("unconstrained", 1), ("truncated", 2)])
def test_every_draw_and_density_path_reports_its_observations(space, ensemble):
    """The chunked loops behind sample_batched, sample_and_log_prob_batched and log_prob_batched report each
    chunk of observations once per pass (chunks of 300 // 100 = 3 observations here), and the draws are the
    same as without the callback."""
    from sbiflows import NPE, box_uniform
    from sbiflows.posterior_batches import reporting_observations

    prior = box_uniform([-1.0, -1.0], [1.0, 1.0])
    theta = prior.sample((200,))
    posterior = NPE(prior, transforms=1, space=space, ensemble=ensemble, max_batch_elements=300).fit(
        theta, theta + 0.3 * torch.randn_like(theta), max_epochs=1, progress=False)
    xs = theta[:7]
    done: list[int] = []
    with reporting_observations(done.append):
        draws = posterior.sample_batched(100, xs, seed=0)
    assert done == [3, 3, 1] and torch.equal(draws, posterior.sample_batched(100, xs, seed=0))
    done.clear()
    with reporting_observations(done.append):
        posterior.log_prob_batched(draws, xs, normalized=False)
    assert done == [3, 3, 1]
    done.clear()
    with reporting_observations(done.append):
        posterior.sample_and_log_prob_batched(100, xs, seed=0, normalized=False)
    assert done == [3, 3, 1] * ensemble  # an ensemble evaluates its draws in a second pass


def test_a_hook_left_by_an_error_is_cleared_and_never_outlives_the_check():
    """A posterior that fails mid-check closes the bar and leaves no progress callback behind, also in the
    density pass (a list comprehension kept its generator alive in the traceback's frame)."""
    from sbiflows.diagnostics.simulations import batched_log_prob
    from sbiflows.posterior_batches import _REPORT

    class Failing(_GlobalExact):
        def log_prob_batched(self, theta, xs):
            if len(xs) < 50:
                raise KeyboardInterrupt
            return super().log_prob_batched(theta, xs)

    xs = torch.randn(70, 2)
    with pytest.raises(KeyboardInterrupt) as caught:
        batched_log_prob(Failing(), xs[None], xs, batch_size=50, progress="densities")
    assert caught.value is not None and _REPORT.get() is None


def test_c2st_shows_its_classifiers_finishing_and_scores_the_same(monkeypatch):
    """progress=True: a bar over the pairs' folds that reaches them all; the accuracies are those without it."""
    import tqdm.auto

    from sbiflows.diagnostics import c2st_batched

    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(300, 2, generator=generator), torch.randn(300, 2, generator=generator)
    pairs = [(a, b), (a, b + 1.0)]
    quiet = c2st_batched(pairs, folds=3, seed=1)
    monkeypatch.setattr(tqdm.auto, "tqdm", _RecordedBar)
    _RecordedBar.bars = []
    shown = c2st_batched(pairs, folds=3, seed=1, progress=True)
    assert [r.accuracy for r in shown] == [r.accuracy for r in quiet]
    (bar,) = _RecordedBar.bars
    assert bar.total == 6 and bar.n == 6 and len(bar.updates) >= 2  # folds finish at different epochs
    with pytest.raises(TypeError, match="progress"):
        c2st_batched(pairs, progress="yes")


def test_sbc_names_a_bias_before_an_over_confidence_as_overall_does():
    """One parameter shifted, the other too narrow: SBC's verdict is "biased" (a shift is what only SBC can tell
    apart; the module's order), not the "over-confident" of the narrow parameter."""
    from sbiflows.diagnostics import simulate_datasets, verdict

    class ShiftedAndNarrow:  # theta ~ N(0, I), x = theta + N(0, I): the exact posterior is N(x / 2, I / 2)
        def sample_batched(self, n, xs):
            sd = torch.tensor([1.0, 0.5]) / 2**0.5
            return xs / 2 + torch.tensor([1.0, 0.0]) + sd * torch.randn(n, *xs.shape)

    prior = torch.distributions.MultivariateNormal(torch.zeros(2), torch.eye(2))
    theta, x = simulate_datasets(prior, lambda t: t + torch.randn_like(t), 500, seed=1)
    result = sbc(ShiftedAndNarrow(), theta=theta, x=x, num_posterior_samples=200, seed=2)
    assert "biased" in result.shapes[0] and "over-confident" in result.shapes[1], result.shapes
    assert verdict(result) == "biased"


@pytest.mark.parametrize("fused", [False, True])
def test_a_nan_density_is_an_error_not_a_point_inside_every_hpd_region(fused):
    """A NaN compares False with every draw's density, so its HPD rank was 0: coverage counted it as covered."""
    from sbiflows.diagnostics import simulate_datasets

    class NanWhereLarge(_GlobalExact):  # the exact posterior, with a NaN density where theta_1 > 1
        def log_prob_batched(self, theta, xs):
            return torch.where(theta[..., 0] > 1.0, torch.nan, super().log_prob_batched(theta, xs))

    class Fused(NanWhereLarge):
        def sample_and_log_prob_batched(self, n, xs):
            draws = self.sample_batched(n, xs)
            return draws, self.log_prob_batched(draws, xs)

    prior = torch.distributions.MultivariateNormal(torch.zeros(2), torch.eye(2))
    theta, x = simulate_datasets(prior, lambda t: t + torch.randn_like(t), 200, seed=0)
    with pytest.raises(ValueError, match=r"returned NaN log-probabilities for \d+ of"):
        expected_coverage((Fused if fused else NanWhereLarge)(), theta=theta, x=x, num_posterior_samples=100, seed=1)


@pytest.mark.parametrize("num_bins", [3, 5])
def test_tarp_integrates_both_halves_whole_with_an_odd_number_of_bins(num_bins):
    """0.5 is not on an odd grid: ``grid >= 0.5`` and ``grid <= 0.5`` left out the bin that straddles it, so ATC and
    the area below 0.5 together covered about half of [0, 1] with 3 bins."""
    from sbiflows.diagnostics import simulate_datasets

    class Wide:  # twice the exact posterior's width: ECP - alpha > 0 over the whole grid
        def sample_batched(self, n, xs):
            return xs / 2 + 2.0 * torch.randn(n, *xs.shape) / 2**0.5

    prior = torch.distributions.MultivariateNormal(torch.zeros(2), torch.eye(2))
    theta, x = simulate_datasets(prior, lambda t: t + torch.randn_like(t), 500, seed=0)
    result = tarp(Wide(), theta=theta, x=x, num_posterior_samples=200, num_bins=num_bins, seed=0)
    whole = float(torch.trapezoid(result.ecp - result.credibility, result.credibility))
    assert whole > 0.05 and abs(result.atc + result.atc_lower - whole) < 0.2 * whole, (result.atc, result.atc_lower)


@pytest.mark.parametrize(
    ("ranks", "match"),
    [(torch.zeros(10, dtype=torch.long), r"ranks must be a tensor of shape \(N, D\), got \(10,\)"),
     (torch.full((10, 2), 101), r"ranks must lie in 0..num_posterior_samples = 0..100, got 101..101"),
     (torch.full((10, 2), -1), r"got -1..-1")],
)
def test_rank_statistics_refuses_ranks_of_another_shape_or_range(ranks, match):
    """They failed inside numpy ("not enough values to unpack", a broadcasting error)."""
    with pytest.raises(ValueError, match=match):
        rank_statistics(ranks, 100)


class _ExactGaussian:  # x = theta + N(0, 1) noise under a N(0, I) prior: posterior N(x / 2, I / 2)
    def sample_batched(self, n, xs):
        return xs / 2 + torch.randn(n, *xs.shape) / 2**0.5


@pytest.mark.filterwarnings("ignore:.*posterior samples per dataset")
@pytest.mark.parametrize("num_posterior_samples", [5, 20])
def test_sbc_and_tarp_pass_an_exact_posterior_with_few_draws_and_many_datasets(num_posterior_samples):
    """Their KS tests read the L + 1 discrete rank values as continuous: an exact posterior failed
    (SBC p ~ 1e-135 at L = 5, 1e-13 at L = 20, and labelled ∪- or ∩-shaped; TARP p ~ 1e-135, 1e-13)."""
    from sbiflows.diagnostics import simulate_datasets

    prior = torch.distributions.MultivariateNormal(torch.zeros(2), torch.eye(2))
    theta, x = simulate_datasets(prior, lambda t: t + torch.randn_like(t), 20_000, seed=0)
    result = sbc(_ExactGaussian(), theta=theta, x=x, num_posterior_samples=num_posterior_samples, seed=1)
    assert result.passed and bool((result.ks_pvalues > 0.01).all()), result.ks_pvalues
    assert result.shapes == ("uniform", "uniform")
    checked = tarp(_ExactGaussian(), theta=theta, x=x, num_posterior_samples=num_posterior_samples, seed=1)
    assert checked.ks_pvalue > 0.01


def test_rank_statistics_accepts_exactly_uniform_ranks_and_is_seeded():
    """200,000 ranks spread exactly evenly over 0..100 failed the KS test (p = 8e-5)."""
    ranks = torch.arange(200_000).remainder(101).unsqueeze(1)
    stats = rank_statistics(ranks, 100)
    assert stats["ks_pvalues"].item() > 0.5 and stats["shapes"] == ("uniform",)
    again, other = rank_statistics(ranks, 100), rank_statistics(ranks, 100, seed=1)
    assert torch.equal(stats["ks_pvalues"], again["ks_pvalues"])
    assert not torch.equal(stats["ks_pvalues"], other["ks_pvalues"])
    with pytest.raises(ValueError, match="seed"):
        rank_statistics(ranks, 100, seed=-1)


def test_rank_statistics_still_rejects_over_confident_ranks_at_few_draws():
    """Randomising the ranks must not blunt the test: ranks piled on 0 and L (a too-narrow posterior) fail."""
    generator = torch.Generator().manual_seed(0)
    outer = torch.randint(0, 2, (600, 1), generator=generator) * 5  # only ranks 0 and 5 of 0..5
    stats = rank_statistics(torch.cat([outer, torch.randint(0, 6, (600, 1), generator=generator)]), 5)
    assert stats["ks_pvalues"].item() < 1e-6
    assert stats["shapes"][0].startswith("∪-shaped")



def test_sbc_names_the_side_a_failure_leans_to_when_no_shape_passes_three_sigmas():
    """A parameter can fail the KS test while its mean rank and tails all stay within 3 standard deviations; its
    shape read "uniform", and verdict() fell through to "biased": a safely wide, unbiased posterior failed --strict,
    and a narrow one was called biased."""
    from sbiflows.diagnostics import verdict

    class Scaled:  # the exact posterior N(x / 2, I / 2) of x = theta + noise, its width times ``scale``
        def __init__(self, scale):
            self.scale = scale

        def sample_batched(self, n, xs):
            return xs / 2 + self.scale * torch.randn(n, *xs.shape) / 2**0.5

    prior = torch.distributions.MultivariateNormal(torch.zeros(2), torch.eye(2))
    for scale, seed, word, failed in ((1.08, 26, "conservative", 1), (0.93, 3, "over-confident", 0)):
        result = sbc(Scaled(scale), prior, lambda t: t + torch.randn_like(t), num_datasets=1000,
                     num_posterior_samples=100, seed=seed)
        assert not result.passed and verdict(result) == word
        assert result.shapes[failed].startswith("weakly") and result.shapes[1 - failed] == "uniform"


def test_count_simulators_and_a_wrong_theta_width_before_any_draw():
    """A torch simulator of integer counts was refused ("x must have a floating-point dtype"), though NumPy counts and
    sbiflows.simulate took them; a theta of the wrong width was refused only after every posterior draw."""

    class Exact:  # the exact posterior N(x / 2, I / 2) of x = theta + noise, with the attribute NPE posteriors have
        theta_dim = 2

        def __init__(self):
            self.calls = 0

        def sample_batched(self, n, xs):
            self.calls += 1
            return xs / 2 + torch.randn(n, *xs.shape) / 2**0.5

        def log_prob(self, theta, x):
            return -(theta - x / 2).square().sum(-1)

    prior = torch.distributions.MultivariateNormal(torch.zeros(2), torch.eye(2))
    counts = lambda t: torch.round(t + torch.randn_like(t)).long()  # noqa: E731
    theta, x = diagnostics.simulate_datasets(prior, counts, 300, seed=0)
    assert x.dtype == theta.dtype and x.shape == (300, 2)
    assert sbc(Exact(), prior, counts, num_datasets=300, num_posterior_samples=100).num_datasets == 300
    assert sbc(Exact(), theta=theta, x=x.long(), num_posterior_samples=100).num_datasets == 300
    posterior = Exact()
    for check in (sbc, expected_coverage, tarp):
        with pytest.raises(ValueError, match=r"theta has 3 parameters but the posterior has 2"):
            check(posterior, theta=torch.randn(300, 3), x=x)
    assert posterior.calls == 0

"""NPE's truncated theta space (``NPE(prior, space="truncated")``, :mod:`sbiflows.truncated_space`).

What must hold: every sample inside the support, ``log_prob`` normalized on it (up to the Monte Carlo
error of the mass estimate) and ``-inf`` outside, no rejection stall (sampling-importance-resampling with a warning for a leaking observation), seeded
draws independent of chunking, and everything else a posterior does (save/load, condition, MAP,
ensembles, diagnostics) unchanged.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch.distributions import (
    Beta,
    Exponential,
    Independent,
    LogNormal,
    Normal,
    Uniform,
)

from sbiflows import NPE, LeakageError, load
from sbiflows.diagnostics.c2st import c2st
from sbiflows.diagnostics.coverage import expected_coverage
from sbiflows.priors import IndependentPrior, box_uniform
from sbiflows.truncated_space import draw_inside, log_mass

NOISE = 0.3


def box_problem(n: int, seed: int = 0):
    """theta ~ U([-1, 1]^2), x = theta + N(0, 0.3^2): near a corner the posterior is cut by the box."""
    g = torch.Generator().manual_seed(seed)
    prior = Independent(Uniform(-torch.ones(2), torch.ones(2)), 1)
    theta = 2 * torch.rand(n, 2, generator=g) - 1
    return prior, theta, theta + NOISE * torch.randn(n, 2, generator=g)


@pytest.fixture(scope="module")
def fitted():
    prior, theta, x = box_problem(3000)
    # one flow (not the default's snapshot check, which may mix): tests below move its standardization
    return prior, NPE(prior, "nsf", space="truncated", ensemble=1).fit(theta, x, seed=0, max_epochs=40,
                                                                        progress=False)


X_CORNER = torch.tensor([0.95, -0.95])  # about a third of the untruncated posterior lies outside the box


# ------------------------------------------------------------------------------------ rejection
def test_draw_inside_keeps_the_first_n_inside_of_each_stream():
    """Observation b's candidates are a fixed stream; its draws are that stream's first n inside, in order."""
    streams = torch.randn(5000, 3, 1, generator=torch.Generator().manual_seed(0)) * torch.tensor([0.5, 1.0, 3.0])[:, None]

    def propose(start, m, active):
        rows = torch.arange(start, start + m) % len(streams)
        return streams[rows][:, active]

    draws = draw_inside(propose, lambda t: (t.abs() < 1).all(-1), 200, 3, max_rows=90)  # many small rounds
    for b in range(3):
        column = streams[:, b]
        assert torch.equal(draws[:, b], column[(column.abs() < 1).all(-1)][:200])


def test_draw_inside_raises_instead_of_stalling():
    calls = []

    def propose(start, m, active):
        calls.append(m)
        return torch.full((m, len(active), 1), 5.0)  # never inside

    with pytest.raises(LeakageError, match=r"observation 0: only 0 of \d+ .*\(acceptance below 0.001\)"):
        draw_inside(propose, lambda t: (t.abs() < 1).all(-1), 100, 1, max_rows=10**6)
    assert sum(calls) < 100_000  # it gave up after a bounded number of candidates


def test_log_mass_estimates_the_share_inside():
    scale = torch.tensor([1.0, 2.0])  # P(|z| < 1) for sd 1 and 2

    def sample(m, contexts, generator):
        return torch.randn(m, len(contexts), 1, generator=generator) * scale[: len(contexts), None]

    estimate = log_mass(sample, lambda t: (t.abs() < 1).all(-1), torch.zeros(2, 1), max_rows=2**16).exp()
    exact = torch.tensor([math.erf(1 / math.sqrt(2)), math.erf(0.5 / math.sqrt(2))], dtype=torch.float64)
    assert torch.allclose(estimate, exact, atol=0.02)


# ------------------------------------------------------------------------------- the posterior
def test_samples_stay_inside_and_log_prob_is_normalized_on_the_box(fitted):
    _prior, posterior = fitted
    assert posterior.config["space"] == "truncated"
    samples = posterior.sample(20_000, X_CORNER, seed=1)
    assert bool((samples.abs() <= 1).all())
    mass = float(posterior.support_mass(X_CORNER))
    assert 0.3 < mass < 0.99  # the flow leaks at this corner, so rejection and normalization are exercised
    grid = torch.linspace(-1, 1, 161)
    points = torch.stack(torch.meshgrid(grid, grid, indexing="ij"), -1).reshape(-1, 2)
    density = posterior.log_prob(points, X_CORNER).exp().reshape(161, 161)
    integral = torch.trapezoid(torch.trapezoid(density, grid), grid)
    assert abs(float(integral) - 1) < 0.03
    assert posterior.log_prob(torch.tensor([[1.2, 0.0], [0.0, -1.01]]), X_CORNER).eq(-torch.inf).all()


def test_truncated_posterior_matches_the_exact_truncated_gaussian(fitted):
    """At a corner the exact posterior is N(x_o, 0.3^2 I) cut to the box (flat prior); C2ST against it."""
    _, posterior = fitted
    g = torch.Generator().manual_seed(3)
    exact = X_CORNER + NOISE * torch.randn(40_000, 2, generator=g)
    exact = exact[(exact.abs() <= 1).all(-1)][:4000]
    samples = posterior.sample(4000, X_CORNER, seed=4)
    assert c2st(exact, samples, seed=0).accuracy <= 0.6


def test_an_observations_log_prob_does_not_depend_on_its_batch(fitted):
    """The mass estimate of x is the same alone and among other observations (one shared noise stream)."""
    prior, posterior = fitted
    xs = torch.tensor([[0.0, 0.3], [0.95, -0.95], [-0.5, 0.9]])  # x 1: about a third of the mass outside
    theta = posterior.sample(5, xs[1], seed=0)
    batched = posterior.log_prob_batched(theta[:, None].expand(5, 3, 2), xs)

    def fresh():  # the same network without the cached normalizers
        return type(posterior)(copy.deepcopy(posterior.net), prior, config=dict(posterior.config))

    torch.testing.assert_close(batched[:, 1], fresh().log_prob(theta, x=xs[1]))
    assert float(fresh().support_mass(xs[1])) == float(posterior.support_mass(xs[1]))


def test_seeded_draws_do_not_depend_on_chunking(fitted):
    _, posterior = fitted
    xs = torch.stack([X_CORNER, torch.zeros(2), -X_CORNER])
    reference = posterior.sample_batched(500, xs, seed=5)
    small = posterior.copy()
    small.max_batch_elements = 333
    # the same candidates and the same accepted ones; matrix products over batches of another size may
    # round the last bit differently (as in the unconstrained path), hence a tolerance, not equality
    torch.testing.assert_close(small.sample_batched(500, xs, seed=5), reference, atol=1e-5, rtol=0)
    assert torch.equal(posterior.sample(500, xs[2], seed=5), posterior.sample(500, xs[2], seed=5))


def test_save_load_condition_and_map_keep_the_truncation(fitted, tmp_path):
    _, posterior = fitted
    posterior.save(tmp_path / "truncated.sbiflows")
    loaded = load(tmp_path / "truncated.sbiflows")
    assert loaded.config["space"] == "truncated"
    theta = torch.tensor([[0.9, -0.9], [0.5, 0.5], [1.5, 0.0]])
    assert torch.equal(loaded.log_prob(theta, X_CORNER), posterior.log_prob(theta, X_CORNER))
    assert torch.equal(loaded.sample(100, X_CORNER, seed=6), posterior.sample(100, X_CORNER, seed=6))
    conditioned = posterior.condition(X_CORNER)
    draws = conditioned.rsample((2000,), generator=torch.Generator().manual_seed(7))
    assert bool((draws.abs() <= 1).all())
    assert torch.equal(draws.detach(), posterior.sample(2000, X_CORNER, generator=torch.Generator().manual_seed(7)))
    assert torch.allclose(conditioned.log_prob(theta[:2]), posterior.log_prob(theta[:2], X_CORNER))
    estimate = posterior.map(X_CORNER, num_iter=100)
    assert bool((estimate.abs() <= 1).all())
    assert float((estimate - X_CORNER).abs().max()) < 0.2  # the mode of the cut Gaussian is x_o itself


def test_a_leaking_observation_falls_back_to_sir_instead_of_failing(fitted):
    """A flow with almost all of its mass outside the box: no error and no stall, a warning instead.

    The flow is the fitted one moved by +2.5 and widened 2x (a trained flow keeps most of its mass
    inside even far from the training x), which leaves about 1e-4 of it in the box. The draws then
    come from sampling-importance-resampling with the prior as proposal; they stay inside the box, are
    reproducible with a seed, and their mean and spread match those of the flow's density restricted
    to the box, computed on a grid.
    """
    posterior = copy.deepcopy(fitted[1])
    posterior.net.u_shift += 2.5
    posterior.net.u_scale *= 2.0
    x_o = torch.zeros(2)
    with pytest.warns(UserWarning, match=r"observation 0: .*sampling-importance-resampling with the prior"):
        samples = posterior.sample(4000, x_o, seed=5)
    assert samples.shape == (4000, 2) and bool((samples.abs() <= 1).all())
    with pytest.warns(UserWarning, match="sampling-importance-resampling"):
        assert torch.equal(posterior.sample(4000, x_o, seed=5), samples)
    posterior.max_batch_elements = 1000  # one observation per chunk: the message still names the batch index
    with pytest.warns(UserWarning, match="observation 1: "):  # batched with an observation that rejects normally
        both = posterior.sample_batched(1000, torch.stack([torch.zeros(2) - 2.5, x_o]), seed=5)
    assert bool((both.abs() <= 1).all())
    grid = torch.linspace(-1, 1, 201)
    points = torch.stack(torch.meshgrid(grid, grid, indexing="ij"), -1).reshape(-1, 2)
    with torch.no_grad():
        weights = torch.softmax(posterior.net.log_prob(points, x_o.expand(len(points), 2)), 0)[:, None]
    mean = (weights * points).sum(0)
    sd = ((weights * points.square()).sum(0) - mean.square()).sqrt()
    assert torch.allclose(samples.mean(0), mean, atol=0.05), (samples.mean(0), mean)
    assert torch.allclose(samples.std(0), sd, atol=0.05), (samples.std(0), sd)


def test_truncated_ensemble_is_a_truncated_mixture():
    prior, theta, x = box_problem(1000)
    posterior = NPE(prior, "nsf", space="truncated", ensemble=2).fit(theta, x, seed=0, max_epochs=5, progress=False)
    samples = posterior.sample(2000, X_CORNER, seed=1)
    assert bool((samples.abs() <= 1).all())
    members = [torch.logsumexp(torch.stack([m.log_prob_given_context(samples[:, None], c) for m, c in
                                            zip(posterior.net.members, posterior.net.context(X_CORNER[None])[0])]), 0)]
    assert members[0].shape == (2000, 1)
    grid = torch.linspace(-1, 1, 121)
    points = torch.stack(torch.meshgrid(grid, grid, indexing="ij"), -1).reshape(-1, 2)
    density = posterior.log_prob(points, X_CORNER).exp().reshape(121, 121)
    assert abs(float(torch.trapezoid(torch.trapezoid(density, grid), grid)) - 1) < 0.04


def test_coverage_runs_on_a_truncated_posterior(fitted):
    prior, posterior = fitted

    def simulator(theta):
        return theta + NOISE * torch.randn_like(theta)

    result = expected_coverage(posterior, prior, simulator, num_datasets=100, num_posterior_samples=200, seed=0)
    assert result.verdict in ("calibrated", "under-confident")  # a 40-epoch flow: not over-confident


def test_unconstrained_space_has_full_mass_and_is_what_old_files_meant():
    prior, theta, x = box_problem(300)
    posterior = NPE(prior, space="unconstrained").fit(theta, x, seed=0, max_epochs=2, progress=False)
    assert posterior.config["space"] == "unconstrained"
    assert float(posterior.support_mass(X_CORNER)) == 1.0
    old = posterior.copy()
    del old.config["space"]  # a file saved before the option existed
    reloaded = type(posterior)(old.net, prior, config=old.config)
    assert torch.equal(reloaded.sample(10, X_CORNER, seed=0), posterior.sample(10, X_CORNER, seed=0))


@pytest.mark.parametrize(("prior", "expected"), [
    (Independent(Uniform(-torch.ones(2), torch.ones(2)), 1), "truncated"),
    (box_uniform([0.0, -5.0, 1.0], [1.0, 5.0, 2.0]), "truncated"),
    (IndependentPrior(Uniform(0.0, 1.0), Beta(torch.ones(2), torch.ones(2))), "truncated"),
    (Independent(Normal(torch.zeros(2), torch.ones(2)), 1), "unconstrained"),
    (Independent(LogNormal(torch.zeros(2), torch.ones(2)), 1), "unconstrained"),
    (IndependentPrior(Uniform(0.0, 1.0), Normal(0.0, 1.0)), "unconstrained"),  # one unbounded parameter
    (IndependentPrior(Uniform(0.0, 1.0), Exponential(1.0)), "unconstrained"),  # bounded below only
])
def test_auto_space_is_truncated_for_a_box_prior_only(prior, expected):
    npe = NPE(prior)
    assert npe.space == expected
    assert NPE(prior, space="unconstrained").space == "unconstrained"
    assert NPE(prior, space="truncated").space == "truncated"


def test_the_default_space_of_a_box_prior_is_saved_as_truncated(tmp_path):
    prior, theta, x = box_problem(300)
    posterior = NPE(prior).fit(theta, x, seed=0, max_epochs=2, progress=False)
    assert posterior.config["space"] == "truncated"
    posterior.save(tmp_path / "p.pt")
    reloaded = load(tmp_path / "p.pt")
    assert reloaded.config["space"] == "truncated"
    assert torch.equal(reloaded.sample(20, X_CORNER, seed=1), posterior.sample(20, X_CORNER, seed=1))
    assert bool(prior.support.check(reloaded.sample(500, X_CORNER, seed=2)).all())


def test_a_real_prior_never_rejects():
    g = torch.Generator().manual_seed(0)
    prior = Independent(Normal(torch.zeros(2), torch.ones(2)), 1)
    theta = torch.randn(500, 2, generator=g)
    posterior = NPE(prior, space="truncated").fit(theta, theta, seed=0, max_epochs=2, progress=False)
    assert float(posterior.support_mass(torch.zeros(2))) == 1.0


def test_bad_space_is_refused_before_training():
    prior, _, _ = box_problem(10)
    with pytest.raises(ValueError, match=r"space must be one of 'auto', 'unconstrained', 'truncated', got 'theta'"):
        NPE(prior, space="theta")


def test_restore_refuses_a_posterior_of_the_other_space(fitted):
    prior, posterior = fitted
    _, theta, x = box_problem(3000)
    with pytest.raises(ValueError, match="the posterior's flow lives in the 'truncated' space, this NPE's in 'unconstrained'"):
        NPE(prior, "nsf", space="unconstrained").restore(posterior, theta, x)

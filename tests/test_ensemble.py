"""NPE(prior, ensemble=K): an equal-weight mixture of K flows trained on the same rows."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
from torch.distributions import Independent, Uniform

from sbiflows import NPE, Posterior, load
from sbiflows.diagnostics import sbc
from sbiflows.ensemble import AUTO_ROWS, EnsembleNet, auto_check

PRIOR = Independent(Uniform(-torch.ones(2), torch.ones(2)), 1)
# The unconstrained space, where each member is exactly normalized and the mixture's density is their
# mean; in the truncated space (the default for this box prior) the mixture is truncated as a whole
# (tests/test_truncated_space.py::test_truncated_ensemble_is_a_truncated_mixture).
OPTIONS = {"transforms": 2, "hidden_features": (16, 16), "space": "unconstrained"}


def data(n=800, seed=0):
    generator = torch.Generator().manual_seed(seed)
    theta = PRIOR.sample((n,))
    return theta, theta + 0.3 * torch.randn(n, 2, generator=generator)


@pytest.fixture(scope="module")
def ensemble():
    theta, x = data()
    return NPE(PRIOR, ensemble=3, **OPTIONS).fit(theta, x, max_epochs=8, progress=False)


def members(posterior):
    """Each member as a posterior of its own."""
    return [Posterior(copy.deepcopy(net), PRIOR, config=dict(posterior.config, ensemble=1))
            for net in posterior.net.members]


def test_log_prob_is_the_log_of_the_members_mean_density(ensemble):
    assert isinstance(ensemble.net, EnsembleNet) and len(ensemble.net.members) == 3
    theta, x_o = PRIOR.sample((50,)), torch.tensor([0.2, -0.4])
    parts = torch.stack([m.log_prob(theta, x_o) for m in members(ensemble)])
    expected = torch.logsumexp(parts, 0) - math.log(3)
    torch.testing.assert_close(ensemble.log_prob(theta, x_o), expected)
    assert not torch.allclose(parts[0], parts[1])  # the members differ (different seeds)


def test_samples_follow_the_mixture_and_integrate_to_one(ensemble):
    x_o = torch.tensor([0.2, -0.4])
    draws = ensemble.sample(40_000, x_o, seed=0)
    assert bool((draws.abs() < 1).all())
    member_draws = torch.cat([m.sample(20_000, x_o, seed=k) for k, m in enumerate(members(ensemble))])
    torch.testing.assert_close(draws.mean(0), member_draws.mean(0), atol=0.01, rtol=0)
    torch.testing.assert_close(draws.std(0), member_draws.std(0), atol=0.01, rtol=0)
    grid = torch.linspace(-0.995, 0.995, 200)
    points = torch.cartesian_prod(grid, grid)
    mass = ensemble.log_prob(points, x_o).exp().sum() * (grid[1] - grid[0]) ** 2
    assert abs(float(mass) - 1.0) < 0.03


def test_seeded_draws_do_not_depend_on_chunking(ensemble):
    xs = torch.tensor([[0.2, -0.4], [0.0, 0.5]])
    whole = ensemble.sample_batched(3000, xs, seed=4)
    small = ensemble.copy()
    small.max_batch_elements = 700
    torch.testing.assert_close(small.sample_batched(3000, xs, seed=4), whole)
    torch.testing.assert_close(ensemble.sample(3000, xs[0], seed=4), whole[:, 0])


def test_save_load_map_condition_and_diagnostics_work_unchanged(ensemble, tmp_path):
    x_o = torch.tensor([0.2, -0.4])
    ensemble.save(tmp_path / "e.pt")
    loaded = load(tmp_path / "e.pt")
    assert loaded.config["ensemble"] == 3 and isinstance(loaded.net, EnsembleNet)
    assert torch.equal(loaded.sample(100, x_o, seed=1), ensemble.sample(100, x_o, seed=1))
    theta = PRIOR.sample((20,))
    assert torch.equal(loaded.log_prob(theta, x_o), ensemble.log_prob(theta, x_o))
    assert bool((ensemble.map(x_o, num_iter=20).abs() < 1).all())
    conditioned = ensemble.condition(x_o)
    torch.testing.assert_close(conditioned.log_prob(theta), ensemble.log_prob(theta, x_o))
    assert conditioned.rsample((5,)).shape == (5, 2)
    theta_c, x_c = data(200, seed=3)
    assert sbc(ensemble, theta=theta_c, x=x_c, num_posterior_samples=100).num_datasets == 200


def test_one_member_is_the_single_flow_and_refits_continue_every_member():
    theta, x = data()
    single = NPE(PRIOR, **OPTIONS).fit(theta, x, max_epochs=3, progress=False)
    one = NPE(PRIOR, ensemble=1, **OPTIONS).fit(theta, x, max_epochs=3, progress=False)
    assert torch.equal(single.sample(50, x[0], seed=0), one.sample(50, x[0], seed=0))
    npe = NPE(PRIOR, ensemble=2, **OPTIONS)
    npe.fit(theta, x, max_epochs=2, progress=False)
    npe.fit(*data(200, seed=5), max_epochs=2, progress=False)
    assert [h.epochs for h in npe.histories] == [4, 4] and len(npe.theta) == 1000


@pytest.mark.parametrize("value,error", [(0, ValueError), (2.0, TypeError), (True, TypeError), ("three", ValueError)])
def test_bad_ensemble_sizes_are_refused(value, error):
    choices = "'auto', 'snapshots', 'auto-snapshots' or 'auto-stacked'"
    with pytest.raises(error, match=f"ensemble must be an int >= 1, {choices}, got"):
        NPE(PRIOR, ensemble=value)


class GaussianPosterior:
    """theta ~ N(0, I), x = theta + N(0, I): the exact posterior is N(x / 2, I / 2); ``narrow`` scales its sd."""

    def __init__(self, narrow=1.0):
        self.sd = narrow * 0.5**0.5

    def sample_batched(self, n, xs, *, seed):
        return xs / 2 + self.sd * torch.randn(n, *xs.shape, generator=torch.Generator().manual_seed(seed))

    def log_prob_batched(self, theta, xs, *, normalized=True):
        return torch.distributions.Normal(xs / 2, self.sd).log_prob(theta).sum(-1)


def test_auto_check_passes_the_exact_posterior_and_flags_a_too_narrow_one():
    generator = torch.Generator().manual_seed(0)
    theta = torch.randn(3000, 2, generator=generator)
    x = theta + torch.randn(3000, 2, generator=generator)
    exact = auto_check(GaussianPosterior(), theta, x, seed=0)
    assert exact.passed and exact.num_datasets == AUTO_ROWS  # at most AUTO_ROWS of the given rows
    narrow = auto_check(GaussianPosterior(narrow=0.8), theta, x, seed=0)
    assert not narrow.passed and narrow.verdict == "over-confident"
    before = torch.random.get_rng_state()
    auto_check(GaussianPosterior(), theta, x, seed=1)
    assert torch.equal(torch.random.get_rng_state(), before)  # seeded without touching the global generator


def test_auto_check_ranks_are_unbiased_at_high_levels():
    # With L = 100 draws, the plain rank k / L would put the exact posterior's coverage at 0.95 near
    # 95 / 101 = 0.941; the randomized rank (k + U) / (L + 1) is uniform: 0.95 within 3.3 standard errors.
    coverage = []
    for seed in range(20):
        generator = torch.Generator().manual_seed(seed)
        theta = torch.randn(AUTO_ROWS, 2, generator=generator)
        x = theta + torch.randn(AUTO_ROWS, 2, generator=generator)
        result = auto_check(GaussianPosterior(), theta, x, seed=seed)
        coverage.append(float(result.empirical[-1]))
    assert float(result.levels[-1]) == pytest.approx(0.95)
    assert abs(sum(coverage) / len(coverage) - 0.95) < 0.005


def test_auto_keeps_the_single_flow_when_it_passes_its_check():
    theta, x = data()
    npe = NPE(PRIOR, ensemble="auto", **OPTIONS)
    posterior = npe.fit(theta, x, max_epochs=8, progress=False)
    single = NPE(PRIOR, ensemble=1, **OPTIONS).fit(theta, x, max_epochs=8, progress=False)
    assert npe.auto_coverage.passed and npe.auto_coverage.num_datasets == int(npe.validation.sum()) == 80
    assert posterior.config["ensemble"] == 1 and not isinstance(posterior.net, EnsembleNet)
    assert posterior.config["ensemble_auto"] == {"rows": 80, "over_confident": False,
                                                 "worst_z": posterior.config["ensemble_auto"]["worst_z"],
                                                 "level": posterior.config["ensemble_auto"]["level"]}
    probe, x_o = PRIOR.sample((20,)), torch.tensor([0.2, -0.4])
    assert torch.equal(posterior.log_prob(probe, x_o), single.log_prob(probe, x_o))  # the single flow itself
    assert len(npe.histories) == 1


def test_auto_adds_the_members_of_ensemble_3_when_the_first_flow_fails(monkeypatch, tmp_path):
    from sbiflows import npe as npe_module

    checked = []

    def failing(posterior, theta, x, *, seed):  # the real check, made to fail: over-confidence is hard to order
        checked.append((theta, x))
        result = auto_check(posterior, theta, x, seed=seed)
        return dataclasses.replace(result, passed=False, verdict="over-confident")

    monkeypatch.setattr(npe_module, "auto_check", failing)
    theta, x = data()
    npe = NPE(PRIOR, ensemble="auto", **OPTIONS)
    posterior = npe.fit(theta, x, max_epochs=4, progress=False)
    three = NPE(PRIOR, ensemble=3, **OPTIONS).fit(theta, x, max_epochs=4, progress=False)
    assert isinstance(posterior.net, EnsembleNet) and posterior.config["ensemble"] == 3
    probe, x_o = PRIOR.sample((20,)), torch.tensor([0.2, -0.4])
    # ensemble=3 steps all three members in one vectorized pass, auto the first alone: the same
    # training up to floating-point rounding
    assert torch.allclose(posterior.log_prob(probe, x_o), three.log_prob(probe, x_o), atol=1e-4)
    assert torch.equal(checked[0][0], npe.theta[npe.validation])  # checked on the first flow's held-out rows
    assert torch.equal(checked[0][1], npe.x[npe.validation])
    assert posterior.config["ensemble_auto"]["over_confident"] is True
    npe.fit(*data(200, seed=5), max_epochs=2, progress=False)  # a refit keeps the three flows, unchecked
    assert len(checked) == 1 and [h.epochs for h in npe.histories] == [6, 6, 6]
    posterior.save(tmp_path / "auto.pt")
    assert load(tmp_path / "auto.pt").config["ensemble_auto"] == posterior.config["ensemble_auto"]


def interrupt_at_evaluation(monkeypatch, at):
    """Make the ``at``-th validation of this test raise KeyboardInterrupt (as Ctrl-C during training): a
    validation of a member trained alone or of the members trained together."""
    from sbiflows import ensemble_training, training

    calls = []

    def interrupting(real):
        def validate(*args, **kwargs):
            calls.append(None)
            if len(calls) == at:
                raise KeyboardInterrupt("Ctrl-C")
            return real(*args, **kwargs)
        return validate

    monkeypatch.setattr(training, "_evaluate", interrupting(training._evaluate))
    monkeypatch.setattr(ensemble_training, "_validate", interrupting(ensemble_training._validate))


def test_interrupted_ensemble_fit_keeps_the_trained_members_in_partial_posterior(monkeypatch):
    theta, x = data()
    npe = NPE(PRIOR, ensemble=3, **OPTIONS)
    interrupt_at_evaluation(monkeypatch, 3)  # the members train together: stopped in their 3rd epoch
    with pytest.raises(KeyboardInterrupt) as caught:
        npe.fit(theta, x, max_epochs=4, progress=False)
    monkeypatch.undo()
    assert any("3 of 3 ensemble members" in note for note in caught.value.__notes__)
    assert npe.net is None  # the NPE itself was rolled back
    partial = npe.partial_posterior
    assert isinstance(partial.net, EnsembleNet) and partial.config["ensemble"] == 3
    # every member holds the best of its 2 completed epochs: those of a 2-epoch fit
    full = NPE(PRIOR, ensemble=3, **OPTIONS).fit(theta, x, max_epochs=2, progress=False)
    probe, x_o = PRIOR.sample((20,)), torch.tensor([0.2, -0.4])
    for kept, expected in zip(members(partial), members(full)):
        assert torch.equal(kept.log_prob(probe, x_o), expected.log_prob(probe, x_o))
    assert partial.sample(100, x_o, seed=0).shape == (100, 2)


def test_interrupted_sequential_ensemble_fit_keeps_the_members_trained(monkeypatch):
    theta, x = data()
    npe = NPE(PRIOR, ensemble=3, balancing=10.0, **OPTIONS)  # a custom objective: members train one by one
    interrupt_at_evaluation(monkeypatch, 4 + 4)  # member 0 runs 4 epochs, member 1 is stopped in its 4th
    with pytest.raises(KeyboardInterrupt) as caught:
        npe.fit(theta, x, max_epochs=4, progress=False)
    monkeypatch.undo()
    assert any("2 of 3 ensemble members" in note for note in caught.value.__notes__)
    partial = npe.partial_posterior
    assert isinstance(partial.net, EnsembleNet) and partial.config["ensemble"] == 2
    # member 0 is a complete 4-epoch fit and member 1 the best of its 3 completed epochs
    full = NPE(PRIOR, ensemble=2, balancing=10.0, **OPTIONS).fit(theta, x, max_epochs=4, progress=False)
    first, second = members(partial)
    expected_first, _ = members(full)
    probe, x_o = PRIOR.sample((20,)), torch.tensor([0.2, -0.4])
    assert torch.equal(first.log_prob(probe, x_o), expected_first.log_prob(probe, x_o))
    assert not torch.equal(second.log_prob(probe, x_o), first.log_prob(probe, x_o))


def test_interrupted_ensemble_refit_keeps_every_member(monkeypatch):
    theta, x = data()
    npe = NPE(PRIOR, ensemble=3, **OPTIONS)
    npe.fit(theta[:400], x[:400], max_epochs=2, progress=False)
    before = copy.deepcopy(npe.net.state_dict())
    interrupt_at_evaluation(monkeypatch, 2)  # the members' refit (together) is stopped in its 2nd epoch
    with pytest.raises(KeyboardInterrupt):
        npe.fit(theta[400:], x[400:], max_epochs=2, progress=False)
    monkeypatch.undo()
    assert all(torch.equal(value, before[name]) for name, value in npe.net.state_dict().items())  # rolled back
    partial = npe.partial_posterior
    assert partial.config["ensemble"] == 3  # every member holds the best of its one refit epoch
    state = partial.net.state_dict()
    for k in range(3):
        assert not all(torch.equal(state[name], before[name]) for name in before if name.startswith(f"members.{k}."))

"""Weighted mixtures (``EnsembleNet(weights=...)``), stacking weights fitted on held-out rows, and
``NPE(ensemble="auto-stacked")``, which mixes a training run's snapshots with them where the check passes (its
command line report: ``tests/test_snapshots.py``)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.distributions import Normal

from sbiflows import NPE, Posterior, load
from sbiflows.ensemble import EnsembleNet, mixture, stack
from sbiflows.estimator import PosteriorNet
from sbiflows.flows import maf
from sbiflows.serialization import FORMAT_VERSION
from sbiflows.snapshots import SnapshotTrail, stacking_weights

from test_snapshots import OPTIONS, PRIOR, data, forced_check


def nets(k=3):
    return [PosteriorNet(maf(2, 2, transforms=1, hidden_features=(8,), seed=s), nn.Identity(), theta_dim=2, x_dim=2)
            for s in range(k)]


def test_a_weighted_mixtures_density_is_the_weighted_mean_of_its_members():
    members = nets()
    weights = torch.tensor([0.2, 0.3, 0.5])
    ensemble = EnsembleNet(members, weights=weights)
    u, context = torch.randn(7, 2), ensemble.context(torch.randn(7, 2))
    each = torch.stack([m.log_prob_given_context(u, context[:, k]) for k, m in enumerate(members)])
    expected = (each.exp() * weights[:, None]).sum(0).log()
    torch.testing.assert_close(ensemble.log_prob_given_context(u, context), expected)
    equal = EnsembleNet(members)  # no weights: the equal mixture, computed as before weights existed
    assert torch.equal(equal.log_prob_given_context(u, context), torch.logsumexp(each, 0) - math.log(3))


def test_each_draw_comes_from_the_member_its_uniform_falls_to_and_members_are_drawn_in_proportion():
    members = nets()
    ensemble = EnsembleNet(members, weights=[0.2, 0.3, 0.5])
    for k, member in enumerate(members):  # each member draws its own index
        member.sample_from_base = lambda z, context, k=k: torch.full_like(z, float(k))
    context = ensemble.context(torch.zeros(1, 2))
    z = torch.zeros(6, 1, 2)
    picks = torch.tensor([0.0, 0.19, 0.2, 0.49, 0.5, 0.999])[:, None, None]
    drawn = ensemble.sample_from_base(torch.cat([z, picks], -1), context)
    assert drawn[:, 0, 0].tolist() == [0, 0, 1, 1, 2, 2]
    draws = ensemble.sample_given_context(20_000, context, generator=torch.Generator().manual_seed(0))
    share = torch.stack([(draws[:, 0, 0] == k).double().mean() for k in range(3)])
    sd = (torch.tensor([0.2, 0.3, 0.5]) * torch.tensor([0.8, 0.7, 0.5]) / 20_000).sqrt()
    assert bool(((share - torch.tensor([0.2, 0.3, 0.5])).abs() < 4 * sd).all()), share


def test_a_weighted_mixture_keeps_its_weights_on_its_members_device():
    """Stacking returns float64 weights on the CPU; a mixture of members on another device (``meta`` stands in for
    a GPU) holds them on that device, so its density runs there."""
    members = [net.to("meta") for net in nets()]
    ensemble = mixture(members, torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64))
    assert ensemble.weights.device.type == "meta" and ensemble.weights.dtype == torch.float32
    u = torch.zeros(4, 2, device="meta")
    assert ensemble.log_prob_given_context(u, ensemble.context(u)).device.type == "meta"

@pytest.mark.parametrize("weights, shown", [([0.5, 0.5], "got [0.5, 0.5]"), ([0.5, 0.6, -0.1], "got [0.5, 0.6, -0.1]"),
                                            ([0.5, 0.6, 0.1], "got [0.5, 0.6, 0.1]"),
                                            ([float("nan"), 0.5, 0.5], "got [nan, 0.5, 0.5]"),
                                            ("equal", "got 'equal'")])
def test_bad_weights_are_refused_naming_the_argument(weights, shown):
    expected = r"weights must be 3 finite values >= 0 that sum to 1, " + shown.replace("[", r"\[")
    with pytest.raises(ValueError, match=expected):
        EnsembleNet(nets(), weights=weights)


def test_stacking_recovers_the_weights_of_a_known_mixture_and_drops_a_member_that_explains_nothing():
    generator = torch.Generator().manual_seed(0)
    n = 5000
    left = torch.rand(n, generator=generator) < 0.3
    rows = torch.where(left, -2.0, 2.0) + torch.randn(n, generator=generator)
    log_q = torch.stack([Normal(-2.0, 1.0).log_prob(rows), Normal(2.0, 1.0).log_prob(rows),
                         Normal(20.0, 1.0).log_prob(rows)])
    weights = stacking_weights(log_q)
    assert weights[2] == 0 and abs(float(weights.sum()) - 1) < 1e-12
    assert abs(float(weights[0]) - 0.3) < 0.03, weights  # binomial sd of the share 0.0065
    # a common offset per row (a Jacobian) changes nothing
    torch.testing.assert_close(stacking_weights(log_q + torch.randn(n, generator=generator)), weights)
    # one member that explains every row better than the others gets all the weight
    assert stacking_weights(torch.stack([log_q[1] - 0.5, log_q[1]])).tolist() == [0.0, 1.0]


def test_stacking_refuses_bad_input():
    with pytest.raises(ValueError, match=r"log_q must have shape \(members, rows\) with both >= 1, got \(4,\)"):
        stacking_weights(torch.zeros(4))
    with pytest.raises(ValueError, match=r"floor must be in \[0, 1\), got 1.0"):
        stacking_weights(torch.zeros(2, 4), floor=1.0)
    with pytest.raises(ValueError, match="at least one member with finite log densities"):
        stacking_weights(torch.full((2, 3), -math.inf))
    nan_member = torch.stack([torch.zeros(3), torch.tensor([0.0, math.nan, 0.0])])
    assert stacking_weights(nan_member).tolist() == [1.0, 0.0]


@pytest.fixture(scope="module")
def snapshot_fit():
    theta, x = data()
    npe = NPE(PRIOR, ensemble="snapshots", **OPTIONS)
    return npe, npe.fit(theta, x, max_epochs=30, progress=False)


def test_stack_fits_the_snapshots_on_held_out_rows_and_a_weighted_posterior_saves_and_loads(snapshot_fit, tmp_path):
    npe, snapshots = snapshot_fit
    members = list(snapshots.net.members)
    held_out = npe.validation
    kept, weights = stack(members, PRIOR, snapshots.config, npe.theta[held_out], npe.x[held_out])
    assert kept and kept == sorted(kept) and abs(float(weights.sum()) - 1) < 1e-9
    # a weighted posterior of all three members (the weights stack found, or fixed ones where it kept one)
    chosen = [0.2, 0.3, 0.5] if len(kept) < 3 else weights
    posterior = Posterior(mixture(members, chosen), PRIOR,
                          config={**snapshots.config, "mixture_weights": [float(w) for w in chosen]})
    x_o, probe = torch.tensor([0.2, -0.4]), PRIOR.sample((50,))
    def unnormalized(p):  # the truncated space normalizes the mixture as a whole, not member by member
        return p.log_prob_batched(probe[:, None], x_o[None], normalized=False)[:, 0]

    single = [unnormalized(Posterior(m, PRIOR, config={**snapshots.config, "ensemble": 1})) for m in members]
    expected = sum(float(w) * lp.exp() for w, lp in zip(chosen, single)).log()
    torch.testing.assert_close(unnormalized(posterior), expected, rtol=1e-5, atol=1e-5)
    posterior.save(tmp_path / "weighted.pt")
    assert torch.load(tmp_path / "weighted.pt", weights_only=True)["format_version"] == FORMAT_VERSION == 5
    again = load(tmp_path / "weighted.pt", prior=PRIOR)
    assert torch.equal(again.log_prob(probe, x_o), posterior.log_prob(probe, x_o))
    assert torch.equal(again.sample(200, x_o, seed=3), posterior.sample(200, x_o, seed=3))


def test_a_float64_weighted_posterior_loads_with_its_weights_and_densities_unchanged(snapshot_fit, tmp_path):
    """Loading builds the members in the file's dtype before mixing: float64 weights are not rounded to float32."""
    _, snapshots = snapshot_fit
    members = [copy.deepcopy(m).double() for m in snapshots.net.members]
    weights = torch.tensor([0.7002821319584056, 0.0166449546111673, 0.2830729134304271], dtype=torch.float64)
    posterior = Posterior(mixture(members, weights), PRIOR,
                          config={**snapshots.config, "mixture_weights": weights.tolist()})
    assert posterior.net.weights.dtype == torch.float64
    posterior.save(tmp_path / "float64.pt")
    again = load(tmp_path / "float64.pt", prior=PRIOR)
    assert again.net.weights.dtype == torch.float64 and torch.equal(again.net.weights, posterior.net.weights)
    probe, x_o = PRIOR.sample((50,)).double(), torch.tensor([0.2, -0.4], dtype=torch.float64)
    assert torch.equal(again.log_prob(probe, x_o), posterior.log_prob(probe, x_o))


@pytest.mark.parametrize("ensemble", ["auto-stacked", "auto-snapshots"])
def test_a_validation_row_on_the_priors_bound_is_checked_and_stacked_as_it_trained(monkeypatch, ensemble):
    """Training moves a parameter on the box's bound one float step inside; the check and stacking on the
    validation rows use the same rows (on the bound itself every member's density is 0, which stopped stacking
    with an error and counted the row as never covered)."""
    import sbiflows.npe as npe_module

    theta, x = data()
    options = {**OPTIONS, "space": "unconstrained"}
    probe = NPE(PRIOR, ensemble=1, **options)
    probe.fit(theta, x, max_epochs=1, progress=False)
    row = int(probe.validation.nonzero()[0])  # a validation row of every fit with this seed
    theta[row, 0] = -1.0  # on the lower bound
    checked = []
    auto_check = npe_module.auto_check
    monkeypatch.setattr(npe_module, "auto_check", lambda p, t, *a, **k: checked.append(t) or auto_check(p, t, *a, **k))
    posterior = NPE(PRIOR, ensemble=ensemble, **options).fit(theta, x, max_epochs=30, progress=False)
    assert len(checked) == 1 and bool((checked[0].abs() < 1).all())  # the nudged row, strictly inside
    assert posterior.config["ensemble_auto"]["rows"] == len(checked[0])
    assert bool(torch.isfinite(posterior.log_prob(theta[row:row + 1].clamp(-0.999, 0.999), x[row])).all())

@pytest.mark.parametrize("passed", [True, False])
def test_auto_stacked_weights_the_snapshots_where_the_check_passes_and_mixes_equally_where_it_fails(
        monkeypatch, snapshot_fit, passed):
    npe_snapshots, snapshots = snapshot_fit
    forced_check(monkeypatch, passed=passed)
    theta, x = data()
    npe = NPE(PRIOR, ensemble="auto-stacked", **OPTIONS)
    posterior = npe.fit(theta, x, max_epochs=30, progress=False)  # trains as ensemble="snapshots" did
    x_o, probe = torch.tensor([0.2, -0.4]), PRIOR.sample((50,))
    if not passed:  # the equal mixture of "snapshots"
        assert posterior.config["snapshot_epochs"] == snapshots.config["snapshot_epochs"]
        assert "mixture_weights" not in posterior.config
        assert torch.equal(posterior.log_prob(probe, x_o), snapshots.log_prob(probe, x_o))
        return
    members, epochs = list(snapshots.net.members), snapshots.config["snapshot_epochs"]
    kept, weights = stack(members, PRIOR, snapshots.config, theta[npe.validation], x[npe.validation])
    if kept == [len(members) - 1]:  # the flow alone
        assert posterior.config["ensemble"] == 1 and "snapshot_epochs" not in posterior.config
    else:
        assert posterior.config["snapshot_epochs"] == [epochs[k] for k in kept]
        assert posterior.config["mixture_weights"] == pytest.approx(weights.tolist(), abs=1e-7)  # float32
        expected = Posterior(mixture([members[k] for k in kept], weights), PRIOR, config=snapshots.config)
        assert torch.equal(posterior.log_prob(probe, x_o), expected.log_prob(probe, x_o))
    restored = NPE(PRIOR, ensemble="auto-stacked", **OPTIONS).restore(posterior, theta, x, validation=npe.validation)
    refit = restored.fit(*data(200, seed=5), max_epochs=3, progress=False)
    assert refit.config["ensemble"] in (1, 2, 3) and refit.config["ensemble_auto"] == posterior.config["ensemble_auto"]


def test_a_trail_that_gives_the_flow_alone_stacks_nothing(snapshot_fit):
    npe, snapshots = snapshot_fit
    net = snapshots.net.members[-1]
    # a trail without snapshots: nothing to weigh
    nets, epochs, weights = SnapshotTrail().stacked(net, 7, PRIOR, snapshots.config, npe.theta[:10], npe.x[:10])
    assert nets == [net] and epochs == [7] and weights.tolist() == [1.0]


def test_where_stacking_would_drop_the_best_epochs_flow_the_flow_is_kept_alone(snapshot_fit, monkeypatch):
    """A refit trains on from a mixture's last member, so that member must be the best epoch's flow."""
    import sbiflows.ensemble

    npe, snapshots = snapshot_fit
    *earlier, net = snapshots.net.members
    trail = SnapshotTrail()
    for epoch, member in zip(snapshots.config["snapshot_epochs"], snapshots.net.members):
        trail.add(epoch, copy.deepcopy(member.state_dict()))
    best = snapshots.config["snapshot_epochs"][-1]
    args = (net, best, PRIOR, snapshots.config, npe.theta[:20], npe.x[:20])
    monkeypatch.setattr(sbiflows.ensemble, "stack", lambda nets, *a, **k: ([0, 1], torch.tensor([0.5, 0.5])))
    nets, epochs, weights = trail.stacked(*args)
    assert nets == [net] and epochs == [best] and weights.tolist() == [1.0]
    monkeypatch.setattr(sbiflows.ensemble, "stack", lambda nets, *a, **k: ([1, 2], torch.tensor([0.25, 0.75])))
    nets, epochs, weights = trail.stacked(*args)  # it kept: the mixture as stacked
    assert nets[-1] is net and epochs[0] == snapshots.config["snapshot_epochs"][1] and weights.tolist() == [0.25, 0.75]

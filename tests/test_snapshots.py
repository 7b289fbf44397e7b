"""NPE(prior, ensemble="snapshots"): one flow, mixed with earlier snapshots of its own training."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.distributions import Independent, Uniform

from sbiflows import NPE, load
from sbiflows.cli import main
from sbiflows.ensemble import EnsembleNet
from sbiflows.flows import maf
from sbiflows.snapshots import MIN_SNAPSHOTS, SNAPSHOT_GAP, SnapshotTrail
from sbiflows.training import train

PRIOR = Independent(Uniform(-torch.ones(2), torch.ones(2)), 1)
OPTIONS = {"transforms": 2, "hidden_features": (16, 16)}


def data(n=800, seed=0):
    generator = torch.Generator().manual_seed(seed)
    theta = 2 * torch.rand(n, 2, generator=generator) - 1  # the prior's draws, seeded
    return theta, theta + 0.3 * torch.randn(n, 2, generator=generator)


def trail_of(epochs, *, max_bytes=2**27):
    trail = SnapshotTrail(max_bytes=max_bytes)
    for epoch in epochs:
        trail.add(epoch, {"w": torch.full((4,), float(epoch))})
    return trail


def brute_force(epochs, best, fraction, start=0, distinct=True):
    """The members by their definition: the latest improvement at or before best - lag and (``distinct``)
    before the later members; else each once."""
    gap = max(1, round(fraction * (best - start)))
    chosen = []
    for lag in (0, gap, 2 * gap):
        candidates = [e for e in epochs if start <= e <= best - lag and (not distinct or all(e < c for c in chosen))]
        if candidates and candidates[-1] not in chosen:
            chosen.append(candidates[-1])
    return sorted(chosen)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("fraction", [0.1, SNAPSHOT_GAP, 0.45])
def test_members_are_the_latest_improvements_at_the_gaps(seed, fraction):
    generator = torch.Generator().manual_seed(seed)
    epochs = sorted(set(torch.randint(0, 200, (60,), generator=generator).tolist()))
    trail = trail_of(epochs)
    best = epochs[-1]
    chosen = trail.members(best, fraction=fraction)
    assert [e for e, _ in chosen] == brute_force(epochs, best, fraction)
    assert [e for e, _ in trail.members(best, fraction=fraction, distinct=False)] == brute_force(
        epochs, best, fraction, distinct=False)
    assert chosen[-1][0] == best and all(float(state["w"][0]) == e for e, state in chosen)
    # a refit: only the snapshots of this call, gaps from its first epoch
    start = epochs[len(epochs) // 2]
    assert [e for e, _ in trail.members(best, fraction=fraction, start=start)] == brute_force(epochs, best, fraction,
                                                                                           start)


def test_no_improvement_between_two_targets_takes_the_improvement_before_the_later_member():
    # gaussian_linear_uniform at 10,000, seed 2 (session 68): overfit after epoch 7, best after a step drop;
    # targets 31, 19, 7: the rule before gave [7, 31] (epoch 7 for both earlier targets), a two-flow mixture
    trail = trail_of([0, 1, 2, 3, 4, 5, 6, 7, 30, 31])
    assert [e for e, _ in trail.members(31)] == [6, 7, 31]
    assert [e for e, _ in trail.members(31, distinct=False)] == [7, 31]
    assert [e for e, _ in trail_of([0, 1, 30]).members(30)] == [0, 1, 30]  # targets 30, 18, 6
    assert [e for e, _ in trail_of([0, 1, 30]).members(30, gap=25)] == [1, 30]  # target 5 -> 1; -20: none


def test_few_improvements_give_fewer_distinct_members():
    assert [e for e, _ in trail_of([0, 30]).members(30)] == [0, 30]  # epochs 18 and 6 both fall back to 0
    assert [e for e, _ in trail_of([5]).members(5)] == [5]
    # targets 10, 6, 2 (NPE then keeps its single flow: the best epoch is an earlier fit's, not in the trail)
    assert [e for e, _ in trail_of([0, 3]).members(10)] == [0, 3]


def test_bad_trails_and_fractions_are_refused():
    trail = trail_of([1, 2])
    with pytest.raises(ValueError, match="epochs must increase: got 2 after 2"):
        trail.add(2, {"w": torch.zeros(1)})
    with pytest.raises(ValueError, match="fraction must be > 0, got 0"):
        trail.members(2, fraction=0)
    with pytest.raises(ValueError, match="gap must be >= 1 epoch, got 0"):
        trail.members(2, gap=0)
    with pytest.raises(TypeError, match="distinct"):
        trail.members(2, distinct="no")  # a string is truthy: without the check it would keep the new rule
    assert [e for e, _ in trail_of([0, 4, 6, 9, 10]).members(10, gap=3)] == [4, 6, 10]  # targets 10, 7, 4


def test_past_its_budget_the_trail_thins_towards_log_spaced_epochs():
    size = 4 * 4  # bytes of one snapshot of trail_of
    trail = trail_of(range(500), max_bytes=MIN_SNAPSHOTS * size)
    kept = [e for e, _ in trail.snapshots]
    assert len(kept) == MIN_SNAPSHOTS and kept[0] == 0 and kept[-1] == 499
    ratios = [(b + 1) / (a + 1) for a, b in zip(kept, kept[1:])]
    assert max(ratios) < 2.5 * math.exp(math.log(500) / (MIN_SNAPSHOTS - 1))  # near-even in log-epoch
    # members: the latest kept snapshot at or before each target, so no later than the exact choice
    chosen = [e for e, _ in trail.members(499)]
    assert chosen[-1] == 499 and all(e <= t for e, t in zip(chosen, [499 - 2 * 200, 499 - 200]))


def seeded_flow():
    with torch.random.fork_rng():
        torch.manual_seed(0)  # the initial weights come from torch's generator
        return maf(2, 1, transforms=1, hidden_features=(8,))


def test_training_keeps_every_improvement_and_ends_on_the_last():
    flow = seeded_flow()
    inputs, context = torch.randn(300, 2), torch.randn(300, 1)
    trail = SnapshotTrail()
    history = train(flow, inputs, context, max_epochs=15, batch_size=50, snapshots=trail)
    running = [min(history.validation_loss[: i + 1]) for i in range(len(history.validation_loss))]
    improved = [i for i, loss in enumerate(history.validation_loss) if loss == running[i]
                and (i == 0 or loss < running[i - 1])]
    assert [e for e, _ in trail.snapshots] == improved and improved[-1] == history.best_epoch
    final = flow.state_dict()
    assert all(torch.equal(final[key], value) for key, value in trail.snapshots[-1][1].items())
    # the same training without a trail gives the same weights
    again = seeded_flow()
    train(again, inputs, context, max_epochs=15, batch_size=50)
    assert all(torch.equal(final[key], value) for key, value in again.state_dict().items())


@pytest.fixture(scope="module")
def fitted():
    theta, x = data()
    npe = NPE(PRIOR, ensemble="snapshots", **OPTIONS)
    posterior = npe.fit(theta, x, max_epochs=30, progress=False)
    single = NPE(PRIOR, ensemble=1, **OPTIONS).fit(theta, x, max_epochs=30, progress=False)
    return npe, posterior, single


def test_the_mixtures_last_member_is_the_single_flow_and_the_others_are_earlier_snapshots(fitted):
    npe, posterior, single = fitted
    epochs = posterior.config["snapshot_epochs"]
    best = single.history.best_epoch
    assert isinstance(posterior.net, EnsembleNet) and posterior.config["ensemble"] == len(epochs) == 3
    gap = round(SNAPSHOT_GAP * best)
    assert epochs[-1] == best and epochs[1] <= best - gap and epochs[0] <= best - 2 * gap
    last = posterior.net.members[-1].state_dict()
    assert all(torch.equal(last[key], value) for key, value in single.net.state_dict().items())
    earlier = posterior.net.members[0].state_dict()
    assert not all(torch.equal(last[key], value) for key, value in earlier.items())
    assert len(npe.histories) == 1 and npe.history.best_epoch == best


def test_snapshot_posteriors_save_load_and_sample(fitted, tmp_path):
    _, posterior, _ = fitted
    posterior.save(tmp_path / "snapshots.pt")
    again = load(tmp_path / "snapshots.pt", prior=PRIOR)
    x_o, probe = torch.tensor([0.2, -0.4]), PRIOR.sample((50,))
    assert again.config["snapshot_epochs"] == posterior.config["snapshot_epochs"]
    assert torch.equal(again.log_prob(probe, x_o), posterior.log_prob(probe, x_o))
    draws = again.sample(500, x_o, seed=0)
    assert draws.shape == (500, 2) and bool(((draws > -1) & (draws < 1)).all())


def test_a_refit_trains_on_from_the_best_member_and_chooses_new_snapshots(fitted):
    npe, posterior, _ = fitted
    before = npe.history.epochs
    refit = npe.fit(*data(400, seed=3), max_epochs=10, progress=False)
    epochs = refit.config["snapshot_epochs"]
    assert len(npe.histories) == 1 and npe.history.epochs == before + 10
    assert len(npe.theta) == 1200 and len(npe.validation) == 1200
    if epochs[-1] >= before:  # improved in this call: its members come from this call's snapshots
        assert all(e >= before for e in epochs) and refit.config["ensemble"] == len(epochs)
    else:  # no improvement: the earlier best flow alone
        assert refit.config["ensemble"] == 1


def test_restore_continues_a_snapshot_posterior(fitted):
    npe, posterior, _ = fitted
    theta, x = npe.theta, npe.x
    restored = NPE(PRIOR, ensemble="snapshots", **OPTIONS).restore(posterior, theta, x, validation=npe.validation)
    assert len(restored.histories) == 1 and torch.equal(restored.validation, npe.validation)
    refit = restored.fit(*data(200, seed=4), max_epochs=3, progress=False)
    assert refit.config["ensemble"] in (1, 2, 3)
    with pytest.raises(ValueError, match="the posterior has 3 flow"):
        NPE(PRIOR, ensemble=2, **OPTIONS).restore(posterior, theta, x)


@pytest.mark.slow
def test_command_line_reports_the_snapshot_epochs(tmp_path, capsys):
    out = tmp_path / "run"
    small = ["--simulations", "300", "--num-samples", "100", "--calibration-datasets", "100",
             "--calibration-samples", "100", "--c2st-samples", "100", "--max-epochs", "6"]
    assert main(["fit", "two_moons", "--ensemble", "snapshots", "--out", str(out), "--observations", "1", *small]) == 0
    epochs = load(out / "posterior.pt").config["snapshot_epochs"]
    report = json.loads((out / "report.json").read_text())
    assert report["ensemble"] == "snapshots" and report["snapshot_epochs"] == epochs
    if len(epochs) > 1:
        assert "mixture of one flow's snapshots at epochs" in capsys.readouterr().out
        assert "mixture of one flow's snapshots at epochs" in (out / "report.md").read_text()


def forced_check(monkeypatch, *, passed):
    """Make ``ensemble="auto"``'s check return ``passed`` (a short fit's flow seldom fails it), recording its calls."""
    import dataclasses

    import sbiflows.npe as npe_module
    from sbiflows.ensemble import auto_check

    calls = []

    def check(posterior, theta, x, *, seed):
        calls.append(len(theta))
        return dataclasses.replace(auto_check(posterior, theta, x, seed=seed), passed=passed)

    monkeypatch.setattr(npe_module, "auto_check", check)
    return calls


@pytest.mark.parametrize("passed", [True, False])
def test_auto_snapshots_mixes_only_where_the_check_fails_and_refits_keep_the_decision(monkeypatch, fitted, passed):
    _, mixed, single = fitted
    calls = forced_check(monkeypatch, passed=passed)
    theta, x = data()
    npe = NPE(PRIOR, ensemble="auto-snapshots", **OPTIONS)
    posterior = npe.fit(theta, x, max_epochs=30, progress=False)
    assert calls == [int(npe.validation.sum())]  # the flow's own validation rows
    assert posterior.config["ensemble_auto"]["over_confident"] is (not passed)
    assert npe.auto_coverage.passed is passed
    x_o, probe = torch.tensor([0.2, -0.4]), PRIOR.sample((50,))
    expected = single if passed else mixed  # the single flow, or ensemble="snapshots"'s mixture
    assert posterior.config.get("snapshot_epochs") == expected.config.get("snapshot_epochs")
    assert torch.equal(posterior.log_prob(probe, x_o), expected.log_prob(probe, x_o))
    refit = npe.fit(*data(200, seed=5), max_epochs=5, progress=False)
    assert calls == [int(npe.validation[:800].sum())]  # refits do not check again
    assert ("snapshot_epochs" in refit.config) is (not passed and refit.config["ensemble"] > 1)
    restored = NPE(PRIOR, ensemble="auto-snapshots", **OPTIONS).restore(posterior, theta, x, validation=npe.validation[:800])
    again = restored.fit(*data(200, seed=5), max_epochs=5, progress=False)
    assert again.config["ensemble_auto"] == posterior.config["ensemble_auto"]
    assert again.config["ensemble"] == refit.config["ensemble"]


@pytest.mark.slow
@pytest.mark.parametrize("ensemble, passed", [("auto-snapshots", False), ("auto-stacked", True)])
def test_command_line_reports_what_the_auto_rules_decided(monkeypatch, tmp_path, capsys, ensemble, passed):
    forced_check(monkeypatch, passed=passed)
    out = tmp_path / "run"
    small = ["--simulations", "300", "--num-samples", "100", "--calibration-datasets", "100",
             "--calibration-samples", "100", "--c2st-samples", "100", "--max-epochs", "6"]
    assert main(["fit", "two_moons", "--ensemble", ensemble, "--out", str(out), "--observations", "1",
                 *small]) == 0
    config = load(out / "posterior.pt").config
    report = json.loads((out / "report.json").read_text())
    assert report["ensemble"] == ensemble and report["ensemble_auto"]["over_confident"] is (not passed)
    assert report.get("snapshot_epochs") == config.get("snapshot_epochs")
    assert report.get("mixture_weights") == config.get("mixture_weights")  # "auto-stacked" where it weighted
    mixed = len(config.get("snapshot_epochs", [])) > 1
    text = ("auto stacked: " if ensemble == "auto-stacked" else "auto snapshots: ") + (
        "mixture of one flow's snapshots at epochs" if mixed else "")
    assert text in capsys.readouterr().out and text in (out / "report.md").read_text()


def test_the_default_is_auto_stacked_and_sequential_rounds_keep_one_flow(monkeypatch, fitted):
    """NPE(prior) is ensemble="auto-stacked" (docs/benchmarks.md, "`ensemble="auto-stacked"` becomes the default"):
    the equal snapshot mixture where the check fails, the stacked snapshots where it passes. TSNPE and the command
    line with --rounds keep one flow per round, so earlier sequential stores resume."""
    from sbiflows import TSNPE
    from sbiflows.pipeline import Job, Observation

    _, mixed, _ = fitted
    forced_check(monkeypatch, passed=False)
    posterior = NPE(PRIOR, **OPTIONS).fit(*data(), max_epochs=30, progress=False)
    assert posterior.config["ensemble"] == mixed.config["ensemble"]  # the check failed: the snapshot mixture
    assert posterior.config["snapshot_epochs"] == mixed.config["snapshot_epochs"]
    assert "mixture_weights" not in posterior.config
    forced_check(monkeypatch, passed=True)
    default = NPE(PRIOR, **OPTIONS).fit(*data(), max_epochs=30, progress=False)
    stacked = NPE(PRIOR, ensemble="auto-stacked", **OPTIONS).fit(*data(), max_epochs=30, progress=False)
    for key in ("ensemble", "snapshot_epochs", "mixture_weights"):
        assert default.config.get(key) == stacked.config.get(key)
    theta, x = data(n=50, seed=1)
    assert torch.equal(default.log_prob(theta, x[0]), stacked.log_prob(theta, x[0]))
    assert NPE(PRIOR).ensemble == "auto-stacked" and NPE(PRIOR, ensemble=1).ensemble == 1
    assert TSNPE(PRIOR).npe.ensemble == 1 and TSNPE(PRIOR, ensemble="auto").npe.ensemble == "auto"
    common = {"name": "t", "simulator": lambda theta: theta, "prior": PRIOR, "out": "unused",
              "observations": [Observation("obs1", torch.zeros(2))]}
    assert Job(**common).ensemble == "auto-stacked" and Job(**common, rounds=2).ensemble == 1

"""Training checkpoints: a killed fit resumes where it stopped and ends exactly as an uninterrupted one."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
from torch import nn

from sbiflows import NPE
from sbiflows import training
from sbiflows.checkpoint import Checkpoint
from sbiflows.flows import nsf
from sbiflows.snapshots import SnapshotTrail
from sbiflows.training import TrainingHistory, train

# small patience and a step drop, so that an interrupted run crosses improvements, a drop and the stop
OPTIONS = dict(max_epochs=40, batch_size=32, patience=4, step_drops=1, drop_patience=3, learning_rate=3e-3, seed=3)


def data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    context = torch.randn(300, 2, generator=generator)
    return context + 0.3 * torch.randn(300, 2, generator=generator), context


def flow() -> nn.Module:
    torch.manual_seed(1)
    return nsf(2, 2, transforms=2, hidden_features=(16,))


class Stop(Exception):
    """Raised by the patched loss: the fit is killed there."""


def raise_after(monkeypatch, module, name: str, calls: int, error: type[BaseException] | None = None) -> None:
    """Make ``module.name`` raise ``error`` (default :class:`Stop`) on its ``calls + 1``-th call: the fit is killed."""
    count, original = [0], getattr(module, name)

    def counted(*args):
        count[0] += 1
        if count[0] > calls:
            raise (error or Stop)
        return original(*args)

    monkeypatch.setattr(module, name, counted)


def interrupt_after(monkeypatch, calls: int) -> None:
    """Kill at the default loss's ``calls + 1``-th call (mid-epoch: a minibatch or a validation pass)."""
    raise_after(monkeypatch, training, "negative_log_likelihood", calls)


def fit(path=None, *, every: float = 0.0, **options):
    model, trail, history = flow(), SnapshotTrail(), TrainingHistory()
    checkpoint = None if path is None else Checkpoint(path, every=every)
    train(model, *data(), snapshots=trail, checkpoint=checkpoint, history=history, **{**OPTIONS, **options})
    return model, trail, history, checkpoint


def assert_same(a, b):
    (model_a, trail_a, history_a, _), (model_b, trail_b, history_b, _) = a, b
    for (name, x), y in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        assert torch.equal(x, y), name
    assert [epoch for epoch, _ in trail_a.snapshots] == [epoch for epoch, _ in trail_b.snapshots]
    for (_, x), (_, y) in zip(trail_a.snapshots, trail_b.snapshots):
        assert all(torch.equal(x[key], y[key]) for key in x)
    for field in ("train_loss", "validation_loss", "best_epoch", "best_validation_loss", "epochs", "stopped_early",
                  "step_drop_epochs", "batch_size"):
        assert getattr(history_a, field) == getattr(history_b, field), field


@pytest.mark.parametrize("calls", [25, 125, 155])  # 10 calls an epoch: epoch 2, after the drop (12), the last (15)
def test_a_killed_training_resumes_and_ends_as_if_never_stopped(tmp_path, monkeypatch, calls):
    plain = fit()
    assert plain[2].step_drop_epochs and plain[2].stopped_early  # the run crosses a drop and stops early
    with monkeypatch.context() as patch:
        interrupt_after(patch, calls)
        with pytest.raises(Stop):
            fit(tmp_path / "training.ckpt")
    assert (tmp_path / "training.ckpt").exists()
    resumed = fit(tmp_path / "training.ckpt")
    assert resumed[3].resumed_epoch is not None and 0 < resumed[3].resumed_epoch < plain[2].epochs
    assert not resumed[3].finished
    assert_same(plain, resumed)
    again = fit(tmp_path / "training.ckpt")  # a finished checkpoint: no epoch is trained
    assert again[3].finished and again[3].resumed_epoch == plain[2].epochs
    assert_same(plain, again)


def test_a_training_killed_after_a_drop_that_grew_the_batch_resumes_with_the_grown_batch(tmp_path, monkeypatch):
    """``drop_batch_factor``: the resumed call trains on with the batch size of the drops before the kill."""
    options = dict(drop_batch_factor=2.5)
    plain = fit(**options)
    (drop,) = plain[2].step_drop_epochs
    calls = (drop + 1) * 10 + 2 * 5  # 9 steps and a validation pass an epoch, then 4 steps of 80 rows and one
    with monkeypatch.context() as patch:
        interrupt_after(patch, calls)
        with pytest.raises(Stop):
            fit(tmp_path / "training.ckpt", **options)
    resumed = fit(tmp_path / "training.ckpt", **options)
    assert drop < resumed[3].resumed_epoch < plain[2].epochs
    assert_same(plain, resumed)
    other = fit(tmp_path / "other.ckpt")  # the factor is part of the call: another factor trains another run
    assert other[2].validation_loss != plain[2].validation_loss

def nan_at(monkeypatch, call: int, stop_after: int | None = None) -> None:
    """The default loss is NaN at its ``call``-th call (a restart with ``on_nonfinite="restore_best"``); with
    ``stop_after``, the fit is killed at the call after that."""
    count, original = [0], training.negative_log_likelihood

    def loss(*args):
        count[0] += 1
        if stop_after is not None and count[0] > stop_after:
            raise Stop
        value = original(*args)
        return value * float("nan") if count[0] == call else value

    monkeypatch.setattr(training, "negative_log_likelihood", loss)


def test_a_restart_on_a_non_finite_loss_survives_a_resume(tmp_path):
    """A checkpoint written after a restart from the best weights keeps it: the resumed fit does not restart
    again and ends as the uninterrupted one (the halved step is in the optimizer's state)."""
    options = dict(on_nonfinite="restore_best")
    with pytest.MonkeyPatch.context() as patch, pytest.warns(RuntimeWarning, match="goes on from the best weights"):
        nan_at(patch, 35)  # a minibatch of epoch 3
        plain = fit(**options)
    assert plain[2].restart_epochs == [3] and not plain[2].diverged and plain[2].epochs > 12
    with pytest.MonkeyPatch.context() as patch, pytest.warns(RuntimeWarning, match="goes on from the best weights"):
        nan_at(patch, 35, stop_after=115)
        with pytest.raises(Stop):
            fit(tmp_path / "training.ckpt", **options)
    resumed = fit(tmp_path / "training.ckpt", **options)
    assert resumed[3].resumed_epoch is not None and 3 < resumed[3].resumed_epoch < plain[2].epochs
    assert resumed[2].restart_epochs == [3]
    for (name, x), y in zip(plain[0].state_dict().items(), resumed[0].state_dict().values()):
        assert torch.equal(x, y), name
    assert plain[2].validation_loss[4:] == resumed[2].validation_loss[4:]  # epoch 3's losses are NaN in both
    assert plain[2].epochs == resumed[2].epochs and plain[2].best_epoch == resumed[2].best_epoch


def test_a_checkpoint_of_another_call_is_ignored_and_replaced(tmp_path):
    path = tmp_path / "training.ckpt"
    fit(path, seed=4)  # another split and minibatch order
    other = fit(path)
    assert other[3].resumed_epoch is None
    assert_same(fit(), other)
    path.write_bytes(b"not a checkpoint")
    assert fit(path)[3].resumed_epoch is None and fit(path)[3].finished


def test_the_checkpoint_is_written_at_most_every_interval(tmp_path):
    model, (u, x) = flow(), data()
    checkpoint = Checkpoint(tmp_path / "training.ckpt", every=3600.0)
    writes = []
    original = Checkpoint.save
    Checkpoint.save = lambda self, state: (writes.append(state["epoch"]), original(self, state))[1]
    try:
        history = train(model, u, x, checkpoint=checkpoint, **OPTIONS)
    finally:
        Checkpoint.save = original
    assert writes == [history.epochs]  # only the final state within an hour


def test_bad_checkpoint_options_are_refused_before_training():
    with pytest.raises(TypeError, match="checkpoint must be a path"):
        Checkpoint(3)
    with pytest.raises(ValueError, match="every"):
        Checkpoint("a.ckpt", every=-1)
    u, x = data()
    with pytest.raises(ValueError, match="checkpoint needs the default objective"):
        train(flow(), u, x, objective=training.negative_log_likelihood, checkpoint=Checkpoint("a.ckpt"))
    prior = torch.distributions.Independent(torch.distributions.Normal(torch.zeros(2), torch.ones(2)), 1)
    with pytest.raises(ValueError, match="checkpoint needs the default loss, got balancing=100.0"):
        NPE(prior, balancing=100.0).fit(u, x, checkpoint="a.ckpt")
    with pytest.raises(ValueError, match="part must be"):
        Checkpoint("a.ckpt").sibling("../b")


def stop_vectorized_after(monkeypatch, steps: int) -> None:
    """Kill the ensembles' vectorized training at its ``steps + 1``-th step."""
    import sbiflows.ensemble_training as ensemble_training

    raise_after(monkeypatch, ensemble_training, "_step", steps)


@pytest.mark.parametrize("ensemble", ["auto-stacked", "auto-snapshots", 1, 3])
def test_a_killed_npe_fit_resumes_to_the_same_posterior(tmp_path, monkeypatch, ensemble):
    """NPE's default and the earlier one (one flow with its snapshot trail, checked), a single flow, and three flows
    trained in one vectorized pass, through ``NPE.fit``."""
    u, x = data()
    prior = torch.distributions.Independent(torch.distributions.Normal(torch.zeros(2), torch.ones(2)), 1)
    options = dict(max_epochs=30, batch_size=32, patience=4, progress=False)
    plain = NPE(prior, ensemble=ensemble).fit(u, x, **options)
    path = tmp_path / "training.ckpt"
    with monkeypatch.context() as patch:
        (stop_vectorized_after(patch, 60) if ensemble == 3 else interrupt_after(patch, 60))
        with pytest.raises(Stop):
            NPE(prior, ensemble=ensemble).fit(u, x, checkpoint=Checkpoint(path, every=0.0), **options)
    checkpoint = Checkpoint(path, every=0.0)
    resumed = NPE(prior, ensemble=ensemble).fit(u, x, checkpoint=checkpoint, **options)
    assert checkpoint.resumed_epoch is not None and checkpoint.resumed_epoch > 0
    assert [p.path.name for p in checkpoint.parts()] == ["training.ckpt"]  # three flows from the start: one pass
    for (name, a), b in zip(plain.net.state_dict().items(), resumed.net.state_dict().values()):
        assert torch.equal(a, b), name
    assert plain.history.validation_loss == resumed.history.validation_loss
    assert torch.equal(plain.log_prob(u[:5], x[0]), resumed.log_prob(u[:5], x[0]))


def test_the_flows_trained_after_the_first_keep_a_checkpoint_of_their_own(tmp_path, monkeypatch):
    """``ensemble="auto"`` whose check fails: the first flow's checkpoint, then the two others' in ``.members``."""
    import sbiflows.npe

    u, x = data()
    prior = torch.distributions.Independent(torch.distributions.Normal(torch.zeros(2), torch.ones(2)), 1)
    options = dict(max_epochs=30, batch_size=32, patience=4, progress=False)

    check = sbiflows.npe.auto_check
    failed = lambda *args, **kwargs: dataclasses.replace(check(*args, **kwargs), passed=False)  # noqa: E731
    monkeypatch.setattr(sbiflows.npe, "auto_check", failed)  # three flows, whatever the first flow's check says
    plain = NPE(prior, ensemble="auto").fit(u, x, **options)
    path = tmp_path / "training.ckpt"
    with monkeypatch.context() as patch:
        stop_vectorized_after(patch, 30)
        with pytest.raises(Stop):
            NPE(prior, ensemble="auto").fit(u, x, checkpoint=Checkpoint(path, every=0.0), **options)
    assert path.exists() and (tmp_path / "training.members.ckpt").exists()
    checkpoint = Checkpoint(path, every=0.0)
    resumed = NPE(prior, ensemble="auto").fit(u, x, checkpoint=checkpoint, **options)
    first, members = checkpoint.parts()
    assert first.finished and members.path.name == "training.members.ckpt" and members.resumed_epoch > 0
    assert checkpoint.resumed_parts() == [first, members] and Checkpoint(path).resumed_parts() == []
    for (name, a), b in zip(plain.net.state_dict().items(), resumed.net.state_dict().values()):
        assert torch.equal(a, b), name
    checkpoint.remove()
    assert not list(tmp_path.iterdir())


def stop_training_after(monkeypatch, calls: int) -> None:
    """Ctrl-C in the middle of training (the loss's ``calls + 1``-th call), with a checkpoint after every epoch."""
    import sbiflows.checkpoint

    monkeypatch.setattr(sbiflows.checkpoint, "CHECKPOINT_SECONDS", 0.0)
    raise_after(monkeypatch, training, "negative_log_likelihood", calls, KeyboardInterrupt)


@pytest.mark.slow
@pytest.mark.parametrize("embedding", [[], ["--embedding", "mlp"]], ids=["default", "named-embedding"])
def test_sbiflows_fit_resumes_a_stopped_training_from_its_checkpoint(tmp_path, monkeypatch, capsys, embedding):
    """A named embedding's weights come from the job's seed, not torch's global state: the rerun builds the same
    network, so its checkpoint resumes (they were drawn unseeded, and every rerun silently trained from scratch)."""
    from sbiflows.cli import main
    from sbiflows.posterior import load

    small = ["two_moons", "--simulations", "600", "--num-samples", "200", "--calibration-datasets", "100",
             "--calibration-samples", "100", "--c2st-samples", "200", "--max-epochs", "12", "--quiet",
             "--observations", "1", *embedding]
    assert main(["fit", *small, "--out", str(tmp_path / "plain")]) == 0
    out = tmp_path / "stopped"
    with monkeypatch.context() as patch:
        stop_training_after(patch, 50)  # a few epochs in
        assert main(["fit", *small, "--out", str(out)]) == 130
    assert "run the same command again to resume" in capsys.readouterr().err
    assert (out / "training.ckpt").exists() and not (out / "posterior.pt").exists()
    assert main(["fit", *small, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    resumed_line = (r"\[2/5\] training NPE .*\n"  # said as it resumes, before the training's own lines
                    r"      resuming training from the checkpoint of a stopped run \(training.ckpt, epoch [1-9]\d*\)\n")
    assert re.search(resumed_line, printed)
    assert not (out / "training.ckpt").exists()  # posterior.pt holds what it led to
    plain, resumed = load(tmp_path / "plain" / "posterior.pt"), load(out / "posterior.pt")
    for (name, a), b in zip(plain.net.state_dict().items(), resumed.net.state_dict().values()):
        assert torch.equal(a, b), name
    (out / "training.ckpt").write_bytes(b"")  # as if stopped between saving posterior.pt and removing it
    assert main(["fit", *small, "--out", str(out)]) == 0
    assert not (out / "training.ckpt").exists()


@pytest.mark.slow
def test_a_tsnpe_round_resumes_its_training_from_its_checkpoint(tmp_path, monkeypatch):
    import simulators
    from sbiflows import TSNPE

    task = simulators.get("two_moons")
    x_o = task.observation(1)
    options = dict(rounds=2, simulations=600, seed=0, check_simulations=0, threshold_samples=20_000,
                   quantile=1e-3, progress=False)
    fit_options = dict(max_epochs=10)
    plain = TSNPE(task.prior).run(task.simulate, x_o, store=tmp_path / "plain", fit_options=fit_options, **options)
    store = tmp_path / "stopped"
    with monkeypatch.context() as patch:
        stop_training_after(patch, 40)  # a few epochs into round 0's training
        with pytest.raises(KeyboardInterrupt):
            TSNPE(task.prior).run(task.simulate, x_o, store=store, fit_options=fit_options, **options)
    assert (store / "round_0" / "training.ckpt").exists()
    lines = []
    resumed_tsnpe = TSNPE(task.prior)
    resumed = resumed_tsnpe.run(task.simulate, x_o, store=store, fit_options=fit_options, log=lines.append, **options)
    resumed_line = r"resuming training from the checkpoint of a stopped run \(training.ckpt, epoch [1-9]\d*\)"
    assert any(re.search(resumed_line, line) for line in lines), lines
    assert len(resumed_tsnpe.reused) == 2 and resumed_tsnpe.reused[0] == "300 of 300 simulations of round 1 (read " \
        "from its store)" and re.fullmatch(r"round 1's training up to epoch [1-9]\d* \(epochs over all rounds; "
                                           r"training.ckpt\)", resumed_tsnpe.reused[1])
    assert not list(store.glob("round_*/training.ckpt"))
    for (name, a), b in zip(plain.net.state_dict().items(), resumed.net.state_dict().values()):
        assert torch.equal(a, b), name


def test_force_removes_a_stopped_trainings_checkpoints_unless_only_later_steps_changed(tmp_path):
    from sbiflows import outputs

    outputs.prepare(tmp_path, {"seed": 0, "labels": None})
    for name in ("training.ckpt", "training.members.ckpt"):
        (tmp_path / name).write_bytes(b"state")
    (tmp_path / "training.notes.ckpt").write_bytes(b"the user's")  # not a name checkpoints take
    outputs.prepare(tmp_path, {"seed": 0, "labels": ["a", "b"]}, force=True)  # the training's settings unchanged
    assert (tmp_path / "training.ckpt").exists() and (tmp_path / "training.members.ckpt").exists()
    removed = outputs.prepare(tmp_path, {"seed": 1, "labels": ["a", "b"]}, force=True)
    assert {"training.ckpt", "training.members.ckpt"} <= set(removed)
    assert not (tmp_path / "training.ckpt").exists() and (tmp_path / "training.notes.ckpt").exists()


def test_a_checkpoint_of_another_network_with_the_same_weights_is_ignored(tmp_path):
    """Weights of the same shapes, but another activation or spline interval: another fit (found in review)."""
    u, x = data()
    prior = torch.distributions.Independent(torch.distributions.Normal(torch.zeros(2), torch.ones(2)), 1)
    options = dict(max_epochs=3, batch_size=32, progress=False)
    path = tmp_path / "training.ckpt"
    NPE(prior, activation="tanh").fit(u, x, checkpoint=path, **options)
    for other in (dict(activation="relu"), dict(bound=3.0)):
        checkpoint = Checkpoint(path)
        NPE(prior, **other).fit(u, x, checkpoint=checkpoint, **options)
        assert checkpoint.resumed_epoch is None, other


def test_the_vectorized_members_key_holds_their_seeds(tmp_path):
    """With the split given, the seeds still set the minibatch order: a checkpoint of other seeds is ignored."""
    from sbiflows.ensemble_training import train_members

    u, x = data()
    masks = [torch.arange(300) % 10 == k for k in range(2)]

    def members_fit(seeds, checkpoint):
        torch.manual_seed(1)
        members = [nsf(2, 2, transforms=1, hidden_features=(8,)) for _ in range(2)]
        how = train_members(members, u, x, seeds=seeds, histories=[TrainingHistory(), TrainingHistory()],
                            validations=masks, max_epochs=3, batch_size=32, checkpoint=checkpoint)
        assert how == "vectorized"

    members_fit([0, 1], Checkpoint(tmp_path / "training.ckpt"))
    other = Checkpoint(tmp_path / "training.ckpt")
    members_fit([5, 6], other)
    assert other.resumed_epoch is None
    same = Checkpoint(tmp_path / "training.ckpt")
    members_fit([5, 6], same)
    assert same.finished


def test_remove_takes_the_siblings_and_nothing_else(tmp_path):
    checkpoint = Checkpoint(tmp_path / "training.ckpt")
    nested = checkpoint.sibling("members").sibling("member1")
    assert [part.path.name for part in checkpoint.parts()] == [
        "training.ckpt", "training.members.ckpt", "training.members.member1.ckpt"]
    names = ["training.ckpt", "training.ckpt.tmp", "training.members.ckpt", "training.member0.ckpt",
             "training.members.member1.ckpt", "trainingmember7.ckpt", "training.notes.ckpt", "other.ckpt"]
    for name in names:
        (tmp_path / name).write_bytes(b"")
    checkpoint.remove()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["other.ckpt", "training.notes.ckpt",
                                                                "trainingmember7.ckpt"]
    assert nested.path.name == "training.members.member1.ckpt"


def test_an_unwritable_checkpoint_is_refused_before_training_and_a_failed_write_only_warns(tmp_path, monkeypatch):
    u, x = data()
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("")
    for bad, message in ((tmp_path / "folder", "must be a file path"), (tmp_path / "file" / "a.ckpt", "cannot be")):
        with pytest.raises(ValueError, match=message):
            train(flow(), u, x, max_epochs=1, checkpoint=Checkpoint(bad))
    import sbiflows.checkpoint

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(sbiflows.checkpoint.torch, "save", full_disk)
    with pytest.warns(RuntimeWarning, match="could not write the training checkpoint .* training goes on"):
        history = train(flow(), u, x, max_epochs=2, checkpoint=Checkpoint(tmp_path / "training.ckpt"))
    assert history.epochs == 2 and not list(tmp_path.glob("training.ckpt*"))


def test_a_refit_of_an_ensemble_resumes_in_a_fresh_process(tmp_path, monkeypatch):
    """Members' histories are in the key without their seconds (found in review: a refit of three flows never
    resumed, because each history's wall time was hashed)."""
    generator = torch.Generator().manual_seed(5)
    u, x = data()
    more_u, more_x = u[:100] + 0.01 * torch.randn(100, 2, generator=generator), x[:100]
    prior = torch.distributions.Independent(torch.distributions.Normal(torch.zeros(2), torch.ones(2)), 1)
    options = dict(max_epochs=12, batch_size=32, patience=4, progress=False)

    def two_fits(stop: bool = False):
        npe = NPE(prior, ensemble=3)
        npe.fit(u, x, checkpoint=Checkpoint(tmp_path / "first.ckpt", every=0.0), **options)
        refit = Checkpoint(tmp_path / "refit.ckpt", every=0.0)
        if stop:
            with monkeypatch.context() as patch:
                stop_vectorized_after(patch, 20)
                with pytest.raises(Stop):
                    npe.fit(more_u, more_x, checkpoint=refit, **options)
            return None, refit
        return npe.fit(more_u, more_x, checkpoint=refit, **options), refit

    plain, _ = two_fits()
    for name in ("first.ckpt", "refit.ckpt"):
        (tmp_path / name).unlink()
    two_fits(stop=True)
    resumed, refit = two_fits()
    assert refit.resumed_epoch is not None and refit.resumed_epoch > 0
    for (name, a), b in zip(plain.net.state_dict().items(), resumed.net.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_resumed_refit_of_vectorized_members_reports_its_epoch_over_all_fits(tmp_path, monkeypatch):
    """A single flow's resume reports the epoch counted over all fits (a TSNPE's rounds), the members trained in one
    vectorized pass reported the epoch within the refit, so a report read "round 2's training up to epoch 27"
    after a round 1 of 60 epochs."""
    u, x = data()
    prior = torch.distributions.Independent(torch.distributions.Normal(torch.zeros(2), torch.ones(2)), 1)
    options = dict(max_epochs=8, batch_size=32, patience=50, progress=False)
    npe = NPE(prior, ensemble=3)
    npe.fit(u, x, **options)
    first = npe.history.epochs
    path = tmp_path / "training.ckpt"
    with monkeypatch.context() as patch:
        stop_vectorized_after(patch, 20)
        with pytest.raises(Stop):
            npe.fit(u[:50] + 0.01, x[:50], checkpoint=Checkpoint(path, every=0.0), **options)
    checkpoint = Checkpoint(path, every=0.0)
    npe.fit(u[:50] + 0.01, x[:50], checkpoint=checkpoint, **options)
    assert first == 8 and first < checkpoint.resumed_epoch < first + 8

"""Ctrl-C and SIGTERM during a checkpointed training: the epoch ends, the checkpoint is written, then the stop."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from test_checkpoint import OPTIONS, assert_same, data, fit, flow

from sbiflows import NPE, training
from sbiflows.checkpoint import Checkpoint
from sbiflows.training import train

CALLS_PER_EPOCH = 10  # OPTIONS' 300 rows: 9 minibatches and the validation pass


@pytest.fixture(autouse=True)
def python_sigint_handler():
    """Python's own SIGINT handler (KeyboardInterrupt), as in a terminal: a process started in the background by
    a shell script inherits SIGINT ignored, and an ignored signal is left alone (tested below)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_an_ignored_signal_stays_ignored(tmp_path, monkeypatch):
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with monkeypatch.context() as patch:
        signal_at(patch, training, "negative_log_likelihood", (25,), signal.SIGINT)
        history = train(flow(), *data(), checkpoint=Checkpoint(tmp_path / "training.ckpt", every=3600.0), **OPTIONS)
    assert history.stopped_early and signal.getsignal(signal.SIGINT) is signal.SIG_IGN


def signal_at(monkeypatch, module, name: str, calls: tuple[int, ...], signum: int) -> None:
    """Send this process ``signum`` from inside ``module.name`` at each of its ``calls``-th calls."""
    count, original = [0], getattr(module, name)

    def counted(*args):
        count[0] += 1
        if count[0] in calls:
            signal.raise_signal(signum)
        return original(*args)

    monkeypatch.setattr(module, name, counted)


def saved_epoch(path) -> tuple[int, bool]:
    state = torch.load(path, weights_only=True)
    return state["epoch"], state["finished"]


def test_ctrl_c_ends_the_epoch_writes_the_checkpoint_and_the_rerun_is_the_same_training(tmp_path, monkeypatch,
                                                                                      capsys):
    plain = fit()
    path = tmp_path / "training.ckpt"
    with monkeypatch.context() as patch:
        signal_at(patch, training, "negative_log_likelihood", (25,), signal.SIGINT)  # in epoch 2 (counted from 0)
        with pytest.raises(KeyboardInterrupt):
            fit(path, every=3600.0)  # no periodic write
    assert saved_epoch(path) == (3, False)  # epoch 2 ended and was written
    assert torch.load(path, weights_only=True)["history"]["seconds"] > 0  # the stopped run's training time
    assert "Ctrl-C: stopping at the end of this epoch" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is back
    resumed = fit(path)
    assert resumed[3].resumed_epoch == 3
    assert_same(plain, resumed)


def test_a_second_ctrl_c_stops_at_once(tmp_path, monkeypatch):
    path = tmp_path / "training.ckpt"
    stopped_in = []
    with monkeypatch.context() as patch:
        signal_at(patch, training, "negative_log_likelihood", (25, 27), signal.SIGINT)
        original = training.negative_log_likelihood
        patch.setattr(training, "negative_log_likelihood", lambda *a: (stopped_in.append(1), original(*a))[1])
        with pytest.raises(KeyboardInterrupt):
            train(flow(), *data(), checkpoint=Checkpoint(path, every=3600.0), **OPTIONS)
    assert len(stopped_in) == 27  # the second Ctrl-C interrupted the 27th loss, mid-epoch
    assert not path.exists()  # no epoch end came, and no periodic write was due
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_sigterm_to_the_three_flows_trained_together_calls_the_installed_handler_after_the_write(tmp_path,
                                                                                                monkeypatch):
    """The vectorized ensemble's loop, and a SIGTERM handler of the user's that is called later, not replaced."""
    import sbiflows.ensemble_training as ensemble_training

    class Terminated(Exception):
        pass

    def handler(signum, frame):
        raise Terminated

    prior = torch.distributions.Independent(torch.distributions.Normal(torch.zeros(2), torch.ones(2)), 1)
    options = dict(max_epochs=30, batch_size=32, patience=4, progress=False)
    plain = NPE(prior, ensemble=3).fit(*data(), **options)
    path = tmp_path / "training.ckpt"
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        with monkeypatch.context() as patch:
            signal_at(patch, ensemble_training, "_step", (20,), signal.SIGTERM)  # in epoch 2 (9 steps an epoch)
            with pytest.raises(Terminated):
                NPE(prior, ensemble=3).fit(*data(), checkpoint=Checkpoint(path, every=3600.0), **options)
        assert signal.getsignal(signal.SIGTERM) is handler
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert saved_epoch(path) == (3, False)
    checkpoint = Checkpoint(path)
    resumed = NPE(prior, ensemble=3).fit(*data(), checkpoint=checkpoint, **options)
    assert checkpoint.resumed_epoch == 3
    for (name, a), b in zip(plain.net.state_dict().items(), resumed.net.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_stop_right_after_the_check_for_a_due_write_is_still_written(tmp_path, monkeypatch):
    path = tmp_path / "training.ckpt"
    original, calls = Checkpoint.due, []

    def due(self):
        answer = original(self)
        calls.append(answer)
        if len(calls) == 3:  # at the end of epoch 2, between the check and the write
            signal.raise_signal(signal.SIGINT)
        return answer

    monkeypatch.setattr(Checkpoint, "due", due)
    with pytest.raises(KeyboardInterrupt):
        train(flow(), *data(), checkpoint=Checkpoint(path, every=3600.0), **OPTIONS)
    assert calls == [False, False, False] and saved_epoch(path) == (3, False)


def test_a_second_signal_acts_as_itself(tmp_path, monkeypatch):
    """Ctrl-C, then SIGTERM before the epoch ends: SIGTERM's handler acts (sbiflows fit: exit 143, not 130)."""
    class Terminated(Exception):
        pass

    def handler(signum, frame):
        raise Terminated

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        with monkeypatch.context() as patch:
            sends = iter([signal.SIGINT, signal.SIGTERM])
            original, count = training.negative_log_likelihood, [0]

            def counted(*args):
                count[0] += 1
                if count[0] in (25, 27):
                    signal.raise_signal(next(sends))
                return original(*args)

            patch.setattr(training, "negative_log_likelihood", counted)
            with pytest.raises(Terminated):
                train(flow(), *data(), checkpoint=Checkpoint(tmp_path / "training.ckpt", every=3600.0), **OPTIONS)
        assert count[0] == 27 and signal.getsignal(signal.SIGTERM) is handler
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_stop_during_the_last_write_is_carried_out_when_training_returns(tmp_path, monkeypatch):
    path = tmp_path / "training.ckpt"
    original = Checkpoint.save

    def save(self, state):
        if state["finished"]:
            signal.raise_signal(signal.SIGINT)
        original(self, state)

    monkeypatch.setattr(Checkpoint, "save", save)
    with pytest.raises(KeyboardInterrupt):
        train(flow(), *data(), checkpoint=Checkpoint(path, every=3600.0), **OPTIONS)
    assert saved_epoch(path)[1]  # the finished state was written first


def test_without_a_checkpoint_or_outside_training_signals_act_at_once(monkeypatch):
    before = signal.getsignal(signal.SIGINT)
    with monkeypatch.context() as patch:
        signal_at(patch, training, "negative_log_likelihood", (5,), signal.SIGINT)
        calls = []
        original = training.negative_log_likelihood
        patch.setattr(training, "negative_log_likelihood", lambda *a: (calls.append(1), original(*a))[1])
        with pytest.raises(KeyboardInterrupt):
            train(flow(), *data(), **OPTIONS)
    assert len(calls) == 5 and signal.getsignal(signal.SIGINT) is before


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_with_the_default_action_ends_the_process_after_the_write(tmp_path, signum):
    """A plain script (no handler of its own; SIGINT's set to the default action, as some launchers do): the
    process still ends by the signal, with its checkpoint written."""
    path = tmp_path / "training.ckpt"
    script = textwrap.dedent(f"""
        import signal, sys
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        sys.path.insert(0, {str(__import__("pathlib").Path(__file__).parent)!r})
        from test_checkpoint import OPTIONS, data, flow
        from sbiflows import training
        from sbiflows.checkpoint import Checkpoint
        original, count = training.negative_log_likelihood, [0]
        def counted(*args):
            count[0] += 1
            if count[0] == 25:
                signal.raise_signal({int(signum)})
            return original(*args)
        training.negative_log_likelihood = counted
        training.train(flow(), *data(), checkpoint=Checkpoint({str(path)!r}, every=3600.0), **OPTIONS)
        print("not reached")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == -signum, done.stderr
    assert "not reached" not in done.stdout
    assert f"{'Ctrl-C' if signum == signal.SIGINT else 'SIGTERM'}: stopping at the end of this epoch" in done.stderr
    assert saved_epoch(path) == (3, False)


@pytest.mark.slow
def test_sbiflows_fit_stopped_by_sigterm_in_training_resumes_from_that_epoch(tmp_path, monkeypatch, capsys):
    """A scheduler's time limit: the default 60 s between writes has not passed, the epoch is written anyway."""
    from sbiflows.cli import main

    small = ["two_moons", "--simulations", "600", "--num-samples", "200", "--calibration-datasets", "100",
             "--calibration-samples", "100", "--c2st-samples", "200", "--max-epochs", "12", "--quiet",
             "--observations", "1",
             "--out", str(tmp_path)]
    with monkeypatch.context() as patch:
        signal_at(patch, training, "negative_log_likelihood", (50,), signal.SIGTERM)
        assert main(["fit", *small]) == 143
    err = capsys.readouterr().err
    assert "SIGTERM: stopping at the end of this epoch" in err and "terminated" in err
    epoch, finished = saved_epoch(tmp_path / "training.ckpt")
    assert epoch >= 1 and not finished
    assert main(["fit", *small]) == 0
    assert f"resuming training from the checkpoint of a stopped run (training.ckpt, epoch {epoch})" in (
        capsys.readouterr().out)
    report = json.loads((tmp_path / "report.json").read_text())  # what the timings of this run leave out
    assert report["reused"] == ["600 of 600 simulations (read from the store)",
                                f"training up to epoch {epoch} (training.ckpt)"]
    assert report["training"]["seconds"] > 0
    assert "Taken from an earlier run into this folder (not timed above): 600 of 600 simulations" in (
        tmp_path / "report.md").read_text()


def test_npe_fit_given_a_path_says_on_stderr_that_it_resumes_when_it_shows_progress(tmp_path, monkeypatch, capsys):
    prior = torch.distributions.Independent(torch.distributions.Normal(torch.zeros(2), torch.ones(2)), 1)
    options = dict(max_epochs=8, batch_size=32, patience=4)
    path = tmp_path / "training.ckpt"
    with monkeypatch.context() as patch:  # a path writes every 60 s: only the Ctrl-C makes this file
        signal_at(patch, training, "negative_log_likelihood", (25,), signal.SIGINT)
        with pytest.raises(KeyboardInterrupt):
            NPE(prior).fit(*data(), checkpoint=path, progress=False, **options)
    assert saved_epoch(path) == (3, False)
    capsys.readouterr()
    NPE(prior).fit(*data(), checkpoint=path, progress=True, **options)
    assert "resuming training from the checkpoint of a stopped run (training.ckpt, epoch 3)" in capsys.readouterr().err
    NPE(prior).fit(*data(), checkpoint=path, progress=False, **options)  # finished: returns at once, silently
    assert "resuming" not in capsys.readouterr().err

"""``sbiflows fit --embedding``: the tasks' structured x, structured observation files, the report."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from sbiflows import load
from sbiflows.cli import main
from sbiflows.cli_observations import _split_observations

SMALL = ["--simulations", "300", "--num-samples", "100", "--calibration-datasets", "100",
         "--calibration-samples", "100", "--max-epochs", "2", "--quiet"]


def test_tasks_list_their_structure_and_default_embedding(capsys):
    assert main(["tasks"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.strip().splitlines()}
    assert "x_shape=(100, 10) embedding=set" in lines["bernoulli_glm_raw"]
    assert "x_shape=(2, 10) embedding=cnn1d" in lines["lotka_volterra"]
    assert "x_shape=(1, 10) embedding=cnn1d" in lines["sir"]
    assert "x_shape=(100,) embedding=mlp" in lines["slcp_distractors"]
    assert lines["two_moons"].endswith("embedding=auto (none)")  # fit's default, and what it resolves to there


@pytest.mark.slow
def test_a_task_trains_with_its_default_embedding_and_the_report_names_it(tmp_path):
    out = tmp_path / "run"
    assert main(["fit", "bernoulli_glm_raw", "--no-reference", "--observations", "1", "--out", str(out), *SMALL]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["embedding"] == "set"
    assert "embedding: set" in (out / "report.md").read_text()
    posterior = load(out / "posterior.pt", prior=None)
    assert posterior.x_shape == (100, 10) and posterior.config["embedding"] == "set"
    assert np.asarray(report["observations"][0]["observation"]).size == 1000


def _write_model(folder):
    (folder / "series.py").write_text(textwrap.dedent("""
        import torch
        from torch.distributions import Independent, Normal

        prior = Independent(Normal(torch.zeros(2), torch.ones(2)), 1)

        def simulate(theta):
            t = torch.linspace(0, 1, 8)
            x = torch.stack([theta[:, :1] * t, theta[:, 1:] * t.flip(0)], 1)
            return x + 0.1 * torch.randn_like(x)
    """))


@pytest.mark.slow
def test_a_user_simulator_with_structured_x_and_npy_observations(tmp_path, monkeypatch):
    _write_model(tmp_path)
    monkeypatch.chdir(tmp_path)
    np.save(tmp_path / "one.npy", np.zeros((2, 8), dtype=np.float32))
    np.save(tmp_path / "batch.npy", np.ones((2, 2, 8), dtype=np.float32))
    out = tmp_path / "run"
    assert main(["fit", "--simulator", "series:simulate", "--prior", "series:prior", "--embedding", "cnn1d",
                 "--observation", "one.npy", "--observation", "batch.npy", "--out", str(out), *SMALL]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["embedding"] == "cnn1d"
    assert [o["name"] for o in report["observations"]] == ["one", "batch", "batch_2"]
    posterior = load(out / "posterior.pt")
    assert posterior.x_shape == (2, 8) and posterior.config["embedding"] == "cnn1d"



@pytest.mark.slow
def test_a_set_observation_with_fewer_trials_gets_its_predictive_check(tmp_path, monkeypatch):
    """The padded observation was refused by the predictive check: the run stopped at step 4/5 with a
    traceback ("x_o contains NaN/inf values"), after training."""
    (tmp_path / "padded_sets.py").write_text(textwrap.dedent("""
        import torch
        from torch.distributions import Independent, Normal

        prior = Independent(Normal(torch.zeros(2), torch.ones(2)), 1)

        def simulate(theta):  # 4 to 10 trials, NaN-padded to 10
            x = theta[:, None, :] + 0.5 * torch.randn(len(theta), 10, 2)
            trials = torch.randint(4, 11, (len(theta),))
            x[torch.arange(10)[None, :] >= trials[:, None]] = float("nan")
            return x
    """))
    monkeypatch.chdir(tmp_path)
    np.save(tmp_path / "six.npy", np.full((6, 2), 0.2, dtype=np.float32) + np.arange(6)[:, None] / 10)
    out = tmp_path / "run"
    assert main(["fit", "--simulator", "padded_sets:simulate", "--prior", "padded_sets:prior", "--embedding", "set",
                 "--observation", "six.npy", "--out", str(out), *SMALL]) == 0
    predictive = json.loads((out / "report.json").read_text())["observations"][0]["predictive"]
    assert predictive["passed"] is not None and "a set: 5 statistics" in predictive["summary"]


@pytest.mark.slow
def test_a_user_simulator_with_long_flat_x_gets_the_linear_summary_unless_none(tmp_path, monkeypatch):
    (tmp_path / "longx.py").write_text(textwrap.dedent("""
        import torch
        from torch.distributions import Independent, Normal

        prior = Independent(Normal(torch.zeros(2), torch.ones(2)), 1)

        def simulate(theta):  # 2 parameters, 30 values: the signal twice, then noise
            signal = torch.cat([theta, theta], 1) + 0.3 * torch.randn(len(theta), 4)
            return torch.cat([signal, torch.randn(len(theta), 26)], 1)
    """))
    monkeypatch.chdir(tmp_path)
    np.savetxt(tmp_path / "obs.csv", np.zeros((1, 30)), delimiter=",")
    for choice, recorded, built in ((None, "auto", "linear"), ("none", "none", "none")):
        out = tmp_path / f"run_{choice}"
        extra = [] if choice is None else ["--embedding", choice]
        assert main(["fit", "--simulator", "longx:simulate", "--prior", "longx:prior", "--observation", "obs.csv",
                     "--out", str(out), *extra, *SMALL]) == 0
        assert json.loads((out / "report.json").read_text())["embedding"] == recorded
        posterior = load(out / "posterior.pt")
        assert posterior.config["embedding"] == built
        assert posterior.config["context_features"] == (4 if built == "linear" else 30)

def test_a_structured_observation_of_the_wrong_shape_fails_before_training(tmp_path, monkeypatch, capsys):
    _write_model(tmp_path)
    monkeypatch.chdir(tmp_path)
    np.save(tmp_path / "bad.npy", np.zeros((3, 8), dtype=np.float32))
    with pytest.raises(SystemExit) as info:
        main(["fit", "--simulator", "series:simulate", "--prior", "series:prior", "--observation", "bad.npy",
              "--out", str(tmp_path / "run"), *SMALL])
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert "holds an array of shape (3, 8); the simulator's x has shape (2, 8)" in err
    assert not (tmp_path / "run" / "posterior.pt").exists()


def test_an_embedding_that_does_not_fit_the_task_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["fit", "two_moons", "--embedding", "set", "--observations", "1", "--out", str(tmp_path / "r"), *SMALL])
    assert info.value.code == 2
    assert "'set' takes x of shape (trials, features) per simulation, got x_shape (2,)" in capsys.readouterr().err


def test_set_observation_files_with_fewer_trials_are_padded():
    one = _split_observations(torch.ones((3, 10)), (100, 10), Path("one.npy"), padded_trials=True)
    assert len(one) == 1 and one[0].shape == (100, 10) and one[0][3:].isnan().all() and (one[0][:3] == 1).all()
    batch = _split_observations(torch.ones((2, 100, 10)), (100, 10), Path("b.npy"), padded_trials=True)
    assert len(batch) == 2 and not batch[1].isnan().any()
    with pytest.raises(ValueError, match="sets of 101 trials, more than the 100"):
        _split_observations(torch.ones((101, 10)), (100, 10), Path("big.npy"), padded_trials=True)

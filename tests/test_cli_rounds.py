"""``sbiflows fit --rounds R``: truncated sequential NPE from the command line, its report and its errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sbiflows.cli import main

SMALL = ["--simulations", "600", "--num-samples", "400", "--calibration-datasets", "100",
         "--calibration-samples", "100", "--c2st-samples", "400", "--max-epochs", "5", "--quiet"]


@pytest.mark.parametrize(
    "argv,message",
    [
        (["fit", "two_moons", "--rounds", "3"], "--rounds 3 (sequential NPE) needs exactly one observation, got 10"),
        (["fit", "two_moons", "--rounds", "2", "--observations", "1,2"], "needs exactly one observation, got 2"),
        (["fit", "two_moons", "--rounds", "0"], "expected a positive integer, got 0"),
        (["fit", "two_moons", "--rounds", "5", "--observations", "1", "--simulations", "4"],
         "--rounds 5 needs at least 2 simulations in the first round and 1 in each other (--simulations 6 or more), "
         "got --simulations 4"),
        (["fit", "two_moons", "--rounds", "5", "--observations", "1", "--simulations", "5"],  # failed in training
         "needs at least 2 simulations in the first round"),
        (["fit", "two_moons", "--rounds", "2", "--observations", "1", "--balancing", "100"],
         "TSNPE does not take balancing (balanced NPE), got balancing=100.0"),
        (["fit", "two_moons", "--retrain-from-scratch"], "retrain_from_scratch (--retrain-from-scratch) trains a new "
         "network in every round of a sequential run and needs rounds > 1 (--rounds R), got rounds=1"),
    ],
)
def test_bad_rounds_give_one_line_and_exit_code_2(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as info:
        main([*argv, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()  # refused before anything ran


def test_an_observation_file_with_two_rows_is_refused(tmp_path, capsys):
    path = tmp_path / "x.csv"
    np.savetxt(path, np.zeros((2, 2)), delimiter=",")
    with pytest.raises(SystemExit):
        main(["fit", "two_moons", "--observation", str(path), "--rounds", "2", "--out", str(tmp_path / "o")])
    assert "needs exactly one observation, got 2 (x, x_2)" in capsys.readouterr().err


@pytest.mark.slow
def test_fit_with_rounds_writes_the_sequential_report_and_resumes(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["fit", "two_moons", "--out", str(out), "--observations", "3", "--rounds", "2", "--device", "cpu", *SMALL]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert [r["simulations"] for r in report["rounds"]] == [300, 300]
    assert report["rounds"][0]["method"] == "prior" and 0 < report["rounds"][1]["volume"] < 1
    assert set(report["calibration"]) == {"truncated_coverage"}
    assert set(report["not_applicable"]) == {"sbc", "coverage", "tarp"}
    assert report["verdict"] in ("calibrated", "conservative", "over-confident", "biased")
    assert [o["name"] for o in report["observations"]] == ["obs3"] and 0.4 < report["observations"][0]["c2st"] <= 1
    markdown = (out / "report.md").read_text()
    assert "## Rounds (truncated sequential NPE)" in markdown and "| 2 | 300 | 0 |" in markdown
    epochs = [r["epochs"] for r in report["rounds"]]  # the history counts over the rounds, and the report says so
    assert report["training"]["epochs"] == sum(epochs) and report["training"]["round_epochs"] == epochs
    assert f"{sum(epochs)} epochs over 2 rounds ({epochs[0]}, {epochs[1]}), best epoch" in markdown
    assert "SBC over the prior" in markdown and "cannot detect posterior mass that a region cut off" in markdown
    for name in ("posterior.pt", "samples.npz", "coverage.png", "corner_obs3.png", "rounds/tsnpe.json",
                 "rounds/round_1/simulations.zarr", "rounds/check/simulations.zarr"):
        assert (out / name).exists(), name
    assert not (out / "sbc_ranks.png").exists() and not (out / "simulations.zarr").exists()
    from sbiflows import load

    posterior = load(out / "posterior.pt")
    assert torch.allclose(posterior.default_x, torch.tensor(report["observations"][0]["observation"]))
    assert "rounds" in json.loads((out / "run.json").read_text())["files"]
    capsys.readouterr()
    assert main(argv) == 0  # the same command resumes: no round is simulated or trained again
    printed = capsys.readouterr().out
    assert "all 2 rounds finished earlier: reusing them" in printed and "round 1:" not in printed
    assert json.loads((out / "report.json").read_text())["rounds"] == report["rounds"]
    # only settings of the later steps changed: --force keeps the rounds (their simulations) and resumes them
    assert main([*argv, "--num-samples", "300", "--force"]) == 0
    printed = capsys.readouterr().out
    assert "all 2 rounds finished earlier: reusing them" in printed and "round 1:" not in printed
    # rounds made under another TSNPE default (the job's settings unchanged): refused in one line, then --force
    manifest = json.loads((out / "rounds" / "tsnpe.json").read_text())
    manifest["settings"]["truncation"]["quantile"] = 0.5  # as if the default had been another
    (out / "rounds" / "tsnpe.json").write_text(json.dumps(manifest))
    rerun = [*argv, "--num-samples", "300"]
    with pytest.raises(SystemExit) as info:
        main(rerun)
    err = capsys.readouterr().err
    assert info.value.code == 2 and "holds a TSNPE run with other settings (truncation: quantile)" in err and "--force" in err
    assert main([*rerun, "--force"]) == 0
    assert "force: removing the rounds of other TSNPE settings" in capsys.readouterr().out
    assert json.loads((out / "rounds" / "tsnpe.json").read_text())["settings"]["truncation"]["quantile"] != 0.5
    # a training setting changed: --force starts the rounds over but keeps round 1's simulations (the prior's draws)
    first = (out / "rounds" / "round_0" / "theta.npy").read_bytes()
    assert main([*rerun, "--max-epochs", "4", "--force"]) == 0
    assert "rounds (all but round 1's simulations)" in capsys.readouterr().err
    reused = json.loads((out / "report.json").read_text())["reused"]
    assert "300 of 300 simulations of round 1 (read from its store)" in reused
    assert not any("round 2" in entry for entry in reused)  # its region came from the new round 1's posterior
    assert (out / "rounds" / "round_0" / "theta.npy").read_bytes() == first
    assert json.loads((out / "report.json").read_text())["training"]["round_epochs"][0] <= 4


def test_the_advice_of_a_sequential_run_asks_only_for_what_tsnpe_takes():
    from sbiflows.diagnostics.verdict import ADVICE, VERDICTS
    from sbiflows.pipeline_sequential import SEQUENTIAL_ADVICE

    assert set(SEQUENTIAL_ADVICE) == set(ADVICE) == set(VERDICTS)
    assert "--ensemble 3" in ADVICE["over-confident"]  # the amortized advice names the measured remedy
    assert "--ensemble 3" in SEQUENTIAL_ADVICE["over-confident"]  # TSNPE trains the ensemble in every round
    for text in SEQUENTIAL_ADVICE.values():  # TSNPE refuses balancing: it is never suggested
        assert "balancing" not in text


def test_a_posterior_that_mixes_flows_already_is_not_advised_an_ensemble_of_three():
    from sbiflows.pipeline_calibration import advice
    from sbiflows.pipeline_sequential import sequential_advice

    for verdict in ("over-confident", "biased"):
        for ensemble, config in ((3, {"ensemble": 3}), ("auto", {"ensemble": 3, "ensemble_auto": {}})):
            text = advice(verdict, ensemble, config)
            assert "It already mixes 3 flows" in text and "ensemble=3" not in text and "--ensemble 3" not in text
        assert "ensemble=3" in advice(verdict, 1, {"ensemble": 1})  # one flow: three is the measured remedy
        assert "ensemble=3" in advice(verdict, "snapshots", {"ensemble": 3, "snapshot_epochs": [3, 6, 9]})
    for verdict in ("over-confident", "biased"):
        assert "--ensemble 3" not in sequential_advice(verdict, 3) and "ensemble=3" not in sequential_advice(verdict, 3)
        assert "--ensemble 3" in sequential_advice(verdict, 1)


def test_retrain_from_scratch_reaches_every_round_and_the_run_settings(tmp_path):
    from sbiflows.cli import _setup
    from sbiflows.cli_parser import build_parser

    argv = ["fit", "two_moons", "--rounds", "2", "--observations", "1", "--out", str(tmp_path / "x")]
    job = _setup(build_parser().parse_args([*argv, "--retrain-from-scratch"]))
    assert job.fit_options["retrain_from_scratch"] is True and job.settings()["retrain_from_scratch"] is True
    plain = _setup(build_parser().parse_args(argv))
    assert "retrain_from_scratch" not in plain.fit_options and "retrain_from_scratch" not in plain.settings()


@pytest.mark.slow
def test_fit_with_rounds_and_a_new_network_every_round_reports_each_rounds_epochs(tmp_path, monkeypatch):
    from sbiflows import NPE

    seen = []
    fit = NPE.fit

    def recording(self, *args, **kwargs):
        seen.append(kwargs.get("retrain_from_scratch"))
        return fit(self, *args, **kwargs)

    monkeypatch.setattr(NPE, "fit", recording)
    out = tmp_path / "run"
    argv = ["fit", "two_moons", "--out", str(out), "--observations", "2", "--rounds", "2", "--retrain-from-scratch"]
    assert main([*argv, *SMALL]) == 0
    assert seen == [True, True]
    report = json.loads((out / "report.json").read_text())
    epochs = [r["epochs"] for r in report["rounds"]]
    assert report["training"]["new_network_each_round"] is True
    assert report["training"]["epochs"] == epochs[-1]  # the final network's own history: the last round's
    assert (f"{sum(epochs)} epochs over 2 rounds ({epochs[0]}, {epochs[1]}), a new network each round; best epoch "
            f"{report['training']['best_epoch']} of round 2") in (out / "report.md").read_text()

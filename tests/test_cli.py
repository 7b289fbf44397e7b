"""The ``sbiflows`` command line: help, one-line errors with exit code 2, and the main job end to end."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from sbiflows.cli import main

SMALL = ["--simulations", "600", "--num-samples", "400", "--calibration-datasets", "100",
         "--calibration-samples", "100", "--c2st-samples", "400", "--max-epochs", "5", "--quiet"]


def test_help_lists_the_main_job(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    assert "fit" in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:
        main(["fit", "--help"])
    text = capsys.readouterr().out
    assert info.value.code == 0 and "--simulations" in text and "--observation" in text
    assert "sampling (default: 0)" in " ".join(text.split())  # a default of 0 is shown too (0 == False)


def test_tasks_lists_the_benchmark(capsys):
    assert main(["tasks"]) == 0
    out = capsys.readouterr().out
    assert "two_moons" in out and "lotka_volterra" in out and len(out.strip().splitlines()) == 10


@pytest.mark.parametrize(
    "argv,message",
    [
        (["fit", "no_such_task"], "unknown task 'no_such_task'"),
        (["fit", "two_moons", "--simulations", "-5"], "expected a positive integer, got -5"),
        (["fit", "two_moons", "--estimator", "nope"], "invalid choice"),
        (["fit", "two_moons", "--transformer", "cubic"], "invalid choice"),
        (["fit", "two_moons", "--estimator", "maf", "--bins", "4"], "bins"),  # maf's default transformer is affine
        (["fit", "two_moons", "--ensemble", "0"],
         "expected a positive integer, auto, snapshots, auto-snapshots or auto-stacked, got 0"),
        (["fit", "two_moons", "--ensemble", "many"],
         "expected a positive integer, auto, snapshots, auto-snapshots or auto-stacked, got 'many'"),
        (["fit", "two_moons", "--mixing", "permute"], "invalid choice"),
        (["fit", "bernoulli_glm", "--estimator", "maf", "--mixing", "lu"],
         "mixing='lu' applies to the coupling estimators 'nsf' and 'realnvp', got estimator 'maf'"),
        (["fit", "two_moons", "--balancing", "-1"], "--balancing: expected a number >= 0, got -1"),
        (["fit", "two_moons", "--balancing", "inf"], "--balancing: expected a number >= 0, got inf"),
        (["fit", "two_moons", "--coverage-penalty", "-2"], "--coverage-penalty: expected a number >= 0, got -2"),
        (["fit", "two_moons", "--learning-rate", "0"], "--learning-rate: expected a positive number, got 0"),
        (["fit", "two_moons", "--learning-rate", "fast"], "expected a positive number, got 'fast'"),
        (["fit", "two_moons", "--patience", "0"], "--patience: expected a positive integer, got 0"),
        (["fit", "two_moons", "--step-drops", "-1"], "--step-drops: expected an integer >= 0, got -1"),
        (["fit", "two_moons", "--step-drops", "one"], "--step-drops: expected an integer >= 0, got 'one'"),
        (["fit", "two_moons", "--drop-patience", "0"], "--drop-patience: expected a positive integer, got 0"),
        (["fit"], "name a task"),
        (["fit", "two_moons", "--observations", "0-3"], "--observations must lie in 1..10"),
        (["fit", "two_moons", "--observation", "x.csv", "--observations", "3"],  # it was ignored without a word
         "--observations picks a task's published observations; with --observation FILE give only the files"),
        (["fit", "--simulator", "nomodule:f", "--prior", "nomodule:p", "--observation", "x.csv"], "cannot import"),
        (["fit", "--simulator", "math:sqrt"], "go together"),
        (["bogus"], "invalid choice"),
    ],
)
def test_bad_arguments_give_one_line_and_exit_code_2(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert message in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("name,content,message", [
    ("semi.csv", "0.3;0.7\n", "error: --observation '{path}' separates its values with ';'; a .csv takes "
                               "comma-separated values"),
    ("header.csv", "x1,x2\n", "its only line was read as a header (a row that is not all numbers); give one "
                              "observation per row as comma-separated values"),
    ("na.csv", "0.3,NA\n0.5,0.5\n", "is not a numeric table"),  # numbers and missing values: data, not a header
    ("empty.csv", "", "holds no observation: it is empty"),
    ("empty.txt", "\n", "holds no observation: it is empty; give one observation per row as values separated by spaces"),
])
def test_observation_files_without_an_observation_give_one_line(tmp_path, capsys, name, content, message):
    """A semicolon-separated or empty table was a RuntimeError traceback from reshaping 0 values."""
    (tmp_path / name).write_text(content)
    with pytest.raises(SystemExit) as info:
        main(["fit", "two_moons", "--observation", str(tmp_path / name), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    message = message.format(path=tmp_path / name)
    assert info.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_observation_file_types_are_read_whatever_the_case_of_their_suffix(tmp_path):
    from sbiflows.cli_observations import _read_observations

    (tmp_path / "UP.CSV").write_text("x1,x2\n0.3,0.7\n")
    np.save(tmp_path / "obs.npy", np.array([0.3, 0.7]))
    (tmp_path / "obs.npy").rename(tmp_path / "OBS.NPY")
    assert _read_observations(tmp_path / "UP.CSV").tolist() == [[pytest.approx(0.3), pytest.approx(0.7)]]
    assert _read_observations(tmp_path / "OBS.NPY").tolist() == [pytest.approx(0.3), pytest.approx(0.7)]


def test_a_spreadsheets_utf8_csv_keeps_its_first_row(tmp_path):
    """Excel's "CSV UTF-8" starts with a byte-order mark, which made the first row read as a header and dropped
    it without a word."""
    from sbiflows.cli_observations import _parse_indices, _read_observations

    path = tmp_path / "bom.csv"
    path.write_bytes(b"\xef\xbb\xbf0.3,0.7\r\n0.5,0.5\r\n")
    assert _read_observations(path).tolist() == [[pytest.approx(0.3), pytest.approx(0.7)], [0.5, 0.5]]
    path.write_bytes(b"\xef\xbb\xbftheta1,theta2\r\n0.5,0.5\r\n")  # with a header: only the header goes
    assert _read_observations(path).tolist() == [[0.5, 0.5]]
    path.write_text("t,0.1,0.5,1.0\n1,2,3,4\n")  # a header of time points beside a name is still a header
    assert _read_observations(path).tolist() == [[1.0, 2.0, 3.0, 4.0]]
    with pytest.raises(ValueError, match="must look like"):  # '1-' read as 1
        _parse_indices("1-")
    with pytest.raises(ValueError, match="the range '3-1' is empty"):
        _parse_indices("3-1")


def test_estimator_choices_come_from_the_registry(capsys):
    from sbiflows.cli import _setup, build_parser
    from sbiflows.estimator import ESTIMATORS

    parser = build_parser()
    fit = parser._subparsers._group_actions[0].choices["fit"]
    (action,) = [a for a in fit._actions if "--estimator" in a.option_strings]
    assert list(action.choices) == sorted(ESTIMATORS) and "nsf" in action.choices
    args = parser.parse_args(["fit", "two_moons", "--estimator", "nsf", "--observations", "1"])
    assert _setup(args).estimator == "nsf"


@pytest.mark.slow
def test_fit_with_the_nsf_estimator(tmp_path):
    out = tmp_path / "run"
    small = ["--simulations", "300", "--num-samples", "100", "--calibration-datasets", "100",
             "--calibration-samples", "100", "--c2st-samples", "100", "--max-epochs", "2", "--quiet"]
    assert main(["fit", "two_moons", "--estimator", "nsf", "--out", str(out), "--observations", "1", *small]) == 0
    from sbiflows import load

    posterior = load(out / "posterior.pt")
    assert (posterior.config["estimator"], posterior.config["transformer"]) == ("nsf", "spline")
    assert json.loads((out / "report.json").read_text())["estimator"] == "nsf"


@pytest.mark.parametrize("option,value,key,parsed", [("--mixing", "lu", "mixing", "lu"),
                                                      ("--balancing", "100", "balancing", 100.0),
                                                      ("--coverage-penalty", "200", "coverage_penalty", 200.0)])
def test_an_option_joins_the_flow_options_and_settings_only_when_used(option, value, key, parsed):
    from sbiflows.cli import _setup, build_parser

    parser = build_parser()

    def job(*argv):
        return _setup(parser.parse_args(["fit", *argv, "--observations", "1"]))

    plain, chosen = job("bernoulli_glm"), job("bernoulli_glm", option, value)
    assert key not in plain.settings() and key not in plain.estimator_options  # earlier runs keep their settings
    assert chosen.settings()[key] == parsed and chosen.estimator_options[key] == parsed
    assert plain.settings() == {k: v for k, v in chosen.settings().items() if k != key}  # the one difference


@pytest.mark.slow
def test_fit_with_a_balanced_spline_maf_ensemble(tmp_path, capsys):
    out = tmp_path / "run"
    small = ["--simulations", "300", "--num-samples", "100", "--calibration-datasets", "100",
             "--calibration-samples", "100", "--c2st-samples", "100", "--max-epochs", "2", "--quiet"]
    flow = ["--estimator", "maf", "--transformer", "spline", "--bins", "4", "--balancing", "10", "--coverage-penalty",
            "5", "--ensemble", "2"]  # the ensemble size last: the rerun below changes it
    assert main(["fit", "two_moons", *flow, "--out", str(out), "--observations", "1", *small]) == 0
    from sbiflows import load

    posterior = load(out / "posterior.pt")
    config = posterior.config
    assert (config["estimator"], config["transformer"], config["bins"], config["ensemble"]) == ("maf", "spline", 4, 2)
    assert config["balancing"] == 10.0 and config["coverage_penalty"] == 5.0  # both penalties trained every member
    report = json.loads((out / "report.json").read_text())
    assert (report["estimator"], report["transformer"], report["bins"], report["ensemble"]) == ("maf", "spline", 4, 2)
    assert report["balancing"] == 10.0 and report["coverage_penalty"] == 5.0  # beside the calibration checks
    assert set(report["calibration"]) >= {"sbc", "coverage"}
    text = (out / "report.md").read_text()
    assert ("maf (spline transformer, 4 bins), ensemble of 2 flows, balanced (weight 10), coverage penalty (weight 5)"
            in text)
    # the flow options are part of the run's settings: another ensemble size needs --force and retrains,
    # while the simulations are reused
    again = ["fit", "two_moons", *flow[:-1], "3", "--out", str(out), "--observations", "1", *small]
    with pytest.raises(SystemExit, match="2"):
        main(again)
    capsys.readouterr()
    assert main([*again, "--force"]) == 0
    assert load(out / "posterior.pt").config["ensemble"] == 3
    assert "300 read from the store" in capsys.readouterr().out.split("[2/5]")[0]


@pytest.mark.slow
def test_auto_ensemble_reports_what_the_check_decided(tmp_path, monkeypatch, capsys):
    import dataclasses

    from sbiflows import load, npe
    from sbiflows.ensemble import auto_check

    def failing(posterior, theta, x, *, seed):  # a 2-epoch flow is seldom over-confident: make its check fail
        return dataclasses.replace(auto_check(posterior, theta, x, seed=seed), passed=False)

    monkeypatch.setattr(npe, "auto_check", failing)
    out = tmp_path / "run"
    small = ["--simulations", "300", "--num-samples", "100", "--calibration-datasets", "100",
             "--calibration-samples", "100", "--c2st-samples", "100", "--max-epochs", "2"]
    assert main(["fit", "two_moons", "--ensemble", "auto", "--out", str(out), "--observations", "1", *small]) == 0
    assert "auto ensemble: 3 flows (one flow was over-confident on 30 held-out rows: z = " in capsys.readouterr().out
    assert load(out / "posterior.pt").config["ensemble"] == 3
    report = json.loads((out / "report.json").read_text())
    assert report["ensemble"] == "auto" and report["ensemble_auto"]["rows"] == 30
    assert "auto ensemble: 3 flows (one flow was over-confident on 30 held-out rows" in (out / "report.md").read_text()


def test_training_options_reach_the_fit_and_are_part_of_the_runs_settings(tmp_path, capsys):
    out = tmp_path / "run"
    # --c2st-samples above --num-samples: C2ST uses the draws there are (it once crashed after training)
    small = ["--simulations", "300", "--num-samples", "100", "--calibration-datasets", "100",
             "--calibration-samples", "100", "--c2st-samples", "400", "--max-epochs", "200", "--quiet",
             "--observations", "1", "--out", str(out)]
    assert main(["fit", "two_moons", "--learning-rate", "0.0005", "--patience", "2", "--step-drops", "1",
                 "--drop-patience", "1", *small]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["observations"][0]["c2st_samples"] == 100 and 0.5 <= report["observations"][0]["c2st"] <= 1
    training = report["training"]
    assert training["learning_rate"] == 0.0005
    # patience 2 and one step drop: the first plateau lowers the step; a drop that does not improve within
    # --drop-patience 1 epoch stops training one epoch after it, one that does gets patience 2 again (200 epochs
    # are never reached on 300 rows)
    (drop,) = training["step_drop_epochs"]
    best = training["best_epoch"]
    assert training["stopped_early"] and training["epochs"] == (best + 3 if best > drop else drop + 2)
    # another step size changes the run's settings: refused without --force, then retrained on the stored rows
    again = ["fit", "two_moons", "--learning-rate", "0.001", "--patience", "1", *small]
    with pytest.raises(SystemExit, match="2"):
        main(again)
    capsys.readouterr()
    assert main([*again, "--force"]) == 0
    assert json.loads((out / "report.json").read_text())["training"]["learning_rate"] == 0.001
    assert "300 read from the store" in capsys.readouterr().out.split("[2/5]")[0]


def test_a_job_checks_its_training_options_before_simulating(tmp_path):
    from sbiflows.pipeline import Job, Observation
    import simulators

    task = simulators.get("two_moons")
    calls = []

    def simulator(theta):
        calls.append(len(theta))
        return task.simulate(theta)

    common = {"name": "t", "simulator": simulator, "prior": task.prior, "out": tmp_path,
              "observations": [Observation("obs1", task.observation(1))]}
    with pytest.raises(ValueError, match=r"learning_rate must be None \(NPE's default\) or a real number > 0, got -0.1"):
        Job(**common, learning_rate=-0.1)
    with pytest.raises(TypeError, match="patience must be None .* or an int >= 1, got float 2.5"):
        Job(**common, patience=2.5)
    with pytest.raises(ValueError, match=r"step_drops must be None \(NPE's default\) or an int >= 0, got -1"):
        Job(**common, step_drops=-1)
    with pytest.raises(ValueError, match=r"drop_patience must be None \(NPE's default\) or an int >= 1, got 0"):
        Job(**common, drop_patience=0)
    refused = [  # the rest of a job, also checked before its first simulation
        ({"observations": []}, ValueError, "observations must be a non-empty list"),
        ({"observations": [Observation("o", np.zeros(2))]}, TypeError, "observation 'o': x must be a torch.Tensor"),
        ({"observations": [Observation("o", torch.tensor([np.nan, 0.0]))]}, ValueError, "'o': x contains NaN"),
        ({"observations": [Observation("o", torch.zeros(2), torch.zeros(3))]}, ValueError,
         "'o': true_parameters has 3 values, but the prior has 2 parameters"),
        ({"num_samples": 0}, ValueError, "num_samples must be an int >= 1, got 0"),
        ({"simulations": 1}, ValueError, "simulations must be an int >= 2, got 1"),  # a traceback from training
        ({"calibration_datasets": 2.5}, TypeError, "calibration_datasets must be an int >= 1"),
        ({"estimator": "xyz"}, ValueError, "unknown estimator 'xyz'"),
        ({"bins": 0}, ValueError, "bins must be an int >= 1, got 0"),
        ({"embedding": "cnn3d"}, ValueError, "embedding must be one of"),
        # the C2ST's five folds need five draws a side (it failed after training)
        ({"task": task, "observations": [Observation("obs1", task.observation(1), None, 1)], "c2st_samples": 4},
         ValueError, "c2st_samples and num_samples must be at least 5 when the C2ST against the reference posterior"),
        ({"task": task, "observations": [Observation("obs1", task.observation(1), None, 1)], "num_samples": 1},
         ValueError, "got c2st_samples=10000 and num_samples=1"),
    ]
    for change, error, message in refused:
        with pytest.raises(error, match=re.escape(message)):
            Job(**{**common, **change})
    assert calls == []
    # left at the defaults, the options are not in the settings, so runs made before they existed resume
    plain = Job(**common)
    assert plain.fit_options == {"max_epochs": plain.max_epochs}
    assert not {"learning_rate", "patience", "step_drops", "drop_patience"} & set(plain.settings())
    assert plain.settings()["max_epochs"] == plain.max_epochs
    chosen = Job(**common, learning_rate=1e-3, patience=np.int64(4), step_drops=0, drop_patience=2, rounds=2)
    assert chosen.fit_options == {"max_epochs": chosen.max_epochs, "learning_rate": 1e-3, "patience": 4, "step_drops": 0,
                                  "drop_patience": 2}
    assert (chosen.settings()["learning_rate"], chosen.settings()["patience"], chosen.settings()["drop_patience"]) == (
        1e-3, 4, 2)


def test_fit_in_the_truncated_space(tmp_path):
    out = tmp_path / "run"
    small = ["--simulations", "300", "--num-samples", "100", "--calibration-datasets", "100",
             "--calibration-samples", "100", "--c2st-samples", "100", "--max-epochs", "2", "--quiet"]
    assert main(["fit", "two_moons", "--estimator", "nsf", "--space", "truncated", "--out", str(out),
                 "--observations", "1", *small]) == 0
    from sbiflows import load

    posterior = load(out / "posterior.pt")
    assert posterior.config["space"] == "truncated"
    assert json.loads((out / "report.json").read_text())["space"] == "truncated"
    report = (out / "report.md").read_text()
    assert "nsf (spline transformer, 8 bins), auto stacked" in report and "truncated theta space" in report
    with np.load(out / "samples.npz") as samples:
        assert all((np.abs(samples[name]) <= 1).all() for name in samples.files)  # two_moons' box is [-1, 1]^2


def test_console_script_entry_point_runs():
    result = subprocess.run([sys.executable, "-m", "sbiflows.cli", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and "sbiflows" in result.stdout


@pytest.mark.slow
def test_fit_benchmark_task_writes_every_output(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert main(["fit", "two_moons", "--out", str(out), "--observations", "1,2", *SMALL]) == 0
    figures = [f"{stem}.{suffix}" for stem in ("corner_obs1", "corner_obs2", "sbc_ranks", "coverage", "tarp")
               for suffix in ("png", "pdf")]
    for name in ["posterior.pt", "simulations.zarr", "calibration.zarr", "samples.npz", *figures, "report.md",
                 "report.json", "run.json"]:
        assert (out / name).exists(), name
    report = json.loads((out / "report.json").read_text())
    assert [o["name"] for o in report["observations"]] == ["obs1", "obs2"]
    assert report["command"] == "sbiflows " + " ".join(["fit", "two_moons", "--out", str(out), "--observations",
                                                         "1,2", *SMALL])
    assert report["verdict"] in ("calibrated", "conservative", "over-confident", "biased") and report["advice"]
    cautioned = report["verdict"] in ("calibrated", "conservative") and report["mean_c2st"] >= 0.75
    assert ("But the mean C2ST of" in report["advice"]) == cautioned  # calibrated is not accurate
    assert {entry["verdict"] for entry in report["calibration"].values()} <= {
        "calibrated", "conservative", "over-confident", "biased"}
    import numpy as np

    samples = np.load(out / "samples.npz")
    for o in report["observations"]:  # the report's numbers are the samples' quantiles
        assert [p["name"] for p in o["parameters"]] == ["θ_1", "θ_2"]
        for j, p in enumerate(o["parameters"]):
            column = torch.from_numpy(samples[o["name"]][:, j]).double()
            expected = torch.quantile(column, torch.tensor([0.5, 0.16, 0.84, 0.025, 0.975], dtype=torch.float64))
            got = [p["median"], *p["ci68"], *p["ci95"]]
            assert got == pytest.approx(expected.tolist(), abs=1e-9)
            assert p["map"] is not None
    markdown = (out / "report.md").read_text()
    assert "$" not in markdown and "| θ_1 |" in markdown and "68% interval" in markdown
    assert 0.4 < report["observations"][0]["c2st"] <= 1.0
    assert set(report["calibration"]) == {"sbc", "coverage", "tarp"}
    assert report["versions"]["torch"] and report["training"]["epochs"] >= 1
    assert report["training"]["batch_size"] >= 32 and report["training"]["learning_rate"] >= 1e-3
    assert "C2ST" in (out / "report.md").read_text()
    from sbiflows import load

    assert samples["obs1"].shape == (400, 2)
    x_o = torch.tensor(report["observations"][0]["observation"])
    assert load(out / "posterior.pt").sample(5, x=x_o).shape == (5, 2)
    capsys.readouterr()
    # the same command again resumes: nothing is simulated, trained or sampled twice
    assert main(["fit", "two_moons", "--out", str(out), "--observations", "1,2", *SMALL]) == 0
    printed = capsys.readouterr().out
    assert "reused 600 finished simulations" in printed and "reusing the posterior trained" in printed
    assert "reusing the posterior samples" in printed and "reused 100 calibration simulations" in printed
    assert "obs1: C2ST" in printed and printed.count("(from the earlier run)") == 2  # C2ST is not trained again
    again = json.loads((out / "report.json").read_text())
    assert again["observations"][0]["c2st"] == report["observations"][0]["c2st"]
    # other C2ST draws: scored again
    assert main(["fit", "two_moons", "--out", str(out), "--observations", "1,2", *SMALL, "--c2st-samples", "300",
                 "--force"]) == 0  # the last --c2st-samples counts; --force keeps the posterior and its samples
    printed = capsys.readouterr().out  # the samples are kept: only other C2ST draws
    assert "reusing the posterior samples" in printed and "(from the earlier run)" not in printed
    assert json.loads((out / "report.json").read_text())["observations"][0]["c2st_samples"] == 300
    with monkeypatch.context() as patch:  # another torch trains the classifier otherwise: scored again
        patch.setattr(torch, "__version__", "0.0.1")
        assert main(["fit", "two_moons", "--out", str(out), "--observations", "1,2", *SMALL, "--c2st-samples",
                     "300"]) == 0
    assert "(from the earlier run)" not in capsys.readouterr().out


@pytest.mark.slow
def test_fit_user_numpy_simulator(tmp_path, monkeypatch):
    (tmp_path / "mymodel.py").write_text(textwrap.dedent("""
        import numpy as np
        import torch
        from torch.distributions import Independent, Normal

        prior = Independent(Normal(torch.zeros(2), torch.ones(2)), 1)

        def simulate(theta):
            theta = np.asarray(theta)
            return theta + 0.3 * np.random.normal(size=theta.shape)
    """))
    (tmp_path / "x_obs.csv").write_text("x1,x2\n0.5,-0.2\n")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    code = main(["fit", "--simulator", "mymodel:simulate", "--prior", "mymodel:prior",
                 "--observation", "x_obs.csv", "--out", str(out), *SMALL])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["observations"][0]["observation"] == pytest.approx([0.5, -0.2])
    assert "c2st" not in report["observations"][0]
    assert report["name"] == "mymodel"  # the module, not the function's name "simulate"
    predictive = report["observations"][0]["predictive"]
    assert predictive["metric"] == "mahalanobis" and 0 < predictive["pvalue"] <= 1
    assert f"p = {predictive['pvalue']:.3g})" in (out / "report.md").read_text()
    assert (out / "corner_x_obs.png").exists() and (out / "corner_x_obs.pdf").exists() and (out / "report.md").exists()


def test_a_simulator_of_one_parameter_set_at_a_time_runs_with_per_row(tmp_path, monkeypatch, capsys):
    """sbi's habit, theta (theta_dim,) -> x (x_dim,): without --per-row one line names the option (before:
    a traceback whose hint, vectorized=False, the command line had no way to give)."""
    (tmp_path / "rowmodel.py").write_text(textwrap.dedent("""
        import numpy as np
        import torch
        from torch.distributions import Independent, Normal

        prior = Independent(Normal(torch.zeros(2), torch.ones(2)), 1)

        def one_at_a_time(theta):
            theta = np.asarray(theta)
            assert theta.shape == (2,), theta.shape
            return theta + 0.3 * np.random.normal(size=2)
    """))
    (tmp_path / "x_obs.csv").write_text("0.5,-0.2\n")
    monkeypatch.chdir(tmp_path)
    command = ["fit", "--simulator", "rowmodel.py:one_at_a_time", "--prior", "rowmodel.py:prior",
               "--observation", "x_obs.csv", "--out", str(tmp_path / "run"), *SMALL]
    assert main(command) == 3  # the simulator cannot run
    err = capsys.readouterr().err
    assert "needs --per-row" in err and "Traceback" not in err and "vectorized=False" not in err
    assert "to rerun with other options, add --force" in err  # the failed call stored nothing
    assert main([*command, "--per-row", "--force"]) == 0
    settings = json.loads((tmp_path / "run" / "run.json").read_text())["settings"]
    assert settings["vectorized"] is False


def test_a_simulator_that_stops_working_after_step_1_is_told_to_resume_not_to_force(tmp_path, monkeypatch, capsys):
    """A later step's "cannot run" (e.g. a licence ran out) keeps the earlier steps: the line says to rerun the
    same command, not --per-row (the batch worked) or --force (it would remove the simulations and posterior)."""
    (tmp_path / "latemodel.py").write_text(textwrap.dedent("""
        import numpy as np
        import torch
        from torch.distributions import Independent, Uniform

        prior = Independent(Uniform(torch.zeros(2), torch.ones(2)), 1)
        CALLS = {"rows": 0}

        def simulate(theta):
            theta = np.asarray(theta)
            CALLS["rows"] += len(theta)
            if CALLS["rows"] > 601:  # the probe and step 1's 600 rows work
                raise RuntimeError("licence server unreachable")
            return theta + 0.1 * np.random.normal(size=theta.shape)
    """))
    (tmp_path / "x_obs.csv").write_text("0.5,0.4\n")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    assert main(["fit", "--simulator", "latemodel.py:simulate", "--prior", "latemodel.py:prior", "--observation",
                 "x_obs.csv", "--out", str(out), *SMALL]) == 3
    err = capsys.readouterr().err
    assert "licence server unreachable" in err and "run the same command to resume" in err
    assert "--per-row" not in err and "--force" not in err and ".partial" not in err
    assert (out / "posterior.pt").exists() and (out / "simulations.zarr").exists()


@pytest.mark.slow
def test_fit_task_with_own_observation_file_skips_c2st(tmp_path):
    """A task's simulator with the user's data: no reference posterior exists for it, so no C2ST."""
    obs = tmp_path / "x_obs.txt"
    obs.write_text("0.1 -0.3\n0.2 0.25\n")
    out = tmp_path / "run"
    assert main(["fit", "two_moons", "--observation", str(obs), "--out", str(out), *SMALL]) == 0
    report = json.loads((out / "report.json").read_text())
    assert [o["name"] for o in report["observations"]] == ["x_obs", "x_obs_2"]
    assert all("c2st" not in o for o in report["observations"]) and "mean_c2st" not in report
    assert "true_parameters" not in report["observations"][0]
    assert (out / "corner_x_obs.png").exists() and (out / "corner_x_obs_2.png").exists()


@pytest.mark.slow
@pytest.mark.parametrize("stop,code,word", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
def test_ctrl_c_during_simulation_then_the_same_command_resumes(tmp_path, stop, code, word):
    """Ctrl-C left an empty folder; now finished chunks stay in the store and a rerun only adds the rest. SIGTERM
    (a plain kill, a scheduler's time limit) stops the run the same way, with exit code 143."""
    (tmp_path / "slowmodel.py").write_text(textwrap.dedent("""
        import os, time
        import torch
        from torch.distributions import Independent, Normal

        prior = Independent(Normal(torch.zeros(2), torch.ones(2)), 1)

        def simulate(theta, seed):
            if os.path.exists("slow"):  # until the stop: the rerun's calibration and predictive checks need no wait
                time.sleep(0.3)  # 60 chunks take about 9 s on 2 workers: the stop lands mid-simulation even when loaded
            return theta + 0.3 * torch.randn(theta.shape, generator=torch.Generator().manual_seed(seed))
    """))
    (tmp_path / "slow").touch()
    (tmp_path / "x_obs.csv").write_text("0.5,-0.2\n")
    out = tmp_path / "run"
    # As from a terminal: a test runner started in the background of a non-interactive shell ignores SIGINT,
    # and a Python started from it would too; the command restores Python's Ctrl-C handler first.
    as_from_a_terminal = ("import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
                          "runpy.run_module('sbiflows.cli', run_name='__main__')")
    command = [sys.executable, "-c", as_from_a_terminal, "fit", "--simulator", "slowmodel:simulate", "--prior",
               "slowmodel:prior", "--observation", "x_obs.csv", "--out", str(out), "--batch-size", "10",
               "--workers", "2", *SMALL]
    process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and len(list(out.glob("simulations.zarr/records/*.json"))) < 10:
        time.sleep(0.05)
    process.send_signal(stop)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == code, stderr
    assert word in stderr and "run the same command again to resume" in stderr
    kept = len(list(out.glob("simulations.zarr/records/*.json")))
    assert 10 <= kept < 60
    (tmp_path / "slow").unlink()
    finished = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr
    assert f"reused {10 * kept} finished simulations" in finished.stdout
    assert (out / "report.md").exists()


USER_MODEL = textwrap.dedent("""
    import torch
    from torch.distributions import Independent, Normal

    prior = Independent(Normal(torch.zeros(2), torch.ones(2)), 1)
    CALLS = []

    def simulate(theta):
        CALLS.append(len(theta))
        return torch.cat([theta, theta.sum(-1, keepdim=True)], -1)  # x has 3 values
""")


@pytest.mark.parametrize(
    "observation,message",
    [
        ("x.csv:1,2", "observation 'x' has 2 values, but the simulator's x has 3"),
        ("x.json:[1,2,3]", "unsupported file type '.json'; use one of .csv, .txt, .npy"),
        ("x.csv:1,nan,3", "observation 'x' contains NaN or inf"),
    ],
)
def test_user_simulator_input_is_checked_after_one_probe_simulation(tmp_path, monkeypatch, capsys, observation,
                                                                    message):
    """Issue 14: a wrong observation is one line and exit code 2 before the simulation budget is spent."""
    (tmp_path / "usermodel.py").write_text(USER_MODEL)
    name, _, content = observation.partition(":")
    (tmp_path / name).write_text(content + "\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        main(["fit", "--simulator", "usermodel:simulate", "--prior", "usermodel:prior", "--observation", name,
              "--out", str(tmp_path / "run"), *SMALL])
    err = capsys.readouterr().err
    assert info.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    import usermodel

    assert sum(usermodel.CALLS) <= 1  # at most the one probe simulation
    assert not (tmp_path / "run").exists()
    sys.modules.pop("usermodel")


def test_a_failing_probe_is_a_note_and_a_resumed_run_reads_the_shape_from_its_store(tmp_path, monkeypatch, capsys):
    """The probe's one simulation may fail (the run counts failures itself); a resume pays for no probe."""
    import sbiflows.pipeline
    from sbiflows import simulate_from_prior

    (tmp_path / "usermodel.py").write_text(USER_MODEL + textwrap.dedent("""
        FAIL = []  # how many calls fail from now on

        def flaky(theta):
            CALLS.append(len(theta))
            if FAIL and FAIL[0] > 0:
                FAIL[0] -= 1
                raise RuntimeError("no convergence")
            return torch.cat([theta, theta.sum(-1, keepdim=True)], -1)
    """))
    (tmp_path / "x.csv").write_text("1,2,3\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    import usermodel

    seen = []
    monkeypatch.setattr(sbiflows.pipeline, "run", recording_run(seen))
    command = ["fit", "--simulator", "usermodel:flaky", "--prior", "usermodel:prior", "--observation", "x.csv",
               "--out", str(tmp_path / "run"), *SMALL]
    usermodel.FAIL[:] = [3]
    assert main(command) == 0  # no traceback: the shape is checked after simulating
    assert "3 probe simulations failed" in capsys.readouterr().err and seen[-1].observations[0].x.shape == (3,)
    usermodel.FAIL[:] = [1]
    usermodel.CALLS.clear()
    assert main([*command[:-len(SMALL)], "--out", str(tmp_path / "other"), *SMALL]) == 0  # the second draw works
    assert usermodel.CALLS == [1, 1] and "probe" not in capsys.readouterr().err
    assert seen[-1].settings()["embedding"] == "none"  # NPE's rule for 3 values, named in the settings
    simulate_from_prior(usermodel.flaky, usermodel.prior, 20, seed=0, batch_size=10, store=tmp_path / "other" /
                        "simulations.zarr")  # what that run stored before a kill
    usermodel.CALLS.clear()
    assert main([*command[:-len(SMALL)], "--out", str(tmp_path / "other"), *SMALL]) == 0
    assert usermodel.CALLS == [] and seen[-1].settings() == seen[-2].settings()  # the stored x's shape, no probe
    (tmp_path / "x4.csv").write_text("1,2,3,4\n")  # as after an edit of the simulator that adds a value to x
    with pytest.raises(SystemExit):
        main([*command[:-len(SMALL)], "--observation", "x4.csv", "--out", str(tmp_path / "other"), *SMALL])
    assert "the shape of the x stored in" in capsys.readouterr().err
    (tmp_path / "xnan.csv").write_text("1,nan,3\n")  # not a matter of the stored shape: no hint about it
    with pytest.raises(SystemExit):
        main([*command[:-len(SMALL)], "--observation", "xnan.csv", "--out", str(tmp_path / "other"), *SMALL])
    error = capsys.readouterr().err
    assert "contains NaN or inf" in error and "stored" not in error
    sys.modules.pop("usermodel")


def test_task_with_a_wrong_length_observation_fails_before_simulating(tmp_path, capsys):
    (tmp_path / "x.txt").write_text("0.1 0.2 0.3\n")
    with pytest.raises(SystemExit) as info:
        main(["fit", "two_moons", "--observation", str(tmp_path / "x.txt"), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "observation 'x' has 3 values, but the simulator's x has 2" in err
    assert not (tmp_path / "run").exists()


def test_a_simulator_given_as_a_file_path_is_imported(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "filemodel.py").write_text(USER_MODEL)
    (tmp_path / "x.csv").write_text("1,2\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:  # imported from the path: the length check is what fails
        main(["fit", "--simulator", "models/filemodel.py:simulate", "--prior", "models/filemodel.py:prior",
              "--observation", "x.csv", "--out", str(tmp_path / "run")])
    assert info.value.code == 2 and "has 2 values, but the simulator's x has 3" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["fit", "--simulator", "models/missing.py:simulate", "--prior", "models/filemodel.py:prior",
              "--observation", "x.csv"])
    assert info.value.code == 2
    assert "'models/missing.py' looks like a file path but is not an existing .py file" in capsys.readouterr().err
    sys.modules.pop("filemodel")
    # a module whose own code fails to import (a NameError, a SyntaxError) printed a traceback (exit code 1)
    (folder / "brokenmodel.py").write_text("x = undefined_name\n")
    (folder / "typomodel.py").write_text("def simulate(theta)\n    return theta\n")
    for module, error in (("brokenmodel", "NameError: name 'undefined_name' is not defined"),
                          ("typomodel", "SyntaxError: ")):
        with pytest.raises(SystemExit) as info:
            main(["fit", "--simulator", f"models/{module}.py:simulate", "--prior", "models/filemodel.py:prior",
                  "--observation", "x.csv"])
        assert info.value.code == 2
        assert f"--simulator: importing module '{module}' failed ({error}" in capsys.readouterr().err
    sys.modules.pop("filemodel", None)


def test_two_files_of_the_same_name_are_refused_not_mixed_up(tmp_path, monkeypatch, capsys):
    """``--prior b/model.py:prior`` returned the module ``model`` that ``--simulator a/model.py:...`` had imported,
    so the run used a/model.py's prior without a word."""
    for folder, dim in (("a", 2), ("b", 3)):  # the same file name, other priors
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "samename.py").write_text(USER_MODEL.replace("torch.zeros(2), torch.ones(2)",
                                                                          f"torch.zeros({dim}), torch.ones({dim})"))
    (tmp_path / "x.csv").write_text("1,2,3\n")
    monkeypatch.chdir(tmp_path)
    try:
        with pytest.raises(SystemExit) as info:
            main(["fit", "--simulator", "a/samename.py:simulate", "--prior", "b/samename.py:prior",
                  "--observation", "x.csv", "--out", str(tmp_path / "run")])
        assert info.value.code == 2
        error = capsys.readouterr().err
        assert "--prior: 'b/samename.py' is a module named 'samename', but a module of that name was already " \
               "imported from" in error and "a/samename.py; rename one of the files" in error
        assert not (tmp_path / "run").exists()
    finally:
        sys.modules.pop("samename", None)


def recording_run(seen):
    """A stand-in for the pipeline's run that only records the job it was given."""

    def run(job, log=print, force=False):
        seen.append(job)
        return {"verdict": "calibrated"}

    return run


def fake_run(verdict):
    """A stand-in for the pipeline's run: writes one file and reports ``verdict``."""

    def run(job, log=print, force=False):
        (job.out / "report.json").write_text("{}")
        return {"verdict": verdict, "advice": "advice"}

    return run


@pytest.mark.parametrize("verdict,code", [("calibrated", 0), ("conservative", 0), ("over-confident", 1),
                                          ("biased", 1)])
def test_strict_exits_with_1_only_for_an_over_confident_or_biased_posterior(tmp_path, monkeypatch, capsys,
                                                                           verdict, code):
    import sbiflows.pipeline

    monkeypatch.setattr(sbiflows.pipeline, "run", fake_run(verdict))
    out = str(tmp_path / "run")
    assert main(["fit", "two_moons", "--out", out, "--observations", "1", "--strict"]) == code
    assert (verdict in capsys.readouterr().err) == (code == 1)
    assert main(["fit", "two_moons", "--out", out, "--observations", "1"]) == 0  # without --strict: 0


def test_out_of_another_run_is_refused_and_force_removes_only_what_sbiflows_wrote(tmp_path, monkeypatch, capsys):
    import sbiflows.pipeline

    monkeypatch.setattr(sbiflows.pipeline, "run", fake_run("calibrated"))
    out = tmp_path / "run"
    assert main(["fit", "two_moons", "--out", str(out), "--observations", "1", "--quiet"]) == 0
    (out / "simulations.zarr").mkdir()  # as a real run leaves it
    (out / "notes.txt").write_text("mine")  # the user's own file
    # same results-changing settings (--workers and --quiet do not count): resumes, no refusal
    assert main(["fit", "two_moons", "--out", str(out), "--observations", "1", "--workers", "2"]) == 0
    with pytest.raises(SystemExit) as info:
        main(["fit", "two_moons", "--out", str(out), "--observations", "1", "--seed", "1"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "holds a run with other settings (seed: 0 -> 1)" in err and "--force" in err
    assert main(["fit", "two_moons", "--out", str(out), "--observations", "1", "--num-samples", "50",
                 "--force"]) == 0
    assert (out / "notes.txt").read_text() == "mine" and (out / "simulations.zarr").exists()  # kept
    assert main(["fit", "two_moons", "--out", str(out), "--observations", "1", "--seed", "1", "--force"]) == 0
    assert not (out / "simulations.zarr").exists()  # made with the old seed: removed
    assert (out / "notes.txt").exists()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "data.csv").write_text("1,2\n")
    for extra in ([], ["--force"]):
        with pytest.raises(SystemExit) as info:
            main(["fit", "two_moons", "--out", str(foreign), "--observations", "1", *extra])
        assert info.value.code == 2 and "not written by sbiflows fit" in capsys.readouterr().err
    assert (foreign / "data.csv").exists()


def test_observation_files_with_the_same_name_get_distinct_names(tmp_path, monkeypatch):
    import sbiflows.pipeline

    seen = []
    monkeypatch.setattr(sbiflows.pipeline, "run", recording_run(seen))
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "x.csv").write_text("0.1,0.2\n0.3,0.4\n")
    assert main(["fit", "two_moons", "--out", str(tmp_path / "run"), "--observation", str(tmp_path / "a" / "x.csv"),
                 "--observation", str(tmp_path / "b" / "x.csv")]) == 0
    assert [o.name for o in seen[0].observations] == ["x", "x_2", "b_x", "b_x_2"]


def test_labels_option_names_the_parameters_and_is_checked(tmp_path, monkeypatch, capsys):
    import sbiflows.pipeline

    seen = []
    monkeypatch.setattr(sbiflows.pipeline, "run", recording_run(seen))
    assert main(["fit", "two_moons", "--out", str(tmp_path / "a"), "--labels", "left, right"]) == 0
    assert seen[0].parameter_names() == ["left", "right"]
    with pytest.raises(SystemExit) as info:
        main(["fit", "two_moons", "--out", str(tmp_path / "b"), "--labels", "a,b,c"])
    assert info.value.code == 2 and "3 parameter labels ['a', 'b', 'c'] for 2 parameters" in capsys.readouterr().err


@pytest.mark.parametrize("before", [1, "auto-snapshots"])  # the defaults until sessions 55 and 70
def test_a_run_made_with_an_earlier_default_ensemble_is_told_how_to_resume(tmp_path, before):
    from sbiflows.outputs import OutputFolderError, prepare, record

    prepare(tmp_path, {"seed": 0, "ensemble": before})
    record(tmp_path, {"seed": 0, "ensemble": before})  # what `sbiflows fit` recorded when it was the default
    with pytest.raises(OutputFolderError, match=rf'ensemble: {json.dumps(before)} -> "auto-stacked".*default was '
                                                rf"ensemble={before!r} \(today 'auto-stacked'\) resumes with "
                                                rf"--ensemble {before}$"):
        prepare(tmp_path, {"seed": 0, "ensemble": "auto-stacked"})
    assert prepare(tmp_path, {"seed": 0, "ensemble": before}) == []  # and with the old value's option it does


def tiny_job(out, calls, **options):
    """A two_moons job of 200 simulations and two epochs whose simulator appends its batch sizes to ``calls``."""
    from sbiflows.pipeline import Job, Observation
    import simulators

    task = simulators.get("two_moons")

    def simulator(theta):
        calls.append(len(theta))
        return task.simulate(theta)

    defaults = {"num_samples": 100, "calibration_datasets": 100, "calibration_samples": 100, "c2st_samples": 100,
                "reference": False, "max_epochs": 2, "progress": False,
                "observations": [Observation("obs1", task.observation(1), None, None)]}
    return Job(simulator=simulator, prior=task.prior, out=out, simulations=200,
               **{"name": "two_moons", **defaults, **options})


def test_a_new_title_keeps_the_trained_posterior_and_its_samples(tmp_path):
    """``name`` only titles the report, but the training step's record named the simulator by it: a new title
    (with force) trained the posterior again. Folders whose records name the simulator that way still resume."""
    from sbiflows.pipeline import run

    calls, lines = [], []
    run(tiny_job(tmp_path, calls), log=lambda line: None)
    calls.clear()
    report = run(tiny_job(tmp_path, calls, name="Two moons, final"), log=lines.append, force=True)
    printed = "\n".join(lines)
    assert calls == [] and "reusing the posterior trained" in printed and "reusing the posterior samples" in printed
    assert report["name"] == "Two moons, final" and "Two moons, final" in (tmp_path / "report.md").read_text()
    resume = tmp_path / "resume.json"
    steps = json.loads(resume.read_text())
    for step in ("train", "sample"):  # as an earlier version recorded them
        steps[step]["simulator"] = "Two moons, final"
    resume.write_text(json.dumps(steps))
    lines.clear()
    run(tiny_job(tmp_path, calls, name="Two moons, final"), log=lines.append)
    printed = "\n".join(lines)
    assert calls == [] and "reusing the posterior trained" in printed and "reusing the posterior samples" in printed
    assert json.loads(resume.read_text())["train"]["simulator"] != "Two moons, final"  # brought up to date


def test_force_keeps_the_figures_a_user_saved_beside_the_runs(tmp_path):
    """run.json recorded every file matching the figures' patterns (``corner_*.pdf``, ``coverage.*``), so force
    removed a corner plot the user had saved there for a paper."""
    from sbiflows.pipeline import run

    run(tiny_job(tmp_path, []), log=lambda line: None)
    mine = [tmp_path / "corner_paper_figure3.pdf", tmp_path / "coverage.svg"]
    for path in mine:
        path.write_text("the user's")
    run(tiny_job(tmp_path, []), log=lambda line: None)  # resumed: the run records its files again
    lines = []
    run(tiny_job(tmp_path, [], num_samples=50), log=lines.append, force=True)
    assert all(path.read_text() == "the user's" for path in mine)
    assert "corner_obs1.pdf" in lines[0] and "corner_paper" not in lines[0]
    assert (tmp_path / "corner_obs1.pdf").exists() and (tmp_path / "coverage.pdf").exists()


def test_pipeline_run_from_python_guards_the_folder_as_the_command_line_does(tmp_path):
    from sbiflows.outputs import OutputFolderError, prepare, record
    from sbiflows.pipeline import run

    calls = []

    def job(**options):
        return tiny_job(tmp_path, calls, **options)

    old = job(ensemble=1).settings()
    prepare(tmp_path, old)
    (tmp_path / "posterior.pt").write_text("trained before the default changed")
    record(tmp_path, old)
    with pytest.raises(OutputFolderError, match=r"Job.out .* holds a run with other settings "
                                                r'\(ensemble: 1 -> "auto-stacked"\).*pass force=True.*'
                                                r"resumes with Job\(ensemble=1\)"):
        run(job(), log=lambda line: None)
    assert (tmp_path / "posterior.pt").read_text() == "trained before the default changed" and calls == []
    lines = []
    report = run(job(), log=lines.append, force=True)  # replaces that run, recording what it wrote
    assert "posterior.pt" in lines[0] and report["ensemble"] == "auto-stacked" and sum(calls) >= 200
    manifest = json.loads((tmp_path / "run.json").read_text())
    assert manifest["settings"] == job().settings() and "posterior.pt" in manifest["files"]
    calls.clear()
    lines.clear()
    run(job(), log=lines.append)  # the same settings resume: nothing is simulated again, not even the
    assert calls == []  # posterior predictive check's 1,000 draws (kept in predictive/obs1.zarr)
    assert "obs1: reused 1000 predictive simulations from predictive/" in "\n".join(lines)
    lines.clear()
    run(job(num_samples=50), log=lines.append, force=True)  # a later step's setting: the posterior is kept
    assert calls == [] and any("reusing the posterior" in line for line in lines)
    from sbiflows.pipeline import Observation
    import simulators

    other = [Observation("obs2", simulators.get("two_moons").observation(2), None, None)]
    with pytest.raises(OutputFolderError, match=r"pass force=True to redo only the steps after training \(its "
                                                r"simulations and trained posterior are kept\)"):
        run(job(observations=other), log=lines.append)
    lines.clear()
    run(job(observations=other), log=lines.append, force=True)  # amortized: one posterior for every observation
    assert any("reusing the posterior" in line for line in lines)
    assert sum(calls) == 1000  # only the new observation's posterior predictive check simulates



@pytest.mark.parametrize("change,kept,removed", [
    ({"num_samples": 50}, ["posterior.pt", "rounds", "resume.json", "samples.npz", "simulations.zarr", "predictive"],
     ["report.md"]),  # samples.npz: the sampling step's record says it is drawn again for another num_samples
    ({"estimator": "maf"}, ["simulations.zarr", "calibration.zarr", "predictive"],
     ["posterior.pt", "rounds", "resume.json", "samples.npz"]),
    ({"seed": 1}, [], ["simulations.zarr", "calibration.zarr", "predictive", "posterior.pt", "rounds", "resume.json"]),
    ({"timeout": 60.0}, ["simulations.zarr", "calibration.zarr", "predictive"], ["posterior.pt", "rounds"]),
    # an amortized run's posterior is one for every observation; a sequential run's rounds are its observation's
    ({"observations": {"obs2": [0.5]}}, ["posterior.pt", "resume.json", "samples.npz", "simulations.zarr"],
     ["report.md"]),
    ({"rounds": 2}, ["simulations.zarr"], ["posterior.pt", "rounds"]),
])
def test_force_removes_only_what_the_changed_settings_invalidate(tmp_path, change, kept, removed):
    from sbiflows.outputs import prepare, record

    settings = {"seed": 0, "estimator": "nsf", "num_samples": 100, "timeout": None, "observations": {"obs1": [0.1]}}
    prepare(tmp_path, settings)
    for name in ("simulations.zarr", "calibration.zarr", "predictive", "rounds"):
        (tmp_path / name).mkdir()
    for name in ("posterior.pt", "resume.json", "samples.npz", "report.md", "notes.txt"):
        (tmp_path / name).write_text(name)
    (tmp_path / "simulations.zarr" / "records").mkdir()  # a row that timed out: a longer limit simulates it again
    (tmp_path / "simulations.zarr" / "records" / "0.json").write_text(
        '{"failures": [[3, "ValueError", "bad"], [4, "TimeoutError", "exceeded the timeout of 30 s"]]}')
    record(tmp_path, settings)
    prepare(tmp_path, {**settings, **change}, force=True)
    assert all((tmp_path / name).exists() for name in [*kept, "notes.txt"]), sorted(p.name for p in tmp_path.iterdir())
    assert not any((tmp_path / name).exists() for name in removed), sorted(p.name for p in tmp_path.iterdir())


def test_a_new_timeout_keeps_everything_where_no_stored_row_timed_out(tmp_path):
    """Only rows that timed out depend on the limit, but any new --timeout removed the trained posterior and its
    samples (with --force), and the rerun trained again on the same rows."""
    from sbiflows.outputs import prepare, record

    settings = {"seed": 0, "timeout": 30.0, "observations": {"obs1": [0.1]}}
    prepare(tmp_path, settings)
    (tmp_path / "simulations.zarr" / "records").mkdir(parents=True)
    (tmp_path / "simulations.zarr" / "records" / "0.json").write_text('{"failures": [[3, "ValueError", "bad"]]}')
    for name in ("posterior.pt", "resume.json", "samples.npz", "report.md"):
        (tmp_path / name).write_text(name)
    record(tmp_path, settings)
    assert prepare(tmp_path, {**settings, "timeout": 60.0}) == []  # no --force needed: nothing it made changes
    assert all((tmp_path / name).exists() for name in ("posterior.pt", "resume.json", "samples.npz", "report.md"))
    assert prepare(tmp_path, {**settings, "timeout": 60.0}) == []  # and the new limit is the run's setting now


def test_new_observations_keep_an_amortized_posterior_but_not_a_sequential_runs_rounds(tmp_path):
    from sbiflows.outputs import OutputFolderError, prepare, record

    sequential = {"seed": 0, "rounds": 3, "observations": {"obs1": [0.1]}}
    prepare(tmp_path, sequential)
    for name in ("posterior.pt", "report.md"):
        (tmp_path / name).write_text(name)
    (tmp_path / "rounds").mkdir()
    record(tmp_path, sequential)
    with pytest.raises(OutputFolderError, match="add --force to replace that run's results"):
        prepare(tmp_path, {**sequential, "observations": {"obs2": [0.5]}})
    prepare(tmp_path, {**sequential, "observations": {"obs2": [0.5]}}, force=True)
    assert not any((tmp_path / name).exists() for name in ("posterior.pt", "rounds", "report.md"))


def test_a_run_stopped_after_training_records_what_it_wrote_so_force_can_replace_it(tmp_path, monkeypatch):
    import sbiflows.pipeline
    from sbiflows.pipeline import Job, Observation, run
    import simulators

    task = simulators.get("two_moons")

    def job(**options):
        return Job(name="two_moons", simulator=task.simulate, prior=task.prior, out=tmp_path, simulations=200,
                   observations=[Observation("obs1", task.observation(1), None, None)], max_epochs=2,
                   progress=False, ensemble=1, **options)

    def interrupted(state, posterior):
        raise KeyboardInterrupt

    monkeypatch.setattr(sbiflows.pipeline, "_sample", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(job(), log=lambda line: None)
    files = json.loads((tmp_path / "run.json").read_text())["files"]
    assert {"posterior.pt", "simulations.zarr", "resume.json"} <= set(files)
    monkeypatch.undo()
    assert run(job(seed=1, num_samples=100, calibration_datasets=100, calibration_samples=100, c2st_samples=100,
                   reference=False), log=lambda line: None, force=True)["seed"] == 1


def test_a_folder_of_an_earlier_pipeline_run_without_run_json_resumes(tmp_path):
    from sbiflows.outputs import OutputFolderError
    from sbiflows.pipeline import run

    calls = []

    def job(**options):
        return tiny_job(tmp_path, calls, ensemble=1, **options)

    run(job(), log=lambda line: None)
    (tmp_path / "run.json").unlink()  # what pipeline.run left before it recorded one
    trained = (tmp_path / "posterior.pt").read_bytes()
    calls.clear()
    lines = []
    run(job(), log=lines.append)  # resumes: nothing simulated or trained again
    assert calls == [] and any("reusing the posterior" in line for line in lines)
    (tmp_path / "run.json").unlink()
    with pytest.raises(OutputFolderError, match="trained with other settings.*force=True"):
        run(job(learning_rate=1e-2), log=lambda line: None)
    assert (tmp_path / "posterior.pt").read_bytes() == trained and not (tmp_path / "run.json").exists()
    (tmp_path / "notes.txt").write_text("mine")  # a folder holding more than sbiflows outputs is not taken over
    with pytest.raises(OutputFolderError, match="not written by sbiflows fit"):
        run(job(), log=lambda line: None)


def test_warnings_of_a_fit_print_as_one_line():
    import warnings

    from sbiflows.cli import _one_line_warnings

    original = warnings.formatwarning
    with _one_line_warnings():
        line = warnings.formatwarning(UserWarning("9 invalid (1.8%)"), UserWarning, "pipeline.py", 26, "source")
    assert line == "sbiflows fit: warning: 9 invalid (1.8%)\n" and warnings.formatwarning is original


def test_an_observation_of_another_shape_than_the_simulations_stops_the_run_before_training(tmp_path):
    from sbiflows.pipeline import Observation, run

    calls = []
    job = tiny_job(tmp_path, calls, observations=[Observation("o", torch.zeros(3))])
    with pytest.raises(ValueError, match="observation 'o' has 3 values, but the simulator's x has 2"):
        run(job, log=lambda line: None)
    assert sum(calls) == 200 and not (tmp_path / "posterior.pt").exists()  # simulated and kept, not trained
    assert "simulations.zarr" in json.loads((tmp_path / "run.json").read_text())["files"]


def test_a_second_run_into_a_folder_in_use_is_refused_in_one_line(tmp_path, capsys):
    from sbiflows import outputs

    out = tmp_path / "run"
    held = outputs.hold(out)  # as another sbiflows fit running there holds it
    try:
        with pytest.raises(SystemExit) as info:
            main(["fit", "two_moons", "--out", str(out), *SMALL])
    finally:
        held.close()
    assert info.value.code == 2
    assert f"--out '{out}' is in use by another run (pid " in capsys.readouterr().err
    assert sorted(path.name for path in out.iterdir()) == [".lock"]  # nothing else written
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("a user's folder")
    assert outputs.hold(tmp_path / "mine") is None and not (tmp_path / "mine" / ".lock").exists()


@pytest.mark.parametrize("prior", ["Normal(0.0, 1.0)", "Uniform(torch.zeros(2), torch.ones(2))"])
def test_a_scalar_prior_or_a_batch_of_them_runs_to_the_report(tmp_path, monkeypatch, prior):
    """NPE takes them (one parameter; D independent ones); the calibration step got the raw prior and failed after
    the whole budget ("the prior has event shape () but the posterior has 1 parameters")."""
    dim = 1 if prior.startswith("Normal") else 2
    module = f"scalarmodel{dim}"  # one module name per prior: an imported module stays in sys.modules
    (tmp_path / f"{module}.py").write_text(textwrap.dedent(f"""
        import torch
        from torch.distributions import Normal, Uniform

        prior = {prior}

        def simulate(theta):
            return theta + 0.1 * torch.randn_like(theta)
    """))
    (tmp_path / "x.csv").write_text(",".join(["0.3"] * dim) + "\n")
    monkeypatch.chdir(tmp_path)
    assert main(["fit", "--simulator", f"{module}:simulate", "--prior", f"{module}:prior", "--observation",
                 "x.csv", "--out", str(tmp_path / "run"), *SMALL, "--ensemble", "1"]) == 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert set(report["calibration"]) == {"sbc", "coverage", "tarp"} and report["verdict"]


def test_observations_with_a_dot_in_their_name_keep_their_own_corner_plots(tmp_path, monkeypatch):
    """``Path("corner_run.v1").with_suffix(".png")`` is ``corner_run.png``: run.v2's plot overwrote run.v1's and the
    report's links pointed at files that did not exist."""
    monkeypatch.chdir(tmp_path)
    for name, value in (("run.v1", "0.1,0.2"), ("run.v2", "-0.3,0.4")):
        (tmp_path / f"{name}.csv").write_text(value + "\n")
    out = tmp_path / "run"
    assert main(["fit", "two_moons", "--observation", "run.v1.csv", "--observation", "run.v2.csv", "--out", str(out),
                 *SMALL, "--ensemble", "1"]) == 0
    report = (out / "report.md").read_text()
    for name in ("run.v1", "run.v2"):
        assert (out / f"corner_{name}.png").exists() and (out / f"corner_{name}.pdf").exists()
        assert f"(corner_{name}.png)" in report
    assert not (out / "corner_run.png").exists()


def test_repeated_observation_indices_and_a_row_named_like_another_file_give_unique_names(tmp_path, monkeypatch):
    """Both ended in a traceback ("observation names must be unique") after run.json was written."""
    from sbiflows.cli_observations import _parse_indices

    assert _parse_indices("1,1") == [1] and _parse_indices("3-5,4,1") == [3, 4, 5, 1]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a_2.csv").write_text("0.1,0.2\n")
    (tmp_path / "a.csv").write_text("0.3,0.4\n-0.1,0.0\n")  # its second row is named a_2 too
    out = tmp_path / "run"
    assert main(["fit", "two_moons", "--observation", "a_2.csv", "--observation", "a.csv", "--out", str(out),
                 *SMALL, "--ensemble", "1"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert [o["name"] for o in report["observations"]] == ["a_2", "a", "a_2-2"]


def test_a_prior_function_that_fails_a_folder_and_a_string_array_as_observation_give_one_line(tmp_path, monkeypatch,
                                                                                              capsys):
    """Each was a traceback (TypeError from the user's function, IsADirectoryError) or a message that did not
    name --observation."""
    (tmp_path / "argmodel.py").write_text(textwrap.dedent("""
        import torch

        def make_prior(scale):
            return torch.distributions.Normal(torch.zeros(2), scale * torch.ones(2))

        def simulate(theta):
            return theta
    """))
    (tmp_path / "x.csv").write_text("0.1,0.2\n")
    (tmp_path / "folder.csv").mkdir()
    np.save(tmp_path / "words.npy", np.array(["a", "b"]))
    monkeypatch.chdir(tmp_path)
    model = ["--simulator", "argmodel:simulate"]
    for argv, message in (
        ([*model, "--prior", "argmodel:make_prior", "--observation", "x.csv"],
         "--prior argmodel:make_prior: calling it failed (TypeError: "),
        (["two_moons", "--observation", "folder.csv"], "--observation file 'folder.csv' is a folder, not a file"),
        (["two_moons", "--observation", "words.npy"], "--observation 'words.npy' is not a numeric table"),
    ):
        with pytest.raises(SystemExit) as info:
            main(["fit", *argv, "--out", str(tmp_path / "run")])
        err = capsys.readouterr().err
        assert info.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_the_default_name_of_a_simulator_in_a_package_is_its_module(tmp_path, monkeypatch):
    """``--simulator pkg.model:simulate`` was named "pkg" (and wrote to runs/pkg)."""
    from sbiflows.cli import _setup
    from sbiflows.cli_parser import build_parser

    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "model.py").write_text(textwrap.dedent("""
        import torch

        prior = torch.distributions.Independent(torch.distributions.Normal(torch.zeros(2), torch.ones(2)), 1)

        def simulate(theta):
            return theta + 0.1 * torch.randn_like(theta)
    """))
    (tmp_path / "x.csv").write_text("0.1,0.2\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    args = build_parser().parse_args(["fit", "--simulator", "pkg.model:simulate", "--prior", "pkg.model:prior",
                                      "--observation", "x.csv"])
    job = _setup(args)
    assert job.name == "model" and str(job.out) == "runs/model"


def test_an_observation_of_the_wrong_length_found_after_simulating_gives_one_line(tmp_path, monkeypatch, capsys):
    """Where the probe simulations failed, the shape is checked once the simulations exist: that ValueError was a
    traceback."""
    import sbiflows.cli

    gaussian_model(tmp_path, "wrongmodel")
    (tmp_path / "x3.csv").write_text("0.1,0.2,0.3\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sbiflows.cli, "_probe_x_shape", lambda *args: None)  # as when every probe failed
    with pytest.raises(SystemExit) as info:
        main(["fit", "--simulator", "wrongmodel:simulate", "--prior", "wrongmodel:prior", "--observation", "x3.csv",
              "--out", str(tmp_path / "run"), *SMALL])
    err = capsys.readouterr().err
    assert info.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert "observation 'x3' has 3 values, but the simulator's x has 2; the simulations are kept in" in err
    assert (tmp_path / "run" / "simulations.zarr").exists()


def test_force_keeps_the_earlier_results_when_the_scheduler_cannot_be_reached(tmp_path, monkeypatch, capsys):
    """--force removed the earlier run's outputs, then the run failed to reach --scheduler: results lost for nothing."""
    import sbiflows.cli

    out = tmp_path / "run"
    command = ["fit", "two_moons", "--observations", "1", "--out", str(out), *SMALL, "--ensemble", "1"]
    assert main(command) == 0

    def unreachable(address):
        raise ValueError(f"--scheduler: cannot reach a Dask scheduler at {address!r}")

    monkeypatch.setattr(sbiflows.cli, "_dask_client", unreachable)
    with pytest.raises(SystemExit) as info:
        main([*command, "--simulations", "700", "--force", "--scheduler", "tcp://127.0.0.1:1"])
    assert info.value.code == 2 and "cannot reach a Dask scheduler" in capsys.readouterr().err
    assert (out / "posterior.pt").exists() and (out / "report.md").exists()


def test_a_run_whose_probes_all_failed_reruns_with_the_same_command(tmp_path, monkeypatch, capsys):
    """Its run.json records embedding "auto" (no shape to resolve it); the rerun found the stored shape, resolved
    "none" and was refused as "a run with other settings"."""
    import sbiflows.cli

    gaussian_model(tmp_path, "probedmodel")
    (tmp_path / "x.csv").write_text("0.1,0.2\n")
    monkeypatch.chdir(tmp_path)
    command = ["fit", "--simulator", "probedmodel:simulate", "--prior", "probedmodel:prior", "--observation", "x.csv",
               "--out", str(tmp_path / "run"), *SMALL, "--ensemble", "1"]
    with monkeypatch.context() as patch:
        patch.setattr(sbiflows.cli, "_probe_x_shape", lambda *args: None)  # as when every probe failed
        assert main(command) == 0
    first = json.loads((tmp_path / "run" / "report.json").read_text())
    assert main(command) == 0  # the finished run, found again: the same posterior and calibration
    again = json.loads((tmp_path / "run" / "report.json").read_text())
    assert again["calibration"] == first["calibration"] and again["verdict"] == first["verdict"]


def gaussian_model(folder, name: str) -> None:
    """Write ``folder/name.py``: a 2-D standard normal ``prior`` and ``simulate`` adding N(0, 0.1^2) noise."""
    (folder / f"{name}.py").write_text(textwrap.dedent("""
        import torch

        prior = torch.distributions.Independent(torch.distributions.Normal(torch.zeros(2), torch.ones(2)), 1)

        def simulate(theta):
            return theta + 0.1 * torch.randn_like(theta)
    """))


def test_ctrl_c_during_the_probe_simulation_is_one_line(tmp_path, monkeypatch, capsys):
    """Ctrl-C while the first (probe) simulation of a slow simulator ran printed a traceback through the engine."""
    (tmp_path / "interrupted_probe.py").write_text(textwrap.dedent("""
        import torch
        from torch.distributions import Independent, Normal

        prior = Independent(Normal(torch.zeros(2), torch.ones(2)), 1)

        def simulate(theta):
            raise KeyboardInterrupt  # as Ctrl-C during a simulation
    """))
    (tmp_path / "x_obs.csv").write_text("0.5,-0.2\n")
    monkeypatch.chdir(tmp_path)
    code = main(["fit", "--simulator", "interrupted_probe:simulate", "--prior", "interrupted_probe:prior",
                 "--observation", "x_obs.csv", "--out", str(tmp_path / "run"), *SMALL])
    err = capsys.readouterr().err
    assert code == 130 and "Traceback" not in err
    assert "interrupted while checking the simulator" in err and "before the run started" in err
    assert not (tmp_path / "run" / "simulations.zarr").exists()


def test_observations_named_like_numpy_arguments_are_saved(tmp_path):
    """The samples were written with ``np.savez_compressed(path, **by_name)``: an observation from ``file.csv`` (or
    ``allow_pickle.csv``) stopped the run after training with a TypeError."""
    import numpy as np

    from sbiflows.pipeline import Observation, run
    import simulators

    task = simulators.get("two_moons")
    observations = [Observation(name, task.observation(k + 1), None, None)
                    for k, name in enumerate(["file", "allow_pickle"])]
    run(tiny_job(tmp_path, [], observations=observations), log=lambda line: None)
    with np.load(tmp_path / "samples.npz") as samples:
        assert sorted(samples.files) == ["allow_pickle", "file"] and samples["file"].shape == (100, 2)
        assert samples["file"].dtype == np.float32 and np.isfinite(samples["allow_pickle"]).all()


def test_simulations_that_are_all_nan_stop_before_training_in_one_line(tmp_path, capsys, monkeypatch):
    """A simulator whose every x is NaN ran into training, which stopped with a traceback (exit code 1)."""
    from sbiflows.pipeline import run
    from sbiflows.pipeline_checks import TooFewSimulationsError

    job = tiny_job(tmp_path / "python", [])
    job.simulator = lambda theta: torch.full((len(theta), 2), float("nan"))
    with pytest.raises(TooFewSimulationsError, match=r"only 0 of 200 simulations are valid .* needs at least 2"):
        run(job, log=lambda line: None)
    assert not (tmp_path / "python" / "posterior.pt").exists() and (tmp_path / "python" / "simulations.zarr").exists()
    model = tmp_path / "nan_model.py"
    model.write_text("import torch\nfrom torch.distributions import Independent, Uniform\n"
                     "prior = Independent(Uniform(torch.zeros(2), torch.ones(2)), 1)\n"
                     "def simulate(theta):\n    return torch.full((len(theta), 2), float('nan'))\n")
    np.savetxt(tmp_path / "x.csv", [[0.5, 0.5]], delimiter=",")
    monkeypatch.chdir(tmp_path)
    code = main(["fit", "--simulator", "nan_model.py:simulate", "--prior", "nan_model.py:prior", "--observation",
                 "x.csv", "--simulations", "100", "--out", "cli", "--quiet"])
    error = capsys.readouterr().err
    assert code == 3 and "error: only 0 of 100 simulations are valid" in error and "Traceback" not in error
    # a fixed simulator of the same name reuses the stored rows: the advice says to delete them
    assert "or fix the simulator and delete cli/simulations.zarr (a rerun reuses its rows" in error
    sys.modules.pop("nan_model", None)


def test_the_advice_to_fix_the_observation_and_run_again_works(tmp_path):
    """An observation of the wrong shape stops the run after simulating, with "fix the observation and run again";
    the fixed observation was then refused as a run of other settings whose "trained posterior" (none) was kept."""
    from sbiflows.pipeline import Observation, run
    from sbiflows.pipeline_checks import ObservationShapeError
    import simulators

    task, calls = simulators.get("two_moons"), []
    wrong = [Observation("obs1", torch.zeros(3), None, None)]
    with pytest.raises(ObservationShapeError, match="fix the observation and run again"):
        run(tiny_job(tmp_path, calls, observations=wrong), log=lambda line: None)
    assert sum(calls) == 200 and not (tmp_path / "posterior.pt").exists()
    calls.clear()
    lines = []
    run(tiny_job(tmp_path, calls), log=lines.append)  # the fixed observation, without force
    assert "reused 200 finished simulations" in "\n".join(lines) and (tmp_path / "posterior.pt").exists()


def _padded_sets(theta):
    """Sets of 1 to 10 trials of two features, NaN-padded to 10 (the padding as the set embedding takes it)."""
    x = theta[:, None, :] + 0.3 * torch.randn(len(theta), 10, 2)
    x[torch.arange(10)[None, :] >= torch.randint(1, 11, (len(theta),))[:, None]] = float("nan")
    return x


def test_the_probe_learns_the_shape_of_nan_padded_sets():
    """A probe's padded set counted as a failed simulation: the shape stayed unknown, the observation file was
    split row by row, and the run was refused after all its simulations."""
    import argparse

    from sbiflows import box_uniform
    from sbiflows.cli_observations import _probe_x_shape

    args = argparse.Namespace(seed=0, timeout=None, per_row=False)
    assert _probe_x_shape(_padded_sets, box_uniform([-3.0, -3.0], [3.0, 3.0]), args) == (10, 2)


def test_sequential_runs_refuse_a_first_round_too_small_and_stop_in_one_line_without_valid_rows(
        tmp_path, monkeypatch, capsys):
    model = tmp_path / "seqmodel.py"
    model.write_text("import torch\nfrom sbiflows import box_uniform\nprior = box_uniform([-3.0, -3.0], [3.0, 3.0])\n"
                     "def one_valid(theta):\n    x = theta.clone()\n    x[1:] = float('nan')\n    return x\n"
                     "def series(theta):\n    return theta[:, :, None].repeat(1, 1, 5)\n")
    np.savetxt(tmp_path / "x.csv", [[0.5, 0.5]], delimiter=",")
    monkeypatch.chdir(tmp_path)
    common = ["fit", "--prior", "seqmodel.py:prior", "--observation", "x.csv", "--quiet", "--no-reference"]
    with pytest.raises(SystemExit) as info:  # one row in round 1 failed in its training, after simulating
        main([*common, "--simulator", "seqmodel.py:one_valid", "--rounds", "3", "--simulations", "3", "--out", "a"])
    assert info.value.code == 2 and "needs at least 2 simulations in the first round" in capsys.readouterr().err
    code = main([*common, "--simulator", "seqmodel.py:one_valid", "--rounds", "2", "--simulations", "200",
                 "--out", "b"])
    error = capsys.readouterr().err
    assert code == 3 and "need at least 2 valid simulations" in error and "kept in b" in error
    assert "Traceback" not in error
    np.save(tmp_path / "series.npy", np.zeros((2, 5)))
    with pytest.raises(SystemExit) as info:  # the advice was an --embedding, which does not flatten a simulator's x
        main(["fit", "--prior", "seqmodel.py:prior", "--observation", "series.npy", "--simulator", "seqmodel.py:series",
              "--rounds", "2", "--out", "c"])
    assert info.value.code == 2 and "make the simulator return flat x" in capsys.readouterr().err
    sys.modules.pop("seqmodel", None)

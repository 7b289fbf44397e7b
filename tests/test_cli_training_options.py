"""``sbiflows fit --on-nonfinite`` (NPE.fit's recovery from a non-finite loss) and ``--device`` (where the network
trains) from the command line, in the run's settings and in the report. ``tests/test_devices.py`` runs a fit on CUDA
where there is a GPU."""

from __future__ import annotations

import json

import pytest
import torch

from sbiflows.cli import _setup, main
from sbiflows.cli_parser import build_parser

SMALL = ["--simulations", "300", "--num-samples", "100", "--calibration-datasets", "100",
         "--calibration-samples", "100", "--c2st-samples", "100", "--max-epochs", "3", "--quiet",
         "--observations", "1"]


def test_the_option_is_a_setting_of_the_run_only_where_chosen(tmp_path):
    argv = ["fit", "two_moons", "--out", str(tmp_path / "x")]
    plain = _setup(build_parser().parse_args(argv))
    assert plain.on_nonfinite == "stop"
    assert "on_nonfinite" not in plain.fit_options and "on_nonfinite" not in plain.settings()  # old runs resume
    chosen = _setup(build_parser().parse_args([*argv, "--on-nonfinite", "restore_best"]))
    assert chosen.fit_options["on_nonfinite"] == "restore_best" == chosen.settings()["on_nonfinite"]
    rounds = _setup(build_parser().parse_args([*argv, "--on-nonfinite", "restore_best", "--rounds", "2",
                                               "--observations", "1"]))
    assert rounds.fit_options["on_nonfinite"] == "restore_best"  # every round's fit gets it


def test_an_unknown_choice_is_refused_before_anything_runs(tmp_path, capsys):
    with pytest.raises(SystemExit, match="2"):
        main(["fit", "two_moons", "--on-nonfinite", "retry", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err  # argparse quotes the choices on some Python versions, not on others
    assert "--on-nonfinite: invalid choice: 'retry'" in err and "stop" in err and "restore_best" in err
    assert not (tmp_path / "x").exists()
    from sbiflows.pipeline import Job, Observation
    import simulators

    task = simulators.get("two_moons")
    with pytest.raises(ValueError, match="on_nonfinite must be one of 'stop', 'restore_best', got 'retry'"):
        Job(name="t", simulator=task.simulate, prior=task.prior, out=tmp_path / "y", on_nonfinite="retry",
            observations=[Observation("obs1", task.observation(1))])


def test_the_choice_reaches_the_fit_and_the_report_lists_restarts(tmp_path, monkeypatch):
    from sbiflows import NPE

    seen, fit = [], NPE.fit

    def recording(self, *args, **kwargs):
        seen.append(kwargs.get("on_nonfinite"))
        return fit(self, *args, **kwargs)

    monkeypatch.setattr(NPE, "fit", recording)
    out = tmp_path / "run"
    assert main(["fit", "two_moons", "--out", str(out), "--on-nonfinite", "restore_best", "--device", "cpu",
                 *SMALL]) == 0
    assert seen == ["restore_best"]
    training = json.loads((out / "report.json").read_text())["training"]
    assert training["restart_epochs"] == []  # a finite run: no restart, and the report says none
    assert "restarted from the best weights" not in (out / "report.md").read_text()


def test_the_markdown_report_names_the_restart_epoch(tmp_path):
    from sbiflows.report import write_markdown

    report = {"name": "t", "simulations": 10, "simulation_summary": "", "estimator": "nsf", "seed": 0,
              "training": {"epochs": 9, "best_epoch": 8, "best_validation_loss": 0.0, "diverged": True,
                           "restart_epochs": [4]},
              "verdict": "calibrated", "advice": "", "observations": [], "calibration": {},
              "timings_seconds": {}, "versions": {}}
    write_markdown(report, tmp_path / "report.md")
    line = next(x for x in (tmp_path / "report.md").read_text().splitlines() if x.startswith("- training:"))
    assert line.endswith("(a non-finite loss at epoch 4: restarted from the best weights at a smaller step) "
                         "(diverged: best weights restored)")


def test_observation_names_make_file_names_and_links_that_work(tmp_path):
    """A name with '/' crashed after training, at the corner plot's path; a name with spaces (``--observation
    "my obs.csv"``) made a Markdown link that does not render."""
    from sbiflows.pipeline import Observation
    from sbiflows.report import write_markdown

    for name in ("2024/obs1", "a\\b", "", ".."):
        with pytest.raises(ValueError, match="Observation name must be usable in a file name"):
            Observation(name, torch.zeros(2))
    with pytest.raises(TypeError, match="Observation name must be a string, got int"):
        Observation(1, torch.zeros(2))
    observation = {"name": "my obs [v2]", "corner": "corner_my obs [v2]", "parameters": [],
                   "predictive": {"passed": True, "summary": ""}}
    report = {"name": "t", "simulations": 10, "simulation_summary": "", "estimator": "nsf", "seed": 0,
              "training": {"epochs": 9, "best_epoch": 8, "best_validation_loss": 0.0, "diverged": False},
              "verdict": "calibrated",
              "advice": "", "observations": [observation], "calibration": {}, "timings_seconds": {}, "versions": {}}
    write_markdown(report, tmp_path / "report.md")
    assert ("![corner plot of my obs (v2)](corner_my%20obs%20%5Bv2%5D.png) ([PDF](corner_my%20obs%20%5Bv2%5D.pdf))"
            in (tmp_path / "report.md").read_text())


def test_the_device_is_checked_before_anything_runs_and_is_not_a_setting(tmp_path, capsys, monkeypatch):
    from sbiflows.pipeline import Job, Observation
    import simulators

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a machine without a GPU
    for device, message in [("cuda", "device (--device)='cuda', but this torch has no CUDA device"),
                            ("cud", "device (--device) must be a torch device such as 'cpu' or 'cuda', got 'cud'")]:
        with pytest.raises(SystemExit, match="2"):
            main(["fit", "two_moons", "--device", device, "--out", str(tmp_path / "x")])
        assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()

    task, calls = simulators.get("two_moons"), []

    def simulator(theta):
        calls.append(len(theta))
        return task.simulate(theta)

    class Custom(torch.distributions.Uniform):  # not one of the classes a prior can be rebuilt from
        def log_prob(self, value):
            return super().log_prob(value) + 1.0

    common = {"name": "t", "simulator": simulator, "out": tmp_path / "y",
              "observations": [Observation("obs1", task.observation(1))]}
    custom = torch.distributions.Independent(Custom(-torch.ones(2), torch.ones(2)), 1)
    with pytest.raises(ValueError, match="cannot move a Independent prior to meta"):
        Job(**common, prior=custom, device="meta")  # the meta device stands in for a GPU here
    assert Job(**common, prior=custom).device == torch.device("cpu")  # where it is, it trains
    assert calls == []
    on_meta = Job(**common, prior=task.prior, device="meta")
    assert on_meta.settings() == Job(**common, prior=task.prior).settings()  # a rerun elsewhere reuses the run

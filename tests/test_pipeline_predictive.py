"""The predictive check of ``sbiflows fit``: stored per observation, and never a crash of the run."""

from __future__ import annotations

import pytest
import torch
from torch.distributions import Independent, Normal

from sbiflows.pipeline import Job, Observation
from sbiflows.pipeline_predictive import PREDICTIVE_SAMPLES, predictive_entry, predictive_simulator

PRIOR = Independent(Normal(torch.zeros(2), torch.ones(2)), 1)


class Exact:
    """A posterior N(x, 0.1^2 I) that samples like sbiflows' (``sample(n, x, seed=...)``)."""

    def sample(self, n, x=None, *, seed=None):
        generator = torch.Generator().manual_seed(seed or 0)
        return x.reshape(1, -1)[:, :2] + 0.1 * torch.randn(n, 2, generator=generator)


def job_for(simulator, tmp_path, **options):
    return Job(name="t", simulator=simulator, prior=PRIOR, out=tmp_path,
               observations=[Observation("obs1", torch.zeros(2))],
               **{"batch_size": 100, **options})


def test_predictive_simulations_are_kept_and_those_of_a_retrained_posterior_replaced(tmp_path):
    calls, lines = [], []

    def simulator(theta):
        calls.append(len(theta))
        return theta + 0.1 * torch.randn_like(theta)

    simulate_predictive = predictive_simulator(job_for(simulator, tmp_path, batch_size=50),
                                               tmp_path / "predictive" / "obs1.zarr", lines.append)
    first = simulate_predictive(torch.zeros(100, 2))
    assert calls == [50, 50] and simulate_predictive.valid == 100
    assert torch.equal(simulate_predictive(torch.zeros(100, 2)), first)  # reused, not simulated
    assert calls == [50, 50] and "obs1: reused 100 predictive simulations" in lines[-1]
    other = simulate_predictive(torch.full((100, 2), 0.5))  # draws of another posterior: simulated again
    assert calls == [50, 50, 50, 50] and "obs1: the posterior changed" in lines[-1]
    assert not torch.equal(other, first) and torch.isfinite(other).all()


def test_a_simulator_failing_at_every_posterior_draw_leaves_the_check_undecided_not_the_run_crashed(tmp_path):
    def fails(theta):
        raise RuntimeError("diverged")

    lines = []
    entry = predictive_entry(job_for(fails, tmp_path), Exact(), Observation("obs1", torch.tensor([0.2, 0.3])),
                             lines.append)
    assert entry["passed"] is None and entry["summary"].startswith("not decided: the simulator failed")
    assert "RuntimeError" in entry["summary"] and "obs1: posterior predictive check not decided" in lines[-1]


def test_too_few_valid_rows_for_a_covariance_fall_back_to_value_by_value(tmp_path):
    x_dim = 300  # < PREDICTIVE_SAMPLES / 2: Mahalanobis first, which needs more than 300 valid rows

    def mostly_nan(theta):
        x = theta[:, :1] + 0.1 * torch.randn(len(theta), x_dim)
        x[torch.arange(len(theta)) % 5 != 0] = float("nan")  # 80% of the rows fail
        return x

    x_o = torch.zeros(x_dim)
    x_o[:2] = torch.tensor([0.2, 0.3])
    lines = []
    with pytest.warns(UserWarning, match="excluded 800 of 1000 predictive simulations"):
        entry = predictive_entry(job_for(mostly_nan, tmp_path), Exact(), Observation("obs1", x_o), lines.append)
    assert entry["passed"] in (True, False) and "standardized" in entry["summary"]
    assert sum("reused" in line for line in lines) == 1  # the second metric read the stored simulations
    # the engine's summary of the failed rows is a log line that says which simulations they were
    assert any(line.strip().startswith("obs1: posterior predictive simulations: 1000 simulations") and
               "800 invalid" in line for line in lines)
    assert PREDICTIVE_SAMPLES // 5 <= x_dim


def test_the_report_says_why_a_check_was_not_decided(tmp_path):
    from sbiflows.report import write_markdown

    parameter = {"name": "a", "median": 0.0, "ci68": [-1.0, 1.0], "ci95": [-2.0, 2.0], "map": 0.0}
    observations = [{"name": name, "predictive": predictive, "parameters": [parameter], "corner": f"corner_{name}"}
                    for name, predictive in [("obs1", {"passed": True, "summary": ""}),
                                             ("obs2", {"passed": False, "summary": ""}),
                                             ("obs3", {"passed": None, "summary": "not decided: only 1 of 1000 "
                                                                                 "predictive simulations are valid"})]]
    report = {"name": "t", "simulations": 10, "simulation_summary": "", "estimator": "nsf", "seed": 0,
              "training": {"epochs": 1, "best_epoch": 1, "best_validation_loss": 0.0, "diverged": False},
              "verdict": "calibrated", "advice": "", "observations": observations, "calibration": {},
              "timings_seconds": {}, "versions": {}}
    write_markdown(report, tmp_path / "report.md")
    text = (tmp_path / "report.md").read_text()
    assert "- posterior predictive: typical" in text and "- posterior predictive: FLAGGED (atypical)" in text
    assert "- posterior predictive: not decided: only 1 of 1000 predictive simulations are valid" in text

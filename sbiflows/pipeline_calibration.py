"""Step 5 of ``sbiflows fit`` for an amortized posterior: SBC, expected coverage and TARP on fresh simulations
(kept in ``calibration.zarr``), their figures, and the verdict in words."""

from __future__ import annotations

import time
from pathlib import Path

import matplotlib.pyplot as plt

from sbiflows import diagnostics, plots
from sbiflows.diagnostics.verdict import ADVICE
from sbiflows.posterior import Posterior
from sbiflows.report import jsonable, plain_label
from sbiflows.seeding import derive_seed
from sbiflows.simulate import simulate_from_prior

__all__ = ["C2ST_CAUTION", "advice", "c2st_caution", "calibrate", "save_figure"]

#: What to try first when the default's check passed one flow that the calibration finds over-confident.
SNAPSHOT_ADVICE = ("Try first the mixture of this training's own snapshots (the same command with --ensemble "
                   "snapshots --force, which keeps the simulations and repeats the same training, or "
                   "ensemble=\"snapshots\"; it costs no training beyond the one flow's): the default's check on the "
                   "validation rows passed "
                   "this flow, so its snapshots were not mixed with equal weights, and on the benchmark tasks at "
                   "1,000 simulations the mixture was calibrated on every run where the check missed an "
                   "over-confident flow (docs/benchmarks.md). Then ")


def calibrate(state, posterior: Posterior) -> None:
    """SBC, expected coverage and TARP on fresh simulations, with their figures."""
    job, start = state.job, time.perf_counter()
    state.log(f"[5/5] calibration on {job.calibration_datasets} fresh simulations x {job.calibration_samples} "
              "posterior draws")
    fresh = simulate_from_prior(job.simulator, job.prior, job.calibration_datasets,
                                seed=derive_seed(job.seed, "calibration"), store=job.out / "calibration.zarr",
                                progress=job.progress, **job.engine)
    if fresh.reused:
        state.log(f"      reused {fresh.reused} calibration simulations from the store")
        state.reused(f"{fresh.reused} of {job.calibration_datasets} calibration simulations")
    fresh.padded_trials = posterior.net.padded_trials  # padded sets are not failures
    valid = fresh.valid
    options = {"num_posterior_samples": job.calibration_samples, "seed": job.seed, "theta": fresh.theta[valid],
               "x": fresh.x[valid], "progress": job.progress}
    labels = job.parameter_names()
    # the three checks on the same posterior draws, made once (each result as its own function gives it)
    checks = diagnostics.calibration(posterior, job.prior, job.simulator, **options,
                                     parameter_names=[plain_label(n) for n in labels])
    state.timed("calibration", start)
    words = {key: diagnostics.verdict(r) for key, r in checks.items()}
    state.report["calibration"] = {
        key: {"verdict": words[key], "passed": bool(r.passed), "summary": str(r), "result": jsonable(r)}
        for key, r in checks.items()
    }
    state.report["verdict"] = diagnostics.overall(words.values())
    state.report["advice"] = advice(state.report["verdict"], job.ensemble, posterior.config) + c2st_caution(
        state.report)
    for key, figure in (
        ("sbc_ranks", plots.sbc_ranks(checks["sbc"], labels=labels, kind="ecdf")),
        ("coverage", plots.coverage(checks["coverage"])),
        ("tarp", plots.tarp(checks["tarp"])),
    ):
        save_figure(figure, job.out / key)
    for key in checks:
        state.log(f"      {key}: {words[key]}")
    state.log(f"      calibration: {state.report['verdict']}: {state.report['advice']}")


def advice(verdict: str, ensemble: int | str, config: dict) -> str:
    """What the report advises for ``verdict``: :data:`~sbiflows.diagnostics.verdict.ADVICE`, led by
    :data:`SNAPSHOT_ADVICE` where ``ensemble="auto-snapshots"`` kept one flow (``config`` has no
    ``snapshot_epochs``) or ``"auto-stacked"`` weighted snapshots (``mixture_weights``) that turned out
    over-confident, and :data:`ENSEMBLE_ADVICE` where the posterior
    already mixes several trained flows (``config["ensemble"] > 1``: not three more of the same).

    Example:
        >>> text = advice("over-confident", "auto-snapshots", {})
        >>> "Try first the mixture of this training's own snapshots" in text, "Then try an ensemble" in text
        (True, True)
        >>> "the same command with --ensemble snapshots --force, which keeps the simulations" in text
        True
        >>> advice("over-confident", "auto-snapshots", {"snapshot_epochs": [9, 28, 47]}) == ADVICE["over-confident"]
        True
        >>> stacked = {"snapshot_epochs": [9, 47], "mixture_weights": [0.1, 0.9], "ensemble": 2}
        >>> text = advice("over-confident", "auto-stacked", stacked)
        >>> "Try first the mixture of this training's own snapshots" in text
        True
        >>> text = advice("over-confident", 3, {"ensemble": 3})  # three flows already: not "try three flows"
        >>> "It already mixes 3 flows" in text, "--ensemble 6" in text, "ensemble=3" in text
        (True, True, False)
    """
    not_mixed = "snapshot_epochs" not in config or "mixture_weights" in config  # not with equal weights
    if verdict == "over-confident" and ensemble in ("auto-snapshots", "auto-stacked") and not_mixed:
        explanation, remedies = ADVICE[verdict].split(" Try ", 1)
        return f"{explanation} {SNAPSHOT_ADVICE}try {remedies}"
    members = int(config.get("ensemble", 1))
    if verdict in ENSEMBLE_ADVICE and members > 1 and "snapshot_epochs" not in config:
        return ENSEMBLE_ADVICE[verdict].format(k=members, more=2 * members)
    return ADVICE[verdict]


#: The advice where the posterior already mixes ``k`` flows trained with their own seeds (an ensemble of
#: three is what :data:`~sbiflows.diagnostics.verdict.ADVICE` suggests for one flow).
ENSEMBLE_ADVICE = {
    "over-confident": ADVICE["over-confident"].split(" Try ", 1)[0] + " It already mixes {k} flows trained "
    "with their own seeds: try more simulations, more flows (--ensemble {more}, ensemble={more}; not measured "
    "on the benchmark tasks), and check the simulator's failed rows.",
    "biased": ADVICE["biased"].split(" Try ", 1)[0] + " It already mixes {k} flows trained with their own "
    "seeds: try more simulations or a more flexible estimator, and more calibration datasets to confirm it "
    "(the check runs on fresh simulations from the prior, so the observations play no part in it).",
}


#: A mean C2ST from here on makes a "calibrated" or "conservative" verdict get a caution about accuracy.
C2ST_CAUTION = 0.75


def c2st_caution(report: dict) -> str:
    """A sentence for the advice where calibration passed but the mean C2ST says the posterior is far from
    the reference (a posterior as wide as the prior is calibrated too); else ``""``.

    Example:
        >>> c2st_caution({"verdict": "calibrated", "mean_c2st": 0.96}).startswith(" But the mean C2ST of 0.960 says")
        True
        >>> c2st_caution({"verdict": "calibrated", "mean_c2st": 0.55})
        ''
    """
    c2st = report.get("mean_c2st")
    if c2st is None or c2st < C2ST_CAUTION or report.get("verdict") not in ("calibrated", "conservative"):
        return ""
    return (f" But the mean C2ST of {c2st:.3f} says the posterior differs clearly from the reference: calibration "
            "means its credible regions are honest on average over the prior, not that it is accurate for these "
            "observations. More simulations sharpen it.")


def save_figure(figure, stem: Path) -> None:
    """``stem.png`` at print resolution (300 dpi) and ``stem.pdf`` (vector); closes the figure. A dot in the stem's
    name (an observation ``run.v1``) is kept: the suffix is appended, not substituted."""
    figure.savefig(stem.with_name(stem.name + ".png"), dpi=300)
    figure.savefig(stem.with_name(stem.name + ".pdf"))
    plt.close(figure)

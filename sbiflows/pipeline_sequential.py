"""The steps of ``sbiflows fit --rounds R`` (R > 1) that differ from the amortized job: TSNPE and its checks.

:func:`sbiflows.pipeline.run` calls :func:`fit` in place of its simulate and train steps and
:func:`calibrate` in place of its calibration step; sampling, the per-observation checks and the report
are shared. Everything TSNPE simulates and trains is kept in ``<out>/rounds`` (see
:mod:`sbiflows.sequential`), so rerunning the command resumes from the last finished round.

**Which calibration checks apply.** A sequential posterior is trained for one observation ``x_o``: its
later rounds' parameters come from the region that ``x_o`` singles out, so it is only valid for data
produced inside that region. SBC, expected coverage and TARP over the *prior* draw parameters from the
whole prior and ask the posterior about data it was never trained for: they would flag failures that
say nothing about the posterior at ``x_o`` (and a pass would be luck). What applies is the paper's check
(:data:`APPLICABLE`): expected coverage with parameters drawn from the last round's truncated prior,
plus the posterior predictive check of ``x_o`` that every run makes.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict

from sbiflows import diagnostics, plots
from sbiflows.diagnostics.verdict import ADVICE
from sbiflows.pipeline_calibration import ENSEMBLE_ADVICE
from sbiflows.embeddings import from_choice
from sbiflows.outputs import OutputFolderError
from sbiflows.posterior import Posterior
from sbiflows.report import jsonable, training_record
from sbiflows.sequential import TSNPE
from sbiflows.sequential_store import RoundStoreMismatchError

__all__ = ["APPLICABLE", "NOT_APPLICABLE", "SEQUENTIAL_ADVICE", "STORE", "calibrate", "fit", "sequential_advice"]

#: The folder under ``--out`` that holds the rounds.
STORE = "rounds"
#: The calibration check of a sequential run and what it can and cannot see.
APPLICABLE = {
    "truncated_coverage": "expected coverage of HPD regions with parameters drawn from the last round's truncated "
    "prior (Deistler et al. 2022). It detects a posterior that is over- or under-confident for data produced "
    "inside the region; it cannot detect posterior mass that a region cut off, since every test parameter lies "
    "inside it.",
}
#: What each verdict means, as :data:`~sbiflows.diagnostics.verdict.ADVICE` says, except where a TSNPE run
#: cannot follow its advice (TSNPE takes no balancing; its ensemble trains in every round).
SEQUENTIAL_ADVICE = {
    **ADVICE,
    "over-confident": "the posterior is too narrow inside the last truncated region: its credible regions miss "
    "the true parameters more often than they claim, and a too narrow posterior also sets too narrow regions "
    "for the rounds after it. Try an ensemble of flows in every round (--ensemble 3), more simulations per "
    "round (fewer rounds, or a larger budget), and check the simulator's failed rows.",
}


def sequential_advice(verdict: str, members: int) -> str:
    """:data:`SEQUENTIAL_ADVICE` for ``verdict`` of a posterior of ``members`` flows per round (one that mixes
    several already is advised more, not "an ensemble").

    Example:
        >>> "(--ensemble 3)" in sequential_advice("over-confident", 1)
        True
        >>> "more flows in every round than its 3 (--ensemble 6;" in sequential_advice("over-confident", 3)
        True
    """
    if verdict == "over-confident" and members > 1:
        return SEQUENTIAL_ADVICE[verdict].replace(
            "an ensemble of flows in every round (--ensemble 3)",
            f"more flows in every round than its {members} (--ensemble {2 * members}; not measured on the benchmark "
            "tasks)")
    if verdict == "biased" and members > 1:
        return ENSEMBLE_ADVICE[verdict].format(k=members, more=2 * members)
    return SEQUENTIAL_ADVICE[verdict]


#: The amortized checks left out, and why.
NOT_APPLICABLE = {
    "sbc": "SBC over the prior draws parameters from the whole prior, but this posterior was trained for one "
    "observation: its later rounds saw only parameters inside the truncated region, so for most prior draws "
    "the posterior is asked about data it was never trained for.",
    "coverage": "expected coverage over the prior: not applicable for the same reason as SBC (the check above "
    "is its version restricted to the truncated prior).",
    "tarp": "TARP over the prior: not applicable for the same reason as SBC.",
}


def fit(state) -> Posterior:
    """Run (or resume) TSNPE for the job's one observation; fills the report's rounds and training entries."""
    job, start = state.job, time.perf_counter()
    observation = job.observations[0]
    store = job.out / STORE
    where = "" if job.device.type == "cpu" else f", training on {job.device}"
    state.log(f"[1-2/5] truncated sequential NPE: {job.rounds} rounds, {job.simulations} simulations in total, "
              f"for {observation.name} (store: {store}){where}")
    embedding = from_choice(job.embedding, tuple(observation.x.shape), seed=job.seed)
    if job.compile:
        state.log("      compiling the training steps (torch.compile): about 30 s the first time this machine sees "
                  "this network and a round's batch size, seconds after that")

    def run() -> tuple[TSNPE, Posterior]:
        tsnpe = TSNPE(job.prior, **job.estimator_options, embedding_net=embedding, device=job.device)

        def indented(text: str) -> None:  # every line of a multi-line message under the step's heading
            for line in text.splitlines():
                state.log(f"      {line}")

        return tsnpe, tsnpe.run(
            job.simulator, observation.x, rounds=job.rounds, simulations=job.simulations, seed=job.seed,
            check_simulations=job.calibration_datasets, check_samples=job.calibration_samples,
            fit_options=job.fit_options, store=store, progress=job.progress, log=indented, **job.engine,
        )

    try:
        tsnpe, posterior = run()
    except RoundStoreMismatchError as error:  # same job settings, other TSNPE settings: a default changed
        if not state.force:
            raise OutputFolderError(f"{error}: the job's settings are unchanged, so a default of TSNPE changed "
                                    "since those rounds were made; run again with --force (pipeline.run(..., "
                                    "force=True)) to start the rounds over, which simulates them again") from None
        state.log(f"      force: removing the rounds of other TSNPE settings in {store}")
        shutil.rmtree(store)
        tsnpe, posterior = run()
    posterior.to("cpu")  # trained on job.device; the report's checks run on the CPU
    posterior.save(job.out / "posterior.pt", allow_unsaved_prior=True)
    state.timed("tsnpe", start)
    state.sequential = tsnpe  # for calibrate()
    for what in tsnpe.reused:
        state.reused(what)
    failed = sum(r.failed for r in tsnpe.rounds)
    state.report.update(
        rounds=[asdict(r) for r in tsnpe.rounds],
        simulation_summary=f"{job.rounds} rounds of {', '.join(str(r.simulations) for r in tsnpe.rounds)} "
        f"simulations; {failed} failed or invalid",
        invalid_simulations=failed,
    )
    # each round's fit continues the last, and the history counts epochs from the first round on; with
    # retrain_from_scratch each round trains a new network, and the history is the last round's
    state.report["training"] = {**training_record(posterior.history), "round_epochs": [r.epochs for r in tsnpe.rounds],
                                **({"new_network_each_round": True} if job.retrain_from_scratch else {})}
    return posterior


def calibrate(state, posterior: Posterior) -> None:
    """Report the final check of the TSNPE run (computed by :func:`fit`) and why the others do not apply."""
    check = state.sequential.check
    if check is None:
        raise RuntimeError("the TSNPE run made no final check; calibrate() needs check_simulations > 0")
    word = diagnostics.verdict(check)
    state.report["calibration"] = {
        "truncated_coverage": {"verdict": word, "passed": bool(check.passed), "summary": str(check),
                               "result": jsonable(check), "meaning": APPLICABLE["truncated_coverage"]},
    }
    state.report["not_applicable"] = dict(NOT_APPLICABLE)
    state.report["verdict"] = diagnostics.overall([word])
    from sbiflows.pipeline_calibration import c2st_caution, save_figure

    state.report["advice"] = sequential_advice(state.report["verdict"], int(posterior.config.get("ensemble", 1))) + (
        c2st_caution(state.report))

    save_figure(plots.coverage(check, source="the last truncated prior"), state.job.out / "coverage")
    state.log(f"[5/5] calibration on the last truncated prior: {word}: {state.report['advice']}")

"""The main job behind ``sbiflows fit``: simulate, train, sample, check calibration, write a report.

A :class:`~sbiflows.pipeline_job.Job` holds the settings and a list of
:class:`~sbiflows.pipeline_job.Observation` records (both also importable from here); :func:`run` runs five
named steps, each of which writes what it made as soon as it exists: every chunk of simulations as
it finishes (into the stores ``simulations.zarr`` and ``calibration.zarr``), the posterior right after
training, the samples right after sampling. Rerunning the same job into the same folder resumes: it
reads the finished simulations, and reuses the posterior and the samples when ``resume.json`` says
they were made with the same settings (:mod:`sbiflows.pipeline_resume`), so a kill or Ctrl-C at any step
loses at most the step in progress.
"""

from __future__ import annotations

import json
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

import sbiflows
from sbiflows import diagnostics, outputs, pipeline_sequential, plots
from sbiflows.checkpoint import Checkpoint
from sbiflows.npe import NPE
from sbiflows.pipeline_calibration import calibrate, save_figure
from sbiflows.pipeline_checks import check_observation_shapes, check_valid_simulations
from sbiflows.pipeline_job import Job, Observation
from sbiflows.pipeline_predictive import predictive_entry
from sbiflows.pipeline_resume import Resume, function_identity, versions
from sbiflows.posterior import Posterior, load
from sbiflows.report import (
    describe_auto,
    describe_estimator,
    describe_snapshots,
    jsonable,
    parameter_summary,
    plain_label,
    training_record,
    write_markdown,
)
from sbiflows.serialization import digest
from sbiflows.simulate import SimulationResult, simulate_from_prior

__all__ = ["Job", "Observation", "run"]


@dataclass
class _State:
    """What the steps of one run share: the job, the log, the resume record and the report so far."""

    job: Job
    log: Callable[[str], None]
    resume: Resume
    report: dict = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    sequential: object = None  # the TSNPE of a run with rounds > 1
    force: bool = False  # run(force=True): a sequential run's rounds of other TSNPE settings start over

    def timed(self, step: str, start: float) -> None:
        self.timings[step] = time.perf_counter() - start

    def reused(self, what: str) -> None:
        """Record in the report what this run took from an earlier one (its time is not in the timings)."""
        self.report.setdefault("reused", []).append(what)


def run(job: Job, *, log: Callable[[str], None] = print, force: bool = False) -> dict:
    """Run the whole job (resuming from what ``job.out`` holds) and write its outputs; returns the report.

    ``job.out`` is guarded as ``sbiflows fit`` guards ``--out`` (:func:`sbiflows.outputs.prepare`): a folder
    holding a run with other settings is refused before anything runs, so a trained posterior is never
    silently replaced; ``force=True`` replaces that run's results (simulation stores are kept where the
    settings they depend on did not change, so it retrains on them).

    Outputs: ``posterior.pt`` (load with :func:`sbiflows.load`), ``simulations.zarr`` and
    ``calibration.zarr`` (load with :func:`sbiflows.load_simulations`), ``predictive/<observation>.zarr`` (the
    posterior predictive check's simulations), ``resume.json``,
    ``samples.npz`` (posterior samples per observation), ``corner_<observation>.png`` / ``.pdf``,
    ``sbc_ranks``, ``coverage`` and ``tarp`` (``.png`` at 300 dpi and ``.pdf``), ``report.md`` and
    ``report.json`` (per observation and parameter the median, 68% and 95% credible intervals and the
    MAP; the calibration verdict in words).

    Example:
        >>> import simulators, tempfile
        >>> task = simulators.get("two_moons")
        >>> job = Job(name="two_moons", task=task, simulator=task.simulate, prior=task.prior,
        ...           observations=[Observation("obs1", task.observation(1), task.true_parameters(1), 1)],
        ...           out=Path(tempfile.mkdtemp()), simulations=500, num_samples=500,
        ...           calibration_datasets=100, calibration_samples=100, c2st_samples=500,
        ...           max_epochs=3, progress=False)
        >>> sorted(run(job, log=lambda s: None)["calibration"])
        ['coverage', 'sbc', 'tarp']
    """
    names = [o.name for o in job.observations]
    if len(set(names)) != len(names):
        raise ValueError(f"observation names must be unique, got {names}")
    if job.rounds > 1 and len(names) != 1:
        raise ValueError(f"a sequential run (rounds={job.rounds}) is for exactly one observation, got {len(names)}")
    job.out = Path(job.out)
    settings = job.settings()
    _adopt(job, settings, force=force)
    removed = outputs.prepare(job.out, settings, force=force, spelling="python")
    if removed:
        log(f"force: removed {len(removed)} outputs of the earlier run in {job.out}: {', '.join(removed)}")
    try:
        state = _run(job, log, force)
    finally:  # what the folder holds now, also after an error or Ctrl-C, so that force can remove it
        outputs.record(job.out, settings, observations=names)
    log(f"done: report in {(job.out / 'report.md').resolve()}")
    return state.report


def _adopt(job: Job, settings: dict, *, force: bool) -> None:
    """A folder of an earlier ``run`` that did not record ``run.json`` resumes (:func:`sbiflows.outputs.adopt`),
    unless its posterior was trained with other settings: then it is refused, as a run of other settings is."""
    trained = Resume(job.out / "resume.json").steps.get("train") if job.out.is_dir() else None
    if (not force and trained is not None and (job.out / "posterior.pt").exists()
            and not (job.out / outputs.MANIFEST).exists()
            and trained not in (jsonable(_training_settings(job)), jsonable(_training_settings(job, legacy=True)))):
        raise outputs.OutputFolderError(
            f"Job.out {str(job.out)!r} holds a posterior that an earlier pipeline.run trained with other settings; "
            "choose another Job.out, or pass force=True to train over it")
    outputs.adopt(job.out, settings)


def _run(job: Job, log: Callable[[str], None], force: bool) -> _State:
    state = _State(job, log, Resume(job.out / "resume.json"), force=force)
    state.report.update(name=job.name, command=job.command, simulations=job.simulations, **job.estimator_options,
                        embedding=job.embedding, seed=job.seed,
                        parameter_names=[plain_label(n) for n in job.parameter_names()],
                        versions=versions())
    if job.rounds > 1:  # the seam: a sequential method replaces simulate + train and calibration
        posterior = pipeline_sequential.fit(state)
    else:
        posterior = _train(state, _simulate(state))
    samples = _sample(state, posterior)
    _check_observations(state, posterior, samples)
    (pipeline_sequential.calibrate if job.rounds > 1 else calibrate)(state, posterior)
    state.report["timings_seconds"] = state.timings
    (job.out / "report.json").write_text(json.dumps(jsonable(state.report), indent=2))
    write_markdown(state.report, job.out / "report.md")
    return state


# -------------------------------------------------------------------------------------- steps
def _simulate(state: _State) -> SimulationResult:
    job, start = state.job, time.perf_counter()
    state.log(f"[1/5] simulating {job.simulations} parameter sets from the prior (store: {job.out / 'simulations.zarr'})")
    sims = simulate_from_prior(job.simulator, job.prior, job.simulations, seed=job.seed, progress=job.progress,
                               store=job.out / "simulations.zarr", **job.engine)
    sims.padded_trials = job.embedding == "set"  # NaN-padded trials of a set are not failures
    state.timed("simulate", start)
    state.report.update(simulation_summary=sims.summary(), invalid_simulations=sims.num_invalid)
    if sims.reused:
        state.log(f"      reused {sims.reused} finished simulations from the store")
        state.reused(f"{sims.reused} of {job.simulations} simulations (read from the store)")
    state.log(f"      {sims.summary()}")
    if sims.x is not None:  # the observations against the simulator's x, before any training
        check_observation_shapes(job, tuple(sims.x.shape[1:]))
    check_valid_simulations(job, sims)
    return sims


def _training_settings(job: Job, *, legacy: bool = False) -> dict:
    """What the trained posterior depends on; ``legacy``: as recorded before the simulator was named by its
    function rather than by the job's name (the report's title, which a rerun may change without retraining)."""
    return {"simulations": job.simulations, "seed": job.seed, **job.estimator_options, "embedding": job.embedding,
            **job.fit_options, "batch_size": job.batch_size,
            "simulator": job.name if legacy else function_identity(job.simulator),
            **({"rounds": job.rounds} if job.rounds > 1 else {})}


def _finished(state: _State, step: str, settings: dict, path: Path, legacy: dict) -> bool:
    """Whether ``step`` finished with ``settings`` (a record in the ``legacy`` form is brought up to date)."""
    if state.resume.matches(step, settings, path):
        return True
    if state.resume.matches(step, legacy, path):
        state.resume.record(step, settings)
        return True
    return False


def _train(state: _State, sims: SimulationResult) -> Posterior:
    job, start = state.job, time.perf_counter()
    settings, path = _training_settings(job), job.out / "posterior.pt"
    if _finished(state, "train", settings, path, _training_settings(job, legacy=True)):
        state.log(f"[2/5] reusing the posterior trained by an earlier run ({path})")
        posterior = load(path, prior=job.prior)
        state.reused("the trained posterior (posterior.pt)")
        Checkpoint(job.out / outputs.CHECKPOINT).remove()  # left if a run stopped right after saving posterior.pt
    else:
        where = "" if job.device.type == "cpu" else f" on {job.device}"
        state.log(f"[2/5] training NPE ({describe_estimator(job.estimator_options)}, embedding {job.embedding}){where}")
        embedding = None if job.embedding == "none" else job.embedding  # a built-in's name: each member's own weights
        checkpoint = Checkpoint(job.out / outputs.CHECKPOINT, log=lambda line: state.log(f"      {line}")) \
            if job.checkpointable else None
        if job.compile:
            state.log("      compiling the training step (torch.compile): about 30 s the first time this machine "
                      "sees this network and batch size, seconds after that")
        posterior = NPE(job.prior, **job.estimator_options, embedding_net=embedding, device=job.device).fit(
            sims.theta, sims.x, seed=job.seed, **job.fit_options, progress=job.progress, checkpoint=checkpoint
        ).to("cpu")  # trained on job.device; sampled and checked on the CPU, as a reused posterior.pt is
        posterior.save(path, allow_unsaved_prior=True)  # reloaded with load(path, prior=job.prior) above
        state.resume.done("train", settings)
        if checkpoint is not None:
            for part in checkpoint.resumed_parts():
                state.reused(f"training up to epoch {part.resumed_epoch} ({part.path.name})")
            checkpoint.remove()  # posterior.pt holds what it led to
    state.timed("train", start)
    history = posterior.history
    state.report["training"] = training_record(history)
    if "ensemble_auto" in posterior.config:  # what ensemble="auto" decided, for the report
        state.report["ensemble_auto"] = posterior.config["ensemble_auto"]
        snapshots = posterior.config.get("snapshot_epochs", []) if job.ensemble != "auto" else None
        if "mixture_weights" in posterior.config:  # ensemble="auto-stacked" weighted the snapshots
            state.report["mixture_weights"] = posterior.config["mixture_weights"]
        decided = describe_auto(state.report["ensemble_auto"], snapshot_epochs=snapshots,
                                weights=posterior.config.get("mixture_weights"), stacked=job.ensemble == "auto-stacked")
        state.log(f"      {decided}")
    if "snapshot_epochs" in posterior.config:  # which epochs ensemble="snapshots" mixed, for the report
        state.report["snapshot_epochs"] = posterior.config["snapshot_epochs"]
        if job.ensemble == "snapshots":  # "auto-snapshots" and "auto-stacked" said so above
            state.log(f"      {describe_snapshots(state.report['snapshot_epochs'])}")
    took = f" in {state.timings['train']:.1f} s" if "train" in state.resume.fresh else ""
    state.log(f"      {history.epochs} epochs{took}, best validation loss {history.best_validation_loss:.3f}")
    return posterior


def _sample(state: _State, posterior: Posterior) -> Tensor:
    """``(num_samples, B, D)`` posterior draws for the job's observations (reused when resuming)."""
    job, start = state.job, time.perf_counter()
    observations, path = job.observations, job.out / "samples.npz"
    # the posterior's weights, not only the settings that made it: rounds started over under force, with the
    # job's settings unchanged, give another posterior
    later = dict(num_samples=job.num_samples, posterior=digest(posterior.net),
                 observations={o.name: o.x.reshape(-1).tolist() for o in observations})
    settings = dict(_training_settings(job), **later)
    if _finished(state, "sample", settings, path, dict(_training_settings(job, legacy=True), **later)):
        state.log(f"[3/5] reusing the posterior samples of an earlier run ({path})")
        state.reused("the posterior samples (samples.npz)")
        with np.load(path) as stored:
            samples = torch.stack([torch.from_numpy(stored[o.name]) for o in observations], dim=1)
    else:
        state.log(f"[3/5] sampling {job.num_samples} posterior draws for {len(observations)} observation(s)")
        xs = torch.stack([o.x for o in observations])
        samples = posterior.sample_batched(job.num_samples, xs, seed=job.seed)  # one batched call
        temporary = path.with_name("samples.tmp.npz")  # whole or not at all: a kill leaves the old file or none
        _save_npz(temporary, {o.name: samples[:, b].numpy() for b, o in enumerate(observations)})
        temporary.replace(path)
        state.resume.done("sample", settings)
    state.timed("sample", start)
    return samples


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """``np.savez_compressed(path, **arrays)`` for any names: an observation named ``file`` (from ``file.csv``) or
    ``allow_pickle`` collided with that function's own arguments."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, allowZip64=True) as archive:
        for name, array in arrays.items():
            with archive.open(f"{name}.npy", "w", force_zip64=True) as handle:
                np.lib.format.write_array(handle, np.ascontiguousarray(array), allow_pickle=False)


def _c2st_scores(state: _State, samples: Tensor, c2st_samples: int) -> dict[int, tuple[Tensor, float, bool]]:
    """For each observation with a reference posterior (by index): its reference draws, the C2ST of the first
    ``c2st_samples`` posterior draws against them, and whether that score was read from an earlier run. The
    scores not read are computed together (:func:`~sbiflows.diagnostics.c2st_batched`) and kept for a rerun."""
    job, scores, pending = state.job, {}, {}
    for b, observation in enumerate(job.observations):
        if observation.reference is None:
            continue
        reference = job.task.reference_posterior(observation.reference, num_samples=c2st_samples, progress=job.progress)
        # the score of these very draws against this reference (digests of their bytes): a rerun reads it
        made_with = {"draws": digest(samples[:c2st_samples, b]), "reference": digest(reference),
                     "seed": job.seed, "sbiflows": sbiflows.__version__, "torch": torch.__version__}
        value = state.resume.cached(f"c2st/{observation.name}", made_with)
        scores[b] = (reference, value, value is not None)
        if value is None:
            pending[b] = made_with
    if pending:
        results = diagnostics.c2st_batched([(scores[b][0], samples[:c2st_samples, b]) for b in pending], seed=job.seed,
                                           progress=job.progress)
        for (b, made_with), result in zip(pending.items(), results):
            state.resume.keep(f"c2st/{job.observations[b].name}", made_with, result.accuracy)
            scores[b] = (scores[b][0], result.accuracy, False)
    return scores


def _check_observations(state: _State, posterior: Posterior, samples: Tensor) -> None:
    """C2ST against the reference (where one exists), posterior predictive and a corner plot per observation."""
    job, start = state.job, time.perf_counter()
    use_reference = job.reference and job.task is not None
    state.log("[4/5] per-observation checks" + (" (C2ST against the reference posterior)" if use_reference else ""))

    entries, labels = [], job.parameter_names()
    c2st_samples = min(job.c2st_samples, job.num_samples)  # C2ST compares equal numbers of draws per side
    # MAP at a bounded cost, every observation in one batched ascent: the best of 1,000 posterior draws,
    # refined by 100 Adam steps
    maps = posterior.map_batched(torch.stack([o.x for o in job.observations]), num_init_samples=1000,
                                 num_to_optimize=10, num_iter=100, seed=job.seed)
    scores = _c2st_scores(state, samples, c2st_samples) if use_reference else {}
    for b, observation in enumerate(job.observations):
        entry: dict = {"name": observation.name, "observation": observation.x.reshape(-1).tolist()}
        if observation.true_parameters is not None:
            entry["true_parameters"] = observation.true_parameters.tolist()
        reference = None
        if b in scores:
            reference, entry["c2st"], cached = scores[b]
            entry["c2st_samples"] = c2st_samples
            state.log(f"      {observation.name}: C2ST {entry['c2st']:.3f}"
                      + (" (from the earlier run)" if cached else ""))
            if cached:
                state.reused(f"the C2ST of {observation.name}")
        entry["predictive"] = predictive_entry(job, posterior, observation, state.log)
        entry["parameters"] = parameter_summary(samples[:, b], [plain_label(n) for n in labels], maps[b])
        # quiet: corner logs "Too few points to create valid contours" for very concentrated panels
        figure = plots.corner(samples[:, b], truths=observation.true_parameters, reference=reference,
                              labels=labels, title=f"{job.name}: {observation.name}", quiet=True)
        entry["corner"] = f"corner_{observation.name}"
        save_figure(figure, job.out / entry["corner"])
        entries.append(entry)
    state.timed("observation_checks", start)
    state.report["observations"] = entries
    c2sts = [e["c2st"] for e in entries if "c2st" in e]
    if c2sts:
        state.report["mean_c2st"] = float(np.mean(c2sts))

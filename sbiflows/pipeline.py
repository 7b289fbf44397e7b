"""The main job behind ``sbiflows fit``: simulate, train, sample, check calibration, write a report.

A :class:`Job` holds the settings and a list of :class:`Observation` records; :func:`run` runs five
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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.distributions import Distribution

import sbiflows
from sbiflows import diagnostics, outputs, pipeline_sequential, plots
from sbiflows.checkpoint import Checkpoint
from sbiflows.checks import check_bool, check_int, check_real
from sbiflows.embeddings import from_choice
from sbiflows.ensemble import DEFAULT_ENSEMBLE, check_ensemble
from sbiflows.estimator import DEFAULT_ESTIMATOR, check_mixing
from sbiflows.npe import NPE
from sbiflows.pipeline_calibration import calibrate, save_figure
from sbiflows.pipeline_checks import check_job, check_observation_shapes
from sbiflows.pipeline_predictive import predictive_entry
from sbiflows.pipeline_resume import Resume, function_identity, prior_identity, versions
from sbiflows.posterior import Posterior, load
from sbiflows.priors import check_prior
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
from sbiflows.sequential import check_sequential_options
from sbiflows.serialization import digest
from sbiflows.simulate import SimulationResult, simulate_from_prior
from sbiflows.training import MAX_EPOCHS
from sbiflows.truncated_space import resolve_space

__all__ = ["Job", "Observation", "run"]



@dataclass(frozen=True)
class Observation:
    """One observed dataset of a job.

    Attributes:
        name: Unique within the job; names the output files (``corner_<name>.png``).
        x: The observed data, ``(x_dim,)`` or ``x_shape`` (structured x).
        true_parameters: The parameters that generated ``x``, if known (a benchmark task's).
        reference: The number of a benchmark task's published observation whose reference posterior
            ``x`` is (then C2ST compares against it); None for other data.
    """

    name: str
    x: Tensor
    true_parameters: Tensor | None = None
    reference: int | None = None


@dataclass
class Job:
    """What ``sbiflows fit`` runs: the model, the observations, the budget and the engine options.

    ``batch_size``, ``vectorized``, ``workers``, ``executor`` and ``timeout`` go to :func:`sbiflows.simulate` for every
    simulation of the run. ``task`` is a benchmark task (with reference posteriors), or None for a user's
    simulator. ``rounds > 1`` runs truncated sequential NPE for the job's single observation
    (:mod:`sbiflows.pipeline_sequential`), which takes neither ``balancing`` nor ``coverage_penalty`` (an
    ``ensemble`` trains in every round). The training
    options go to :meth:`sbiflows.NPE.fit` (None: its defaults); like the flow options they are part of the
    run's settings: :func:`run` refuses a folder made with other settings, and with ``force=True`` retrains on
    its stored simulations.
    """

    name: str
    simulator: Callable
    prior: Distribution
    observations: list[Observation]
    out: Path
    task: object = None
    simulations: int = 10_000
    estimator: str | None = None  # None: NPE's default, also for rounds > 1 (resolved on construction)
    transformer: str | None = None
    bins: int | None = None
    mixing: str = "none"
    ensemble: int | str | None = None  # None: NPE's default (one flow per round when rounds > 1); else as NPE's
    balancing: float = 0.0  # weight of balanced NPE's penalty; 0 = plain NPE
    coverage_penalty: float = 0.0  # weight of calibrated NPE's coverage penalty; 0 = plain NPE
    space: str = "auto"  # resolved on construction: "truncated" for a box prior, else "unconstrained"
    embedding: str = "none"
    seed: int = 0
    num_samples: int = 10_000
    calibration_datasets: int = 500
    calibration_samples: int = 1000
    c2st_samples: int = 10_000
    reference: bool = True
    max_epochs: int = MAX_EPOCHS
    learning_rate: float | None = None  # None: NPE's default step size
    patience: int | None = None  # None: NPE's default (TSNPE's per-round default when rounds > 1)
    step_drops: int | None = None  # None: NPE's default
    drop_patience: int | None = None  # None: NPE's default (the round's patience when rounds > 1)
    compile: bool = False  # train with torch.compile (sbiflows.compiling)
    retrain_from_scratch: bool = False  # rounds > 1 only: a new network every round (NPE.fit's option)
    progress: bool = True
    batch_size: int = 100
    vectorized: bool = True
    workers: int | None = None
    executor: object = None
    timeout: float | None = None
    labels: list[str] | None = None
    command: str | None = None
    rounds: int = 1

    def __post_init__(self) -> None:
        # checked here, before any simulation, rather than by NPE.fit after the simulations are paid for
        self.learning_rate = check_real(self.learning_rate, "learning_rate", low=0, low_open=True,
                                        optional="NPE's default")
        self.patience = check_int(self.patience, "patience", minimum=1, optional="NPE's default")
        self.step_drops = check_int(self.step_drops, "step_drops", minimum=0, optional="NPE's default")
        self.drop_patience = check_int(self.drop_patience, "drop_patience", minimum=1, optional="NPE's default")
        self.compile = check_bool(self.compile, "compile")
        self.retrain_from_scratch = check_bool(self.retrain_from_scratch, "retrain_from_scratch")
        if self.retrain_from_scratch and self.rounds == 1:
            raise ValueError("retrain_from_scratch (--retrain-from-scratch) trains a new network in every round of "
                             "a sequential run and needs rounds > 1 (--rounds R), got rounds=1: an amortized run "
                             "trains one network once")
        if self.estimator is None:
            self.estimator = DEFAULT_ESTIMATOR
        check_mixing(self.estimator, self.mixing)
        self.balancing = check_real(self.balancing, "balancing", low=0)
        self.coverage_penalty = check_real(self.coverage_penalty, "coverage_penalty", low=0)
        if self.ensemble is None:
            self.ensemble = 1 if self.rounds > 1 else DEFAULT_ENSEMBLE  # as NPE and TSNPE default
        self.ensemble = check_ensemble(self.ensemble)
        if self.rounds > 1:
            check_sequential_options(self.estimator_options)
        self.space = resolve_space(check_prior(self.prior)[0].support, self.space)
        check_job(self)  # counts, choices, the flow's options and the observations

    @property
    def estimator_options(self) -> dict:
        """The options of :class:`~sbiflows.NPE` that choose the flow and its loss (``estimator``, ``transformer``,
        ``bins``, ``ensemble``, and ``mixing``, ``space``, ``balancing`` and ``coverage_penalty`` unless they are the default)."""
        return {"estimator": self.estimator, "transformer": self.transformer, "bins": self.bins,
                "ensemble": self.ensemble, **({"mixing": self.mixing} if self.mixing != "none" else {}),
                **({"space": self.space} if self.space != "unconstrained" else {}),
                **({"balancing": self.balancing} if self.balancing else {}),
                **({"coverage_penalty": self.coverage_penalty} if self.coverage_penalty else {})}

    @property
    def checkpointable(self) -> bool:
        """Whether training keeps a checkpoint (:mod:`sbiflows.checkpoint`): not where the loss is not NPE's own
        (``balancing``, ``coverage_penalty``)."""
        return not self.balancing and not self.coverage_penalty

    @property
    def fit_options(self) -> dict:
        """The training options of :meth:`sbiflows.NPE.fit` the job sets (``learning_rate``, ``patience``,
        ``step_drops`` and ``drop_patience`` only where given, ``compile`` and ``retrain_from_scratch`` only where
        True, so that runs which leave them at the defaults keep their settings)."""
        chosen = {"learning_rate": self.learning_rate, "patience": self.patience, "step_drops": self.step_drops,
                  "drop_patience": self.drop_patience, "compile": self.compile or None,
                  "retrain_from_scratch": self.retrain_from_scratch or None}
        return {"max_epochs": self.max_epochs, **{key: value for key, value in chosen.items() if value is not None}}

    @property
    def engine(self) -> dict:
        """The options of every call of the simulation engine."""
        return {"batch_size": self.batch_size, "workers": self.workers, "executor": self.executor,
                "timeout": self.timeout, "vectorized": self.vectorized}

    def settings(self) -> dict:
        """The settings that change the run's results (not progress output or the engine's parallelism)."""
        return jsonable({
            "name": self.name, "simulator": function_identity(self.simulator), "prior": prior_identity(self.prior),
            "observations": {o.name: o.x.reshape(-1).tolist() for o in self.observations},
            **{key: getattr(self, key) for key in ("simulations", "estimator", "transformer", "bins", "ensemble",
                                                   "embedding", "seed", "num_samples",
                                                   "calibration_datasets", "calibration_samples", "c2st_samples",
                                                   "reference", "batch_size", "timeout", "labels")},
            **self.fit_options,
            **({"rounds": self.rounds} if self.rounds > 1 else {}),  # amortized runs keep their old settings
            **({"space": self.space} if self.space != "unconstrained" else {}),  # so do runs of the default space
            **({"mixing": self.mixing} if self.mixing != "none" else {}),  # and runs without mixing layers
            **({"balancing": self.balancing} if self.balancing else {}),  # and runs of plain NPE
            **({"coverage_penalty": self.coverage_penalty} if self.coverage_penalty else {}),
            **({"vectorized": False} if not self.vectorized else {}),  # per-row seeds: other draws
        })

    def parameter_names(self) -> list[str]:
        """Parameter labels: ``labels``, else the task's or the prior's ``parameter_names``, else theta_1..."""
        dim = self.prior.sample().reshape(-1).numel()
        for names in (self.labels, getattr(self.task, "parameter_names", None),
                      getattr(self.prior, "parameter_names", None)):
            if names is not None:
                if len(names) != dim:
                    raise ValueError(f"{len(names)} parameter labels {list(names)} for {dim} parameters")
                return [str(name) for name in names]
        return [f"$\\theta_{{{j + 1}}}$" for j in range(dim)]


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
        outputs.record(job.out, settings)
    log(f"done: report in {(job.out / 'report.md').resolve()}")
    return state.report


def _adopt(job: Job, settings: dict, *, force: bool) -> None:
    """A folder of an earlier ``run`` that did not record ``run.json`` resumes (:func:`sbiflows.outputs.adopt`),
    unless its posterior was trained with other settings: then it is refused, as a run of other settings is."""
    trained = Resume(job.out / "resume.json").steps.get("train") if job.out.is_dir() else None
    if (not force and trained is not None and (job.out / "posterior.pt").exists()
            and not (job.out / outputs.MANIFEST).exists() and trained != jsonable(_training_settings(job))):
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
    return sims


def _training_settings(job: Job) -> dict:
    return {"simulations": job.simulations, "seed": job.seed, **job.estimator_options, "embedding": job.embedding,
            **job.fit_options, "batch_size": job.batch_size, "simulator": job.name,
            **({"rounds": job.rounds} if job.rounds > 1 else {})}


def _train(state: _State, sims: SimulationResult) -> Posterior:
    job, start = state.job, time.perf_counter()
    settings, path = _training_settings(job), job.out / "posterior.pt"
    if state.resume.matches("train", settings, path):
        state.log(f"[2/5] reusing the posterior trained by an earlier run ({path})")
        posterior = load(path, prior=job.prior)
        state.reused("the trained posterior (posterior.pt)")
        Checkpoint(job.out / outputs.CHECKPOINT).remove()  # left if a run stopped right after saving posterior.pt
    else:
        state.log(f"[2/5] training NPE ({describe_estimator(job.estimator_options)}, embedding {job.embedding})")
        embedding = from_choice(job.embedding, tuple(sims.x.shape[1:]))
        checkpoint = Checkpoint(job.out / outputs.CHECKPOINT, log=lambda line: state.log(f"      {line}")) \
            if job.checkpointable else None
        if job.compile:
            state.log("      compiling the training step (torch.compile): about 30 s the first time this machine "
                      "sees this network and batch size, seconds after that")
        posterior = NPE(job.prior, **job.estimator_options, embedding_net=embedding).fit(
            sims.theta, sims.x, seed=job.seed, **job.fit_options, progress=job.progress, checkpoint=checkpoint
        )
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
        snapshots = posterior.config.get("snapshot_epochs", []) if job.ensemble == "auto-snapshots" else None
        state.log(f"      {describe_auto(state.report['ensemble_auto'], snapshot_epochs=snapshots)}")
    if "snapshot_epochs" in posterior.config:  # which epochs ensemble="snapshots" mixed, for the report
        state.report["snapshot_epochs"] = posterior.config["snapshot_epochs"]
        if job.ensemble == "snapshots":  # "auto-snapshots" said so above
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
    settings = dict(_training_settings(job), num_samples=job.num_samples, posterior=digest(posterior.net),
                    observations={o.name: o.x.reshape(-1).tolist() for o in observations})
    if state.resume.matches("sample", settings, path):
        state.log(f"[3/5] reusing the posterior samples of an earlier run ({path})")
        state.reused("the posterior samples (samples.npz)")
        with np.load(path) as stored:
            samples = torch.stack([torch.from_numpy(stored[o.name]) for o in observations], dim=1)
    else:
        state.log(f"[3/5] sampling {job.num_samples} posterior draws for {len(observations)} observation(s)")
        xs = torch.stack([o.x for o in observations])
        samples = posterior.sample_batched(job.num_samples, xs, seed=job.seed)  # one batched call
        temporary = path.with_name("samples.tmp.npz")  # whole or not at all: a kill leaves the old file or none
        np.savez_compressed(temporary, **{o.name: samples[:, b].numpy() for b, o in enumerate(observations)})
        temporary.replace(path)
        state.resume.done("sample", settings)
    state.timed("sample", start)
    return samples


def _check_observations(state: _State, posterior: Posterior, samples: Tensor) -> None:
    """C2ST against the reference (where one exists), posterior predictive and a corner plot per observation."""
    job, start = state.job, time.perf_counter()
    use_reference = job.reference and job.task is not None
    state.log("[4/5] per-observation checks" + (" (C2ST against the reference posterior)" if use_reference else ""))

    entries, labels = [], job.parameter_names()
    c2st_samples = min(job.c2st_samples, job.num_samples)  # C2ST compares equal numbers of draws per side
    for b, observation in enumerate(job.observations):
        entry: dict = {"name": observation.name, "observation": observation.x.reshape(-1).tolist()}
        if observation.true_parameters is not None:
            entry["true_parameters"] = observation.true_parameters.tolist()
        reference = None
        if use_reference and observation.reference is not None:
            reference = job.task.reference_posterior(observation.reference, num_samples=c2st_samples,
                                                     progress=job.progress)
            # the score of these very draws against this reference (digests of their bytes): a rerun reads it
            made_with = {"draws": digest(samples[:c2st_samples, b]), "reference": digest(reference),
                         "seed": job.seed, "sbiflows": sbiflows.__version__, "torch": torch.__version__}
            entry["c2st"] = state.resume.cached(f"c2st/{observation.name}", made_with)
            if entry["c2st"] is None:
                entry["c2st"] = diagnostics.c2st(reference, samples[:c2st_samples, b], seed=job.seed).accuracy
                state.resume.keep(f"c2st/{observation.name}", made_with, entry["c2st"])
            entry["c2st_samples"] = c2st_samples
            cached = f"c2st/{observation.name}" not in state.resume.fresh
            state.log(f"      {observation.name}: C2ST {entry['c2st']:.3f}"
                      + (" (from the earlier run)" if cached else ""))
            if cached:
                state.reused(f"the C2ST of {observation.name}")
        entry["predictive"] = predictive_entry(job, posterior, observation, state.log)
        # MAP at a bounded cost: the best of 1,000 posterior draws, refined by 100 Adam steps
        best = posterior.map(observation.x, num_init_samples=1000, num_to_optimize=10, num_iter=100,
                             seed=job.seed)
        entry["parameters"] = parameter_summary(samples[:, b], [plain_label(n) for n in labels], best)
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

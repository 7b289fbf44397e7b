"""What ``sbiflows fit`` runs: a :class:`Job` (the model, the observations, the budget, the training and engine
options) and its :class:`Observation` records, checked on construction before anything is simulated.

:func:`sbiflows.pipeline.run` runs a job. This module imports neither matplotlib nor the pipeline's steps, so the
command line builds and checks a job cheaply.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.distributions import Distribution

from sbiflows.checks import check_bool, check_choice, check_device, check_int, check_real
from sbiflows.divergence import NONFINITE_CHOICES
from sbiflows.ensemble import DEFAULT_ENSEMBLE, check_ensemble
from sbiflows.estimator import DEFAULT_ESTIMATOR, check_mixing
from sbiflows.pipeline_checks import check_job
from sbiflows.pipeline_resume import function_identity, prior_identity
from sbiflows.prior_specs import move_prior
from sbiflows.priors import check_prior
from sbiflows.report import jsonable
from sbiflows.sequential import check_sequential_options
from sbiflows.training import MAX_EPOCHS
from sbiflows.truncated_space import resolve_space

__all__ = ["Job", "Observation"]


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

    def __post_init__(self) -> None:
        """The name becomes part of file names: refused here, not after training, when it cannot be one."""
        if not isinstance(self.name, str):
            raise TypeError(f"Observation name must be a string, got {type(self.name).__name__}")
        if self.name in ("", ".", "..") or any(c in self.name for c in ("/", "\\", "\0")):
            raise ValueError(f"Observation name must be usable in a file name (corner_<name>.png): not empty, '.' or "
                             f"'..', without '/', '\\' or NUL, got {self.name!r}")


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
    its stored simulations. ``device`` is where the network trains (``NPE(device=...)``), not a setting: the
    simulator gets CPU tensors, and sampling and the checks after training run on the CPU.
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
    on_nonfinite: str = "stop"  # NPE.fit's option: "restore_best" restarts once from the best weights
    device: torch.device | str = "cpu"  # where the network trains; simulations and the checks run on the CPU
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
        self.on_nonfinite = check_choice(self.on_nonfinite, "on_nonfinite", NONFINITE_CHOICES)
        self.device = check_device(self.device, "device (--device)")
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
        move_prior(self.prior, self.device)  # a prior that cannot train on the device: a ValueError now
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
        True, ``on_nonfinite`` only where not ``"stop"``, so that runs which leave them at the defaults keep their
        settings)."""
        chosen = {"learning_rate": self.learning_rate, "patience": self.patience, "step_drops": self.step_drops,
                  "drop_patience": self.drop_patience, "compile": self.compile or None,
                  "retrain_from_scratch": self.retrain_from_scratch or None,
                  "on_nonfinite": None if self.on_nonfinite == "stop" else self.on_nonfinite}
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

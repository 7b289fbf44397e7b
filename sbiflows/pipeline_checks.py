"""The checks of a :class:`sbiflows.pipeline_job.Job` that run before anything is simulated: counts, choices,
the flow's options and the observations, so that a bad job fails in a line, not after its simulations.
(That the observations have the simulator's x shape is checked right after simulating, before training:
:func:`check_observation_shapes`.)"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from sbiflows.checks import check_choice, check_int
from sbiflows.diagnostics.c2st import DEFAULT_FOLDS
from sbiflows.embeddings import EMBEDDINGS as BUILT_IN
from sbiflows.priors import check_prior
from sbiflows.training_data import MIN_VALID, TooFewSimulationsError
from sbiflows.xshape import valid_rows

__all__ = ["EMBEDDINGS", "ObservationShapeError", "TooFewSimulationsError", "check_job", "check_observation_shapes",
           "check_valid_simulations"]

#: What ``Job.embedding`` takes (``sbiflows fit --embedding``): the built-in networks, "auto" and "none".
EMBEDDINGS = ("none", "auto", *BUILT_IN)
#: The counts of a job, each at least 1.
COUNTS = ("simulations", "num_samples", "calibration_datasets", "calibration_samples", "c2st_samples",
          "max_epochs", "batch_size", "rounds")




def check_job(job) -> None:
    """Refuse a bad job (ValueError / TypeError naming the field) before its first simulation.

    Example:
        >>> import simulators
        >>> from sbiflows.pipeline_job import Job, Observation
        >>> task = simulators.get("two_moons")
        >>> Job(name="t", simulator=task.simulate, prior=task.prior, out="unused", num_samples=0,
        ...     observations=[Observation("obs1", task.observation(1))])  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: num_samples must be an int >= 1, got 0
    """
    from sbiflows.npe import NPE

    for name in COUNTS:
        setattr(job, name, check_int(getattr(job, name), name, minimum=1))
    check_int(job.simulations, "simulations", minimum=MIN_VALID)  # a training row and a validation row
    job.embedding = check_choice(job.embedding, "embedding", EMBEDDINGS)
    NPE(job.prior, **job.estimator_options)  # refuses a bad estimator, transformer, bins, ... (builds no network)
    dim = check_prior(job.prior)[1]
    if not isinstance(job.observations, Sequence) or len(job.observations) == 0:
        raise ValueError(f"observations must be a non-empty list of Observation, got {job.observations!r}")
    for observation in job.observations:
        where = f"observation {observation.name!r}"
        if not isinstance(observation.x, Tensor):
            raise TypeError(f"{where}: x must be a torch.Tensor, got {type(observation.x).__name__}")
        if not observation.x.is_floating_point() or observation.x.numel() == 0:
            raise ValueError(f"{where}: x must be a non-empty floating-point tensor, got dtype {observation.x.dtype} "
                             f"and shape {tuple(observation.x.shape)}")
        padded = job.embedding == "set" and observation.x.ndim == 2  # sets of fewer trials are NaN-padded
        if not bool(valid_rows(observation.x[None], padded_trials=padded).all()):
            raise ValueError(f"{where}: x contains NaN or inf: {observation.x.reshape(-1).tolist()[:10]}")
        truth = observation.true_parameters
        if truth is not None and torch.as_tensor(truth).numel() != dim:
            raise ValueError(f"{where}: true_parameters has {torch.as_tensor(truth).numel()} values, but the "
                             f"prior has {dim} parameters")
    compared = job.reference and job.task is not None and any(o.reference is not None for o in job.observations)
    if compared and min(job.c2st_samples, job.num_samples) < DEFAULT_FOLDS:
        raise ValueError(f"c2st_samples and num_samples must be at least {DEFAULT_FOLDS} when the C2ST against the "
                         f"reference posterior runs (its {DEFAULT_FOLDS}-fold cross-validation needs a draw per fold), "
                         f"got c2st_samples={job.c2st_samples} and num_samples={job.num_samples}; or turn the "
                         "reference off (--no-reference)")


class ObservationShapeError(ValueError):
    """An observation whose shape is not the simulator's x, found once simulations exist (they are kept)."""


def check_observation_shapes(job, x_shape: tuple[int, ...]) -> None:
    """Every observation has the simulator's x shape (known once simulations exist): an
    :class:`ObservationShapeError` (a ValueError) naming it."""
    from sbiflows.cli_observations import _check_observations

    try:
        _check_observations(job.observations, tuple(x_shape), padded_trials=job.embedding == "set")
    except ValueError as error:
        raise ObservationShapeError(f"{error}; the simulations are kept in {job.out}: fix the observation and run "
                                    "again") from None


def check_valid_simulations(job, sims) -> None:
    """At least :data:`MIN_VALID` simulations without NaN or inf (failed rows are NaN): a
    :class:`TooFewSimulationsError` saying how many, before training."""
    valid = len(sims.theta) - sims.num_invalid
    if valid < MIN_VALID:
        raise TooFewSimulationsError(
            f"only {valid} of {len(sims.theta)} simulations are valid (x without NaN or inf), and training needs at "
            f"least {MIN_VALID}: check what the simulator returns")

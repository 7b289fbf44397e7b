"""The plan and the record of TSNPE's rounds (see :mod:`sbiflows.sequential`): how the budget is split,
which NPE options TSNPE refuses, and what each round did.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sbiflows.checks import check_int

__all__ = ["COVERS_PRIOR", "Round", "check_sequential_options", "split_budget"]

#: A region holding at least this share of the prior's mass counts as covering the prior.
COVERS_PRIOR = 0.9

@dataclass(frozen=True)
class Round:
    """What one round did.

    Attributes:
        index: The round, from 0.
        simulations: Parameter sets simulated in this round.
        failed: Of those, rows whose simulation failed or is NaN/inf (not trained on).
        method: How its parameters were drawn: ``"prior"`` (round 0), ``"rejection"``, ``"sir"`` or
            ``"rejection+sir"`` (see :class:`~sbiflows.truncation.TruncatedPrior`).
        acceptance: The accepted fraction of the draw (1.0 for the prior).
        volume: The prior mass of the region the parameters came from (1.0 for the prior).
        volume_stderr: Its standard error.
        threshold: The log-density threshold of that region (None for the prior).
        covers_prior: Whether the region holds at least :data:`COVERS_PRIOR` of the prior.
        validation_loss: The best validation loss of the training after this round, on the validation rows
            of all rounds so far (each round adds a share of its own rows; later rounds' rows lie in smaller
            regions, so the losses of different rounds are not comparable).
        epochs: Epochs of that training.
        seconds: Wall seconds of the round (drawing, simulating, training).
        cpu_seconds: CPU seconds of this process in the round (simulations in worker processes excluded).
        restart_epochs: Epochs of that training whose non-finite loss restarted it from the best weights
            (``fit_options={"on_nonfinite": "restore_best"}``; numbered as the history numbers them); empty in
            rounds recorded before this field existed.
    """

    index: int
    simulations: int
    failed: int
    method: str
    acceptance: float
    volume: float
    volume_stderr: float
    threshold: float | None
    covers_prior: bool
    validation_loss: float
    epochs: int
    seconds: float
    cpu_seconds: float
    restart_epochs: list[int] = field(default_factory=list)


def check_sequential_options(npe_options: Mapping[str, Any]) -> None:
    """Refuse the :class:`~sbiflows.NPE` options that TSNPE cannot honour, before any simulation.

    ``ensemble`` is allowed: every round then trains the ensemble, and each region is the mixture's.
    ``balancing``: balanced NPE's penalty compares ``q(theta | x)``
    with the prior's density on parameters drawn from the prior, while every round after the first draws
    them from the truncated prior, where that comparison is off by the region's prior mass.
    ``coverage_penalty``: calibrated NPE's penalty was measured for amortized NPE only.

    Example:
        >>> check_sequential_options({"estimator": "nsf", "balancing": 0.0})  # the defaults pass
        >>> check_sequential_options({"balancing": 100.0})
        Traceback (most recent call last):
        ...
        ValueError: TSNPE does not take balancing (balanced NPE), got balancing=100.0: its penalty assumes parameters drawn from the prior, and rounds after the first draw them from the truncated prior
    """
    if npe_options.get("balancing", 0):
        raise ValueError(f"TSNPE does not take balancing (balanced NPE), got balancing={npe_options['balancing']}: "
                         "its penalty assumes parameters drawn from the prior, and rounds after the first draw "
                         "them from the truncated prior")
    if npe_options.get("coverage_penalty", 0):
        raise ValueError(f"TSNPE does not take coverage_penalty (calibrated NPE), got coverage_penalty="
                         f"{npe_options['coverage_penalty']}: its penalty was measured for amortized NPE only")


def split_budget(simulations: int, rounds: int, first_round: int | None = None) -> list[int]:
    """Simulations per round (see the module docstring).

    Example:
        >>> split_budget(1000, 3), split_budget(1000, 3, first_round=400)
        ([334, 333, 333], [400, 300, 300])
    """
    rounds = check_int(rounds, "rounds", minimum=1)
    simulations = check_int(simulations, "simulations", minimum=1)
    if simulations < rounds:
        raise ValueError(f"simulations must be at least rounds (one simulation per round), got {simulations} "
                         f"simulations for {rounds} rounds")
    if first_round is None:
        base, extra = divmod(simulations, rounds)
        return [base + (r < extra) for r in range(rounds)]
    first_round = check_int(first_round, "first_round", minimum=1, maximum=simulations - (rounds - 1))
    if rounds == 1 and first_round != simulations:
        raise ValueError(f"with rounds=1, first_round must equal simulations ({simulations}), got {first_round}")
    return [first_round] + (split_budget(simulations - first_round, rounds - 1) if rounds > 1 else [])

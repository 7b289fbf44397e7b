"""How one :meth:`sbiflows.NPE.fit` trains its flows, in order: a snapshot-keeping flow, the auto-checked
first flow, and the other members together (:mod:`sbiflows.ensemble_training`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from sbiflows.checkpoint import Checkpoint
from sbiflows.ensemble import member_seed
from sbiflows.ensemble_training import train_members
from sbiflows.snapshots import SnapshotTrail
from sbiflows.training import TrainingHistory, train_checked

__all__ = ["train_flows"]


def train_flows(members: list[nn.Module], u: Tensor, x: Tensor, *, seed: int, histories: list[TrainingHistory],
                validations: list[Tensor], trail: SnapshotTrail | None,
                check_first: Callable[[nn.Module], Any] | None, checkpoint: Checkpoint | None = None,
                **options: Any) -> Any:
    """Train ``members`` on ``(u, x)`` in place, each on its own validation rows and history.

    With a ``trail``, the first flow trains alone and keeps the weights of its improvements in it. With
    ``check_first`` (``ensemble="auto"``, ``"auto-snapshots"`` or ``"auto-stacked"``), the first flow trains
    alone and is checked; if the check passes, the other members are not trained. The other members then
    train together (one vectorized pass where they allow it).

    Args:
        members: The flows (a fit's first one, or all of an ensemble's).
        u, x: The training rows (theta in the flow's space, simulations).
        seed: The fit's seed (member ``k`` trains with :func:`~sbiflows.ensemble.member_seed`).
        histories, validations: Per member: its training history (extended) and validation mask.
        trail: Where the first flow keeps its snapshots, or None.
        check_first: Checks the trained first flow (e.g. :func:`~sbiflows.ensemble.auto_check` on its
            validation rows), or None.
        checkpoint: Where training keeps its state (:mod:`sbiflows.checkpoint`): the first flow's, if it trains
            alone, and the members' trained after it in ``checkpoint.sibling("members")``.
        **options: :func:`~sbiflows.training.train`'s options, already checked.

    Returns:
        The first flow's check result, or None without ``check_first``.
    """
    first, check = 0, None
    if trail is not None:  # one flow, keeping the weights of its improvements
        train_checked(members[0], u, x, seed=seed, history=histories[0], validation=validations[0],
                      snapshots=trail, checkpoint=checkpoint, **options)
        first = 1
    if check_first is not None:  # the first flow alone, checked on its own validation rows
        if first == 0:
            train_members(members[:1], u, x, seeds=[member_seed(seed, 0)], histories=histories[:1],
                          validations=validations[:1], checkpoint=checkpoint, **options)
        check, first = check_first(members[0]), 1
        if check.passed:  # one flow is enough: the others are not trained
            return check
    if first < len(members):  # the others together, in one vectorized pass where they allow it
        train_members(members[first:], u, x, seeds=[member_seed(seed, k) for k in range(first, len(members))],
                      histories=histories[first:], validations=validations[first:],
                      checkpoint=checkpoint if checkpoint is None or first == 0 else checkpoint.sibling("members"),
                      **options)
    return check

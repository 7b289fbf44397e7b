"""A mixture of one training run's own snapshots: ``NPE(prior, ensemble="snapshots")``.

Training keeps the weights of every validation improvement to restore the best one
(:func:`~sbiflows.training.train`). A :class:`SnapshotTrail` holds on to those copies, so that after
training the posterior can be the equal-weight mixture (:class:`~sbiflows.ensemble.EnsembleNet`) of the
best weights and of the latest improvements at least ``gap`` and ``2 gap`` epochs before the best, with
``gap`` a fraction (:data:`SNAPSHOT_GAP`) of the best epoch (snapshot ensembles, Huang et al. 2017, without
their cyclic step size). It trains one flow, exactly as the single-flow default does; the earlier
members are less sharp than the best, so the mixture is wider where the flow is over-confident
(``docs/benchmarks.md``, "A mixture of one training run's snapshots"). :func:`stacking_weights` weights
the members instead by how well their mixture explains held-out rows (``ensemble="auto-stacked"``).

Memory: the trail keeps references to the copies training makes anyway. Past a budget
(:data:`SNAPSHOT_BYTES`, at least :data:`MIN_SNAPSHOTS` copies) it drops the copy whose removal leaves
the smallest gap in log-epoch between its neighbours, so the trail thins towards log-spaced epochs and
the chosen members stay close to the targets; under the budget the members are exact.

Example:
    >>> trail = SnapshotTrail()
    >>> for epoch in [0, 1, 2, 4, 7, 9, 12, 20]:
    ...     trail.add(epoch, {"w": torch.tensor(float(epoch))})
    >>> [epoch for epoch, _ in trail.members(best_epoch=20, fraction=0.4)]
    [4, 12, 20]
"""

from __future__ import annotations

import copy
import math

from typing import Any

import torch
from torch import Tensor, nn

from sbiflows.checks import check_bool

__all__ = ["MIN_SNAPSHOTS", "SNAPSHOT_BYTES", "SNAPSHOT_GAP", "STACKING_FLOOR", "SnapshotTrail", "stacking_weights"]

#: ``ensemble="snapshots"``: the gap between members as a fraction of the best epoch (members at the best
#: epoch and at about 0.6 and 0.2 of it). 0.3 left two_moons over-confident where 0.4 did not
#: (docs/benchmarks.md, "A mixture of one training run's snapshots").
SNAPSHOT_GAP = 0.4
#: :func:`stacking_weights`: a member whose weight comes out below this leaves the mixture (it would cost a
#: flow's time per density for a negligible part of it).
STACKING_FLOOR = 0.01
#: The trail keeps at most this many bytes of weights, and at least :data:`MIN_SNAPSHOTS` copies.
SNAPSHOT_BYTES = 2**27
MIN_SNAPSHOTS = 16


class SnapshotTrail:
    """The ``(epoch, weights)`` of a training run's validation improvements, oldest first.

    Args:
        max_bytes: Memory budget of the kept weights (``>= 0``); past it the trail thins (module docstring).
    """

    def __init__(self, *, max_bytes: int = SNAPSHOT_BYTES):
        self.max_bytes = max_bytes
        self.snapshots: list[tuple[int, dict[str, Tensor]]] = []

    def add(self, epoch: int, state: dict[str, Tensor]) -> None:
        """Keep ``state`` (not copied: pass a copy the model will not overwrite) as the weights of ``epoch``."""
        if self.snapshots and epoch <= self.snapshots[-1][0]:
            raise ValueError(f"epochs must increase: got {epoch} after {self.snapshots[-1][0]}")
        self.snapshots.append((epoch, state))
        size = sum(value.numel() * value.element_size() for value in state.values())
        limit = max(MIN_SNAPSHOTS, self.max_bytes // max(1, size))
        while len(self.snapshots) > limit:
            self._thin()

    def _thin(self) -> None:
        """Drop the interior snapshot whose neighbours are closest in log-epoch (never the first or the last)."""
        logs = [math.log1p(epoch) for epoch, _ in self.snapshots]
        merged = [logs[i + 1] - logs[i - 1] for i in range(1, len(logs) - 1)]
        del self.snapshots[1 + merged.index(min(merged))]

    def members(self, best_epoch: int, *, fraction: float = SNAPSHOT_GAP, gap: int | None = None, start: int = 0,
                distinct: bool = True) -> list[tuple[int, dict[str, Tensor]]]:
        """The mixture's members, oldest first: the latest snapshots at or before ``best_epoch``,
        ``best_epoch - gap`` and ``best_epoch - 2 gap`` with ``gap = max(1, round(fraction * (best_epoch -
        start)))``, each before the later members: where training did not improve between two targets, the
        earlier member is the improvement before the later one, so the mixture keeps three members wherever
        the trail has them (fewer only where training improved fewer times).

        Args:
            best_epoch: The epoch whose weights training restored.
            fraction: The gap as a fraction of the epochs from ``start`` to the best (``> 0``).
            gap: A gap in epochs (``>= 1``) instead of ``fraction`` (``examples/benchmark_snapshot_mixture.py``
                measures both).
            start: The first epoch of the training call (a refit counts epochs on from earlier fits).
            distinct: False: the rule before session 68, where two targets without an improvement between
                them gave one member, so the mixture had two (``examples/benchmark_snapshot_mixture.py``
                compares both).

        Example:
            >>> trail = SnapshotTrail()
            >>> for epoch in [0, 1, 2, 3, 4, 5, 6, 7, 30, 31]:  # overfit after epoch 7, improved after a step drop
            ...     trail.add(epoch, {"w": torch.tensor(float(epoch))})
            >>> [epoch for epoch, _ in trail.members(31)], [epoch for epoch, _ in trail.members(31, distinct=False)]
            ([6, 7, 31], [7, 31])
        """
        if not fraction > 0:
            raise ValueError(f"fraction must be > 0, got {fraction}")
        distinct = check_bool(distinct, "distinct")
        if gap is None:
            gap = max(1, round(fraction * (best_epoch - start)))
        elif gap < 1:
            raise ValueError(f"gap must be >= 1 epoch, got {gap}")
        chosen: list[tuple[int, dict[str, Tensor]]] = []
        for lag in (0, gap, 2 * gap):
            target = best_epoch - lag
            if distinct and chosen:
                target = min(target, chosen[-1][0] - 1)
            earlier = [(epoch, state) for epoch, state in self.snapshots if start <= epoch <= target]
            if earlier and all(earlier[-1][0] != epoch for epoch, _ in chosen):
                chosen.append(earlier[-1])
        return chosen[::-1]

    def networks(self, net: nn.Module, best_epoch: int, **choice) -> tuple[list[nn.Module], list[int]]:
        """The members as networks, oldest first, and their epochs: copies of ``net`` (which holds the best
        weights) loaded with the earlier members' weights, then ``net`` itself. Only ``net`` where the
        trail does not reach ``best_epoch`` (a refit that did not improve on an earlier fit's best).
        ``choice``: :meth:`members`' ``fraction``, ``gap`` and ``start``.

        Example:
            >>> trail, net = SnapshotTrail(), nn.Linear(1, 1)
            >>> for epoch in range(10):
            ...     trail.add(epoch, {"weight": torch.full((1, 1), float(epoch)), "bias": torch.zeros(1)})
            >>> nets, epochs = trail.networks(net, 9)
            >>> epochs, [float(n.weight.detach()) for n in nets[:-1]], nets[-1] is net
            ([1, 5, 9], [1.0, 5.0], True)
        """
        chosen = self.members(best_epoch, **choice)
        if not chosen or chosen[-1][0] != best_epoch:
            return [net], [best_epoch]
        members = []
        for _, state in chosen[:-1]:
            member = copy.deepcopy(net)
            member.load_state_dict(state)
            members.append(member.eval())
        return [*members, net], [epoch for epoch, _ in chosen]

    def stacked(self, net: nn.Module, best_epoch: int, prior: Any, config: dict, theta: Tensor, x: Tensor,
                **choice) -> tuple[list[nn.Module], list[int], Tensor]:
        """The members of :meth:`networks` that a stacked mixture keeps (:func:`~sbiflows.ensemble.stack` on the
        held-out pairs ``(theta, x)``; ``prior`` and ``config`` define a member's posterior), their epochs and
        weights; ``[net]``, ``[best_epoch]`` and weight 1 where the trail gives ``net`` alone. ``choice`` as for
        :meth:`networks`.

        A mixture always keeps ``net``: where stacking would drop it (earlier snapshots that explain the held-out
        pairs together better than with it), ``net`` alone is returned, so the last member of every stacked
        mixture is the best epoch's flow that a refit trains on from."""
        from sbiflows.ensemble import stack

        nets, epochs = self.networks(net, best_epoch, **choice)
        if len(nets) == 1:
            return nets, epochs, torch.ones(1, dtype=torch.float64)
        kept, weights = stack(nets, prior, config, theta, x)
        if kept[-1] != len(nets) - 1:  # the best epoch's flow dropped
            return [net], [best_epoch], torch.ones(1, dtype=torch.float64)
        return [nets[k] for k in kept], [epochs[k] for k in kept], weights


def stacking_weights(log_q: Tensor, *, floor: float = STACKING_FLOOR, iterations: int = 10_000,
                     tol: float = 1e-9) -> Tensor:
    """Mixture weights ``w`` that maximize ``sum_i log sum_k w_k q_k(theta_i | x_i)`` on held-out rows (stacking),
    by expectation-maximization from equal weights; weights below ``floor`` are set to 0 and the rest renormalized
    (the fit is then repeated on the members left, so the weights are the optimum among them).

    The objective is concave in ``w``, so EM's fixed point is its maximum: a member gets weight only where it
    explains held-out rows the others do not; a best member that explains the rows alone gets weight 1.

    Args:
        log_q: ``(K, N)`` log densities of the ``K`` members at ``N`` held-out rows (any common offset per row,
            e.g. a Jacobian, leaves the weights unchanged).
        floor: Weights below it are dropped (in ``[0, 1)``).
        iterations: At most this many EM steps.
        tol: Stop when no weight moves by more than this in a step.

    Returns:
        ``(K,)`` float64 weights that sum to 1.

    Example:
        >>> best = torch.tensor([0.0, 0.0, 0.0, 0.0])
        >>> stacking_weights(torch.stack([best - 1, best]))  # the second member is better everywhere
        tensor([0., 1.], dtype=torch.float64)
        >>> w = stacking_weights(torch.tensor([[0.0, -9.0], [-9.0, 0.0]]))  # each explains one row
        >>> [round(float(v), 3) for v in w]
        [0.5, 0.5]
    """
    if log_q.dim() != 2 or log_q.shape[0] < 1 or log_q.shape[1] < 1:
        raise ValueError(f"log_q must have shape (members, rows) with both >= 1, got {tuple(log_q.shape)}")
    if not 0 <= floor < 1:
        raise ValueError(f"floor must be in [0, 1), got {floor}")
    log_q = log_q.detach().to(torch.float64)
    if not bool(torch.isfinite(log_q).all(1).any()):
        raise ValueError("log_q must have at least one member with finite log densities at every row")
    keep = torch.isfinite(log_q).all(1)  # a member with a -inf or nan row would be dropped by EM anyway
    while True:
        weights = torch.zeros(len(log_q), dtype=torch.float64)
        weights[keep] = _em(log_q[keep], iterations=iterations, tol=tol)
        small = keep & (weights < floor)
        if not bool(small.any()):
            return weights
        keep &= ~small
        if not bool(keep.any()):  # every weight below the floor: keep the largest
            keep[int(weights.argmax())] = True


def _em(log_q: Tensor, *, iterations: int, tol: float) -> Tensor:
    """Stacking weights of the members ``log_q`` ``(K, N)`` by EM from equal weights (no floor)."""
    weights = torch.full((len(log_q),), 1 / len(log_q), dtype=torch.float64)
    for _ in range(iterations):
        updated = torch.softmax(log_q + weights.log()[:, None], 0).mean(1)
        moved = float((updated - weights).abs().max())
        weights = updated
        if moved <= tol:
            break
    return weights

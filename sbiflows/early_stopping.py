"""The plateau rule of :func:`~sbiflows.training.train`: early stopping, patience and step drops.

One :class:`Plateau` per trained flow decides after each validated epoch whether the weights improved
(keep them), whether a plateau lowers the step size (go on from the best weights) and whether
training stops. :func:`~sbiflows.training.train` keeps one; the vectorized ensemble training of
:mod:`sbiflows.ensemble_training` keeps one per member, so both follow the same rule.
"""

from __future__ import annotations

import math

__all__ = ["Plateau"]


class Plateau:
    """Best validation loss, patience and step drops of one training run.

    After ``patience`` epochs without improvement a step drop is taken while ``step_drops`` are left
    (the caller restarts from the best weights with a smaller step size), else training stops. After
    a drop, ``drop_patience`` epochs (None: ``patience``) must bring an improvement; once one does,
    ``patience`` applies again.

    Example:
        >>> rule = Plateau(patience=2, step_drops=1, drop_patience=1)
        >>> [rule.observe(loss, epoch) for epoch, loss in enumerate([3.0, 2.0, 2.5, 2.4, 2.2, 1.0])]
        [(True, None), (True, None), (False, None), (False, 'drop'), (False, 'stop'), (False, 'stop')]
        >>> rule.best_loss, rule.best_epoch
        (2.0, 1)
    """

    def __init__(self, *, patience: int, step_drops: int = 0, drop_patience: int | None = None):
        self.patience, self.drop_patience = patience, drop_patience
        self.best_loss, self.best_epoch, self.since_best = math.inf, -1, 0
        self.drops_left, self.on_trial = step_drops, False  # on_trial: after a drop that has not improved yet
        self.stopped = False

    def observe(self, loss: float, epoch: int) -> tuple[bool, str | None]:
        """Record epoch ``epoch``'s validation ``loss``: ``(improved, action)`` with action None, ``"drop"`` or ``"stop"``.

        Once ``"stop"`` was returned, every later call returns it again (without recording the loss).
        """
        if self.stopped:
            return False, "stop"
        improved = loss < self.best_loss
        if improved:
            self.best_loss, self.best_epoch, self.since_best, self.on_trial = loss, epoch, 0, False
        else:
            self.since_best += 1
        if self.since_best < (self.drop_patience if self.on_trial else self.patience):
            return improved, None
        if self.drops_left > 0:
            self.drops_left, self.since_best, self.on_trial = self.drops_left - 1, 0, self.drop_patience is not None
            return improved, "drop"
        self.stopped = True
        return improved, "stop"

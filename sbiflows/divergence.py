"""What training does on a non-finite loss: stop with the best weights, or restart once from them.

:func:`~sbiflows.training.train` and the vectorized ensemble training of :mod:`sbiflows.ensemble_training`
follow the same rule (``on_nonfinite``): by default a non-finite loss restores the best weights and stops
with a warning (a :class:`FloatingPointError` before any finite validation loss); with
``"restore_best"`` the first one goes on from the best weights with half the step size.
"""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING

from sbiflows.early_stopping import Plateau

if TYPE_CHECKING:
    from sbiflows.training import TrainingHistory

__all__ = ["NONFINITE_CHOICES", "RESTART_FACTOR", "may_restart", "nonfinite_key", "record_divergence",
           "record_restart"]

#: What ``on_nonfinite`` accepts: ``"stop"`` (restore the best weights and stop) or ``"restore_best"``.
NONFINITE_CHOICES = ("stop", "restore_best")
#: The step size after a restart from the best weights (``on_nonfinite="restore_best"``), as a factor.
RESTART_FACTOR = 0.5


def may_restart(on_nonfinite: str, rule: Plateau, history: TrainingHistory) -> bool:
    """Whether a non-finite loss restarts training from the best weights: with ``"restore_best"``, once a
    call, and only when there are best weights (a finite validation loss was reached)."""
    return on_nonfinite == "restore_best" and not history.restart_epochs and rule.best_epoch >= 0


def nonfinite_key(on_nonfinite: str) -> dict[str, str]:
    """``on_nonfinite`` for a checkpoint's key: nothing for the default, so checkpoints written before the option
    existed still resume.

    Example:
        >>> nonfinite_key("stop"), nonfinite_key("restore_best")
        ({}, {'on_nonfinite': 'restore_best'})
    """
    return {} if on_nonfinite == "stop" else {"on_nonfinite": on_nonfinite}


def record_restart(history: TrainingHistory, rule: Plateau, epoch: int, *, stacklevel: int) -> None:
    """Warn that a non-finite loss at ``epoch`` restarts training from the best weights with half the step, and
    count the epoch in ``history``: its losses are NaN, so epoch numbers still index the lists."""
    warnings.warn(
        f"non-finite loss at epoch {epoch}; training goes on from the best weights (epoch {rule.best_epoch}, "
        f"validation loss {rule.best_loss:.4f}) with half the step size (on_nonfinite='restore_best'; "
        "a second non-finite loss stops training)",
        RuntimeWarning,
        stacklevel=stacklevel + 1,
    )
    history.train_loss.append(math.nan)
    history.validation_loss.append(math.nan)
    history.epochs += 1
    history.restart_epochs.append(epoch)


def record_divergence(history: TrainingHistory, rule: Plateau, epoch: int, *, stacklevel: int) -> None:
    """Mark ``history`` diverged at ``epoch`` and warn that the best weights were restored; raise if there are none.

    Raises:
        FloatingPointError: If no epoch reached a finite validation loss.
    """
    history.diverged = True
    if rule.best_epoch < 0:
        raise FloatingPointError(
            f"non-finite loss at epoch {epoch} before any finite validation loss; try a lower "
            "learning_rate or check the data for extreme values"
        )
    warnings.warn(
        f"training diverged (non-finite loss) at epoch {epoch}; restored the best weights "
        f"(epoch {rule.best_epoch}, validation loss {rule.best_loss:.4f})",
        RuntimeWarning,
        stacklevel=stacklevel + 1,
    )

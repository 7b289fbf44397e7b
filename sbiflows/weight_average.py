"""An exponential moving average of a model's weights, updated in place at every training step.

:func:`~sbiflows.training.train` validates, keeps and returns this average rather than the last Adam
iterate. The update is one ``torch._foreach_lerp_`` per step rather than
:class:`torch.optim.swa_utils.AveragedModel`, whose per-step bookkeeping costs more
(``examples/benchmark_training_step.py``; numbers in docs/benchmarks.md).
"""

from __future__ import annotations

import copy
import math
import numbers

import torch
from torch import nn


class WeightAverage:
    """An exponential moving average of a model's parameters with a time constant of ``steps`` updates.

    The average lives in :attr:`module`, a copy of the model. The first :meth:`update` copies the
    parameters; update ``n`` (counted from 0) then moves the average towards them with the decay
    ``min(1 - 1 / steps, (1 + n) / (10 + n))``: a short window at first, growing to the full time
    constant, so the initial weights fade quickly. Buffers (e.g. batch-norm statistics) are copied
    from the model by :meth:`copy_buffers`, not averaged.

    Example:
        >>> model = nn.Linear(1, 1)
        >>> average = WeightAverage(model, steps=4)
        >>> _ = model.bias.data.fill_(1.0); average.update()
        >>> _ = model.bias.data.fill_(2.0); average.update()   # decay min(0.75, 2 / 11)
        >>> round(average.module.bias.item(), 4)
        1.8182

    Raises:
        TypeError: If ``model`` is not an ``nn.Module`` or ``steps`` is not a real number.
        ValueError: If ``steps`` is not finite and > 0.
    """

    def __init__(self, model: nn.Module, *, steps: float):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self._decay = _decay(steps)
        self.module = copy.deepcopy(model).requires_grad_(False)
        self._model = model
        self._params = list(model.parameters())
        self._averaged = list(self.module.parameters())
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        """Fold the model's current parameters into the average."""
        if self.updates == 0:
            torch._foreach_copy_(self._averaged, self._params)
        else:
            n = self.updates
            torch._foreach_lerp_(self._averaged, self._params, 1.0 - min(self._decay, (1 + n) / (10 + n)))
        self.updates += 1

    def retime(self, steps: float) -> None:
        """Give the average a time constant of ``steps`` updates from now on (e.g. when the steps per epoch change).

        Raises:
            TypeError, ValueError: As the constructor does for ``steps``.

        Example:
            >>> average = WeightAverage(nn.Linear(1, 1), steps=4)
            >>> average.retime(10); average._decay
            0.9
        """
        self._decay = _decay(steps)

    def restart(self) -> None:
        """Start the average afresh: the next :meth:`update` copies the model's parameters."""
        self.updates = 0

    @torch.no_grad()
    def copy_buffers(self) -> None:
        """Give the average the model's current buffers."""
        for mine, theirs in zip(self.module.buffers(), self._model.buffers()):
            mine.copy_(theirs)


def _decay(steps: float) -> float:
    """The per-update decay of an average with a time constant of ``steps`` updates, or the error naming ``steps``."""
    if isinstance(steps, bool) or not isinstance(steps, numbers.Real):
        raise TypeError(f"steps must be a real number finite and > 0, got {type(steps).__name__} {steps!r}")
    if not 0 < steps < math.inf:
        raise ValueError(f"steps must be finite and > 0, got {steps!r}")
    return max(0.0, 1.0 - 1.0 / steps)

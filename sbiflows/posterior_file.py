"""Reading a posterior file back: :func:`load` builds a :class:`~sbiflows.posterior.Posterior` from it.

The file format is :mod:`sbiflows.serialization`'s (which knows nothing of the ``Posterior`` class);
``Posterior.save`` writes it. :func:`load` is importable as ``sbiflows.load`` and
``sbiflows.posterior.load``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.distributions import Distribution

from sbiflows import serialization

if TYPE_CHECKING:
    from sbiflows.posterior import Posterior

__all__ = ["load"]


def load(
    path: str | Path,
    *,
    prior: Distribution | None = None,
    estimator: Any = None,
    embedding_net: torch.nn.Module | None = None,
    map_location: torch.device | str = "cpu",
) -> Posterior:
    """Load a posterior written by :meth:`Posterior.save` (never unpickles: ``torch.load(weights_only=True)``).

    Args:
        path: The file.
        prior: Required if the file holds no prior (saved with ``allow_unsaved_prior=True``); otherwise
            it must be the saved prior (the same class and parameters; another one is a ``ValueError``,
            as the posterior's theta space depends on it).
        estimator: The callable used at training time, required if the posterior was trained with one.
        embedding_net: A module of the architecture used at training time, required if one was used
            (the posterior gets a copy with the saved weights; the module passed stays as it is).
        map_location: Device of the loaded posterior (a file saved on a GPU loads on the CPU by default).

    Raises:
        ValueError: For a file that is not a valid sbiflows posterior of a readable format version
            (a newer one asks to upgrade sbiflows), a digest mismatch, or a missing
            ``prior``/``estimator``/``embedding_net``; see :func:`sbiflows.serialization.read`.

    Example:
        See :func:`sbiflows.serialization.save`.
    """
    from sbiflows.posterior import Posterior  # the class imports this module

    return Posterior(**serialization.read(path, prior=prior, estimator=estimator, embedding_net=embedding_net,
                                          map_location=map_location))

"""Observations far outside the training simulations: the warning a posterior gives, and how to silence it.

A posterior is an extrapolation of the network where an observation's features lie more than
:data:`OUTSIDE_Z` standard deviations from the training simulations' mean; :func:`warn_if_outside`
says so once per call, pointing at the user's code. :func:`observations_unchecked` silences it
within a block (the calibration checks feed simulated x, whose tails may lie that far out).
"""

from __future__ import annotations

import contextlib
import contextvars
import warnings
from collections.abc import Iterator

import torch
from torch import Tensor

from sbiflows.checks import caller_level
from sbiflows.xshape import trial_mask

__all__ = ["OUTSIDE_Z", "observations_unchecked", "warn_if_fewer_trials", "warn_if_outside"]

#: An observation feature more than this many standard deviations from the training simulations' mean
#: counts as far outside them (the posterior there is an extrapolation of the network).
OUTSIDE_Z = 5.0
_CHECK_OBSERVATIONS: contextvars.ContextVar[bool] = contextvars.ContextVar("sbiflows_check_observations", default=True)


@contextlib.contextmanager
def observations_unchecked() -> Iterator[None]:
    """Within the block, posteriors do not warn about observations far outside the training simulations.

    For internal callers (the calibration checks feed simulated x, whose tails may legitimately lie
    beyond 5 standard deviations).

    Example:
        >>> with observations_unchecked():
        ...     pass
    """
    token = _CHECK_OBSERVATIONS.set(False)
    try:
        yield
    finally:
        _CHECK_OBSERVATIONS.reset(token)


def warn_if_outside(xs: Tensor, name: str, *, x_shift: Tensor, x_scale: Tensor) -> None:
    """One warning when features of ``xs`` lie more than :data:`OUTSIDE_Z` sd from the training x.

    ``x_shift`` and ``x_scale`` are the training simulations' z-scoring (a network's ``x_shift`` and
    ``x_scale``). Nothing is checked inside :func:`observations_unchecked`.

    Example:
        >>> shift, scale = torch.zeros(2), torch.ones(2)
        >>> warn_if_outside(torch.tensor([[1.0, -2.0]]), "x", x_shift=shift, x_scale=scale)  # within 5 sd: silent
    """
    if not _CHECK_OBSERVATIONS.get():
        return
    z = ((xs.double() - x_shift) / x_scale).abs().reshape(len(xs), -1)
    far = z > OUTSIDE_Z  # NaN padding is never far
    if not bool(far.any()):
        return
    features = torch.nonzero(far.any(0)).flatten().tolist()
    rows = int(far.any(1).sum())
    shown = ", ".join(f"{j} (|z| {float(z[:, j].max()):.3g})" for j in features[:5])
    warnings.warn(
        f"{rows} of {len(xs)} {name} row(s) lie far outside the training simulations: feature(s) {shown}"
        f"{' and more' if len(features) > 5 else ''} are more than {OUTSIDE_Z:g} standard deviations from "
        "the simulations' mean, so the posterior there is an extrapolation. A misspecified simulator or "
        "wrong units are the usual cause (silence with sbiflows.posterior.observations_unchecked())",
        UserWarning, stacklevel=caller_level(),
    )


def warn_if_fewer_trials(xs: Tensor, name: str, *, fewest: int | None) -> None:
    """One warning when sets ``xs`` ``(B, trials, features)`` (NaN-padded) hold fewer finite trials than ``fewest``,
    the fewest of any training set: the set network never saw so few (trained on full sets only, it is far off).
    Nothing is checked inside :func:`observations_unchecked` or when ``fewest`` is None.

    Example:
        >>> warn_if_fewer_trials(torch.ones(1, 3, 2), "x", fewest=3)  # as few as training had: silent
    """
    if not _CHECK_OBSERVATIONS.get() or fewest is None:
        return
    counts = trial_mask(xs).sum(-1)
    if not bool((counts < fewest).any()):
        return
    warnings.warn(
        f"{int((counts < fewest).sum())} of {len(xs)} {name} set(s) hold {int(counts.min())} trial(s), fewer than "
        f"the {fewest} of every training simulation: the set network never saw so few, so the posterior there is an "
        "extrapolation; train on NaN-padded sets of as few trials to serve them (silence with "
        "sbiflows.posterior.observations_unchecked())",
        UserWarning, stacklevel=caller_level(),
    )

"""The rows NPE trains on: checked, cleaned and grouped before any training starts.

:func:`check_training_data` turns a user's ``(theta, x)`` into tensors, refuses what cannot be right
(shapes, NaN in theta, theta outside the prior's support) and warns about what it drops or keeps (NaN
rows of x; extreme values that would erase a column when z-scored). :func:`duplicate_groups` keeps
identical simulations on one side of the validation split.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.distributions import Distribution

from sbiflows.checks import as_float_tensor, caller_level
from sbiflows.estimator import EXTREME_Z, extreme_rows
from sbiflows.posterior import _x_dtype
from sbiflows.priors import draws_float64
from sbiflows.unconstrained import Unconstrained
from sbiflows.xshape import valid_rows

__all__ = ["MIN_VALID", "TooFewSimulationsError", "check_training_data", "duplicate_groups"]


#: The fewest valid simulations a training takes: one row to train on and one to validate.
MIN_VALID = 2
#: The largest rounding of float64 theta to the flow's dtype, relative to a parameter's spread, that passes without
#: a warning: a parameter of spread 1 at an offset of 1e6 rounds by up to 0.03 in float32.
COARSE = 1e-4


class TooFewSimulationsError(ValueError):
    """Fewer valid simulations (x without NaN or inf) than a training needs: one row to train on and one to
    validate. The simulations themselves are fine to keep: more of them, or a fixed simulator, can train."""


def check_training_data(
    theta: Any,
    x: Any,
    *,
    prior: Distribution,
    theta_dim: int,
    dtype: torch.dtype,
    device: torch.device,
    earlier: tuple[Tensor, Tensor] | None,
    validation_fraction: float,
    padded_trials: bool = False,
) -> tuple[Tensor, Tensor]:
    """New training rows as ``(N, D)`` and ``(N, *x_shape)`` tensors, failed simulations dropped.

    ``x`` may be flat, ``(N, x_dim)`` (``(N,)`` for one dimension), or structured, ``(N, *x_shape)``.
    A failed simulation holds NaN or inf; with ``padded_trials`` (sets ``(N, trials, features)`` for a
    set embedding), all-NaN trials are padding, and only a set with no finite trial, inf, or NaN
    inside a trial is failed (see :func:`sbiflows.xshape.valid_rows`).

    Args:
        theta: Parameters drawn from the prior (a tensor or NumPy array).
        x: Their simulations; float64 stays float64 (it is standardized in that precision).
        prior: The checked prior (event shape ``(D,)``); theta must lie in its support.
        theta_dim: ``D``.
        dtype: The network's dtype (theta's).
        device: Where the rows go.
        earlier: The rows of earlier fits ``(theta, x)``, whose x shape new rows must match; None at first.
        validation_fraction: The split the rows must allow (at least one training row).
        padded_trials: Whether x holds NaN-padded sets.

    Raises:
        TypeError: For data that are not float tensors or arrays.
        ValueError: For wrong shapes, mismatched rows, NaN/inf in theta, theta outside the support, no
            valid simulation, or too few rows for the split. Warnings name dropped and extreme rows.

    Example:
        >>> prior = torch.distributions.Independent(torch.distributions.Uniform(-torch.ones(2), torch.ones(2)), 1)
        >>> theta, x = check_training_data(torch.zeros(10, 2), torch.ones(10, 3), prior=prior, theta_dim=2,
        ...                                dtype=torch.float32, device=torch.device("cpu"), earlier=None,
        ...                                validation_fraction=0.1)
        >>> theta.shape, x.shape
        (torch.Size([10, 2]), torch.Size([10, 3]))
    """
    _warn_coarse(theta, dtype)
    theta = as_float_tensor(theta, "theta", dtype=dtype, device=device, warn_narrowing=lambda: not draws_float64(prior))
    x = as_float_tensor(x, "x", dtype=_x_dtype(x, dtype), device=device)  # float64 stays float64
    if theta.ndim == 1 and theta_dim == 1:
        theta = theta[:, None]
    if theta.ndim != 2 or theta.shape[1] != theta_dim:
        raise ValueError(
            f"theta must have shape (N, {theta_dim}) to match the prior's event shape ({theta_dim},), "
            f"got {tuple(theta.shape)}"
        )
    x = x[:, None] if x.ndim == 1 else x
    if x.ndim < 2 or 0 in x.shape[1:]:
        raise ValueError(f"x must have shape (N, x_dim) or (N, *x_shape) with at least one value per simulation, "
                         f"got {tuple(x.shape)}")
    if earlier is not None and x.shape[1:] != earlier[1].shape[1:]:
        raise ValueError(
            f"x must have shape (N, {', '.join(map(str, earlier[1].shape[1:]))}) like the data of the first fit, "
            f"got {tuple(x.shape)}"
        )
    if padded_trials and x.ndim != 3:
        raise ValueError(
            f"x must have shape (N, trials, features) for a set embedding (NaN-padded trials), got {tuple(x.shape)}"
        )
    if len(theta) != len(x):
        raise ValueError(
            f"got {len(theta)} parameter sets but {len(x)} simulations; theta and x need one row per simulation"
        )
    if len(theta) == 0:
        need = "2 rows (a training and a validation row)" if earlier is None else "1 row"
        raise ValueError(f"theta and x must contain at least {need}, got 0")
    bad_theta = ~torch.isfinite(theta).all(-1)
    if bad_theta.any():
        raise ValueError(f"theta contains NaN or inf in {int(bad_theta.sum())} of {len(theta)} rows")
    outside = ~Unconstrained(prior.support).inside(theta)
    if outside.any():
        row = int(torch.nonzero(outside)[0])
        raise ValueError(
            f"{int(outside.sum())} of {len(theta)} rows of theta (parameter sets) lie outside the prior's "
            f"support ({prior.support}), e.g. row {row}: {theta[row].tolist()}"
        )
    valid = valid_rows(x, padded_trials=padded_trials)
    n_bad = int((~valid).sum())
    what = "NaN or inf" if not padded_trials else "no finite trial, inf, or NaN inside a trial"
    if n_bad == len(x):
        raise TooFewSimulationsError(f"all {len(x)} rows of x (simulations) contain {what}; nothing to train on")
    if n_bad:
        warnings.warn(
            f"excluded {n_bad} of {len(x)} simulations ({n_bad / len(x):.1%}) that contain {what}",
            UserWarning,
            stacklevel=3,
        )
        theta, x = theta[valid], x[valid]
    if padded_trials:  # the trials are the rows whose columns are z-scored
        trials = x.reshape(-1, x.shape[-1])
        finite = torch.isfinite(trials).all(-1)
        extreme_trials, columns, inflation = extreme_rows(trials[finite])
        flagged = torch.zeros(len(trials), dtype=torch.bool, device=x.device)
        flagged[finite] = extreme_trials.to(x.device)
        extreme = flagged.reshape(x.shape[:2]).any(1)
    else:
        extreme, columns, inflation = extreme_rows(x)
    if columns:
        warnings.warn(
            f"{int(extreme.sum())} of {len(x)} simulations have extreme values in x column(s) "
            f"{columns[:10]} (more than {EXTREME_Z:g} robust standard deviations from the median); they "
            f"inflate the standard deviation up to {inflation:.3g}x, so z-scoring squeezes the other rows "
            "together and the column's information is lost. Check those simulations (or transform x, "
            "e.g. with a log); sbiflows keeps them",
            UserWarning, stacklevel=3,
        )
    total = len(theta) + (0 if earlier is None else len(earlier[0]))
    n_val = max(1, int(round(total * validation_fraction)))
    if total - n_val < 1:
        raise TooFewSimulationsError(
            f"need at least 2 valid simulations for a training and a validation split "
            f"(validation_fraction={validation_fraction}), got {total}"
        )
    return theta, x


def duplicate_groups(theta: Tensor, x: Tensor) -> Tensor | None:
    """Labels that keep identical ``(theta, x)`` rows (duplicated simulations) on one side of the
    validation split, or None when every row is unique (scored on copies, the validation loss was 0.05
    where held-out rows gave 0.55)."""
    rows = torch.cat([theta.reshape(len(theta), -1).double(), x.reshape(len(x), -1).double()], dim=1)
    _, groups = torch.unique(rows, dim=0, return_inverse=True)
    return groups if int(groups.max()) + 1 < len(rows) else None


def _warn_coarse(theta: Any, dtype: torch.dtype) -> None:
    """Warn when float64 ``theta`` rounds to ``dtype`` by more than :data:`COARSE` of a parameter's spread (a large
    offset, e.g. a time of 1e6 s known to a second): the flow would learn and return a quantized posterior."""
    values = torch.from_numpy(theta) if isinstance(theta, np.ndarray) else theta
    if not isinstance(values, Tensor) or values.dtype != torch.float64 or dtype == torch.float64 or len(values) < 2:
        return
    values = values.detach().reshape(len(values), -1)
    rounding = (values - values.to(dtype).double()).abs().amax(0)
    spread = values.std(0)
    coarse = torch.nonzero((rounding > COARSE * spread) & (spread > 0)).flatten().tolist()
    if coarse:
        j = coarse[0]
        warnings.warn(
            f"theta's parameter(s) {coarse[:10]} lose precision in the flow's {dtype}: parameter {j} spreads "
            f"{float(spread[j]):.3g} around {float(values[:, j].mean()):.6g} and rounds by up to "
            f"{float(rounding[j]):.3g}, so the posterior would be quantized; call torch.set_default_dtype(torch.float64) before creating NPE, or "
            "train on parameters shifted and scaled to a range near 0 and 1",
            UserWarning, stacklevel=caller_level())

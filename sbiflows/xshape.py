"""The shape of ``x``: which simulations are valid, z-scoring that fits the shape, observations checked against it.

One simulation is ``x_shape``: ``(d,)`` for a flat vector, ``(C, T)`` for a time series with channels,
``(C, H, W)`` or ``(H, W)`` for an image, ``(trials, d)`` for a set of iid trials. What the shape
*means* is the embedding net's choice (an ``(N, T)`` array may be flat or a one-channel series), so
the embedding declares two things, read by :func:`layout` (an ``nn.Module`` of yours may declare them too):

* ``zscore_axes``: axes of ``x_shape`` (negative, counted from the end) pooled when z-scoring.
  None (default, the flat rule): one mean and std per element of ``x_shape``. The CNNs pool over
  time / pixels, so each **channel** gets one mean and std: a convolution sees the same scale at
  every position, and the shape of a curve (its relative amplitudes over time) is kept.
  :class:`~sbiflows.embeddings.PermutationInvariant` pools over the trial axis, so each **trial
  feature** gets one mean and std: trials are exchangeable, and per-position statistics would break
  that (and see fewer rows for the positions that are padding in small sets).
* ``nan_padded_trials``: True for a set embedding that masks out all-NaN trials (axis ``-2``). A
  set with fewer trials is NaN-padded to the largest count: such a padded simulation is **valid**,
  while a simulation whose every trial is NaN (or that holds inf, or NaN inside a trial) is a failed
  simulation, as everywhere else.

Example:
    >>> x = torch.tensor([[[1.0], [3.0]], [[5.0], [float("nan")]]])  # 2 sets of up to 2 trials
    >>> valid_rows(x, padded_trials=True).tolist(), valid_rows(x, padded_trials=False).tolist()
    ([True, True], [True, False])
    >>> mean, std, constant = zscore_shaped(x, axes=(-2,), padded_trials=True)
    >>> mean.shape, float(mean), float(std)
    (torch.Size([1, 1]), 3.0, 2.0)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["check_observations", "layout", "stats_shape", "valid_rows", "zscore", "zscore_shaped"]


@torch.no_grad()
def zscore(data: Tensor) -> tuple[Tensor, Tensor, list[int]]:
    """Column means, stds and the constant columns of ``data`` (N, K); constant columns get std 1.

    A column is constant when all its values are equal or its std is below the absolute floor
    ``1e-14``. The floor is absolute, not relative to the mean, so that signal in small units
    (std ``1e-9``) or on a large offset (mean ``1e8``, std ``50``) is standardized, not discarded. The
    equality test catches constant columns whose float std is not zero (a float32 column of ``1e8``
    has a computed std of about 8); their mean is the constant itself, so they standardize to 0.

    Example:
        >>> mean, std, constant = zscore(torch.tensor([[1.0, 5.0], [3.0, 5.0]]))
        >>> std.tolist(), constant
        ([1.4142135381698608, 1.0], [1])
    """
    mean = data.mean(0)
    std = data.std(0) if len(data) > 1 else torch.zeros_like(mean)
    equal = (data == data[:1]).all(0)
    if len(data):
        mean = torch.where(equal, data[0], mean)
    constant = equal | ~(std >= 1e-14)  # ~(>=) also flags a NaN std
    return mean, torch.where(constant, torch.ones_like(std), std), torch.nonzero(constant).flatten().tolist()


def layout(embedding: nn.Module | None, x_shape: Sequence[int]) -> tuple[tuple[int, ...], bool]:
    """``(zscore_axes, nan_padded_trials)`` of an embedding for simulations of shape ``x_shape``.

    Raises:
        ValueError: If the axes do not exist in ``x_shape``, or a set embedding gets ``x_shape`` that
            is not ``(trials, features)``.

    Example:
        >>> layout(None, (5,))
        ((), False)
    """
    axes = getattr(embedding, "zscore_axes", None) or ()
    padded = bool(getattr(embedding, "nan_padded_trials", False))
    ndim = len(x_shape)
    if any(not -ndim <= a < 0 for a in axes):
        raise ValueError(
            f"the embedding pools z-scoring over axes {tuple(axes)}, which x of shape {tuple(x_shape)} (one "
            f"simulation) does not have; expected negative axes from -{ndim} to -1"
        )
    if padded and ndim != 2:
        raise ValueError(
            f"a set embedding ({type(embedding).__name__}) needs each simulation of shape (trials, features); "
            f"got x_shape {tuple(x_shape)}"
        )
    return tuple(sorted(int(a) for a in axes)), padded


def stats_shape(x_shape: Sequence[int], axes: Sequence[int]) -> tuple[int, ...]:
    """The shape of the z-score statistics: ``x_shape`` with the pooled axes set to 1.

    Example:
        >>> stats_shape((3, 100), (-1,))
        (3, 1)
    """
    ndim = len(x_shape)
    return tuple(1 if i - ndim in axes else size for i, size in enumerate(x_shape))


def valid_rows(x: Tensor, *, padded_trials: bool = False) -> Tensor:
    """Boolean ``(N,)``: simulations ``x`` ``(N, *x_shape)`` that are not failed (see the module docstring).

    Without padding, a row is valid when all its values are finite. With ``padded_trials`` (x of shape
    ``(N, trials, features)``), a row is valid when it holds no inf, every NaN belongs to an all-NaN
    (padding) trial, and at least one trial is finite.
    """
    if not padded_trials:
        return torch.isfinite(x.reshape(len(x), -1)).all(-1)
    trial_nan = torch.isnan(x).all(-1)  # (N, trials): padding
    trial_ok = torch.isfinite(x).all(-1)
    return (trial_ok | trial_nan).all(-1) & trial_ok.any(-1)


def trial_mask(x: Tensor) -> Tensor:
    """``(..., trials)``: the finite trials of sets ``x`` ``(..., trials, features)`` (padding is all NaN)."""
    return torch.isfinite(x).all(-1)


@torch.no_grad()
def zscore_shaped(
    x: Tensor, *, axes: Sequence[int] = (), padded_trials: bool = False
) -> tuple[Tensor, Tensor, list[int]]:
    """Means, stds and constant entries of the z-score statistics of valid simulations ``x`` ``(N, *x_shape)``.

    The statistics have :func:`stats_shape` (pooled over ``N`` and ``axes``); padding trials are left
    out. With no pooled axes and no padding this is :func:`~sbiflows.estimator.zscore` of the
    flattened rows (flat ``x`` is standardized exactly as before). ``constant`` lists flat indices
    into the statistics (see ``zscore`` for the rule).
    """
    x_shape = tuple(x.shape[1:])
    shape = stats_shape(x_shape, axes)
    ndim = len(x_shape)
    kept = [i + 1 for i in range(ndim) if i - ndim not in axes]
    pooled = [i + 1 for i in range(ndim) if i - ndim in axes]
    rows = x.permute(0, *pooled, *kept).reshape(-1, math.prod(shape))
    if padded_trials:
        rows = rows[torch.isfinite(rows).all(-1)]
        if len(rows) < 2:  # statistics per trial position, and (nearly) every set has a padding trial
            raise ValueError(
                f"x's z-score statistics are kept per trial position (the embedding's zscore_axes {tuple(axes)} "
                f"do not pool the trials, axis -2), and only {len(rows)} of the simulations have no padding trial "
                "to compute them from; give the embedding zscore_axes = (-2,) so that the statistics are per "
                "trial feature, pooled over the finite trials")
    mean, std, constant = zscore(rows)
    return mean.reshape(shape), std.reshape(shape), constant


def check_observations(
    xs: Tensor, x_shape: Sequence[int], name: str, *, padded_trials: bool = False, single: bool = False
) -> Tensor:
    """Observations as ``(B, *x_shape)``: ``(*x_shape)`` is one, ``(B, *x_shape)`` a batch.

    With ``padded_trials``, sets of fewer trials than ``x_shape[0]`` are NaN-padded to it. With
    ``single``, exactly one observation is accepted (``(*x_shape)`` or ``(1, *x_shape)``).

    Raises:
        ValueError: For a shape that fits neither, naming the expected and received shapes; for a set
            with more trials than the training sets; with ``single``, for a batch of several.

    Example:
        >>> check_observations(torch.zeros(3, 2), (5, 2), "x", padded_trials=True, single=True).shape
        torch.Size([1, 5, 2])
    """
    x_shape = tuple(x_shape)
    shape = tuple(xs.shape)
    dims = ", ".join(map(str, x_shape))
    if xs.numel() == 0:
        raise ValueError(f"{name} must hold at least one observation of shape {x_shape}, got shape {shape}")
    if single:
        expected = f"{x_shape} or (1, {dims}) like the training simulations"
    else:
        expected = f"(B, {dims}) (observations of the training x's shape {x_shape}) or {x_shape} for one"
    if x_shape == (1,) and len(shape) < 2:  # scalar simulations: () is one, (B,) B of them, as fit takes x (N,)
        xs = xs.reshape(-1, 1)
    elif len(shape) == len(x_shape):
        xs = xs[None]
    elif len(shape) != len(x_shape) + 1:
        raise ValueError(f"{name} must have shape {expected}, got {shape}")
    if padded_trials and xs.shape[2:] == x_shape[1:] and xs.shape[1] != x_shape[0]:
        if xs.shape[1] > x_shape[0]:
            raise ValueError(
                f"{name} holds sets of {xs.shape[1]} trials, more than the {x_shape[0]} of the training "
                f"simulations (x_shape {x_shape}); the network never saw that many: train on sets that large "
                f"or pass at most {x_shape[0]} trials"
            )
        pad = xs.new_full((len(xs), x_shape[0] - xs.shape[1], *x_shape[1:]), float("nan"))
        xs = torch.cat([xs, pad], 1)
    if tuple(xs.shape[1:]) != x_shape:
        raise ValueError(f"{name} must have shape {expected}, got {shape}")
    if single and len(xs) != 1:
        raise ValueError(
            f"{name} has shape {shape}: a batch of {len(xs)} observations; sample() and log_prob() take one "
            f"observation of shape {x_shape} or (1, {dims}); use sample_batched() or log_prob_batched() "
            "for many"
        )
    return xs

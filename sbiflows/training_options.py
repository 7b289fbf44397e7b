"""The options of :func:`~sbiflows.training.train`: their checks, NPE's defaults and the validation split.

:func:`check_training_options` validates the options once, before any expensive step;
:data:`MAX_EPOCHS`, :func:`default_batch_size` and :func:`default_learning_rate` are the defaults
``NPE.fit`` and the command line use; :func:`split_sizes` and the group-aware ordering decide which
rows train and which validate.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Collection, Mapping
from typing import Any

import torch
from torch import Tensor

from sbiflows.checks import check_int

#: The default cap on training epochs everywhere (``train``, ``NPE.fit``, ``sbiflows fit --max-epochs``);
#: early stopping usually ends training long before it.
MAX_EPOCHS = 1000


def check_training_options(
    *,
    max_epochs: int,
    batch_size: int,
    learning_rate: float,
    validation_fraction: float,
    patience: int,
    clip_grad_norm: float,
    weight_decay: float = 0.0,
    ema_epochs: float = 0.0,
    step_drops: int = 0,
    step_drop_factor: float = 0.2,
    drop_patience: int | None = None,
    drop_batch_factor: float = 1.0,
    optional: Collection[str] = (),
) -> tuple[int, int | None, int]:
    """Validate the options of :func:`~sbiflows.training.train` (see there for their meaning and ranges).

    Args:
        optional: Names of options that may also be None (a caller's "use the default rule"); their
            error messages then say so. None values are returned / accepted unchanged.

    Returns:
        ``(max_epochs, batch_size, patience)`` as Python ints (numpy integers are accepted;
        ``batch_size`` is None if it is optional and None).

    Raises:
        TypeError: If an integer option is not an integer or a real option is not a real number.
        ValueError: If an option is out of range; the message names it, its range and the value.

    Example:
        >>> check_training_options(max_epochs=10, batch_size=64, learning_rate=1e-3,
        ...                        validation_fraction=0.1, patience=5, clip_grad_norm=5.0)
        (10, 64, 5)
    """
    def expected(name: str, text: str) -> str:
        return f"None (the default rule) or {text}" if name in optional else text

    check_int(step_drops, "step_drops", minimum=0)
    check_int(drop_patience, "drop_patience", minimum=1, optional="patience")
    ints = {"max_epochs": max_epochs, "batch_size": batch_size, "patience": patience}
    for name, value in ints.items():
        if value is None and name in optional:
            continue
        ints[name] = check_int(value, name, minimum=1, optional="the default rule" if name in optional else False)
    reals = {
        "learning_rate": (learning_rate, "finite and > 0", lambda v: 0 < v < math.inf),
        "clip_grad_norm": (clip_grad_norm, "> 0", lambda v: v > 0),
        "validation_fraction": (validation_fraction, "in (0, 1)", lambda v: 0 < v < 1),
        "weight_decay": (weight_decay, "finite and >= 0", lambda v: 0 <= v < math.inf),
        "ema_epochs": (ema_epochs, "finite and >= 0", lambda v: 0 <= v < math.inf),
        "step_drop_factor": (step_drop_factor, "in (0, 1)", lambda v: 0 < v < 1),
        "drop_batch_factor": (drop_batch_factor, "finite and >= 1", lambda v: 1 <= v < math.inf),
    }
    for name, (value, condition, ok) in reals.items():
        if value is None and name in optional:
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            what = expected(name, f"a real number {condition}")
            raise TypeError(f"{name} must be {what}, got {type(value).__name__} {value!r}")
        if not ok(float(value)):
            raise ValueError(f"{name} must be {expected(name, condition)}, got {value!r}")
    return ints["max_epochs"], ints["batch_size"], ints["patience"]


def _grouped_order(groups: Tensor, generator: torch.Generator, n_train: int) -> tuple[Tensor, int]:
    """``(row order, training rows)`` with whole groups on each side (groups in random order).

    The cut moves from ``n_train`` to the nearest group boundary that leaves rows on both sides.
    """
    _, group = torch.unique(groups, return_inverse=True)
    num = int(group.max()) + 1
    rank = torch.empty(num, dtype=torch.long)
    rank[torch.randperm(num, generator=generator)] = torch.arange(num)
    order = torch.argsort(rank[group], stable=True)  # rows of one group together, groups shuffled
    sorted_groups = group[order]
    starts = torch.nonzero(sorted_groups[1:] != sorted_groups[:-1]).flatten() + 1  # first row of each group
    if len(starts) == 0:  # one group: nothing to keep apart
        return torch.randperm(len(order), generator=generator), n_train
    return order, int(starts[torch.argmin((starts - n_train).abs())])


def split_order(n: int, validation_fraction: float, generator: torch.Generator,
                groups: Tensor | None = None) -> tuple[Tensor, int]:
    """``(row order, training rows)`` of :func:`~sbiflows.training.train`'s random split: the first
    ``n_train`` rows of the order train, the rest validate (whole groups on each side)."""
    n_train, n_val = split_sizes(n, validation_fraction)
    if n_train < 1 or n_val < 1:
        raise ValueError(f"need at least 2 rows for a training and a validation split, got {n}")
    perm = torch.randperm(n, generator=generator)
    if groups is not None:
        perm, n_train = _grouped_order(_check_groups(groups, n), generator, n_train)
    return perm, n_train


def training_split(
    n: int, validation_fraction: float, *, seed: int, groups: Tensor | None = None,
    validation: Tensor | None = None, device: torch.device | str = "cpu",
) -> tuple[torch.Generator, Tensor, Tensor]:
    """``(generator, training rows, validation rows)`` of :func:`~sbiflows.training.train` with ``seed``.

    Without ``validation`` the split is :func:`split_order`'s, drawn from ``generator``, which then
    goes on to draw the minibatch orders; with it (a checked boolean mask, True: validate) the split
    is the mask's. The row indices are on ``device``.

    Example:
        >>> generator, train_rows, val_rows = training_split(10, 0.2, seed=0)
        >>> len(train_rows), len(val_rows), sorted(train_rows.tolist() + val_rows.tolist()) == list(range(10))
        (8, 2, True)
    """
    generator = torch.Generator().manual_seed(seed)
    if validation is None:
        perm, n_train = split_order(n, validation_fraction, generator, groups)
    else:  # the caller's split
        validation = check_validation(validation, n)
        perm = torch.cat([torch.nonzero(~validation).flatten(), torch.nonzero(validation).flatten()])
        n_train = int((~validation).sum())
    perm = perm.to(device)
    return generator, perm[:n_train], perm[n_train:]


def validation_mask(n: int, validation_fraction: float, *, seed: int, groups: Tensor | None = None) -> Tensor:
    """The ``(n,)`` boolean mask of the rows ``train(..., seed=seed, groups=groups)`` holds out.

    Example:
        >>> mask = validation_mask(1000, 0.1, seed=0)
        >>> mask.dtype, int(mask.sum())
        (torch.bool, 100)
    """
    perm, n_train = split_order(n, validation_fraction, torch.Generator().manual_seed(seed), groups)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[perm[n_train:]] = True
    return mask


def extend_validation_mask(
    mask: Tensor, new_rows: int, validation_fraction: float, *, seed: int, groups: Tensor | None = None,
) -> Tensor:
    """The mask of ``mask``'s rows followed by ``new_rows`` appended rows: earlier rows keep their side,
    a random ``validation_fraction`` of the new rows validates.

    Refitting on more data this way never scores the model on rows it was trained on before. With
    ``groups`` (labels of all rows, e.g. duplicated simulations), each group takes the side of its
    first row, so a new copy of an earlier row joins that row's side (and copies that an earlier mask
    put on both sides are moved to their first row's side).

    Example:
        >>> old = validation_mask(100, 0.1, seed=0)
        >>> new = extend_validation_mask(old, 50, 0.1, seed=1)
        >>> bool((new[:100] == old).all()), int(new[100:].sum())
        (True, 5)
    """
    generator = torch.Generator().manual_seed(seed)
    appended = torch.zeros(new_rows, dtype=torch.bool)
    appended[torch.randperm(new_rows, generator=generator)[:round(new_rows * validation_fraction)]] = True
    mask = torch.cat([mask.detach().cpu().bool(), appended])
    if groups is not None:
        _, group = torch.unique(_check_groups(groups, len(mask)), return_inverse=True)
        first = torch.full((int(group.max()) + 1,), len(mask), dtype=torch.long)
        first = first.scatter_reduce(0, group, torch.arange(len(mask)), reduce="amin")
        mask = mask[first[group]]
    return mask


def fit_validation(
    earlier: list[Tensor] | None, n: int, validation_fraction: float, *, seeds: list[int], groups: Tensor | None,
) -> tuple[list[Tensor], list[Tensor | None]]:
    """``NPE.fit``'s split of ``n`` rows per ensemble member (one training seed each): ``(masks to keep,
    masks to pass to train)``.

    A first fit (``earlier`` None) lets ``train`` draw its own split (passing None, so the result is
    that of a plain ``train``) and records it; a refit extends each member's earlier mask by the new
    rows (:func:`extend_validation_mask`).
    """
    if earlier is None:
        masks = [validation_mask(n, validation_fraction, seed=seed, groups=groups) for seed in seeds]
        return masks, [None] * len(seeds)
    masks = [extend_validation_mask(mask, n - len(mask), validation_fraction, seed=seed, groups=groups)
             for mask, seed in zip(earlier, seeds)]
    return masks, masks


def check_validation(validation: Tensor, n: int) -> Tensor:
    """``validation`` as a CPU boolean mask of ``n`` rows with rows on both sides, or a ``ValueError``."""
    if not isinstance(validation, Tensor) or validation.dtype != torch.bool or validation.shape != (n,):
        shown = (f"{validation.dtype} of shape {tuple(validation.shape)}" if isinstance(validation, Tensor)
                 else type(validation).__name__)
        raise ValueError(f"validation must be a boolean tensor of shape ({n},) (True: a validation row), got {shown}")
    held_out = int(validation.sum())
    if held_out == 0 or held_out == n:
        raise ValueError(f"validation must leave rows on both sides of the split, got {held_out} of {n} "
                         "rows marked for validation")
    return validation.cpu()


def _check_groups(groups: Tensor, n: int) -> Tensor:
    if not isinstance(groups, Tensor) or groups.shape != (n,) or groups.is_floating_point():
        shown = tuple(groups.shape) if isinstance(groups, Tensor) else type(groups).__name__
        raise ValueError(f"groups must be an integer tensor of shape ({n},), got {shown}")
    return groups.cpu()


def split_sizes(n: int, validation_fraction: float) -> tuple[int, int]:
    """Rows ``(n_train, n_val)`` of the split :func:`~sbiflows.training.train` makes: at least one validation row.

    Example:
        >>> split_sizes(1000, 0.1)
        (900, 100)
    """
    n_val = max(1, round(n * validation_fraction))
    return n - n_val, n_val


def default_batch_size(n_train: int) -> int:
    """NPE's default minibatch size for ``n_train`` training rows: ``2 * sqrt(n_train)``, within [32, 256].

    Small simulation budgets need many gradient steps per epoch: with a fixed batch, an epoch of 900
    rows is only a few steps, and early stopping (counted in epochs) ends training before the flow
    has converged. Large budgets gain nothing from small batches but pay for more steps. The square
    root trades the two off (measured in docs/benchmarks.md: about 60 rows for 1,000 simulations,
    about 190 for 10,000, 256 from about 16,000 training rows on).

    Example:
        >>> default_batch_size(900), default_batch_size(9000), default_batch_size(100_000)
        (60, 190, 256)
    """
    return min(256, max(32, round(2 * math.sqrt(n_train))))


def default_learning_rate(batch_size: int) -> float:
    """NPE's default Adam step size: ``2e-3`` for the batches of :func:`default_batch_size` (32 to 256 rows).

    Measured by held-out posterior log-density against the earlier rule (``1e-3``, scaled up linearly
    above 128 rows), 3-6 seeds per setting (docs/benchmarks.md, "Step size"): at ``2e-3`` two_moons fits
    better at 1,000 and 10,000 simulations, slcp equally well, gaussian_linear slightly worse (0.01-0.02
    nats), and training takes 0.7-0.9x the time on five of the six settings, because early stopping
    comes sooner. The argument is kept so that a rule that depends on the batch size can replace this one.

    Example:
        >>> default_learning_rate(60), default_learning_rate(190)
        (0.002, 0.002)
    """
    del batch_size  # the measured optimum did not depend on it within the default range
    return 2e-3


def check_batch_fits(batch_size: int | None, *, n_train: int, rows: int, validation_fraction: float) -> None:
    """Refuse a ``batch_size`` larger than the ``n_train`` rows that train (of ``rows``) after the validation split.

    NPE does not lower such a batch silently: the caller asked for a step on more rows than exist, which
    usually means the wrong number in the wrong place. None (the default rule) always fits. The options
    are assumed checked (:func:`check_training_options`).

    Example:
        >>> check_batch_fits(256, n_train=900, rows=1000, validation_fraction=0.1)
        >>> check_batch_fits(256, n_train=180, rows=200, validation_fraction=0.1)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: batch_size must be at most the 180 training rows left of 200 rows after the validation split ...
    """
    if batch_size is not None and batch_size > n_train:
        raise ValueError(f"batch_size must be at most the {n_train} training rows left of {rows} rows after the "
                         f"validation split (validation_fraction={validation_fraction}), got {batch_size}; pass a "
                         "smaller batch_size, or None for the default rule")


def batch_options(n_train: int, batch_size: int | None, learning_rate: float | None) -> tuple[int, float]:
    """``(batch_size, learning_rate)`` NPE trains ``n_train`` rows with: the defaults where an option is None.

    The options are assumed checked (:func:`check_training_options`, :func:`check_batch_fits`).

    Example:
        >>> batch_options(900, None, None), batch_options(100, 64, 1e-3)
        ((60, 0.002), (64, 0.001))
    """
    batch_size = default_batch_size(n_train) if batch_size is None else batch_size
    return batch_size, default_learning_rate(batch_size) if learning_rate is None else learning_rate


def check_fit_options(options: Mapping[str, Any], fit: Callable, *, set_by_caller: Collection[str] = (),
                      rows: int | None = None) -> None:
    """Keyword options meant for ``fit`` (:meth:`sbiflows.NPE.fit`), checked before anything runs: unknown
    names (TypeError), the values :func:`check_training_options` checks (ValueError / TypeError), the flags
    and choices ``fit`` checks itself (``compile``, ``retrain_from_scratch``, ``on_nonfinite``,
    ``num_threads``) and, given the fewest ``rows`` a fit will see, that ``batch_size`` fits them
    (:func:`check_batch_fits`).

    Example:
        >>> from sbiflows import NPE
        >>> check_fit_options({"max_epochs": 5}, NPE.fit)
        >>> check_fit_options({"max_epoch": 5}, NPE.fit)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        TypeError: fit_options has unknown keys ['max_epoch']; NPE.fit takes ...
    """
    import inspect

    parameters = inspect.signature(fit).parameters
    allowed = [name for name, p in parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY
               and name not in set_by_caller]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(f"fit_options has unknown keys {unknown}; NPE.fit takes {allowed}")
    values = {name: parameters[name].default for name in allowed} | dict(options)
    checked = [name for name in inspect.signature(check_training_options).parameters if name != "optional"]
    check_training_options(**{name: values[name] for name in checked if name in values},
                           optional=("batch_size", "learning_rate"))
    from sbiflows.checks import check_bool, check_choice
    from sbiflows.divergence import NONFINITE_CHOICES
    from sbiflows.threads import resolve_threads

    for flag in ("compile", "retrain_from_scratch"):
        if flag in options:
            check_bool(options[flag], flag)
    if "on_nonfinite" in options:
        check_choice(options["on_nonfinite"], "on_nonfinite", NONFINITE_CHOICES)
    if "num_threads" in options:
        resolve_threads(options["num_threads"])
    if rows is not None:
        fraction = values["validation_fraction"]
        check_batch_fits(values.get("batch_size"), n_train=split_sizes(rows, fraction)[0], rows=rows,
                         validation_fraction=fraction)


def batch_after_drops(batch_size: int, drops: int, *, factor: float, rows: int) -> int:
    """The minibatch size after ``drops`` step drops that each multiply it by ``factor`` (``drop_batch_factor``),
    rounded at each drop and capped at the ``rows`` that train.

    Example:
        >>> [batch_after_drops(60, k, factor=2.5, rows=900) for k in range(4)]
        [60, 150, 375, 900]
        >>> batch_after_drops(60, 1, factor=1e308, rows=900)  # capped before rounding: no overflow
        900
    """
    for _ in range(drops):
        batch_size = round(min(rows, batch_size * factor))
    return batch_size

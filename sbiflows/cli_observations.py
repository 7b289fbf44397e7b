"""The observations of ``sbiflows fit``: reading ``--observation`` files, ``--observations`` indices, checks.

A file (``.csv``, ``.txt`` or ``.npy``) holds one observation or a batch of them;
:func:`_split_observations` cuts it into observations of the simulator's x shape (probed from one
simulation by :func:`_probe_x_shape` when the simulator is the user's), and
:func:`_check_observations` refuses NaN, inf or a wrong shape before anything is simulated.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from sbiflows.pipeline_job import Observation


def _parse_indices(text: str) -> list[int]:
    indices: list[int] = []
    try:
        for part in text.split(","):
            lo, dash, hi = part.partition("-")
            first, last = int(lo), int(hi if dash else lo)  # '1-' is no range
            if last < first:
                empty = part
                break
            indices.extend(range(first, last + 1))
        else:
            empty = None
    except ValueError:
        raise ValueError(f"--observations must look like '1-10' or '1,4', got {text!r}") from None
    if empty is not None:
        lo, _, hi = empty.partition("-")
        raise ValueError(f"--observations: the range {empty!r} is empty (write it as '{hi.strip()}-{lo.strip()}')")
    bad = [i for i in indices if not 1 <= i <= 10]
    if bad or not indices:
        raise ValueError(f"--observations must lie in 1..10, got {text!r}")
    return list(dict.fromkeys(indices))  # each once ('1,1' or '1-3,2'), in the order given


def _check_observations(
    observations: list[Observation], x_shape: tuple[int, ...] | None, *, padded_trials: bool = False
) -> None:
    """Every observation finite (up to NaN-padded trials for a set embedding) and of the simulator's x shape
    (None: not known)."""
    _check_finite_observations(observations, padded_trials=padded_trials)
    for observation in observations:
        name, x = observation.name, observation.x
        if x_shape is not None and len(x_shape) == 1 and x.numel() != x_shape[0]:
            raise ValueError(f"observation {name!r} has {x.numel()} values, but the simulator's x has {x_shape[0]}")
        if x_shape is not None and tuple(x.shape) != tuple(x_shape) and len(x_shape) > 1:
            raise ValueError(
                f"observation {name!r} has shape {tuple(x.shape)} ({x.numel()} values), but the simulator's x has "
                f"shape {tuple(x_shape)}"
            )


def _check_finite_observations(observations: list[Observation], *, padded_trials: bool = False) -> None:
    """Every observation finite, up to NaN-padded trials for a set embedding."""
    from sbiflows.xshape import valid_rows

    for observation in observations:
        x = observation.x
        if not valid_rows(x[None], padded_trials=padded_trials and x.ndim == 2).all():
            raise ValueError(f"observation {observation.name!r} contains NaN or inf: {x.reshape(-1).tolist()}")


#: Parameter draws :func:`_probe_x_shape` tries, one after another, until one simulates.
PROBES = 3
#: What the command line says where the engine's message suggests ``vectorized=False``.
PER_ROW_HINT = "; a simulator that takes one parameter set theta of shape (theta_dim,) at a time needs --per-row"


def _stored_x_shape(simulator, args: argparse.Namespace, *, out: Path) -> tuple[int, ...] | None:
    """The x shape in ``out``'s simulations, stored by an earlier run of this simulator and seed (None if
    there are none): a resumed run pays for no probe."""
    from sbiflows.engine.store import SimulationStore
    from sbiflows.engine.names import same_simulator, simulator_name

    try:
        stored = SimulationStore.read(out / "simulations.zarr")
        same = same_simulator(stored.config.get("simulator"), simulator_name(simulator))
        if same and stored.config.get("seed") == args.seed:
            return None if stored.x_layout is None else stored.x_layout[0]
    except (OSError, ValueError, KeyError):  # no store, or not one sbiflows can read
        pass
    return None


def _probe_x_shape(simulator, prior, args: argparse.Namespace) -> tuple[int, ...] | None:
    """The shape of one of the simulator's x, from the first of up to :data:`PROBES` seeded simulations that
    succeeds (None if all fail)."""
    from sbiflows.priors import sample_seeded
    from sbiflows.seeding import derive_seed
    from sbiflows.simulate import SimulationError, simulate
    from sbiflows.xshape import valid_rows

    thetas = sample_seeded(prior, (PROBES,), derive_seed(args.seed, "probe")).reshape(PROBES, -1)
    x, batch_hint = None, False
    for k in range(PROBES):  # one at a time: usually the first is the only simulation paid for
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a failed probe only skips the check; the run reports failures
            try:
                stream = "probe" if k == 0 else f"probe/{k}"
                probe = simulate(simulator, thetas[k:k + 1], seed=derive_seed(args.seed, stream),
                                 timeout=args.timeout, vectorized=not args.per_row, progress=False)
            except SimulationError as error:  # the probe's one row failed: the run counts its own failures
                batch_hint = batch_hint or "vectorized=False" in str(error)
                continue
        # a set's trials may be NaN-padded: such an x is valid where each trial is all finite or all NaN
        if probe.x is not None and probe.x.numel() > 0 and valid_rows(probe.x, padded_trials=probe.x.ndim == 3).all():
            x = probe.x
            break
    if x is None:
        print(f"sbiflows fit: note: {PROBES} probe simulations failed, so the observation's shape is checked "
              "after simulating" + (PER_ROW_HINT if batch_hint else ""), file=sys.stderr)
        return None
    return tuple(x.shape[1:]) if x.ndim > 1 else (1,)


def _split_observations(
    data: torch.Tensor, x_shape: tuple[int, ...] | None, path: Path, *, padded_trials: bool = False
) -> list[torch.Tensor]:
    """The observations in a file's array: ``x_shape`` is one, ``(B, *x_shape)`` is B; a table's rows are
    reshaped to ``x_shape`` when they hold its number of values (unknown shape: one observation per row).
    For a set embedding (``padded_trials``), sets of fewer trials are NaN-padded to ``x_shape``."""
    if padded_trials and x_shape is not None and len(x_shape) == 2 and data.ndim in (2, 3) \
            and data.shape[-1] == x_shape[1]:
        from sbiflows.xshape import check_observations

        return list(check_observations(data, x_shape, f"--observation {str(path)!r}", padded_trials=True))
    if x_shape is None or len(x_shape) == 1:
        return list(data.reshape(1, -1) if data.ndim <= 1 else data.reshape(len(data), -1))
    x_shape = tuple(x_shape)
    if tuple(data.shape) == x_shape:
        return [data]
    if tuple(data.shape[1:]) == x_shape:
        return list(data)
    if data.ndim == 2 and data.shape[1] == int(np.prod(x_shape)):
        return list(data.reshape(len(data), *x_shape))
    raise ValueError(
        f"--observation {str(path)!r} holds an array of shape {tuple(data.shape)}; the simulator's x has shape "
        f"{x_shape}: give {x_shape} (one observation), (B, {', '.join(map(str, x_shape))}) or a table of "
        f"{int(np.prod(x_shape))} values per row"
    )


_FORMATS = (".csv", ".txt", ".npy")


def _read_observations(path: Path) -> torch.Tensor:
    suffix = path.suffix.lower()  # OBS.CSV is a .csv
    if suffix not in _FORMATS:
        raise ValueError(f"--observation {str(path)!r}: unsupported file type {path.suffix or '(none)'!r}; "
                         f"use one of {', '.join(_FORMATS)} (one observation per row)")
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise ValueError(f"--observation file {str(path)!r} {what}")
    if suffix == ".csv":
        first = path.read_text(encoding="utf-8-sig").splitlines()[:1]
        if first and ";" in first[0] and "," not in first[0]:
            raise ValueError(f"--observation {str(path)!r} separates its values with ';'; a .csv takes "
                             "comma-separated values (or save the table as .txt, values separated by spaces)")
    header = 0
    try:
        if suffix == ".npy":
            data = np.load(path, allow_pickle=False)
        else:
            header = _header(path)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "input contained no data": said below, with the reason
                data = np.loadtxt(path, delimiter="," if suffix == ".csv" else None, ndmin=2, skiprows=header,
                                  encoding="utf-8-sig")  # a spreadsheet's UTF-8 export starts with a byte-order mark
        numbers = np.asarray(data, dtype=np.float32)  # a .npy keeps its shape (structured x); a table is 2-D
    except (ValueError, TypeError) as error:  # also a .npy of strings or objects
        raise ValueError(f"--observation {str(path)!r} is not a numeric table: {error}") from None
    if data.size == 0:
        read = "its only line was read as a header (a row that is not all numbers)" if header else "it is empty"
        separator = "comma-separated values" if suffix == ".csv" else "values separated by spaces"
        raise ValueError(f"--observation {str(path)!r} holds no observation: {read}; give one observation per "
                         f"row as {separator}")
    return torch.from_numpy(numbers if suffix == ".npy" else np.atleast_2d(numbers))


#: Values that mark a missing number in a table (compared in lower case): a first row holding only numbers and these
#: is data (refused if a value is missing), not a header.
MISSING = ("na", "n/a", "nan", "null", "none", "-", "?", "")


def _header(path: Path) -> int:
    """1 if the first line is a header (a value in it is a name: ``theta1,theta2``, ``t,0.1,0.5``), else 0: a first
    row of numbers and missing-value marks (``0.3,NA``) is data, refused as such."""
    first = path.read_text(encoding="utf-8-sig").splitlines()[:1]
    if not first:
        return 0
    values = [v.strip() for v in first[0].split(",")] if "," in first[0] else first[0].split()
    return int(any(not _number(v) and v.lower() not in MISSING for v in values))


def _number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False

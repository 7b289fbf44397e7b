"""The on-disk simulation store: a zarr group that a run writes chunk by chunk and a rerun resumes.

Layout of ``<path>`` (a zarr v3 group, readable by ``zarr.open_group`` and ``dask.array.from_zarr``)::

    zarr.json           group attributes: format version and the run's configuration (seed, batch
                        size, simulator, per-row or batched) plus x's shape and dtype once known
    theta/, x/          arrays of (rows, theta_dim) and (rows, *x_shape); one zarr chunk per
                        simulation chunk, so a finished chunk is one file per array
    records/<c>.json    one per finished chunk, written last and atomically (write, then rename):
                        its rows, seed, SHA-256 digests of its theta and x bytes, failures, seconds
    .lock               held (``flock``) by the one process writing the store

A chunk counts as finished only when its record exists and both digests match the bytes on disk; a
chunk killed mid-write has no record, and a corrupted one fails its digest: either is simulated again.
Only the driver process writes (workers send results back), and the lock keeps a second driver out,
so no orphaned process can write into a store that a resumed run is using.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import numpy as np

from sbiflows.engine.names import same_simulator
from sbiflows.locks import LockHeld, hold_lock

__all__ = ["SimulationStore", "StoreMismatchError"]

FORMAT = 1


class StoreMismatchError(ValueError):
    """The store was made by a different run (seed, batch size, simulator, prior, x shape or dtype)."""


def digest(array: np.ndarray) -> str:
    """SHA-256 of an array's bytes (C order)."""
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


class SimulationStore:
    """A store at ``path``; use :meth:`open` (a run) or :meth:`read` (loading)."""

    def __init__(self, path: str | os.PathLike, group, *, lock_file=None):
        self.path = Path(path)
        self._group = group
        self._lock_file = lock_file

    # ------------------------------------------------------------------------------- opening
    @classmethod
    def open(cls, path: str | os.PathLike, config: dict, *, rows: int, theta_dim: int,
             theta_dtype: np.dtype) -> SimulationStore:
        """Open (or create) the store for a run with ``config`` and lock it. A new store has room for ``rows``; an
        existing one grows to them when the run has verified that its stored rows are this run's (:meth:`grow`), so
        that a refused run leaves the store as it was.

        Raises:
            StoreMismatchError: If the store holds another run.
            RuntimeError: If another process is writing it.
        """
        import zarr

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        lock_file = _lock(path)
        try:
            group = zarr.open_group(zarr.storage.LocalStore(path), mode="a")
            stored = group.attrs.get("sbiflows_simulations")
            if stored is not None and stored != {"format": FORMAT, "config": config} \
                    and not any((path / "records").glob("*.json")):
                # nothing finished under the stored settings (e.g. a simulator that could not run as called):
                # this run's settings replace them, so the error's advice (vectorized=False) can be followed
                for name in ("theta", "x"):
                    if name in group:
                        del group[name]
                stored = None
            if stored is None:
                if "theta" in group:
                    raise StoreMismatchError(f"{path} is a zarr group that sbiflows did not write")
                group.attrs["sbiflows_simulations"] = {"format": FORMAT, "config": config}
                group.create_array("theta", shape=(rows, theta_dim), chunks=(config["batch_size"], theta_dim),
                                   dtype=theta_dtype, fill_value=np.nan, config={"write_empty_chunks": True})
            else:
                _compare(path, stored, config)
            (path / "records").mkdir(exist_ok=True)
            return cls(path, group, lock_file=lock_file)
        except BaseException:
            lock_file.close()
            raise

    @classmethod
    def read(cls, path: str | os.PathLike) -> SimulationStore:
        """Open an existing store for reading (no lock)."""
        import zarr

        path = Path(path)
        if not (path / "zarr.json").exists():
            raise FileNotFoundError(f"no simulation store at {str(path)!r} (expected a zarr group written by "
                                    "sbiflows.simulate with store=...)")
        group = zarr.open_group(zarr.storage.LocalStore(path, read_only=True), mode="r")
        if "sbiflows_simulations" not in group.attrs:
            raise ValueError(f"{path} is a zarr group that sbiflows did not write")
        return cls(path, group)

    def close(self) -> None:
        """Release the lock."""
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    # ------------------------------------------------------------------------------- contents
    @property
    def config(self) -> dict:
        """The configuration of the run that made the store."""
        return dict(self._group.attrs["sbiflows_simulations"]["config"])

    @property
    def rows(self) -> int:
        """Rows the store has room for (the largest run asked of it)."""
        return int(self._group["theta"].shape[0])

    @property
    def x_layout(self) -> tuple[tuple[int, ...], np.dtype] | None:
        """``(x_shape, dtype)`` of the stored simulations, or None before the first chunk."""
        layout = self._group.attrs["sbiflows_simulations"].get("x")
        return None if layout is None else (tuple(layout["shape"]), np.dtype(layout["dtype"]))

    def records(self) -> dict[int, dict]:
        """Records of the chunks written so far, by chunk index (unverified)."""
        out = {}
        for file in (self.path / "records").glob("*.json"):
            try:
                record = json.loads(file.read_text())
                out[int(record["chunk"])] = record
            except (ValueError, KeyError, OSError):
                warnings.warn(f"unreadable chunk record {file.name} in {self.path}: that chunk will be simulated "
                              "again", UserWarning, stacklevel=3)
        return out

    def read_verified(self) -> tuple[dict[int, dict], np.ndarray, np.ndarray | None]:
        """``(records whose digests match, theta, x)`` with all stored rows; warns about corrupted chunks."""
        records = self.records()
        has_x = "x" in self._group
        try:
            theta = self._group["theta"][:]
            x = self._group["x"][:] if has_x else None
            unreadable: set[int] = set()
        except Exception:  # noqa: BLE001 - a chunk file that no longer decodes: read chunk by chunk
            theta, x, unreadable = self._read_by_chunk(records)
        good = {}
        for c, record in sorted(records.items()):
            previous = record.get("previous")  # a rewrite that a kill stopped before its data were written
            versions = [record, *([previous] if isinstance(previous, dict) else [])]
            intact = [v for v in versions if c not in unreadable and _matches(v, theta, x)]
            if not intact:
                warnings.warn(f"chunk {c} of {self.path} is corrupted (its data do not match the digest recorded "
                              "when it was written): it counts as not simulated", UserWarning, stacklevel=3)
                continue
            good[c] = {key: value for key, value in intact[0].items() if key != "previous"}
        return good, theta, x

    def _read_by_chunk(self, records: dict[int, dict]) -> tuple[np.ndarray, np.ndarray | None, set[int]]:
        theta_array = self._group["theta"]
        x_array = self._group["x"] if "x" in self._group else None
        theta = np.full(theta_array.shape, np.nan, dtype=theta_array.dtype)
        x = None if x_array is None else np.full(x_array.shape, np.nan, dtype=x_array.dtype)
        unreadable = set()
        for c, record in records.items():
            a, b = record["start"], record["start"] + record["rows"]
            try:
                theta[a:b] = theta_array[a:b]
                if x is not None:
                    x[a:b] = x_array[a:b]
            except Exception:  # noqa: BLE001 - reported as corrupted by the caller
                unreadable.add(c)
        return theta, x, unreadable

    # ------------------------------------------------------------------------------- writing
    def set_x_layout(self, shape: tuple[int, ...], dtype: np.dtype) -> None:
        """Create the x array (first finished chunk of a new store)."""
        batch = self.config["batch_size"]
        self._group.create_array("x", shape=(self.rows, *shape), chunks=(batch, *shape), dtype=dtype,
                                 fill_value=np.nan, config={"write_empty_chunks": True}, overwrite=True)
        meta = dict(self._group.attrs["sbiflows_simulations"])  # after the array: a kill between the two
        meta["x"] = {"shape": list(shape), "dtype": np.dtype(dtype).name}  # leaves a store without a layout,
        self._group.attrs["sbiflows_simulations"] = meta  # which the next run makes again

    def write_chunk(self, chunk: int, start: int, theta: np.ndarray, x: np.ndarray, *, seed: int,
                    failures: list[tuple[int, str, str]], seconds: float) -> None:
        """Write a finished chunk: data first, then its record (atomically).

        A chunk rewritten (failed rows simulated again) first gets a record that also holds the one it replaces
        (``"previous"``), so that a kill before the new data land leaves the old rows verified, not corrupted.
        """
        stop = start + len(theta)
        record = {"chunk": chunk, "start": start, "rows": len(theta), "seed": seed,
                  "theta_sha256": digest(theta), "x_sha256": digest(x),
                  "failures": [list(f) for f in failures], "seconds": seconds}
        target = self.path / "records" / f"{chunk}.json"
        previous = self._verified_record(target)
        if previous is not None:
            self._write_record(target, {**record, "previous": previous})
        self._group["theta"][start:stop] = theta
        self._group["x"][start:stop] = x
        self._write_record(target, record)

    def _verified_record(self, target: Path) -> dict | None:
        """The version of a chunk's record (itself, or the ``"previous"`` it holds after a stopped rewrite) whose
        digests the stored rows match, None if neither does (or there is none)."""
        try:
            existing = json.loads(target.read_text()) if target.exists() else None
        except (ValueError, OSError):
            return None
        if not isinstance(existing, dict):
            return None
        for version in (existing, existing.get("previous")):
            if not isinstance(version, dict):
                continue
            try:
                a, b = version["start"], version["start"] + version["rows"]
                theta, x = self._group["theta"][a:b], self._group["x"][a:b] if "x" in self._group else None
            except Exception:  # noqa: BLE001 - a record or chunk that does not read is no verified version
                continue
            if x is not None and digest(theta) == version.get("theta_sha256") and digest(x) == version.get("x_sha256"):
                return {key: value for key, value in version.items() if key != "previous"}
        return None

    @staticmethod
    def _write_record(target: Path, record: dict) -> None:
        temporary = target.with_suffix(".json.tmp")
        temporary.write_text(json.dumps(record))
        os.replace(temporary, target)

    def grow(self, rows: int) -> None:
        """Make room for ``rows`` rows (the store keeps the largest run asked of it)."""
        for name in ("theta", "x"):
            if name in self._group and self._group[name].shape[0] < rows:
                array = self._group[name]
                array.resize((rows, *array.shape[1:]))


def _matches(record: dict, theta: np.ndarray, x: np.ndarray | None) -> bool:
    """Whether the stored rows of ``record`` have the digests it recorded."""
    try:
        a, b = record["start"], record["start"] + record["rows"]
        return x is not None and b <= len(theta) and digest(theta[a:b]) == record["theta_sha256"] and \
            digest(x[a:b]) == record["x_sha256"]
    except (KeyError, TypeError):
        return False


def _compare(path: Path, stored: dict, config: dict) -> None:
    if stored.get("format") != FORMAT:
        raise StoreMismatchError(f"{path} has store format {stored.get('format')}; this sbiflows writes {FORMAT}")
    old = stored["config"]
    for key, value in config.items():
        if key == "simulator" and same_simulator(old.get(key), value):
            continue  # also a name an earlier version recorded for this simulator
        if old.get(key) != value:
            raise StoreMismatchError(
                f"the store at {path} was made with {key}={old.get(key)!r}, not {value!r}; its simulations "
                "cannot be mixed with these. Use another store path, or delete it to start over"
            )


def _lock(path: Path):
    try:
        return hold_lock(path / ".lock")
    except LockHeld as held:
        raise RuntimeError(f"the simulation store {path} is in use by another process (pid {held.owner}); wait "
                           "for it to finish or stop it") from None

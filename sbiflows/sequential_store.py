"""The folder a :class:`~sbiflows.TSNPE` run keeps its rounds in (see :mod:`sbiflows.sequential`).

``tsnpe.json`` holds the run's settings, how each round's parameters were drawn and one record per
finished round; it is rewritten atomically after each change. A folder with other settings, or a
non-empty folder without ``tsnpe.json``, is refused, except one that holds only round 1's parameters and
simulations (:func:`keep_first_round`).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from sbiflows.engine.names import same_simulator

__all__ = ["FIRST_ROUND", "MANIFEST", "RoundStore", "atomic_npy", "atomic_text", "keep_first_round"]

MANIFEST = "tsnpe.json"
#: What :func:`keep_first_round` keeps in ``round_0``: round 1's parameters and simulation store.
FIRST_ROUND = ("theta.npy", "simulations.zarr")


def atomic_npy(path: Path, array: np.ndarray) -> None:
    """``np.save`` to a temporary file beside ``path``, then rename (a kill never leaves half a file)."""
    temporary = path.with_name(path.name + ".tmp.npy")
    np.save(temporary, array)
    os.replace(temporary, path)


def atomic_text(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename (a kill never leaves half a file)."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


class RoundStoreMismatchError(ValueError):
    """The store holds a TSNPE run with other settings."""


def _named(key: str, old: Any, new: Any) -> str:
    """A changed setting as the refusal names it: a dict's changed keys too (``npe_options: hidden_features``)."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        return f"{key}: {', '.join(keys)}"
    return key


class RoundStore:
    """The store folder of a run (see the module docstring): ``tsnpe.json`` and one folder per round."""

    def __init__(self, root: str | os.PathLike, settings: dict, *,
                 comparable: Callable[[dict, dict], tuple[dict, dict]] | None = None):
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise ValueError(f"store must be a directory, but {self.root} is a file")
        self.root.mkdir(parents=True, exist_ok=True)
        self.settings = settings
        path = self.root / MANIFEST
        if path.exists():
            self.manifest = json.loads(path.read_text())
            old = self.manifest.get("settings") or {}
            # ``comparable`` (the run's) says what of the stored and the new settings is compared
            theirs, mine = (old, settings) if comparable is None else comparable(old, settings)
            # a setting an earlier version did not record cannot be compared: its stores resume as before
            changed = sorted(_named(k, theirs.get(k), mine.get(k)) for k in set(theirs) | set(mine)
                             if k in theirs and theirs.get(k) != mine.get(k)
                             and not (k == "simulator" and same_simulator(theirs[k], mine.get(k))))
            if changed:
                raise RoundStoreMismatchError(f"the store {self.root} holds a TSNPE run with other settings "
                                              f"({', '.join(changed)}); use another store path, or delete it to "
                                              "start over")
            if set(settings) - set(old):  # record them now, so that later resumes compare them
                self.manifest["settings"] = settings
                self._write()
        else:
            if not _first_round_only(self.root):
                raise ValueError(f"store {self.root} is a non-empty folder without {MANIFEST}; use an empty or new one")
            self.manifest = {"settings": settings, "rounds": [], "draws": {}}
            self._write()

    def stored_draw(self, r: int) -> tuple[str, float]:
        """How round ``r``'s parameters were drawn, as recorded before they were simulated."""
        draw = self.manifest.get("draws", {}).get(str(r), {})
        return draw.get("method", "unknown"), float(draw.get("acceptance", float("nan")))

    def round(self, r: int) -> Path:
        folder = self.root / f"round_{r}"
        folder.mkdir(exist_ok=True)
        return folder

    def finished(self) -> list[dict]:
        """Records of the finished rounds whose posterior file exists, in order."""
        records = []
        for record in self.manifest["rounds"]:
            if not (self.root / f"round_{record['index']}" / "posterior.pt").exists():
                break
            records.append(record)
        return records

    def note_draw(self, r: int, method: str, acceptance: float) -> None:
        self.manifest.setdefault("draws", {})[str(r)] = {"method": method, "acceptance": acceptance}
        self._write()

    def finish_round(self, record: Any) -> None:
        self.manifest["rounds"] = [x for x in self.manifest["rounds"] if x["index"] < record.index] + [asdict(record)]
        self._write()

    def _write(self) -> None:
        atomic_text(self.root / MANIFEST, json.dumps(self.manifest, indent=1))


def keep_first_round(root: str | os.PathLike) -> bool:
    """Empty a TSNPE store but for round 1's parameters and simulations (:data:`FIRST_ROUND`): they come from the
    prior alone, so a run with the same prior, simulator, seed and budget but another training setting or
    observation takes them up again. Returns whether anything of round 1 was kept.

    Example:
        >>> import tempfile
        >>> root = Path(tempfile.mkdtemp())
        >>> for name in ("tsnpe.json", "round_0/theta.npy", "round_0/posterior.pt", "round_1/theta.npy"):
        ...     (root / name).parent.mkdir(exist_ok=True); _ = (root / name).write_text("")
        >>> keep_first_round(root), sorted(str(p.relative_to(root)) for p in root.rglob("*"))
        (True, ['round_0', 'round_0/theta.npy'])
        >>> RoundStore(root, {"seed": 0}).finished()  # taken up as a store with no finished round
        []
    """
    root, first = Path(root), Path(root) / "round_0"
    for entry in [*root.iterdir(), *(first.iterdir() if first.is_dir() else ())]:
        if entry != first and not (entry.parent == first and entry.name in FIRST_ROUND):
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    if first.is_dir() and not any(first.iterdir()):
        first.rmdir()
    return first.is_dir()


def _first_round_only(root: Path) -> bool:
    """Whether ``root`` is empty or holds only what :func:`keep_first_round` keeps."""
    entries = list(root.iterdir())
    if not entries:
        return True
    first = root / "round_0"
    return entries == [first] and first.is_dir() and all(e.name in FIRST_ROUND for e in first.iterdir())

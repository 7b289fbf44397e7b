"""The folder a :class:`~sbiflows.TSNPE` run keeps its rounds in (see :mod:`sbiflows.sequential`).

``tsnpe.json`` holds the run's settings, how each round's parameters were drawn and one record per
finished round; it is rewritten atomically after each change. A folder with other settings, or a
non-empty folder without ``tsnpe.json``, is refused.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from sbiflows.engine.names import same_simulator

__all__ = ["MANIFEST", "RoundStore", "atomic_npy", "atomic_text"]

MANIFEST = "tsnpe.json"


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


class RoundStore:
    """The store folder of a run (see the module docstring): ``tsnpe.json`` and one folder per round."""

    def __init__(self, root: str | os.PathLike, settings: dict):
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise ValueError(f"store must be a directory, but {self.root} is a file")
        self.root.mkdir(parents=True, exist_ok=True)
        self.settings = settings
        path = self.root / MANIFEST
        if path.exists():
            self.manifest = json.loads(path.read_text())
            old = self.manifest.get("settings") or {}
            # a setting an earlier version did not record cannot be compared: its stores resume as before
            changed = sorted(k for k in set(old) | set(settings) if k in old and old.get(k) != settings.get(k)
                             and not (k == "simulator" and same_simulator(old[k], settings[k])))
            if changed:
                raise RoundStoreMismatchError(f"the store {self.root} holds a TSNPE run with other settings "
                                              f"({', '.join(changed)}); use another store path, or delete it to "
                                              "start over")
            if set(settings) - set(old):  # record them now, so that later resumes compare them
                self.manifest["settings"] = settings
                self._write()
        else:
            if any(self.root.iterdir()):
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

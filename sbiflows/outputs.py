"""The output folder of ``sbiflows fit`` and :func:`sbiflows.pipeline.run`: never clobber a foreign run, never
leave stale files.

A run records in ``run.json`` the settings that change its results (model, observations, budget,
seeds; not ``--quiet`` or ``--workers``) and, when it finishes, the files it wrote. Before a run:

* an empty or missing folder is used as it is;
* a folder whose ``run.json`` has the same settings is resumed (the simulation stores and
  ``resume.json`` say what is already done);
* any other non-empty folder is refused, unless ``force``: then the files the earlier run recorded
  are removed (only those: a file sbiflows did not write is never touched), the simulation stores
  only if the settings they depend on changed, and the trained posterior (or a sequential run's
  ``rounds``) only if a setting other than those of the steps after training changed (the observations
  are among those of an amortized run: new ones reuse its posterior). Of the rounds, round 1's parameters
  and simulations stay where its stores' settings, the budget and the number of rounds are unchanged: they
  come from the prior alone.
"""

from __future__ import annotations

import fnmatch
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sbiflows.checkpoint import CHECKPOINT_FILE, Checkpoint
from sbiflows.locks import LockHeld, hold_lock
from sbiflows.sequential_store import keep_first_round

__all__ = ["FIGURES", "MANIFEST", "OutputFolderError", "adopt", "hold", "prepare", "record"]

#: The file that marks a folder as an sbiflows run.
MANIFEST = "run.json"
#: The training checkpoint (:mod:`sbiflows.checkpoint`) that a run keeps while it trains, removed once
#: ``posterior.pt`` is saved: a stopped run resumes training from it.
CHECKPOINT = CHECKPOINT_FILE
#: What a run writes (glob patterns in the output folder); nothing else is ever recorded or removed.
OUTPUTS = ("posterior.pt", "training*.ckpt", "samples.npz", "resume.json", "report.md", "report.json",
           "simulations.zarr", "calibration.zarr", "predictive", "rounds", "corner_*.png", "corner_*.pdf",
           "sbc_ranks.*", "coverage.*", "tarp.*")
#: The figures of a run besides its corner plots (``corner_<observation>``), each as ``.png`` and ``.pdf``.
FIGURES = ("sbc_ranks", "coverage", "tarp")
#: Outputs that hold simulations, and the settings they depend on (the predictive checks' stores also
#: depend on the posterior: the pipeline replaces one whose parameters are not the posterior's draws).
STORES = ("simulations.zarr", "calibration.zarr", "predictive")
#: (Not ``timeout``: a store keeps its rows, and those that timed out under a shorter limit run again.)
STORE_SETTINGS = ("simulator", "prior", "seed", "batch_size", "vectorized")
#: The rounds of a sequential run (``--rounds``), which hold simulations too.
SEQUENTIAL = "rounds"
#: Settings that only steps after training use: when nothing else changed, ``force`` keeps the trained
#: posterior, the rounds of a sequential run, the posterior samples and ``resume.json`` (which says which
#: later steps to redo: the samples are drawn again only if ``num_samples`` changed).
AFTER_TRAINING = ("name", "labels", "num_samples", "calibration_datasets", "calibration_samples", "c2st_samples",
                  "reference")
#: What an amortized run (no ``rounds`` in its settings) adds to :data:`AFTER_TRAINING`: its posterior is one for
#: every observation, so new observations keep it (a sequential run's rounds are made for its observation).
AMORTIZED_AFTER_TRAINING = ("observations",)


def after_training(settings: dict) -> tuple[str, ...]:
    """The settings of a run that only the steps after training use (see :data:`AFTER_TRAINING`).

    Example:
        >>> "observations" in after_training({"seed": 0}), "observations" in after_training({"rounds": 3})
        (True, False)
    """
    return AFTER_TRAINING + (AMORTIZED_AFTER_TRAINING if "rounds" not in settings else ())


class OutputFolderError(ValueError):
    """The output folder holds something this run must not overwrite."""


#: The lock file ``sbiflows fit`` holds in its output folder while it runs (:func:`hold`).
RUN_LOCK = ".lock"


def hold(out: Path, spelling: str = "cli") -> Any:
    """Lock ``out`` for this process (an advisory ``flock`` on ``out/.lock``, made with the folder if needed) and
    return the open lock file (:func:`sbiflows.locks.hold_lock`): keep it referenced while the run goes on; it is
    released when closed or when the process ends. None where ``out`` is a file (:func:`prepare` refuses it) or a
    folder that is not a run's.

    Raises:
        OutputFolderError: If another process holds ``out`` (a second run into the same folder).
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        return None
    if out.exists() and not (out / MANIFEST).exists() and any(path.name != RUN_LOCK for path in out.iterdir()):
        return None  # not a run folder: prepare() refuses it, and nothing is written into it
    out.mkdir(parents=True, exist_ok=True)
    try:
        return hold_lock(out / RUN_LOCK)
    except LockHeld as held:
        raise OutputFolderError(f"{SPELLINGS[spelling]['out']} {str(out)!r} is in use by another run (pid "
                                f"{held.owner}); wait for it to finish or stop it, or choose another folder") from None


#: Settings whose default changed, as (setting, default before, default since), oldest first: a run folder made
#: before a change holds an old default, and the same command now resolves to the newest one.
CHANGED_DEFAULTS = (("ensemble", 1, "auto-snapshots"), ("ensemble", "auto-snapshots", "auto-stacked"))


#: How the refusals name the folder, the override and an option: for ``sbiflows fit`` and for
#: :func:`sbiflows.pipeline.run` called from Python.
SPELLINGS = {
    "cli": {"out": "--out", "force": "add --force", "option": "--{key} {value}"},
    "python": {"out": "Job.out", "force": "pass force=True", "option": "Job({key}={value!r})"},
}


def _old_default_hint(old: dict, settings: dict, spelling: str = "cli") -> str:
    """How to resume a run that an earlier version made with a default that has changed since
    (:data:`CHANGED_DEFAULTS`): pass the old value's option.

    Example:
        >>> _old_default_hint({"ensemble": 1}, {"ensemble": "auto-stacked"})
        "; a run made when NPE's default was ensemble=1 (today 'auto-stacked') resumes with --ensemble 1"
        >>> _old_default_hint({"ensemble": "auto-snapshots"}, {"ensemble": "auto-stacked"}, "python")
        "; a run made when NPE's default was ensemble='auto-snapshots' (today 'auto-stacked') resumes with \
Job(ensemble='auto-snapshots')"
        >>> _old_default_hint({"ensemble": 1}, {"ensemble": 3}), _old_default_hint({"seed": 0}, {"seed": 1})
        ('', '')
    """
    today = {key: since for key, _, since in CHANGED_DEFAULTS}  # the last change of each setting wins
    return "".join(f"; a run made when NPE's default was {key}={before!r} (today {today[key]!r}) resumes with "
                   + SPELLINGS[spelling]["option"].format(key=key, value=before)
                   for key, before, _ in CHANGED_DEFAULTS
                   if old.get(key) == before and settings.get(key) == today[key])


def prepare(out: Path, settings: dict, *, force: bool = False, spelling: str = "cli") -> list[str]:
    """Make ``out`` ready for a run with ``settings``; returns what was removed (for the log).

    ``spelling`` (a key of :data:`SPELLINGS`) says whether the refusal names the command line's options or
    :func:`sbiflows.pipeline.run`'s arguments.

    A run whose changed settings only matter after training, and that made nothing after training (it stopped
    before: e.g. at an observation of the wrong shape), takes the new settings without ``force``.

    Raises:
        OutputFolderError: If ``out`` is not empty and not a run with the same settings (and not ``force``).

    Example:
        >>> import tempfile
        >>> out = Path(tempfile.mkdtemp())
        >>> prepare(out, {"seed": 0}); record(out, {"seed": 0})
        []
        >>> prepare(out, {"seed": 1})  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        sbiflows.outputs.OutputFolderError: ... holds a run with other settings (seed: 0 -> 1); ...
    """
    out, names = Path(out), SPELLINGS[spelling]
    if out.exists() and not out.is_dir():
        raise OutputFolderError(f"{names['out']} {str(out)!r} is a file, not a folder")
    if not out.exists() or not any(path.name != RUN_LOCK for path in out.iterdir()):
        out.mkdir(parents=True, exist_ok=True)
        _write(out, {"settings": settings, "files": []})
        return []
    manifest = _read(out)
    if manifest is None:
        raise OutputFolderError(
            f"{names['out']} {str(out)!r} is not empty and was not written by sbiflows fit (no {MANIFEST}); choose "
            f"another folder (nothing in it is removed, not even with {names['force'].split()[-1]})"
        )
    old = manifest.get("settings", {})
    if old == settings:
        return []
    changed = sorted(key for key in set(old) | set(settings) if old.get(key) != settings.get(key))
    if changed == ["timeout"] and not _timed_out(out):  # no stored row timed out: the limit changed nothing made
        _write(out, {"settings": settings, "files": manifest.get("files", [])})
        return []
    later = all(key in after_training(old) and key in after_training(settings) for key in changed)
    trained = (out / "posterior.pt").exists()
    made = [name for name in manifest.get("files", [])
            if name not in (*STORES, SEQUENTIAL, CHECKPOINT, "resume.json", MANIFEST) and (out / name).exists()]
    if later and not trained and not made:  # e.g. it stopped at an observation of the wrong shape: nothing to redo
        _write(out, {"settings": settings, "files": manifest.get("files", [])})
        return []
    if not force:
        details = ", ".join(f"{key}: {_short(old.get(key))} -> {_short(settings.get(key))}" for key in changed[:4])
        kept = "its simulations and trained posterior are kept" if trained else "its simulations are kept"
        what = f"to redo only the steps after training ({kept})" if later else "to replace that run's results"
        raise OutputFolderError(
            f"{names['out']} {str(out)!r} holds a run with other settings ({details}); choose another "
            f"{names['out']}, or {names['force']} {what}" + _old_default_hint(old, settings, spelling)
        )
    keep = set()
    if not any(key in STORE_SETTINGS for key in changed):
        keep.update(STORES)
    if later:
        keep.update(("posterior.pt", CHECKPOINT, SEQUENTIAL, "resume.json", "samples.npz"))
    removed = []
    first_round = not ({"simulations", "rounds"} & set(changed))  # round 1's draws: the prior's, of the same size
    if SEQUENTIAL not in keep and STORES[0] in keep and first_round and (out / SEQUENTIAL).is_dir() \
            and keep_first_round(out / SEQUENTIAL):
        keep.add(SEQUENTIAL)
        removed.append(f"{SEQUENTIAL} (all but round 1's simulations)")
    for name in manifest.get("files", []):
        path = out / name
        if name in keep or name == MANIFEST or path.parent != out or not path.exists():
            continue
        shutil.rmtree(path) if path.is_dir() else path.unlink()
        removed.append(name)
    for name in (*STORES, SEQUENTIAL, "resume.json"):  # a killed run may not have recorded them
        if (out / name).exists() and name not in keep and name not in removed:
            shutil.rmtree(out / name) if (out / name).is_dir() else (out / name).unlink()
            removed.append(name)
    if CHECKPOINT not in keep:  # a stopped training's checkpoint and its siblings (never recorded: removed at the end)
        present = sorted(path.name for path in out.glob("training*.ckpt"))
        Checkpoint(out / CHECKPOINT).remove()
        removed += [name for name in present if not (out / name).exists()]
    _write(out, {"settings": settings, "files": [name for name in manifest.get("files", []) if name not in removed]})
    return removed


def _timed_out(out: Path) -> bool:
    """Whether a simulation store in ``out`` (its chunks' records) holds a row that timed out, which a rerun with a
    longer ``timeout`` simulates again; an unreadable record counts as one."""
    from sbiflows.engine.jobs import TIMEOUT

    for path in out.rglob("records/*.json"):
        try:
            if any(failure[1] == TIMEOUT for failure in json.loads(path.read_text()).get("failures", [])):
                return True
        except (OSError, ValueError, TypeError, IndexError, AttributeError):
            return True
    return False


def adopt(out: Path, settings: dict) -> bool:
    """Give a folder that :func:`sbiflows.pipeline.run` wrote before it recorded :data:`MANIFEST` (it holds
    only outputs of :data:`OUTPUTS`, among them ``resume.json``) a manifest with ``settings``, so that it
    resumes: its ``resume.json`` and the stores' own checks decide what is reused. Returns whether it did.

    Example:
        >>> import tempfile
        >>> out = Path(tempfile.mkdtemp())
        >>> _ = (out / "resume.json").write_text("{}")
        >>> adopt(out, {"seed": 0}), prepare(out, {"seed": 0})
        (True, [])
    """
    out = Path(out)
    if not out.is_dir() or (out / MANIFEST).exists() or not (out / "resume.json").exists():
        return False
    entries = [path for path in out.iterdir() if path.name != RUN_LOCK]
    if not all(any(fnmatch.fnmatch(path.name, pattern) for pattern in OUTPUTS) for path in entries):
        return False
    _write(out, {"settings": settings, "files": sorted(path.name for path in entries)})
    return True


def record(out: Path, settings: dict, *, observations: Sequence[str] = ()) -> None:
    """Record that a run with ``settings`` finished, with the outputs now in ``out``: those of :data:`OUTPUTS`, the
    figures by their exact names (:data:`FIGURES` and ``corner_<name>`` of each of its ``observations``, as PNG and
    PDF), not by the patterns, which a figure the user saved beside them (``corner_paper.pdf``) also matches.

    Example:
        >>> import tempfile
        >>> out = Path(tempfile.mkdtemp())
        >>> for name in ("corner_obs1.png", "corner_obs1.pdf", "corner_paper.pdf", "coverage.svg"):
        ...     _ = (out / name).write_text("")
        >>> record(out, {"seed": 0}, observations=["obs1"])
        >>> json.loads((out / MANIFEST).read_text())["files"]
        ['corner_obs1.pdf', 'corner_obs1.png']
    """
    out = Path(out)
    figures = {f"{stem}{suffix}" for stem in (*FIGURES, *(f"corner_{name}" for name in observations))
               for suffix in (".png", ".pdf")}
    patterns = [pattern for pattern in OUTPUTS if not pattern.startswith(("corner_", *FIGURES))]
    files = {path.name for pattern in patterns for path in out.glob(pattern)}
    _write(out, {"settings": settings, "files": sorted(files | {name for name in figures if (out / name).exists()})})


def recorded_settings(out: Path) -> dict:
    """The settings ``out``'s ``run.json`` records (empty without one)."""
    return dict((_read(Path(out)) or {}).get("settings") or {})


def _read(out: Path) -> dict | None:
    try:
        return json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def _write(out: Path, manifest: dict) -> None:
    temporary = out / f"{MANIFEST}.tmp"
    temporary.write_text(json.dumps(manifest, indent=1))
    temporary.replace(out / MANIFEST)


def _short(value: object) -> str:
    text = "default" if value is None else json.dumps(value)  # None: the option was left at its default
    return text if len(text) <= 40 else text[:37] + "..."

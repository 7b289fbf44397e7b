"""What makes a run of ``sbiflows fit`` resumable and traceable: ``resume.json``, identities and versions.

:class:`Resume` records the settings each finished step (training, sampling) was made with, so a rerun
of the same job reuses its outputs; :func:`function_identity` and :func:`prior_identity` name the
simulator and the prior in a job's settings; :func:`versions` goes into the report.
"""

from __future__ import annotations

import json
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.distributions import Distribution

import sbiflows
from sbiflows.report import jsonable

__all__ = ["Resume", "function_identity", "prior_identity", "versions"]


def function_identity(function: Callable) -> str:
    """``module:qualname`` of a function (of its class for a callable object): how a run names its simulator.

    Example:
        >>> function_identity(json.dumps)
        'json:dumps'
    """
    target = function if hasattr(function, "__qualname__") else type(function)
    return f"{getattr(target, '__module__', '?')}:{getattr(target, '__qualname__', repr(target))}"


def prior_identity(prior: Distribution) -> str:
    """The prior's class and parameters (a digest of them), or its repr when it cannot be described."""
    import hashlib

    from sbiflows.prior_specs import prior_spec

    spec = prior_spec(prior)
    if spec is None:
        return repr(prior)
    config, tensors = spec
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for name in sorted(tensors):
        digest.update(tensors[name].detach().cpu().double().numpy().tobytes())
    return f"{config.get('class')}:{digest.hexdigest()[:16]}"


class Resume:
    """``resume.json``: the settings each finished step (training, sampling) was made with."""

    def __init__(self, path: Path):
        self.path = path
        self.fresh: set[str] = set()  # steps run (not reused) by this run
        try:
            self.steps = json.loads(path.read_text()) if path.exists() else {}
        except ValueError:
            self.steps = {}

    def matches(self, step: str, settings: dict, output: Path) -> bool:
        """Whether ``step`` finished with these settings and its output is still there."""
        return output.exists() and self.steps.get(step) == jsonable(settings)

    def done(self, step: str, settings: dict) -> None:
        """Record that ``step`` finished with these settings (written atomically)."""
        self.steps[step] = jsonable(settings)
        self.fresh.add(step)
        self._write()

    def record(self, step: str, settings: dict) -> None:
        """Record the settings of a step that finished in an earlier run, in today's form (not counted as run)."""
        self.steps[step] = jsonable(settings)
        self._write()

    def cached(self, step: str, settings: dict) -> Any:
        """The value :meth:`keep` stored for ``step`` under these settings, or None."""
        entry = self.steps.get(step)
        if isinstance(entry, dict) and entry.get("settings") == jsonable(settings):
            return entry.get("value")
        return None

    def keep(self, step: str, settings: dict, value: Any) -> None:
        """Store the result ``value`` (JSON) of ``step`` made with these settings (written atomically)."""
        self.steps[step] = {"settings": jsonable(settings), "value": jsonable(value)}
        self.fresh.add(step)
        self._write()

    def _write(self) -> None:
        temporary = self.path.with_suffix(".tmp")
        temporary.write_text(json.dumps(self.steps, indent=1))
        temporary.replace(self.path)


def versions() -> dict[str, str]:
    """The versions of sbiflows, Python, torch, numpy and scipy and the platform, for a run's report."""
    import scipy

    return {
        "sbiflows": sbiflows.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "platform": platform.platform(),
    }

"""Writing a run's report: JSON-safe conversion and the human-readable ``report.md``."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch


def jsonable(value: Any) -> Any:
    """Convert tensors, arrays, dataclasses and non-finite floats into JSON-safe Python values.

    Non-finite floats become ``None`` (JSON has no NaN); tensors and arrays become nested lists.

    Example:
        >>> jsonable({"a": torch.tensor([1.0, float("nan")]), "b": (np.float32(2.5),)})
        {'a': [1.0, None], 'b': [2.5]}
    """
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return jsonable(value.detach().cpu().tolist())
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.bool_,)):
        return bool(value)
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    return str(value)


def write_markdown(report: dict, path: Path) -> None:
    """Write the human-readable summary of a run (``report.md``)."""
    lines = [f"# sbiflows report: {report['name']}", ""]
    lines += [
        f"- simulations: {report['simulations']} ({report['simulation_summary']})",
        f"- estimator: {report['estimator']}, seed {report['seed']}",
        f"- training: {report['training']['epochs']} epochs, best epoch {report['training']['best_epoch']}, "
        f"best validation loss {report['training']['best_validation_loss']:.4f}"
        + (" (diverged: best weights restored)" if report["training"]["diverged"] else ""),
        "",
        "## Observations",
        "",
    ]
    has_c2st = any("c2st" in o for o in report["observations"])
    columns = ["observation", *(["C2ST vs reference"] if has_c2st else []), "posterior predictive"]
    lines += ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for o in report["observations"]:
        row = f"| {o['name']} | "
        if has_c2st:
            row += f"{o['c2st']:.3f} | "
        row += ("pass" if o["predictive"]["passed"] else "FLAGGED") + " |"
        lines.append(row)
    if "mean_c2st" in report:
        lines += ["", f"Mean C2ST: **{report['mean_c2st']:.3f}** (0.5 = indistinguishable from the reference)."]
    lines += ["", "![corner plot](corner.png)", "", "## Calibration", ""]
    for key, title, figure in (
        ("sbc", "Simulation-based calibration", "sbc_ranks.png"),
        ("coverage", "Expected coverage", "coverage.png"),
        ("tarp", "TARP", "tarp.png"),
    ):
        entry = report["calibration"][key]
        lines += [f"### {title}: {'passed' if entry['passed'] else 'FAILED'}", "", "```", entry["summary"], "```",
                  "", f"![{title}]({figure})", ""]
    lines += ["## Timings (seconds)", ""]
    lines += [f"- {k}: {v:.1f}" for k, v in report["timings_seconds"].items()]
    lines += ["", "## Versions", ""]
    lines += [f"- {k}: {v}" for k, v in report["versions"].items()]
    path.write_text("\n".join(lines) + "\n")

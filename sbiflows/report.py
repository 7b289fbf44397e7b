"""A run's report: the numbers people cite, JSON-safe conversion and the human-readable ``report.md``."""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Any
from urllib.parse import quote

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


#: The central credible intervals the report gives for every parameter.
INTERVALS = (0.68, 0.95)


def training_record(history: Any) -> dict:
    """The report's ``training`` entry: what a :class:`~sbiflows.training.TrainingHistory` says about the fit.

    Example:
        >>> from sbiflows.training import TrainingHistory
        >>> sorted(training_record(TrainingHistory(epochs=3)))[:3]
        ['batch_size', 'best_epoch', 'best_validation_loss']
    """
    keys = ("epochs", "best_epoch", "best_validation_loss", "stopped_early", "diverged", "batch_size", "learning_rate",
            "step_drop_epochs", "restart_epochs", "train_loss", "validation_loss")
    # the training loop's own seconds, over every run it was resumed in (not the time an interrupted epoch lost)
    return {key: getattr(history, key) for key in keys} | {"seconds": round(float(history.seconds), 3)}


def parameter_summary(samples: torch.Tensor, names: list[str], map_estimate: torch.Tensor | None = None) -> list[dict]:
    """Per parameter: the posterior median, the 68% and 95% central credible intervals and the MAP.

    Args:
        samples: Posterior samples ``(N, D)`` for one observation.
        names: One name per parameter.
        map_estimate: A maximum-a-posteriori point ``(D,)`` (e.g. :meth:`sbiflows.Posterior.map`), or None.

    Example:
        >>> rows = parameter_summary(torch.linspace(0, 1, 101, dtype=torch.float64)[:, None], ["a"])
        >>> rows[0]["median"], rows[0]["ci68"]
        (0.5, [0.16, 0.84])
    """
    data = samples.detach().double().cpu()
    probabilities = [0.5] + [p for level in INTERVALS for p in ((1 - level) / 2, (1 + level) / 2)]
    quantiles = torch.quantile(data, torch.tensor(probabilities, dtype=data.dtype), dim=0)
    rows = []
    for j, name in enumerate(names):
        row = {"name": name, "median": round(float(quantiles[0, j]), 12)}
        for k, level in enumerate(INTERVALS):
            row[f"ci{round(level * 100)}"] = [round(float(quantiles[1 + 2 * k, j]), 12),
                                              round(float(quantiles[2 + 2 * k, j]), 12)]
        row["map"] = None if map_estimate is None else float(map_estimate[j])
        rows.append(row)
    return rows


def plain_label(label: str) -> str:
    """A parameter label without TeX markup, for Markdown and JSON (``$\\theta_1$`` -> ``θ_1``).

    Example:
        >>> plain_label(r"$\\beta_{2}$"), plain_label("rate")
        ('β_2', 'rate')
    """
    greek = {"alpha": "α", "beta": "β", "gamma": "γ", "delta": "δ", "epsilon": "ε", "theta": "θ", "lambda": "λ",
             "mu": "μ", "nu": "ν", "rho": "ρ", "sigma": "σ", "tau": "τ", "phi": "φ", "omega": "ω"}
    text = label.replace("$", "")
    text = re.sub(r"\\([A-Za-z]+)", lambda m: greek.get(m.group(1), m.group(1)), text)
    return text.replace("{", "").replace("}", "")


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


#: How :func:`describe_estimator` names each non-default ``mixing`` of :data:`sbiflows.flows.MIXINGS`.
_MIXING_TEXT = {"lu": "LU-linear layers between couplings", "masks": "masks cycling through binary digits"}


def describe_estimator(options: dict) -> str:
    """A short text for the NPE options of a run: estimator, transformer, mixing layers, ensemble, penalties, space.

    Example:
        >>> describe_estimator({"estimator": "maf"})
        'maf'
        >>> describe_estimator({"estimator": "nsf", "bins": 8, "ensemble": 5})
        'nsf (spline transformer, 8 bins), ensemble of 5 flows'
        >>> describe_estimator({"estimator": "maf", "transformer": "spline", "space": "truncated"})
        'maf (spline transformer, 8 bins), truncated theta space'
        >>> describe_estimator({"estimator": "nsf", "mixing": "lu"})
        'nsf (spline transformer, 8 bins), LU-linear layers between couplings'
        >>> describe_estimator({"estimator": "nsf", "mixing": "masks"})
        'nsf (spline transformer, 8 bins), masks cycling through binary digits'
        >>> describe_estimator({"estimator": "nsf", "balancing": 100.0})
        'nsf (spline transformer, 8 bins), balanced (weight 100)'
        >>> describe_estimator({"estimator": "nsf", "coverage_penalty": 200.0})
        'nsf (spline transformer, 8 bins), coverage penalty (weight 200)'
        >>> describe_estimator({"estimator": "nsf", "ensemble": "auto"})
        'nsf (spline transformer, 8 bins), auto ensemble (three flows if one is over-confident on held-out rows)'
        >>> describe_estimator({"estimator": "maf", "ensemble": "snapshots", "snapshot_epochs": [12, 37, 62]})
        "maf, mixture of one flow's snapshots at epochs 12, 37 and 62"
    """
    from sbiflows.estimator import resolve_transformer

    estimator = options["estimator"]
    transformer = resolve_transformer(estimator, options.get("transformer"), options.get("bins"))
    text = estimator
    if transformer["transformer"] == "spline":
        text += f" (spline transformer, {transformer['bins']} bins)"
    if options.get("mixing", "none") != "none":
        text += ", " + _MIXING_TEXT[options["mixing"]]
    ensemble = options.get("ensemble", 1)
    if ensemble in ("auto", "auto-snapshots", "auto-stacked"):
        snapshots = options.get("snapshot_epochs", []) if ensemble != "auto" else None
        text += ", " + describe_auto(options.get("ensemble_auto"), snapshot_epochs=snapshots,
                                     weights=options.get("mixture_weights"), stacked=ensemble == "auto-stacked")
    elif ensemble == "snapshots":
        text += ", " + describe_snapshots(options.get("snapshot_epochs"))
    elif ensemble > 1:
        text += f", ensemble of {ensemble} flows"
    if options.get("balancing", 0):
        text += f", balanced (weight {options['balancing']:g})"
    if options.get("coverage_penalty", 0):
        text += f", coverage penalty (weight {options['coverage_penalty']:g})"
    if options.get("space", "unconstrained") != "unconstrained":
        text += ", truncated theta space"
    return text


def describe_auto(check: dict | None, *, snapshot_epochs: list[int] | None = None, weights: list[float] | None = None,
                  stacked: bool = False) -> str:
    """What ``ensemble="auto"`` decided, from the posterior's ``config["ensemble_auto"]`` (None: not trained yet);
    with ``snapshot_epochs`` (``config["snapshot_epochs"]``, empty where none were mixed), what
    ``ensemble="auto-snapshots"`` decided, and with ``stacked``, ``"auto-stacked"`` (``weights``:
    ``config["mixture_weights"]``).

    Example:
        >>> describe_auto({"rows": 1000, "over_confident": True, "worst_z": -5.1, "level": 0.95})
        'auto ensemble: 3 flows (one flow was over-confident on 1000 held-out rows: z = -5.1 at the 95% level)'
        >>> check = {"rows": 100, "over_confident": True, "worst_z": -4.0, "level": 0.9}
        >>> describe_auto(check, snapshot_epochs=[5, 14]).split(" (")[0]
        "auto snapshots: mixture of one flow's snapshots at epochs 5 and 14"
        >>> passed = {"rows": 1000, "over_confident": False, "worst_z": -1.2, "level": 0.3}
        >>> describe_auto(passed, snapshot_epochs=[40, 90], weights=[0.1, 0.9], stacked=True).split(" (")[0]
        "auto stacked: mixture of one flow's snapshots at epochs 40 and 90, weights 0.10 and 0.90"
    """
    kind = "auto ensemble" if snapshot_epochs is None else "auto stacked" if stacked else "auto snapshots"
    if check is None:
        if snapshot_epochs is None:
            return "auto ensemble (three flows if one is over-confident on held-out rows)"
        if stacked:
            return ("auto stacked (one flow's snapshot mixture if the flow is over-confident on held-out rows, else "
                    "its snapshots weighted on them)")
        return "auto snapshots (one flow's snapshot mixture if the flow is over-confident on held-out rows)"
    from sbiflows.ensemble import AUTO_MEMBERS

    found = f"{check['rows']} held-out rows: z = {check['worst_z']:+.1f} at the {check['level']:.0%} level"
    if check["over_confident"]:
        if snapshot_epochs is None:
            return f"auto ensemble: {AUTO_MEMBERS} flows (one flow was over-confident on {found})"
        return f"{kind}: {describe_snapshots(snapshot_epochs)} (the flow was over-confident on {found})"
    if stacked and snapshot_epochs:
        shown = [f"{w:.2f}" for w in weights or ()]
        listed = ", ".join(shown[:-1]) + f" and {shown[-1]}" if len(shown) > 1 else "".join(shown)
        return (f"{kind}: {describe_snapshots(snapshot_epochs)}, weights {listed} (the flow passed the coverage "
                f"check on {found}; weights fitted there)")
    return f"{kind}: 1 flow (it passed the coverage check on {found})"


def describe_snapshots(epochs: list[int] | None) -> str:
    """What ``ensemble="snapshots"`` mixed, from the posterior's ``config["snapshot_epochs"]`` (None: not trained yet).

    Example:
        >>> describe_snapshots([3, 9])
        "mixture of one flow's snapshots at epochs 3 and 9"
        >>> describe_snapshots([5])
        "one flow (its training's only snapshot at epoch 5)"
    """
    if epochs is None:
        return "mixture of one flow's snapshots (its best epoch and two earlier ones)"
    if len(epochs) == 1:
        return f"one flow (its training's only snapshot at epoch {epochs[0]})"
    listed = ", ".join(str(e) for e in epochs[:-1]) + f" and {epochs[-1]}"
    return f"mixture of one flow's snapshots at epochs {listed}"


#: Title and figure of each calibration check a report may hold.
_CHECKS = {
    "sbc": ("Simulation-based calibration", "sbc_ranks"),
    "coverage": ("Expected coverage", "coverage"),
    "tarp": ("TARP", "tarp"),
    "truncated_coverage": ("Expected coverage on the last truncated prior", "coverage"),
}


def _rounds(rounds: list[dict]) -> list[str]:
    """The per-round table of a sequential run."""
    lines = ["## Rounds (truncated sequential NPE)", "",
             "| round | simulations | failed | proposal | acceptance | truncated volume | validation loss | epochs |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rounds:
        volume = f"{r['volume']:.3g}" + (" (covers the prior)" if r["covers_prior"] else "")
        restarts = "".join(f" (restart at epoch {epoch})" for epoch in r.get("restart_epochs", []))
        lines.append(f"| {r['index'] + 1} | {r['simulations']} | {r['failed']} | {r['method']} | "
                     f"{_number(r['acceptance'])} | {volume} | {_number(r['validation_loss'])} | {r['epochs']}"
                     f"{restarts} |")
    note = ("Truncated volume: the prior mass of the region the round's parameters were drawn from. Validation "
            "losses are on all rounds so far.")
    return [*lines, "", note, ""]


def _epochs(training: dict) -> str:
    """The training epochs and the best one (counted from 0); a sequential run's over all its rounds and per round.

    Example:
        >>> _epochs({"epochs": 162, "best_epoch": 101, "round_epochs": [92, 70]})
        '162 epochs over 2 rounds (92, 70), best epoch 101 (counted from 0 over all rounds: epoch 9 of round 2)'
        >>> _epochs({"epochs": 50, "best_epoch": 40})
        '50 epochs, best epoch 40'
        >>> _epochs({"epochs": 70, "best_epoch": 48, "round_epochs": [92, 70], "new_network_each_round": True})
        '162 epochs over 2 rounds (92, 70), a new network each round; best epoch 48 of round 2'
    """
    rounds, best = training.get("round_epochs"), training["best_epoch"]
    if not rounds:
        return f"{training['epochs']} epochs, best epoch {best}"
    if training.get("new_network_each_round"):  # the history is the last round's
        return (f"{sum(rounds)} epochs over {len(rounds)} rounds ({', '.join(map(str, rounds))}), a new network each "
                f"round; best epoch {best} of round {len(rounds)}")
    start, index = 0, 0
    for index, count in enumerate(rounds):  # the round whose epochs hold the best one
        if best < start + count:
            break
        start += count
    return (f"{training['epochs']} epochs over {len(rounds)} rounds ({', '.join(map(str, rounds))}), best epoch {best} "
            f"(counted from 0 over all rounds: epoch {best - start} of round {index + 1})")


def write_markdown(report: dict, path: Path) -> None:
    """Write the human-readable summary of a run (``report.md``); the same numbers are in ``report.json``."""
    lines = [f"# sbiflows report: {report['name']}", ""]
    if report.get("command"):
        lines += ["Produced by:", "", "```", report["command"], "```", ""]
    training = report["training"]
    lines += [
        f"- simulations: {report['simulations']} ({report['simulation_summary']})",
        f"- estimator: {describe_estimator(report)}, embedding: {report.get('embedding', 'none')}, seed {report['seed']}",
        f"- training: {_epochs(training)}, best validation loss {training['best_validation_loss']:.4f}"
        + "".join(f" (a non-finite loss at epoch {epoch}: restarted from the best weights at a smaller step)"
                  for epoch in training.get("restart_epochs", []))
        + (" (diverged: best weights restored)" if training["diverged"] else ""),
        f"- calibration: **{report['verdict']}**: {report['advice']}",
        "",
        "## Observations",
        "",
    ]
    for o in report["observations"]:
        lines += [f"### {o['name']}", ""]
        predictive = o["predictive"]
        passed = predictive["passed"]
        numbers = (f" ({predictive['metric']} distance {predictive['distance']:.3g}, p = {predictive['pvalue']:.3g})"
                   if "pvalue" in predictive else "")
        checks = ["posterior predictive: " + ("typical" if passed else "FLAGGED (atypical)" if passed is not None
                                              else predictive["summary"]) + (numbers if passed is not None else "")]
        if "c2st" in o:
            checks.insert(0, f"C2ST against the reference posterior: {o['c2st']:.3f} (0.5 = indistinguishable)")
        lines += [f"- {c}" for c in checks] + [""]
        lines += ["| parameter | median | 68% interval | 95% interval | MAP | true |",
                  "| --- | --- | --- | --- | --- | --- |"]
        truth = o.get("true_parameters")
        for j, p in enumerate(o["parameters"]):
            lines.append(
                f"| {p['name']} | {_number(p['median'])} | [{_number(p['ci68'][0])}, {_number(p['ci68'][1])}] | "
                f"[{_number(p['ci95'][0])}, {_number(p['ci95'][1])}] | {_number(p['map'])} | "
                f"{_number(truth[j]) if truth else '-'} |"
            )
        link = quote(o["corner"])  # spaces and parentheses of an observation's name would end the link
        alt = o["name"].replace("[", "(").replace("]", ")")
        lines += ["", f"![corner plot of {alt}]({link}.png) ([PDF]({link}.pdf))", ""]
    if "mean_c2st" in report:
        lines += [f"Mean C2ST: **{report['mean_c2st']:.3f}** (0.5 = indistinguishable from the reference).", ""]
    if "rounds" in report:
        lines += _rounds(report["rounds"])
    lines += ["## Calibration", "", f"Verdict: **{report['verdict']}**: {report['advice']}", ""]
    for key, entry in report["calibration"].items():
        title, figure = _CHECKS[key]
        lines += [f"### {title}: {entry['verdict']}", ""]
        if entry.get("meaning"):
            lines += [f"What it checks: {entry['meaning']}", ""]
        lines += ["```", entry["summary"], "```", "", f"![{title}]({figure}.png)", ""]
    if report.get("not_applicable"):
        lines += ["### Checks that do not apply to this posterior", ""]
        lines += [f"- {key}: {reason}" for key, reason in report["not_applicable"].items()] + [""]
    lines += ["## Timings (seconds, this run)", ""]
    lines += [f"- {k}: {v:.1f}" for k, v in report["timings_seconds"].items()]
    if report.get("reused"):
        lines += ["", "Taken from an earlier run into this folder (not timed above): " + "; ".join(report["reused"])
                  + f". The training loop took {report['training']['seconds']:.1f} s over all runs."]
    lines += ["", "## Versions", ""]
    lines += [f"- {k}: {v}" for k, v in report["versions"].items()]
    path.write_text("\n".join(lines) + "\n")

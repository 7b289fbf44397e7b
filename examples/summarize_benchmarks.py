"""Tables for docs/benchmarks.md from the JSON records of the benchmark scripts (a reader, not a benchmark).

Reads the ``--json`` files of ``benchmark_npe.py`` (ours against sbi on the same rows), of
``benchmark_bounded_space.py`` (the unconstrained against the truncated space) and of
``benchmark_npe_training.py`` (held-out posterior NLL per setting, ``nll``) and of ``benchmark_coverage.py``
(expected HPD coverage per setting, ``coverage``) and of ``benchmark_tsnpe.py`` (``tsnpe``) and prints one markdown
row per task, budget and configuration: the mean over seeds of the per-seed mean C2ST over
observations, the paired difference with its standard error over seeds (the targets' "no worse"
test), how many seeds ours won, the summed training CPU seconds and the published NPE-NSF mean (sbibm,
Lueckmann et al. 2021). Records of the same task, budget, configuration and seed are deduplicated
(the last one wins), so a file may be appended to by reruns; in ``npe`` a configuration includes every
training option that differs from NPE's defaults (``--learning-rate 0.004`` is a row of its own).

Usage:
    python examples/summarize_benchmarks.py npe results.jsonl
    python examples/summarize_benchmarks.py bounded box.jsonl [--sbi results.jsonl]
    python examples/summarize_benchmarks.py nll heldout.jsonl --baseline "sbi nsf"
    python examples/summarize_benchmarks.py nll-grid heldout.jsonl --candidate estimator=nsf
    python examples/summarize_benchmarks.py coverage coverage.jsonl
    python examples/summarize_benchmarks.py tsnpe ours.jsonl sbi.jsonl --baseline "NPE nsf"
    python examples/summarize_benchmarks.py tsnpe before.jsonl "fixed split=after.jsonl" --baseline "TSNPE nsf"
    python examples/summarize_benchmarks.py tsnpe-regions ours.jsonl   # per TSNPE run: posterior mass inside each region
    python examples/summarize_benchmarks.py snapshots snap.jsonl checks.jsonl  # benchmark_snapshot_mixture.py
    python examples/summarize_benchmarks.py timing r1.jsonl r2.jsonl r3.jsonl  # repeats of benchmark_npe_training --sbi
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import statistics
from collections import defaultdict

from sbiflows import NPE

#: Published NPE-NSF mean C2ST at 1,000 and 10,000 simulations (sbibm; quoted in issue 16).
PUBLISHED_NSF = {
    "two_moons": (0.725, 0.606), "slcp": (0.975, 0.901), "gaussian_linear": (0.694, 0.552),
    "gaussian_linear_uniform": (0.696, 0.553), "bernoulli_glm": (0.863, 0.678), "bernoulli_glm_raw": (0.900, 0.765),
    "gaussian_mixture": (0.716, 0.615), "slcp_distractors": (0.982, 0.970), "sir": (0.815, 0.680),
    "lotka_volterra": (0.999, 0.997),
}


def published(task: str, simulations: int, *, table: dict = PUBLISHED_NSF) -> str:
    """The published mean (``table``, default NPE-NSF) for ``task`` at 1,000 or 10,000 simulations, else ``"-"``.

    Example:
        >>> published("two_moons", 10_000), published("two_moons", 5_000)
        ('0.606', '-')
        >>> published("sir", 1_000, table=PUBLISHED_SNPE_C)
        '0.638'
    """
    values = table.get(task)
    column = {1_000: 0, 10_000: 1}.get(simulations)
    return "-" if values is None or column is None else f"{values[column]:.3f}"


def paired(ours: list[float], theirs: list[float]) -> tuple[float, float]:
    """Mean of ``ours - theirs`` and its standard error over seeds (NaN for one seed).

    Example:
        >>> [round(v, 4) for v in paired([0.6, 0.7, 0.8], [0.7, 0.7, 0.7])]
        [0.0, 0.0577]
    """
    differences = [a - b for a, b in zip(ours, theirs)]
    spread = statistics.stdev(differences) / math.sqrt(len(differences)) if len(differences) > 1 else math.nan
    return statistics.fmean(differences), spread


def difference_text(difference: float, se: float) -> str:
    """A paired difference and its standard error, ``-`` for the error of a single seed.

    Example:
        >>> difference_text(-0.0123, 0.004), difference_text(0.02, float("nan"))
        ('-0.012 (0.004)', '+0.020 (-)')
    """
    return f"{difference:+.3f} ({'-' if math.isnan(se) else f'{se:.3f}'})"


#: Published sequential NPE (SNPE-C with NSF, sbibm) mean C2ST at 1,000 and 10,000 simulations (issue 18).
PUBLISHED_SNPE_C = {
    "two_moons": (0.643, 0.554), "slcp": (0.965, 0.845), "gaussian_mixture": (0.697, 0.583),
    "sir": (0.638, 0.561), "lotka_volterra": (0.990, 0.953),
}


def _mean(c2st: dict) -> float:
    return statistics.fmean(c2st.values())


def _records(path: str):
    """The JSON records of a ``--json`` file, one per non-empty line, in file order."""
    with open(path) as stream:
        yield from (json.loads(line) for line in stream if line.strip())


def _groups(path: str, key) -> list[tuple[tuple, list[dict]]]:
    """Records grouped by ``key(record)[:-1]`` (the last element is the seed), the last of duplicates kept."""
    latest = {key(record): record for record in _records(path)}
    groups = defaultdict(list)
    for record in latest.values():
        groups[key(record)[:-1]].append(record)
    return [(group, sorted(records, key=lambda r: r["seed"])) for group, records in sorted(groups.items(), key=str)]


#: Options of ``benchmark_npe.py`` records that set one configuration of ours apart from another, each with
#: the value that means NPE's default (records before an option existed lack it; it is then not compared).
#: The script records ``NPE.fit``'s own defaults for the stopping options, so they are read from there.
NPE_OPTIONS = {"activation": "tanh", "batch_size": None, "learning_rate": None,
               **{name: inspect.signature(NPE.fit).parameters[name].default
                  for name in ("patience", "step_drops", "drop_patience", "step_drop_factor", "drop_batch_factor")},
               "hidden_features": None, "transforms": None, "bins": None, "bound": None,
               "mixing": None, "coverage_penalty": None, "embedding": "auto", "ema_epochs": None}


def npe_options(record: dict) -> tuple[tuple[str, str], ...]:
    """The options of a ``benchmark_npe.py`` record that differ from NPE's defaults, as ``(name, value)`` pairs.

    Example:
        >>> npe_options({"learning_rate": 0.004, "patience": 20, "hidden_features": [100, 100]})
        (('learning_rate', '0.004'), ('hidden_features', '100x100'))
    """
    def text(value) -> str:
        return "x".join(map(str, value)) if isinstance(value, list) else str(value)

    return tuple((name, text(record[name])) for name, default in NPE_OPTIONS.items()
                 if name in record and record[name] != default)


def _npe_key(r: dict) -> tuple:
    """A ``benchmark_npe.py`` record's group (task, budget, estimator and options) and seed."""
    sbi = (r.get("sbi") or {}).get("density_estimator", "maf") if "sbi_c2st" in r else None  # MAF before the field
    return (r["task"], r["simulations"], r["estimator"], r.get("transformer"), r.get("space"), npe_options(r), sbi,
            r["seed"])


def _npe_name(estimator: str, transformer: str | None, space: str | None, options: tuple) -> str:
    """How :func:`npe_rows` names a group: ``"nsf, truncated, learning_rate=0.004"``."""
    return (estimator + (f" ({transformer})" if transformer else "") + (f", {space}" if space else "")
            + "".join(f", {option}={value}" for option, value in options))


def parse_sbi_values(items: list[str]) -> dict[tuple[str, int], dict[int, float]]:
    """``--sbi-values``: sbi's mean C2ST per seed from runs recorded elsewhere (e.g. docs/benchmarks.md's tables),
    as ``TASK:SIMULATIONS=C0,C1,...`` for seeds 0, 1, ...

    Example:
        >>> parse_sbi_values(["bernoulli_glm:1000=0.862,0.836,0.852"])
        {('bernoulli_glm', 1000): {0: 0.862, 1: 0.836, 2: 0.852}}
    """
    values = {}
    for item in items:
        run, _, numbers = item.partition("=")
        task, _, simulations = run.partition(":")
        values[task, int(simulations)] = {seed: float(v) for seed, v in enumerate(numbers.split(","))}
    return values


def npe_rows(path: str, *, sbi_values: dict[tuple[str, int], dict[int, float]] | None = None) -> list[str]:
    """Rows for ``benchmark_npe.py`` records: ours (per estimator and options) against sbi where sbi ran, or else
    against ``sbi_values`` (:func:`parse_sbi_values`; paired by seed, sbi's CPU time then unknown)."""
    rows = ["| task | simulations | ours | seeds | ours C2ST | sbi C2ST | ours - sbi (SE) | seeds ours <= sbi "
            "| ours train CPU s | sbi train CPU s | published NPE-NSF |",
            "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for (task, simulations, estimator, transformer, space, options, sbi), records in _groups(path, _npe_key):
        ours = [_mean(r["ours_c2st"]) for r in records]
        cpu = sum(next(iter(r["ours"].values()))["train_cpu_seconds"] for r in records)
        name = _npe_name(estimator, transformer, space, options)
        name += f" (vs sbi {sbi})" if sbi not in (None, "nsf") else ""
        given = (sbi_values or {}).get((task, simulations), {})
        if all("sbi_c2st" in r or r["seed"] in given for r in records):
            sbi = [_mean(r["sbi_c2st"]) if "sbi_c2st" in r else given[r["seed"]] for r in records]
            difference, se = paired(ours, sbi)
            wins = sum(a <= b for a, b in zip(ours, sbi))
            sbi_cpu = (f"{sum(r['sbi']['train_cpu_seconds'] for r in records):.1f}" if all("sbi" in r for r in records)
                       else "-")
            sbi_cols = (f"{statistics.fmean(sbi):.3f} | {difference_text(difference, se)} | {wins} of {len(records)} | "
                        f"{cpu:.1f} | {sbi_cpu}")
        else:
            sbi_cols = f"- | - | - | {cpu:.1f} | -"
        rows.append(f"| {task} | {simulations:,} | {name} | {len(records)} | {statistics.fmean(ours):.3f} | {sbi_cols} "
                    f"| {published(task, simulations)} |")
    return rows


def npe_seed_rows(path: str, *, sbi_values: dict[tuple[str, int], dict[int, float]] | None = None) -> list[str]:
    """``summarize_benchmarks.py npe --per-seed``: one row per seed of :func:`npe_rows`' groups, with ours' and sbi's
    C2ST averaged over the observations (sbi's where it ran, else its ``sbi_values`` entry, as :func:`npe_rows`
    pairs them), and both training CPU times.

    Example:
        >>> import json, tempfile
        >>> record = {"task": "sir", "simulations": 1000, "seed": 2, "estimator": "nsf", "space": "truncated",
        ...           "ours": {"1": {"train_cpu_seconds": 9.5}}, "ours_c2st": {"1": 0.7, "2": 0.8}}
        >>> with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:
        ...     _ = f.write(json.dumps(record))
        >>> npe_seed_rows(f.name)[2]
        '| sir | 1,000 | nsf, truncated | 2 | 0.750 | - | 9.5 | - |'
        >>> npe_seed_rows(f.name, sbi_values={("sir", 1000): {2: 0.8}})[2]
        '| sir | 1,000 | nsf, truncated | 2 | 0.750 | 0.800 | 9.5 | - |'
    """
    rows = ["| task | simulations | ours | seed | ours C2ST | sbi C2ST | ours train CPU s | sbi train CPU s |",
            "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for (task, simulations, estimator, transformer, space, options, _), records in _groups(path, _npe_key):
        name = _npe_name(estimator, transformer, space, options)
        given = (sbi_values or {}).get((task, simulations), {})
        for r in records:
            if "sbi_c2st" in r:
                sbi_c2st, sbi_cpu = f"{_mean(r['sbi_c2st']):.3f}", f"{r['sbi']['train_cpu_seconds']:.1f}"
            else:  # sbi's value from --sbi-values where given
                sbi_c2st, sbi_cpu = (f"{given[r['seed']]:.3f}" if r["seed"] in given else "-"), "-"
            ours_cpu = next(iter(r["ours"].values()))["train_cpu_seconds"]
            rows.append(f"| {task} | {simulations:,} | {name} | {r['seed']} | {_mean(r['ours_c2st']):.3f} | "
                        f"{sbi_c2st} | {ours_cpu:.1f} | {sbi_cpu} |")
    return rows


def bounded_rows(path: str, *, sbi_path: str | None = None) -> list[str]:
    """Rows for ``benchmark_bounded_space.py`` records: the truncated against the unconstrained space.

    With ``sbi_path`` (``benchmark_npe.py`` records of the same tasks, budgets and seeds, hence the same
    rows), the truncated space is also compared with sbi's C2ST, paired by seed, on the seeds both have.
    """
    def key(r):
        return r["task"], r["simulations"], r["estimator"], r["seed"]

    sbi = {}  # (task, simulations, seed) -> sbi NSF's mean C2ST (the last record wins)
    if sbi_path is not None:
        with open(sbi_path) as stream:
            for r in map(json.loads, filter(str.strip, stream)):
                # records before the field (commit 7d83323) ran sbi's MAF
                if "sbi_c2st" in r and r["sbi"].get("density_estimator", "maf") == "nsf":
                    sbi[r["task"], r["simulations"], r["seed"]] = _mean(r["sbi_c2st"])
    rows = ["| task | simulations | estimator | seeds | unconstrained C2ST | truncated C2ST | truncated - unconstrained "
            "(SE) | seeds truncated better | lowest support mass | train CPU s unconstrained / truncated |"
            + (" seeds with sbi | truncated - sbi (SE) | published NPE-NSF |" if sbi_path else ""),
            "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |" + (" ---: | ---: | ---: |" if sbi_path else "")]
    for (task, simulations, estimator), records in _groups(path, key):
        free = [r["unconstrained"]["mean_c2st"] for r in records]
        cut = [r["theta space"]["mean_c2st"] for r in records]
        difference, se = paired(cut, free)
        lowest = min(min(r["theta space"]["acceptance"].values()) for r in records)
        cpu = [sum(r[name].get("train_cpu_s", math.nan) for r in records) for name in ("unconstrained", "theta space")]
        row = (f"| {task} | {simulations:,} | {estimator} | {len(records)} | {statistics.fmean(free):.3f} | "
               f"{statistics.fmean(cut):.3f} | {difference_text(difference, se)} | "
               f"{sum(c < f for c, f in zip(cut, free))} of {len(records)} | {lowest:.2f} | "
               f"{cpu[0]:.1f} / {cpu[1]:.1f} |")
        if sbi_path:
            both = [(c, sbi[task, simulations, r["seed"]]) for c, r in zip(cut, records)
                    if (task, simulations, r["seed"]) in sbi]
            versus = "-"
            if both:
                versus_mean, versus_se = paired([c for c, _ in both], [s for _, s in both])
                versus = difference_text(versus_mean, versus_se)
            row += f" {len(both)} | {versus} | {published(task, simulations)} |"
        rows.append(row)
    return rows


def coverage_rows(path: str) -> list[str]:
    """Rows for ``benchmark_coverage.py`` records: coverage at 50% and 90% (means over seeds), the worst deviation."""
    def key(r):
        # the protocol too: a rerun with more datasets or draws is another row, not a replacement of its seed
        return (r["task"], r["simulations"], r["setting"], r.get("temperature", 1.0), r.get("requested_datasets"),
                r.get("posterior_samples"), r["seed"])

    rows = ["| task | simulations | setting | seeds | coverage at 50% | at 90% | worst z over levels and seeds (level) "
            "| seeds with z >= -3 | held-out NLL | train CPU s |",
            "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for (task, simulations, setting, temperature, datasets, draws), records in _groups(path, key):
        worst = min(records, key=lambda r: r["worst_z"])
        name = (setting or "defaults") + (f", base sd {temperature:g}" if temperature != 1.0 else "") \
            + (f" ({datasets} datasets, {draws} draws)" if datasets is not None else "")
        nll = [r["heldout_nll"] for r in records if "heldout_nll" in r]
        rows.append(f"| {task} | {simulations:,} | {name} | {len(records)} | "
                    f"{statistics.fmean(r['coverage']['0.5'] for r in records):.3f} | "
                    f"{statistics.fmean(r['coverage']['0.9'] for r in records):.3f} | "
                    f"{worst['worst_z']:+.2f} ({worst['worst_level']:.2f}) | "
                    f"{sum(r['passes'] for r in records)} of {len(records)} | "
                    f"{f'{statistics.fmean(nll):.3f}' if len(nll) == len(records) else '-'} | "
                    f"{sum(r['train_cpu_seconds'] for r in records):.1f} |")
    return rows


def _snapshot_records(paths: list[str]) -> tuple[dict, dict]:
    """``benchmark_snapshot_mixture.py`` records by (task, simulations, seed, setting), and the auto checks by
    (task, simulations, seed) from any record of a run (``--check-only`` ones too); the last duplicate wins."""
    records, checks = {}, {}
    for path in paths:
        for r in _records(path):
            run = r["task"], r["simulations"], r["seed"]
            if "auto_check" in r:
                checks[run] = r["auto_check"]
            if "worst_z" in r:  # scored (with or without C2ST)
                records[(*run, r["setting"])] = r
    return records, checks


def snapshot_task_rows(paths: list[str], *, setting: str = "snapshots gap_fraction=0.4") -> list[str]:
    """Per task and budget, over the seeds with a single flow, a mixture and a check: how many runs fail the
    coverage target (worst z below -3) with one flow, the mixture and ``ensemble="auto-snapshots"``; on how
    many the check fires; auto-snapshots' mean C2ST change against the flow (paired over seeds, standard
    error); and the check's median CPU seconds.

    Example:
        >>> import json, tempfile
        >>> def record(seed, setting, z, c2st):
        ...     return {"task": "slcp", "simulations": 10000, "seed": seed, "setting": setting, "worst_z": z,
        ...             "c2st": {"1": c2st}, "auto_check": {"over_confident": seed == 0, "worst_z": -9.0 + 7 * seed},
        ...             "check_cpu_seconds": 2.0}
        >>> lines = [record(0, "defaults", -6.0, 0.86), record(0, "snapshots gap_fraction=0.4", -0.4, 0.87),
        ...          record(1, "defaults", -1.0, 0.85), record(1, "snapshots gap_fraction=0.4", 0.5, 0.88)]
        >>> with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:
        ...     _ = f.write("\\n".join(json.dumps(r) for r in lines))
        >>> snapshot_task_rows([f.name])[-1]
        '| slcp | 10,000 | 0, 1 | 1 of 2 | 0 of 2 | 0 of 2 | 1 of 2 | +0.005 (0.005) | 2.0 |'
    """
    records, checks = _snapshot_records(paths)
    runs = defaultdict(list)
    for task, simulations, seed, name in sorted(records, key=str):
        mixed, check = records.get((task, simulations, seed, setting)), checks.get((task, simulations, seed))
        if name == "defaults" and mixed is not None and check is not None:
            one = records[(task, simulations, seed, name)]
            runs[task, simulations].append((seed, one, mixed, check, mixed if check["over_confident"] else one))
    rows = ["| task | simulations | seeds | one flow fails | mixture fails | auto-snapshots fails | check fires "
            "| auto-snapshots C2ST change (SE) | check CPU s (median) |",
            "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for (task, simulations), group in sorted(runs.items()):
        def fails(index: int) -> str:
            return f"{sum(run[index]['worst_z'] < -3 for run in group)} of {len(group)}"

        scored = all("c2st" in run[4] and "c2st" in run[1] for run in group)
        change = difference_text(*paired([_mean(run[4]["c2st"]) for run in group],
                                         [_mean(run[1]["c2st"]) for run in group])) if scored else "-"
        cpu = [run[1]["check_cpu_seconds"] for run in group if "check_cpu_seconds" in run[1]]
        rows.append(f"| {task} | {simulations:,} | {', '.join(str(run[0]) for run in group)} | {fails(1)} | {fails(2)} "
                    f"| {fails(4)} | {sum(run[3]['over_confident'] for run in group)} of {len(group)} | {change} "
                    f"| {f'{statistics.median(cpu):.1f}' if cpu else '-'} |")
    return rows


def _snapshot_cell(r: dict, *, nll: bool = True) -> str:
    """A scored posterior as ``worst z; C2ST[; NLL]``, ``-`` for a C2ST not scored."""
    c2st = f"{_mean(r['c2st']):.3f}" if "c2st" in r else "-"
    return f"{r['worst_z']:+.2f}; {c2st}" + (f"; {r['heldout_nll']:.3f}" if nll else "")


def _check_text(check: dict | None) -> str:
    """The auto check's worst z and whether it fires (mixes), ``-`` without a check."""
    return "-" if check is None else f"{check['worst_z']:+.2f} ({'fires' if check['over_confident'] else 'passes'})"


def snapshot_rows(paths: list[str], *, setting: str = "snapshots gap_fraction=0.4") -> list[str]:
    """Rows for ``benchmark_snapshot_mixture.py`` records (several files merged; the last of duplicates kept):
    the single flow against the mixture of ``setting``, per task, budget and seed, with the auto check (from
    any record of that run, ``--check-only`` ones too) and what ``ensemble="auto-snapshots"`` returns: the
    mixture where the check fails, else the flow. Each cell: worst z; mean C2ST; held-out NLL."""
    records, checks = _snapshot_records(paths)
    rows = ["| task | simulations | seed | one flow: worst z; C2ST; NLL | members | mixture: worst z; C2ST; NLL "
            "| C2ST change | auto check z | auto-snapshots: worst z; C2ST |",
            "| --- | ---: | ---: | --- | --- | --- | ---: | --- | --- |"]
    for task, simulations, seed, name in sorted(records, key=str):
        mixed = records.get((task, simulations, seed, setting))
        if name != "defaults" or mixed is None:
            continue
        one = records[(task, simulations, seed, name)]
        check = checks.get((task, simulations, seed))
        auto = "-" if check is None else _snapshot_cell(mixed if check["over_confident"] else one, nll=False)
        members = ", ".join(map(str, mixed["members"]))
        change = f"{_mean(mixed['c2st']) - _mean(one['c2st']):+.3f}" if "c2st" in mixed and "c2st" in one else "-"
        rows.append(f"| {task} | {simulations:,} | {seed} | {_snapshot_cell(one)} | {members} | "
                    f"{_snapshot_cell(mixed)} | {change} | {_check_text(check)} | {auto} |")
    return rows


def previous_member_rows(paths: list[str], *, setting: str = "snapshots gap_fraction=0.4") -> list[str]:
    """The runs where ``benchmark_snapshot_mixture.py --previous-members`` scored the member rule before
    session 68 beside today's (their members differ): both mixtures' members and worst z; C2ST; NLL, and
    whether ``ensemble="auto-snapshots"`` returns the mixture there (the check fires). Empty without such runs.

    Example:
        >>> import json, tempfile
        >>> def record(setting, members, z):
        ...     return {"task": "sir", "simulations": 10000, "seed": 3, "setting": setting, "members": members,
        ...             "worst_z": z, "heldout_nll": -7.9, "auto_check": {"over_confident": True, "worst_z": -3.1}}
        >>> lines = [record("snapshots gap_fraction=0.4", [6, 7, 31], -2.5),
        ...          record("snapshots gap_fraction=0.4 previous", [7, 31], -3.4)]
        >>> with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:
        ...     _ = f.write("\\n".join(json.dumps(r) for r in lines))
        >>> previous_member_rows([f.name])[-1]
        '| sir | 10,000 | 3 | -3.10 (fires) | 6, 7, 31 | -2.50; -; -7.900 | 7, 31 | -3.40; -; -7.900 |'
    """
    records, checks = _snapshot_records(paths)
    rows = ["| task | simulations | seed | auto check z | members | mixture: worst z; C2ST; NLL | previous rule's members "
            "| previous rule: worst z; C2ST; NLL |",
            "| --- | ---: | ---: | --- | --- | --- | --- | --- |"]
    for task, simulations, seed, name in sorted(records, key=str):
        if name != f"{setting} previous" or (task, simulations, seed, setting) not in records:
            continue
        new, old = records[(task, simulations, seed, setting)], records[(task, simulations, seed, name)]
        rows.append(f"| {task} | {simulations:,} | {seed} | {_check_text(checks.get((task, simulations, seed)))} | "
                    f"{', '.join(map(str, new['members']))} | {_snapshot_cell(new)} | "
                    f"{', '.join(map(str, old['members']))} | {_snapshot_cell(old)} |")
    return rows if len(rows) > 2 else []


def stacked_rows(paths: list[str], *, setting: str = "stacked gap_fraction=0.4") -> list[str]:
    """The runs where ``benchmark_snapshot_mixture.py --stacked`` scored the likelihood-stacked mixture (runs
    whose check passed the flow): one flow against it (worst z; C2ST; NLL), the members kept with their weights,
    and a last row with the changes paired over the runs (standard error) and the runs failing the target with
    each. Empty without such runs.

    Example:
        >>> import json, tempfile
        >>> def record(seed, setting, z, c2st, nll, **extra):
        ...     return {"task": "sir", "simulations": 10000, "seed": seed, "setting": setting, "worst_z": z,
        ...             "c2st": {"1": c2st}, "heldout_nll": nll, "auto_check": {"over_confident": False,
        ...             "worst_z": -1.7}, **extra}
        >>> stacked = {"kept": [71, 372], "weights": [0.1, 0.9]}
        >>> lines = [record(3, "defaults", -3.3, 0.564, -7.91), record(3, "stacked gap_fraction=0.4", -2.7,
        ...          0.563, -7.92, **stacked), record(4, "defaults", -1.0, 0.55, -7.5),
        ...          record(4, "stacked gap_fraction=0.4", -1.0, 0.55, -7.5, kept=[90], weights=[1.0])]
        >>> with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:
        ...     _ = f.write("\\n".join(json.dumps(r) for r in lines))
        >>> rows = stacked_rows([f.name])
        >>> rows[2]
        '| sir | 10,000 | 3 | -1.70 (passes) | -3.30; 0.564; -7.910 | 71: 0.10, 372: 0.90 | -2.70; 0.563; -7.920 |'
        >>> rows[-1]
        '| all 2 runs | | | | 1 fail | 1 of 2 weighted | 0 fail; C2ST -0.001 (0.001); NLL -0.005 (0.005) |'
    """
    records, checks = _snapshot_records(paths)
    rows = ["| task | simulations | seed | auto check z | one flow: worst z; C2ST; NLL | members kept: weight "
            "| stacked: worst z; C2ST; NLL |",
            "| --- | ---: | ---: | --- | --- | --- | --- |"]
    pairs = []
    for task, simulations, seed, name in sorted(records, key=str):
        if name != setting or (task, simulations, seed, "defaults") not in records:
            continue
        stacked, one = records[(task, simulations, seed, name)], records[(task, simulations, seed, "defaults")]
        pairs.append((one, stacked))
        weights = ", ".join(f"{epoch}: {weight:.2f}" for epoch, weight in zip(stacked["kept"], stacked["weights"]))
        rows.append(f"| {task} | {simulations:,} | {seed} | {_check_text(checks.get((task, simulations, seed)))} | "
                    f"{_snapshot_cell(one)} | {weights} | {_snapshot_cell(stacked)} |")
    if not pairs:
        return []
    both = [(one, stacked) for one, stacked in pairs if "c2st" in one and "c2st" in stacked]
    c2st = difference_text(*paired([_mean(b["c2st"]) for _, b in both],
                                   [_mean(a["c2st"]) for a, _ in both])) if both else "-"
    nll = difference_text(*paired([b["heldout_nll"] for _, b in pairs], [a["heldout_nll"] for a, _ in pairs]))
    weighted = sum(len(stacked["kept"]) > 1 for _, stacked in pairs)
    rows.append(f"| all {len(pairs)} runs | | | | {sum(a['worst_z'] < -3 for a, _ in pairs)} fail | {weighted} of "
                f"{len(pairs)} weighted | {sum(b['worst_z'] < -3 for _, b in pairs)} fail; C2ST {c2st}; NLL {nll} |")
    return rows


def unscored_rows(paths: list[str]) -> list[str]:
    """The runs ``benchmark_snapshot_mixture.py --stacked-only`` recorded without scoring them, per task and budget:
    how many, on how many the check fired (the default is then the equal mixture) and on how many stacking kept the
    flow alone (the default is the flow). Empty without such runs.

    Example:
        >>> import json, tempfile
        >>> def record(seed, fired, **extra):
        ...     return {"task": "sir", "simulations": 1000, "seed": seed, "setting": "unscored gap_fraction=0.4",
        ...             "auto_check": {"over_confident": fired, "worst_z": -1.0}, **extra}
        >>> lines = [record(0, True), record(1, False, kept=[90], weights=[1.0]), record(2, True)]
        >>> with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:
        ...     _ = f.write("\\n".join(json.dumps(r) for r in lines))
        >>> unscored_rows([f.name])[2]
        '| sir | 1,000 | 3 | 2 | 1 |'
    """
    runs: dict[tuple, dict] = {}
    for path in paths:
        for r in _records(path):
            if r.get("setting", "").startswith("unscored"):
                runs[(r["task"], r["simulations"], r["seed"])] = r
    if not runs:
        return []
    rows = ["| task | simulations | runs not scored | check fired (equal mixture) | stacking kept the flow alone |",
            "| --- | ---: | ---: | ---: | ---: |"]
    for task, simulations in sorted({key[:2] for key in runs}):
        group = [r for key, r in runs.items() if key[:2] == (task, simulations)]
        fired = sum(r["auto_check"]["over_confident"] for r in group)
        rows.append(f"| {task} | {simulations:,} | {len(group)} | {fired} | {len(group) - fired} |")
    return rows


def _versus(ours: dict, base: dict) -> str:
    """``"difference (SE) | k of n"``: ``ours - base`` paired over their common seeds (``"- | -"`` if none).

    Example:
        >>> _versus({0: 1.0, 1: 2.0}, {0: 1.5, 1: 2.0, 2: 0.0})
        '-0.250 (0.250) | 1 of 2'
    """
    seeds = sorted(set(ours) & set(base))
    if not seeds:
        return "- | -"
    difference, se = paired([ours[s] for s in seeds], [base[s] for s in seeds])
    return f"{difference_text(difference, se)} | {sum(ours[s] < base[s] for s in seeds)} of {len(seeds)}"


def _versus_by_seed(ours: dict, base: dict) -> str:
    """:func:`_versus` for runs keyed ``(seed, observation)``: each seed's difference is the mean over its shared
    observations (the observations of a seed share its network, so they are not independent), the standard error
    is over seeds, and ``"k of n"`` counts runs.

    Example:
        >>> _versus_by_seed({(0, 1): 0.6, (0, 2): 0.8, (1, 1): 0.7}, {(0, 1): 0.7, (0, 2): 0.7, (1, 1): 0.8})
        '-0.050 (0.050) | 2 of 3'
    """
    runs = sorted(set(ours) & set(base))
    if not runs:
        return "- | -"
    seeds = sorted({run[0] for run in runs})
    per_seed = [statistics.fmean(ours[run] - base[run] for run in runs if run[0] == seed) for seed in seeds]
    difference, se = paired(per_seed, [0.0] * len(per_seed))
    return f"{difference_text(difference, se)} | {sum(ours[run] < base[run] for run in runs)} of {len(runs)}"


def _setting(record: dict) -> str:
    """A record's setting, ``"defaults"`` for the defaults (``benchmark_coverage.py`` records them as ``""``).

    Example:
        >>> _setting({"setting": ""}), _setting({"setting": "ensemble=3"})
        ('defaults', 'ensemble=3')
    """
    return record["setting"] or "defaults"


def nll_rows(path: str, *, baseline: str = "defaults") -> list[str]:
    """Rows for ``benchmark_npe_training.py`` records: each setting's held-out NLL against ``baseline``.

    The difference is paired by seed (the same simulations and test pairs); negative is better. The
    last column counts the seeds on which the setting's NLL was lower than the baseline's.
    """
    def key(r):
        return r["task"], r["simulations"], _setting(r), r["seed"]

    table = {group: records for group, records in _groups(path, key)}
    rows = [f"| task | simulations | setting | seeds | held-out NLL | minus {baseline} (SE) | seeds better | "
            "train CPU s (sum) | epochs (mean) |",
            "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for (task, simulations, setting), records in sorted(table.items(), key=lambda item: (item[0][0], item[0][1],
                                                                                         item[0][2] != baseline)):
        nll = {r["seed"]: r["heldout_nll"] for r in records}
        base = {r["seed"]: r["heldout_nll"] for r in table.get((task, simulations, baseline), [])}
        versus = _versus(nll, base) if setting != baseline else "- | -"
        cpu = sum(r.get("train_cpu_seconds", math.nan) for r in records)
        rows.append(f"| {task} | {simulations:,} | {setting} | {len(records)} | {statistics.fmean(nll.values()):.3f} | "
                    f"{versus} | {cpu:.1f} | {statistics.fmean(r['epochs'] for r in records):.0f} |")
    return rows


def timing_rows(paths: list[str], *, baseline: str = "defaults", other: str = "sbi nsf") -> list[str]:
    """``timing``: repeated ``benchmark_npe_training.py --sbi`` runs (one file per repeat) timed against each other.

    Per task, budget and file: ``baseline``'s and ``other``'s training CPU and wall seconds summed over the seeds
    both ran, and their ratio (the same processes, so the same machine load); then a row of the medians over files.

    Example:
        >>> import json, tempfile
        >>> def run(ours, sbi):
        ...     with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:
        ...         for setting, cpu in (("defaults", ours), ("sbi nsf", sbi)):
        ...             _ = f.write(json.dumps({"task": "sir", "simulations": 1000, "seed": 0, "setting": setting,
        ...                                     "heldout_nll": 0.0, "epochs": 9, "train_cpu_seconds": cpu,
        ...                                     "train_seconds": cpu + 1}) + "\\n")
        ...     return f.name
        >>> for row in timing_rows([run(12.0, 10.0), run(11.0, 10.0), run(13.0, 10.0)])[2:]:
        ...     print(row)
        | sir | 1,000 | 1 | 12.0 / 13.0 | 10.0 / 11.0 | 1.20 | 1.18 |
        | sir | 1,000 | 2 | 11.0 / 12.0 | 10.0 / 11.0 | 1.10 | 1.09 |
        | sir | 1,000 | 3 | 13.0 / 14.0 | 10.0 / 11.0 | 1.30 | 1.27 |
        | sir | 1,000 | median of 3 | 12.0 / 13.0 | 10.0 / 11.0 | **1.20** | 1.18 |
    """
    def key(r):
        return r["task"], r["simulations"], _setting(r), r["seed"]

    runs = defaultdict(list)  # (task, simulations) -> per file: (ours cpu, ours wall, other cpu, other wall)
    for path in paths:
        table = {group: records for group, records in _groups(path, key)}
        for task, simulations in sorted({(t, n) for t, n, _ in table}):
            ours, theirs = ({r["seed"]: r for r in table.get((task, simulations, s), [])} for s in (baseline, other))
            seeds = sorted(set(ours) & set(theirs))
            if seeds:
                runs[task, simulations].append(tuple(sum(side[k][field] for k in seeds) for side in (ours, theirs)
                                                     for field in ("train_cpu_seconds", "train_seconds")))
    rows = [f"| task | simulations | repeat | {baseline} CPU / wall s | {other} CPU / wall s | CPU ratio "
            "| wall ratio |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for (task, simulations), repeats in runs.items():
        ratios = [(v[0] / v[2], v[1] / v[3]) for v in repeats]
        medians = [statistics.median(column) for column in zip(*repeats)]
        lines = [(str(k + 1), values, ratio, "") for k, (values, ratio) in enumerate(zip(repeats, ratios))]
        lines.append((f"median of {len(repeats)}", medians, [statistics.median(c) for c in zip(*ratios)], "**"))
        for label, (cpu, wall, other_cpu, other_wall), (cpu_ratio, wall_ratio), bold in lines:
            rows.append(f"| {task} | {simulations:,} | {label} | {cpu:.1f} / {wall:.1f} | {other_cpu:.1f} / "
                        f"{other_wall:.1f} | {bold}{cpu_ratio:.2f}{bold} | {wall_ratio:.2f} |")
    return rows


def nll_grid_rows(path: str, *, baseline: str = "defaults", candidate: str | None = None) -> list[str]:
    """One row per task and budget: every setting's mean held-out NLL, then ``candidate - baseline`` paired by seed.

    Settings are the columns in the order of the tasks (by name), then of the settings (by name) within the first
    task that has them (here ``b`` before ``defaults``); ``-`` where a setting was not run. With
    several tasks or budgets, a last row pools ``candidate - baseline`` over all their task-seeds.

    Example:
        >>> import json, tempfile
        >>> with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:
        ...     for task, seed, setting, nll in [("sir", 0, "defaults", 1.0), ("sir", 0, "b", 0.5),
        ...                                       ("slcp", 0, "defaults", 2.0), ("slcp", 0, "b", 2.5)]:
        ...         _ = f.write(json.dumps({"task": task, "simulations": 1000, "seed": seed, "setting": setting,
        ...                                 "heldout_nll": nll}) + "\\n")
        >>> for row in nll_grid_rows(f.name, candidate="b")[2:]:
        ...     print(row)
        | sir | 1,000 | 0.500 | 1.000 | -0.500 (-) | 1 of 1 |
        | slcp | 1,000 | 2.500 | 2.000 | +0.500 (-) | 0 of 1 |
        | all 2 | - | - | - | +0.000 (0.500) | 1 of 2 |
    """
    def key(r):
        return r["task"], r["simulations"], _setting(r), r["seed"]

    table = {group: {r["seed"]: r["heldout_nll"] for r in records} for group, records in _groups(path, key)}
    settings = list(dict.fromkeys(setting for _, _, setting in table))
    rows = ["| task | simulations | " + " | ".join(settings) + f" | {candidate} - {baseline} (SE) | seeds better |",
            "| --- | ---: | " + " | ".join("---:" for _ in settings) + " | ---: | ---: |"]
    for task, simulations in sorted({(t, n) for t, n, _ in table}, key=lambda item: (item[1], item[0])):
        cells = [f"{statistics.fmean(table[(task, simulations, s)].values()):.3f}" if (task, simulations, s) in table
                 else "-" for s in settings]
        versus = _versus(table.get((task, simulations, candidate), {}), table.get((task, simulations, baseline), {}))
        rows.append(f"| {task} | {simulations:,} | " + " | ".join(cells) + f" | {versus} |")
    groups = {(t, n) for t, n, _ in table}
    if len(groups) > 1:
        pooled = [{(t, n, seed): value for (t, n, s), seeds in table.items() if s == setting
                   for seed, value in seeds.items()} for setting in (candidate, baseline)]
        rows.append(f"| all {len(groups)} | - | " + " | ".join("-" for _ in settings) + f" | {_versus(*pooled)} |")
    return rows


def tsnpe_methods(record: dict) -> dict[str, tuple[float, float]]:
    """The methods of one ``benchmark_tsnpe.py`` record, named with their flow: ``{name: (C2ST, CPU s)}``.

    TSNPE's name carries the training options the record set (``patience``, ``step_drops``, ``ensemble``). Records
    from before ``npe_estimator`` was written used TSNPE's flow for the amortized NPE too;
    sbi's without ``density_estimator`` used sbi's default, its MAF.

    Example:
        >>> tsnpe_methods({"estimator": "maf", "ours_tsnpe": {"c2st": 0.6, "cpu_seconds": 9.0},
        ...                "ours_npe": {"c2st": 0.7, "cpu_seconds": 4.0}})
        {'TSNPE maf': (0.6, 9.0), 'NPE maf': (0.7, 4.0)}
        >>> list(tsnpe_methods({"estimator": "nsf", "ensemble": 3, "ours_tsnpe": {"c2st": 0.6, "cpu_seconds": 9.0}}))
        ['TSNPE nsf, ensemble=3']
    """
    options = "".join(f", {key}={record[key]}" for key in ("patience", "step_drops") if record.get(key) is not None)
    options += f", ensemble={record['ensemble']}" if record.get("ensemble", 1) != 1 else ""
    names = {"ours_tsnpe": f"TSNPE {record['estimator']}{options}",
             "ours_npe": f"NPE {record.get('npe_estimator', record['estimator'])}",
             "sbi_tsnpe": f"sbi TSNPE {record.get('sbi_tsnpe', {}).get('density_estimator', 'maf')}"}
    return {name: (record[key]["c2st"], record[key]["cpu_seconds"]) for key, name in names.items() if key in record}


def tsnpe_rows(paths: list[str], *, baseline: str) -> list[str]:
    """One row per task, budget, rounds and method: mean C2ST over runs and the difference from ``baseline``.

    A run is one seed and observation; records of the same run from several files are merged (the last
    file wins for a method in two). A path given as ``LABEL=PATH`` names its methods ``"NAME (LABEL)"``,
    so the same method run with other code can be set against the unlabelled one. The difference is
    paired over the runs both methods have (the mean C2ST is over all of the method's runs), with its standard
    error over seeds (each seed's mean difference over its observations: before session 76 it was over runs, which
    understated it, :func:`_versus_by_seed`); "runs better" counts the runs where the method's C2ST is lower.
    The amortized NPE's CPU seconds are one training per seed, shared by its observations.
    """
    runs: dict[tuple, dict[str, tuple[float, float]]] = defaultdict(dict)
    for given in paths:
        label, _, path = ("", "", given) if os.path.exists(given) else given.partition("=")
        for record in _records(path):
            key = (record["task"], record["simulations"], record["rounds"], record["seed"], record["observation"])
            runs[key].update({f"{name} ({label})" if label else name: value
                              for name, value in tsnpe_methods(record).items()})
    rows = [f"| task | simulations | rounds | method | runs | mean C2ST | minus {baseline} (SE) | runs better "
            "| median CPU s | published SNPE-C |", "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for task, simulations, rounds in sorted({key[:3] for key in runs}, key=lambda k: (k[1], k[0], k[2])):
        group = {key[3:]: methods for key, methods in runs.items() if key[:3] == (task, simulations, rounds)}
        names = sorted({name for methods in group.values() for name in methods}, key=lambda n: (n != baseline, n))
        snpe = published(task, simulations, table=PUBLISHED_SNPE_C)
        base = {run: methods[baseline][0] for run, methods in group.items() if baseline in methods}
        for name in names:
            c2st = {run: methods[name][0] for run, methods in group.items() if name in methods}
            cpu = statistics.median(methods[name][1] for methods in group.values() if name in methods)
            versus = _versus_by_seed(c2st, base) if name != baseline else "- | -"
            rows.append(f"| {task} | {simulations:,} | {rounds} | {name} | {len(c2st)} | "
                        f"{statistics.fmean(c2st.values()):.3f} | {versus} | {cpu:.1f} | {snpe} |")
    return rows


def tsnpe_region_rows(paths: list[str]) -> list[str]:
    """One row per TSNPE run (task, budget, method, seed, observation): its C2ST and, for each truncated round,
    the share of the reference posterior's draws inside the region (``reference_inside``), with the smallest.

    Example:
        >>> import tempfile
        >>> record = {"task": "slcp", "simulations": 1000, "rounds": 3, "seed": 0, "observation": 2,
        ...           "estimator": "nsf", "ours_tsnpe": {"c2st": 0.9, "cpu_seconds": 5.0, "rounds": [
        ...           {"volume": 1.0}, {"reference_inside": 0.99}, {"reference_inside": 1.0}]}}
        >>> with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:
        ...     _ = f.write(json.dumps(record) + "\\n")
        >>> tsnpe_region_rows([f.name])[2]
        '| slcp | 1,000 | TSNPE nsf | 0 | 2 | 0.900 | 0.9900 1.0000 | 0.9900 |'
    """
    rows = ["| task | simulations | method | seed | observation | C2ST | reference draws inside each region | "
            "smallest |", "| --- | ---: | --- | ---: | ---: | ---: | --- | ---: |"]
    for given in paths:
        label, _, path = ("", "", given) if os.path.exists(given) else given.partition("=")
        for record in _records(path):
            if "ours_tsnpe" not in record:
                continue
            name = next(iter(tsnpe_methods({k: v for k, v in record.items() if k in (
                "estimator", "patience", "step_drops", "ensemble", "ours_tsnpe")})))
            shares = [r["reference_inside"] for r in record["ours_tsnpe"]["rounds"] if "reference_inside" in r]
            rows.append(f"| {record['task']} | {record['simulations']:,} | {name}{f' ({label})' if label else ''} | "
                        f"{record['seed']} | {record['observation']} | {record['ours_tsnpe']['c2st']:.3f} | "
                        f"{' '.join(f'{v:.4f}' for v in shares)} | {min(shares, default=float('nan')):.4f} |")
    return rows


def main(argv: list[str] | None = None) -> None:
    """Print the table; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=["npe", "bounded", "nll", "nll-grid", "coverage", "tsnpe", "tsnpe-regions",
                                         "snapshots", "timing"])
    parser.add_argument("path")
    parser.add_argument("more", nargs="*", help="tsnpe: more record files, merged by task, budget, rounds, seed, "
                        "observation; LABEL=PATH adds ' (LABEL)' to the names of its methods; snapshots: more "
                        "benchmark_snapshot_mixture.py files (e.g. --check-only ones); timing: one file per repeat")
    parser.add_argument("--baseline", default=None, help="nll, nll-grid: the setting the others are compared with "
                        "(default: defaults); tsnpe: the method (default: NPE nsf)")
    parser.add_argument("--candidate", default=None, help="nll-grid: the setting compared with the baseline")
    parser.add_argument("--sbi", default=None, metavar="NPE_JSONL",
                        help="bounded: benchmark_npe.py records on the same rows, to compare the truncated space with sbi")
    parser.add_argument("--per-seed", action="store_true", help="npe: one row per seed instead of the seeds' mean")
    parser.add_argument("--sbi-values", nargs="*", default=[], metavar="TASK:SIMULATIONS=C0,C1,...",
                        help="npe: sbi's mean C2ST per seed (0, 1, ...) from runs recorded elsewhere, for records "
                        "without sbi")
    args = parser.parse_args(argv)
    if args.kind == "tsnpe":
        rows = tsnpe_rows([args.path, *args.more], baseline=args.baseline or "NPE nsf")
    elif args.kind == "tsnpe-regions":
        rows = tsnpe_region_rows([args.path, *args.more])
    elif args.kind == "snapshots":
        paths = [args.path, *args.more]
        tables = [snapshot_rows(paths), snapshot_task_rows(paths), previous_member_rows(paths), stacked_rows(paths),
                  unscored_rows(paths)]
        rows = [row for table in tables if len(table) > 2 for row in ["", *table]][1:]  # tables with a row
    elif args.kind == "timing":
        rows = timing_rows([args.path, *args.more], baseline=args.baseline or "defaults")
    elif args.kind == "nll":
        rows = nll_rows(args.path, baseline=args.baseline or "defaults")
    elif args.kind == "nll-grid":
        rows = nll_grid_rows(args.path, baseline=args.baseline or "defaults", candidate=args.candidate)
    elif args.kind == "bounded":
        rows = bounded_rows(args.path, sbi_path=args.sbi)
    elif args.kind == "npe":
        sbi_values = parse_sbi_values(args.sbi_values)
        rows = (npe_seed_rows(args.path, sbi_values=sbi_values) if args.per_seed
                else npe_rows(args.path, sbi_values=sbi_values))
    else:
        rows = coverage_rows(args.path)
    print("\n".join(rows))


if __name__ == "__main__":
    main()

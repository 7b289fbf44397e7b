"""Do the validation rows flatter the calibration check? The check on the rows that chose the epoch against fresh rows.

The default's check (:func:`sbiflows.ensemble.auto_check`) scores the first flow's expected HPD coverage on
its validation rows: rows it never trained on, but rows whose loss chose its early-stopping epoch. If that
choice favours weights that happen to cover those rows, the check sees a better calibrated flow than fresh
data do, and passes flows that are over-confident. For each task and seed this script trains one flow
(``NPE(prior, ensemble=1)``, otherwise the defaults) on ``--simulations`` of the task's seeded simulations,
then runs the same check, with the same seed, on its validation rows and on ``--fresh`` fresh prior pairs
(another seed), and records per level the coverage on both, the mean randomized HPD rank on both (an
over-confident flow puts the truth at high ranks; exactly uniform ranks have mean 1/2), the worst ``z`` of
each and the mean negative log density of each.

Without a selection effect the two sets estimate the same coverage, and the differences average to zero
over seeds; ``--summarize FILE`` prints one row per run and their means with standard errors over runs.

``--widen`` also measures a width correction: the flow with its base distribution scaled by the factor
``s`` (:func:`widened`) that maximizes the mean log density of the validation rows (:func:`fit_width`),
checked on the same fresh rows (``record["widened"]``, with ``s`` in ``record["width"]``), so that
``--summarize`` compares the corrected flow with the flow on data neither saw.

Usage:
    python examples/benchmark_check_rows.py --tasks two_moons --simulations 10000 --seeds 10 11 --json rows.jsonl
    python examples/benchmark_check_rows.py --summarize rows.jsonl
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import time

import torch

import simulators
from sbiflows import NPE
from sbiflows.ensemble import auto_check, members_of
from sbiflows.posterior import observations_unchecked
from sbiflows.seeding import derive_seed
from sbiflows.simulate import simulate_from_prior
from sbiflows.transforms import Compose, ElementwiseAffine

#: fit_width searches the scale of the base distribution in [1 / WIDTH_RANGE, WIDTH_RANGE].
WIDTH_RANGE = 2.0


def widened(posterior, scale: float):
    """A copy of ``posterior`` whose flows draw their base noise with standard deviation ``scale``: each flow's
    transform gets a last layer ``z -> z / scale`` (data -> latent), so the density stays normalized (in the
    truncated space up to the normalizer, which ``log_prob`` estimates for the new flow)."""
    wide = copy.deepcopy(posterior)
    for net in members_of(wide.net):
        flow = net.flow
        layer = ElementwiseAffine(flow.features, log_scale=math.log(scale))
        flow.transform = Compose(flow.transform, layer.to(device=net.u_shift.device, dtype=net.u_shift.dtype))
    return wide


def fit_width(posterior, theta, x, *, steps: int = 40) -> float:
    """The scale of :func:`widened` that maximizes the mean log density of ``(theta, x)`` (golden-section search
    on ``log scale``; unnormalized densities, so in the truncated space mass pushed outside the box is not
    charged)."""
    def score(log_scale: float) -> float:
        with torch.no_grad(), observations_unchecked():
            log_q = widened(posterior, math.exp(log_scale)).log_prob_batched(theta[None], x, normalized=False)
        return float(log_q.mean())

    low, high = -math.log(WIDTH_RANGE), math.log(WIDTH_RANGE)
    ratio = (math.sqrt(5) - 1) / 2
    a, b = high - ratio * (high - low), low + ratio * (high - low)
    fa, fb = score(a), score(b)
    for _ in range(steps):
        if fa >= fb:
            high, b, fb = b, a, fa
            a = high - ratio * (high - low)
            fa = score(a)
        else:
            low, a, fa = a, b, fb
            b = low + ratio * (high - low)
            fb = score(b)
    return math.exp((low + high) / 2)


def summary(check, theta, x, posterior) -> dict[str, object]:
    """Coverage per level, mean rank, worst z and mean negative log density of one check's rows."""
    levels, empirical = check.levels, check.empirical
    rows = len(check.hpd_ranks)
    z = (empirical - levels) / (levels * (1 - levels) / rows).sqrt()
    worst = int(z.argmin())
    with torch.no_grad(), observations_unchecked():
        nll = -float(posterior.log_prob_batched(theta[None], x).mean())
    return {"rows": rows, "coverage": {round(float(v), 2): round(float(c), 4) for v, c in zip(levels, empirical)},
            "mean_rank": round(float(check.hpd_ranks.mean()), 5), "worst_z": round(float(z[worst]), 3),
            "worst_level": round(float(levels[worst]), 2), "passed": bool(check.passed), "nll": round(nll, 5)}


def measure(task_name: str, simulations: int, seed: int, *, fresh_rows: int, widen: bool = False) -> dict[str, object]:
    """Train one flow and check it on its validation rows and on fresh rows (with ``widen``, also the flow
    widened by :func:`fit_width` on its validation rows, on the fresh rows)."""
    task = simulators.get(task_name)
    sims = simulate_from_prior(task.simulate, task.prior, simulations, seed=seed, progress=False)
    theta, x = sims.theta[sims.valid], sims.x[sims.valid]
    npe = NPE(task.prior, ensemble=1)
    cpu = time.process_time()
    posterior = npe.fit(theta, x, seed=seed, progress=False)
    cpu = time.process_time() - cpu
    mask = npe.validation
    fresh = simulate_from_prior(task.simulate, task.prior, fresh_rows, seed=derive_seed(seed, "check-rows"),
                                progress=False)
    fresh_theta, fresh_x = fresh.theta[fresh.valid], fresh.x[fresh.valid]
    record = {"task": task_name, "simulations": simulations, "seed": seed, "train_cpu_seconds": round(cpu, 1),
              "best_epoch": npe.history.best_epoch, "epochs": npe.history.epochs}
    for name, (t, xs) in {"validation": (theta[mask], x[mask]), "fresh": (fresh_theta, fresh_x)}.items():
        check = auto_check(posterior, t, xs, seed=seed)
        record[name] = summary(check, t, xs, posterior)
    if widen:
        record["width"] = round(fit_width(posterior, theta[mask], x[mask]), 5)
        wide = widened(posterior, record["width"])
        record["widened"] = summary(auto_check(wide, fresh_theta, fresh_x, seed=seed), fresh_theta, fresh_x, wide)
    return record


def summarize(path: str) -> list[str]:
    """A markdown table of the records in ``path`` (one row per run), then the means over runs with their
    standard errors: fresh minus validation mean rank, validation minus fresh coverage (at 50% and averaged over
    the levels), fresh minus validation NLL, and how often the check's verdicts (z >= -2.5) differ."""
    latest = {}  # a rerun of a run (--json appends) replaces it, as the other summaries do
    with open(path) as stream:
        for r in (json.loads(line) for line in stream if line.strip()):
            latest[r["task"], r.get("simulations"), r["seed"]] = r
    records = sorted(latest.values(), key=lambda r: (r["task"], r["seed"]))
    rows = ["| task | seed | best epoch | mean rank: validation / fresh | coverage at 50%: validation / fresh | "
            "worst z: validation / fresh | NLL: validation / fresh |", "| --- | ---: | ---: | --- | --- | --- | --- |"]
    for r in records:
        v, f = r["validation"], r["fresh"]
        rows.append(f"| {r['task']} | {r['seed']} | {r['best_epoch']} | {v['mean_rank']:.4f} / {f['mean_rank']:.4f} | "
                    f"{v['coverage']['0.5']:.3f} / {f['coverage']['0.5']:.3f} | {v['worst_z']:+.2f} / "
                    f"{f['worst_z']:+.2f} | {v['nll']:.4f} / {f['nll']:.4f} |")

    def mean_se(values: list[float]) -> str:
        if len(values) < 2:
            return f"{values[0]:+.4f} (one run)"
        return f"{statistics.mean(values):+.4f} (SE {statistics.stdev(values) / len(values) ** 0.5:.4f})"

    levels = list(records[0]["fresh"]["coverage"])
    differences = {
        "mean rank, fresh - validation": [r["fresh"]["mean_rank"] - r["validation"]["mean_rank"] for r in records],
        "coverage at 50%, validation - fresh": [r["validation"]["coverage"]["0.5"] - r["fresh"]["coverage"]["0.5"]
                                                for r in records],
        "coverage over the 19 levels, validation - fresh": [
            statistics.mean(r["validation"]["coverage"][k] - r["fresh"]["coverage"][k] for k in levels)
            for r in records],
        "NLL, fresh - validation": [r["fresh"]["nll"] - r["validation"]["nll"] for r in records],
    }
    rows += ["", f"Over {len(records)} runs:"]
    rows += [f"- {name}: {mean_se(values)}" for name, values in differences.items()]
    passes = [(r["validation"]["worst_z"] >= -2.5, r["fresh"]["worst_z"] >= -2.5) for r in records]
    rows.append(f"- the check (z >= -2.5) passes on validation and fails on fresh rows: {passes.count((True, False))}; "
                f"the reverse: {passes.count((False, True))}; both fail: {passes.count((False, False))}; "
                f"both pass: {passes.count((True, True))}")
    widened_runs = [r for r in records if "widened" in r]
    if widened_runs:
        rows += ["", f"The width correction on fresh rows ({len(widened_runs)} runs; scale fitted on the validation "
                 "rows):", "", "| task | seed | scale | mean rank: flow / widened | coverage at 50%: flow / widened | "
                 "worst z: flow / widened | NLL: flow / widened |", "| --- | ---: | ---: | --- | --- | --- | --- |"]
        for r in widened_runs:
            f, w = r["fresh"], r["widened"]
            rows.append(f"| {r['task']} | {r['seed']} | {r['width']:.4f} | "
                        f"{f['mean_rank']:.4f} / {w['mean_rank']:.4f} | "
                        f"{f['coverage']['0.5']:.3f} / {w['coverage']['0.5']:.3f} | {f['worst_z']:+.2f} / "
                        f"{w['worst_z']:+.2f} | {f['nll']:.4f} / {w['nll']:.4f} |")
        changes = {
            "scale": [r["width"] for r in widened_runs],
            "NLL on fresh rows, widened - flow": [r["widened"]["nll"] - r["fresh"]["nll"] for r in widened_runs],
            "mean rank on fresh rows, widened - flow": [r["widened"]["mean_rank"] - r["fresh"]["mean_rank"]
                                                        for r in widened_runs],
            "mean rank on fresh rows - 1/2, widened": [r["widened"]["mean_rank"] - 0.5 for r in widened_runs],
        }
        rows += [""] + [f"- {name}: {mean_se(values)}" for name, values in changes.items()]
        fails = [(r["fresh"]["worst_z"] < -2.5, r["widened"]["worst_z"] < -2.5) for r in widened_runs]
        rows.append(f"- fresh checks failing (z < -2.5): flow {sum(f for f, _ in fails)}, widened "
                    f"{sum(w for _, w in fails)} of {len(fails)}")
    return rows


def main(argv: list[str] | None = None) -> None:
    """Run the comparison; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["two_moons"], choices=simulators.names())
    parser.add_argument("--simulations", type=int, default=10_000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[10])
    parser.add_argument("--fresh", type=int, default=1000, help="fresh prior pairs the check also runs on")
    parser.add_argument("--widen", action="store_true", help="also check the flow widened by fit_width on fresh rows")
    parser.add_argument("--json", default=None, help="append one JSON record per task and seed to this file")
    parser.add_argument("--summarize", default=None, metavar="FILE", help="print the table of FILE's records instead")
    args = parser.parse_args(argv)
    if args.summarize:
        print("\n".join(summarize(args.summarize)))
        return
    torch.set_num_threads(1)
    for task_name in args.tasks:
        for seed in args.seeds:
            record = measure(task_name, args.simulations, seed, fresh_rows=args.fresh, widen=args.widen)
            print(f"{task_name} seed {seed}: mean rank validation {record['validation']['mean_rank']:.4f} "
                  f"fresh {record['fresh']['mean_rank']:.4f}; worst z {record['validation']['worst_z']:+.2f} / "
                  f"{record['fresh']['worst_z']:+.2f}; nll {record['validation']['nll']:.4f} / "
                  f"{record['fresh']['nll']:.4f}", flush=True)
            if args.json:
                with open(args.json, "a") as handle:
                    handle.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()

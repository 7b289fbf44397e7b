"""Is the default posterior over-confident? Expected HPD coverage per task (issue 16's calibration target).

For each task, seed and setting: simulate ``--simulations`` training pairs (the benchmark's seeded
draws), train NPE with the setting's options, simulate ``--datasets`` fresh pairs from the prior
(another seed), and compute the expected coverage of the posterior's HPD regions at the levels
0.05, 0.10, ..., 0.95 with :func:`sbiflows.diagnostics.expected_coverage` (``--posterior-samples``
draws per dataset). Reported per row: the empirical coverage at 50% and 90%, the most negative
deviation in binomial standard deviations, ``z = (empirical - level) / sqrt(level (1 - level) / N)``
over all levels, and whether it passes the issue's rule "nowhere below the level by more than
3 standard deviations" (``z >= -3``); also the verdict of the library's two-sided check (3 standard
deviations plus its 0.02 Monte Carlo tolerance) and training CPU seconds. Each record also says how
many flows the posterior has (``ensemble``) and, for ``ensemble=auto``, what the first flow's check
on its validation rows found (``ensemble_auto``: rows, over-confident or not, worst z and its level).

Settings are comma-separated NPE and ``fit`` options as in ``benchmark_npe_training.py`` (``""`` is
the defaults; ``ensemble=5`` an ensemble). ``--sbi`` (with the ``sbi`` package importable) adds a row
for sbi's NPE (``--sbi-estimator``, default ``nsf``, sbi's defaults) trained on the same simulations
and scored on the same datasets; its HPD ranks use the flow's density without sbi's leakage
normalization, which does not change ranks within one dataset.

Usage:
    python examples/benchmark_coverage.py --tasks slcp two_moons --simulations 10000 --seeds 0
    python examples/benchmark_coverage.py --tasks slcp --simulations 10000 --settings "" ensemble=5 --json cov.jsonl
    python examples/benchmark_coverage.py --tasks slcp --simulations 10000 --settings "" --sbi
"""

from __future__ import annotations

import argparse
import contextlib
import math
import time

import torch

import simulators
from sbiflows import coverage_loss
from sbiflows.diagnostics import expected_coverage
from sbiflows.posterior import observations_unchecked
from sbiflows.seeding import derive_seed
from sbiflows.simulate import simulate_from_prior

from benchmark_npe import _NullTracker  # examples/ is on sys.path when this runs as a script
from benchmark_npe_training import emit, fit_setting

#: The issue's rule: coverage nowhere below the level by more than this many binomial standard deviations.
MAX_SIGMAS_BELOW = 3.0


def worst_z(levels: torch.Tensor, empirical: torch.Tensor, n: int) -> tuple[float, float]:
    """The most negative ``(empirical - level) / sqrt(level (1 - level) / n)`` and the level where it occurs.

    Example:
        >>> worst_z(torch.tensor([0.5, 0.9]), torch.tensor([0.5, 0.84]), 100)
        (-2.0, 0.9)
    """
    z = (empirical - levels) / (levels * (1 - levels) / n).sqrt()
    i = int(z.argmin())
    return round(float(z[i]), 2), round(float(levels[i]), 2)


@contextlib.contextmanager
def tempered(posterior, temperature: float):
    """Within the block, the flow's standard normal base has standard deviation ``temperature``.

    A measurement of post-hoc widening (not a library feature): sampling scales the base draws by
    ``temperature`` and ``log_prob`` uses the widened base, so the posterior stays a normalized flow
    density. Single flows in the unconstrained space only.
    """
    if temperature == 1.0:
        yield posterior
        return
    net = posterior.net
    if hasattr(net, "members") or posterior.config.get("space", "unconstrained") != "unconstrained":
        raise ValueError("temperatures are measured for single flows in the unconstrained space only (the default "
                         "may mix snapshots: add ensemble=1 and space=unconstrained to the setting)")
    base, from_base = net.flow.base, net.sample_from_base
    dim = base.features

    class Widened(torch.nn.Module):
        features = dim

        def log_prob(self, z):
            return base.log_prob(z / temperature) - dim * math.log(temperature)

        def sample(self, shape, *, generator=None):
            return base.sample(shape, generator=generator) * temperature

    net.flow.base = Widened()
    net.sample_from_base = lambda noise, context: from_base(noise * temperature, context)
    try:
        yield posterior
    finally:
        net.flow.base = base
        del net.sample_from_base  # back to the class's method


class SbiPosterior:
    """sbi's posterior with the two batched methods :func:`expected_coverage` calls."""

    def __init__(self, posterior):
        self.posterior = posterior

    def sample_batched(self, n, xs):
        return self.posterior.sample_batched((n,), x=xs, show_progress_bars=False)

    def log_prob_batched(self, theta, xs):
        return self.posterior.log_prob_batched(theta, x=xs, norm_posterior=False)

    def log_prob(self, theta, x):
        return self.posterior.log_prob(theta, x=x, norm_posterior=False)


def train_sbi(prior, theta, x, *, seed: int, density_estimator: str) -> SbiPosterior:
    """sbi's NPE with its defaults on the same rows (one torch thread, as ours)."""
    from sbi.inference import NPE as SbiNPE

    torch.manual_seed(seed)
    inference = SbiNPE(prior=prior, density_estimator=density_estimator, show_progress_bars=False,
                       tracker=_NullTracker())
    estimator = inference.append_simulations(theta, x).train()
    return SbiPosterior(inference.build_posterior(estimator))


def score(posterior, fresh, test, *, seed: int, posterior_samples: int) -> dict[str, object]:
    """The coverage fields of a record: expected HPD coverage on the ``fresh`` datasets, its worst ``z``
    and the rule, the library's verdict, and the held-out NLL of ``test`` (valid rows of both)."""
    with observations_unchecked():
        start = time.process_time()
        result = expected_coverage(posterior, theta=fresh.theta[fresh.valid], x=fresh.x[fresh.valid],
                                   num_posterior_samples=posterior_samples, seed=seed)
        coverage_cpu = time.process_time() - start
        with torch.no_grad():
            nll = -float(posterior.log_prob_batched(test.theta[test.valid][None], test.x[test.valid]).mean())
    z, at = worst_z(result.levels, result.empirical, result.num_datasets)
    level = {round(float(v), 2): round(float(c), 3) for v, c in zip(result.levels, result.empirical)}
    return {"datasets": result.num_datasets, "coverage": level, "worst_z": z, "worst_level": at,
            "passes": z >= -MAX_SIGMAS_BELOW, "verdict": result.verdict, "heldout_nll": round(nll, 4),
            "test_size": int(test.valid.sum()), "coverage_cpu_seconds": round(coverage_cpu, 1)}


def measure(task_name: str, simulations: int, seed: int, setting: str, *, datasets: int, posterior_samples: int,
            test_size: int, temperatures: list[float]) -> list[dict[str, object]]:
    """Train one posterior and return its coverage record per temperature (``setting`` "sbi nsf": sbi's NSF)."""
    task = simulators.get(task_name)
    sims = simulate_from_prior(task.simulate, task.prior, simulations, seed=seed, progress=False)
    start, cpu_start = time.perf_counter(), time.process_time()
    if setting.startswith("sbi "):
        posterior = train_sbi(task.prior, sims.theta[sims.valid], sims.x[sims.valid], seed=seed,
                              density_estimator=setting.removeprefix("sbi "))
    else:
        posterior = fit_setting(task.prior, setting, sims.theta[sims.valid], sims.x[sims.valid], seed=seed)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    config = getattr(posterior, "config", {})  # sbi's posterior has none
    flows = {"ensemble": config.get("ensemble", 1), "ensemble_auto": config.get("ensemble_auto")}
    fresh = simulate_from_prior(task.simulate, task.prior, datasets, seed=derive_seed(seed, "coverage"), progress=False)
    test = simulate_from_prior(task.simulate, task.prior, test_size, seed=derive_seed(seed, "heldout"), progress=False)
    records = []
    for temperature in [1.0] if setting.startswith("sbi ") else temperatures:
        with tempered(posterior, temperature):
            scores = score(posterior, fresh, test, seed=seed, posterior_samples=posterior_samples)
        records.append({"task": task_name, "simulations": simulations, "seed": seed, "setting": setting,
                        "temperature": temperature, "posterior_samples": posterior_samples,
                        "requested_datasets": datasets, **scores,
                        "train_seconds": round(seconds, 1), "train_cpu_seconds": round(cpu_seconds, 1), **flows})
    return records


def main(argv: list[str] | None = None) -> None:
    """Run the measurement; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["two_moons"], choices=simulators.names())
    parser.add_argument("--simulations", type=int, default=10_000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--settings", nargs="*", default=[""], help="comma-separated NPE / fit options; '' = defaults")
    parser.add_argument("--datasets", type=int, default=300, help="fresh prior datasets for the coverage")
    parser.add_argument("--posterior-samples", type=int, default=500, help="posterior draws per dataset")
    parser.add_argument("--test-size", type=int, default=1000, help="fresh pairs for the held-out NLL")
    parser.add_argument("--temperatures", type=float, nargs="+", default=[1.0],
                        help="also score the flow with its base widened to these standard deviations (a measurement)")
    parser.add_argument("--sbi", action="store_true", help="also train and score sbi's NPE")
    parser.add_argument("--sbi-estimator", default="nsf", help="sbi's density_estimator")
    parser.add_argument("--penalty-rows", type=int, default=None,
                        help="rows per minibatch that calibrated NPE's coverage penalty ranks (default: the library's)")
    parser.add_argument("--penalty-draws", type=int, default=None,
                        help="posterior draws per ranked row of that penalty (default: the library's)")
    parser.add_argument("--json", default=None, help="append one JSON record per row to this file")
    args = parser.parse_args(argv)
    settings = [*args.settings, *([f"sbi {args.sbi_estimator}"] if args.sbi else [])]
    if args.penalty_rows is not None:  # measurement knobs: the library's constants, read per fit
        coverage_loss.DEFAULT_ROWS = args.penalty_rows
    if args.penalty_draws is not None:
        coverage_loss.DEFAULT_DRAWS = args.penalty_draws
    torch.set_num_threads(1)
    rows = []
    for task_name in args.tasks:
        for seed in args.seeds:
            for setting in settings:
                for record in measure(task_name, args.simulations, seed, setting, datasets=args.datasets,
                                      posterior_samples=args.posterior_samples, test_size=args.test_size,
                                      temperatures=args.temperatures):
                    if "coverage_penalty=" in setting:  # what the penalty ranked, with the setting's weight
                        record |= {"penalty_rows": coverage_loss.DEFAULT_ROWS,
                                   "penalty_draws": coverage_loss.DEFAULT_DRAWS}
                    emit(args.json, record)
                    rows.append(record)
    print("\n| task | simulations | setting | temperature | seed | datasets | coverage at 50% | at 90% | worst z (level) "
          "| z >= -3 | verdict | held-out NLL | train CPU s |")
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- | ---: | ---: |")
    for r in rows:
        cov = r["coverage"]
        print(f"| {r['task']} | {r['simulations']:,} | {r['setting'] or 'defaults'} | {r['temperature']:g} | {r['seed']} "
              f"| {r['datasets']} | {cov[0.5]:.3f} | {cov[0.9]:.3f} | {r['worst_z']:+.2f} ({r['worst_level']:.2f}) "
              f"| {'yes' if r['passes'] else 'NO'} | {r['verdict']} | {r['heldout_nll']:.3f} | {r['train_cpu_seconds']:.1f} |")
    failing = sorted({r["task"] for r in rows if not r["passes"]})
    print(f"\nover-confident beyond {MAX_SIGMAS_BELOW:g} standard deviations: "
          + (", ".join(failing) if failing else "none") + f" (of {len({r['task'] for r in rows})} tasks)")


if __name__ == "__main__":
    main()

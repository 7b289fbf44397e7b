"""How often does ``ensemble="auto"``'s check fire? Exact and slightly too narrow Gaussian posteriors.

``NPE(prior, ensemble="auto")`` adds flows when :func:`sbiflows.ensemble.auto_check` finds the first
flow over-confident on its validation rows. This script runs that check on a posterior known in
closed form: ``theta ~ N(0, I_D)``, ``x = theta + N(0, I_D)``, posterior ``N(x / 2, I_D / 2)``, its
standard deviation scaled by ``--narrow`` factors (1: the exact posterior, where every firing is a
false alarm; below 1: over-confident, where firing is right). For each factor it draws ``--repeats``
fresh sets of ``--rows`` pairs and reports how often the check fires and how often the most negative
``z = (coverage - level) / sqrt(level (1 - level) / rows)`` over the levels 0.05, ..., 0.95 falls
below -2, -2.5 and -3.

``--cost TASK ...`` measures what the check costs instead: for each task, a flow of the default
architecture trained for one epoch on ``--simulations`` of the task's simulations (the check's cost
does not depend on the weights), then the CPU seconds of :func:`~sbiflows.ensemble.auto_check` on its
validation rows, and of :func:`~sbiflows.diagnostics.expected_coverage` on 300 of them with 500 draws
each; both as the library runs them (the draws' densities from the pass that drew them) and in two
passes (draw, then evaluate), alternating, medians over ``--cost-repeats``.

Usage:
    python examples/benchmark_auto_check.py --dims 3 --repeats 200 --narrow 1 0.97 0.95
    python examples/benchmark_auto_check.py --cost two_moons slcp lotka_volterra --simulations 10000 --cost-repeats 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch import Tensor

import simulators
from sbiflows import NPE
from sbiflows.diagnostics import expected_coverage
from sbiflows.ensemble import AUTO_ROWS, auto_check, auto_summary
from sbiflows.simulate import simulate_from_prior

THRESHOLDS = (-2.0, -2.5, -3.0)
#: ``--cost`` also times expected coverage as ``benchmark_coverage.py`` scores it: rows x draws per row.
COVERAGE_ROWS, COVERAGE_DRAWS = 300, 500


class ScaledGaussianPosterior:
    """``N(x / 2, narrow^2 I / 2)``: the exact posterior of the model above for ``narrow = 1``."""

    def __init__(self, narrow: float):
        self.sd = narrow * 0.5**0.5

    def sample_batched(self, n: int, xs: Tensor, *, seed: int) -> Tensor:
        return xs / 2 + self.sd * torch.randn(n, *xs.shape, generator=torch.Generator().manual_seed(seed))

    def log_prob_batched(self, theta: Tensor, xs: Tensor, *, normalized: bool = True) -> Tensor:
        return torch.distributions.Normal(xs / 2, self.sd).log_prob(theta).sum(-1)


def firing(narrow: float, *, dims: int, rows: int, repeats: int) -> dict[str, object]:
    """The check's firing rate and worst-z quantiles over ``repeats`` seeded sets of ``rows`` pairs."""
    fired, worst = 0, []
    for repeat in range(repeats):
        generator = torch.Generator().manual_seed(repeat)
        theta = torch.randn(rows, dims, generator=generator)
        x = theta + torch.randn(rows, dims, generator=generator)
        result = auto_check(ScaledGaussianPosterior(narrow), theta, x, seed=repeat)
        fired += not result.passed
        worst.append(auto_summary(result)["worst_z"])
    z = torch.tensor(worst)
    return {"narrow": narrow, "dims": dims, "rows": min(rows, AUTO_ROWS), "repeats": repeats,
            "fired": fired / repeats, **{f"z_below_{-t:g}": float((z < t).float().mean()) for t in THRESHOLDS},
            "median_worst_z": float(z.median())}


class TwoPasses:
    """A posterior seen without ``sample_and_log_prob_batched``: the checks then draw, and evaluate the
    draws in a second pass through the flow (what they did before session 54)."""

    def __init__(self, posterior) -> None:
        self.posterior = posterior

    def sample_batched(self, n: int, xs: Tensor, **options) -> Tensor:
        return self.posterior.sample_batched(n, xs, **options)

    def log_prob_batched(self, theta: Tensor, xs: Tensor, **options) -> Tensor:
        return self.posterior.log_prob_batched(theta, xs, **options)

    def log_prob(self, theta: Tensor, x: Tensor | None = None) -> Tensor:
        return self.posterior.log_prob(theta, x)


def check_cost(task_name: str, simulations: int, *, repeats: int = 1, seed: int = 0) -> dict[str, object]:
    """CPU (and wall) seconds of the check, and of ``expected_coverage`` on ``COVERAGE_ROWS`` x
    ``COVERAGE_DRAWS``, for the default flow of ``task_name`` at ``simulations`` simulations: one pass per
    draw (the library's) and two (:class:`TwoPasses`), alternating, medians over ``repeats``."""
    task = simulators.get(task_name)
    sims = simulate_from_prior(task.simulate, task.prior, simulations, seed=seed, progress=False)
    npe = NPE(task.prior, ensemble=1)  # the one flow the check runs on
    posterior = npe.fit(sims.theta[sims.valid], sims.x[sims.valid], max_epochs=1, seed=seed, progress=False)
    theta, x = npe.theta[npe.validation], npe.x[npe.validation]
    pairs = {"theta": theta[:COVERAGE_ROWS], "x": x[:COVERAGE_ROWS], "num_posterior_samples": COVERAGE_DRAWS, "seed": seed}
    jobs = {
        "check": lambda: auto_check(posterior, theta, x, seed=seed),
        "check_two_passes": lambda: auto_check(TwoPasses(posterior), theta, x, seed=seed),
        "coverage": lambda: expected_coverage(posterior, **pairs),
        "coverage_two_passes": lambda: expected_coverage(TwoPasses(posterior), **pairs),
    }
    cpu: dict[str, list[float]] = {name: [] for name in jobs}
    wall: dict[str, list[float]] = {name: [] for name in jobs}
    for _ in range(repeats):
        for name, job in jobs.items():
            start, start_wall = time.process_time(), time.perf_counter()
            job()
            cpu[name].append(time.process_time() - start)
            wall[name].append(time.perf_counter() - start_wall)
    record = {"task": task_name, "simulations": simulations, "rows": len(theta[:AUTO_ROWS]), "repeats": repeats}
    for name in jobs:
        record[f"{name}_cpu_seconds"] = round(statistics.median(cpu[name]), 2)
        record[f"{name}_wall_seconds"] = round(statistics.median(wall[name]), 2)
    for name in ("check", "coverage"):  # same-run ratios of the medians
        record[f"{name}_cpu_ratio"] = round(record[f"{name}_cpu_seconds"] / record[f"{name}_two_passes_cpu_seconds"], 2)
    return record


def main(argv: list[str] | None = None) -> None:
    """Run the measurement; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, default=3)
    parser.add_argument("--rows", type=int, default=AUTO_ROWS, help="held-out rows (the check uses at most "
                        f"{AUTO_ROWS})")
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--narrow", type=float, nargs="+", default=[1.0, 0.97, 0.95])
    parser.add_argument("--cost", nargs="*", default=None, metavar="TASK", help="time the check on these tasks")
    parser.add_argument("--simulations", type=int, default=10_000, help="training simulations for --cost")
    parser.add_argument("--cost-repeats", type=int, default=1, help="timings per job for --cost (medians)")
    parser.add_argument("--json", default=None, help="append one JSON record per row to this file")
    args = parser.parse_args(argv)
    if args.cost:
        for task_name in args.cost:
            record = check_cost(task_name, args.simulations, repeats=args.cost_repeats)
            print(json.dumps(record), flush=True)
            _append(args.json, record)
        return
    print("| sd factor | rows | repeats | check fires | z < -2 | z < -2.5 | z < -3 | median worst z |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for narrow in args.narrow:
        record = firing(narrow, dims=args.dims, rows=args.rows, repeats=args.repeats)
        _append(args.json, record)
        print(f"| {narrow:g} | {record['rows']} | {args.repeats} | {record['fired']:.3f} | {record['z_below_2']:.3f} "
              f"| {record['z_below_2.5']:.3f} | {record['z_below_3']:.3f} | {record['median_worst_z']:+.2f} |")


def _append(path: str | None, record: dict) -> None:
    if path:
        with open(path, "a") as stream:
            stream.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()

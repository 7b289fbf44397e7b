"""Time posterior sampling per estimator against the affine MAF, interleaved in the same run.

Issue 16's sampling target: 10,000 samples for each of 100 observations on one core, and any new
default within 2x of the affine MAF measured beside it. Each setting is trained once on the same
simulations (sampling cost does not depend on how well a flow fits, except in the truncated space,
where rejection draws about 1/mass candidates per sample: train fully for that), then every repeat
times ``sample_batched(n, xs)`` for every setting in turn, so all settings see the same machine load.
Reported: median wall and CPU seconds and the ratio of medians to the first setting (the baseline).

Usage:
    python examples/benchmark_sampling.py --task two_moons --settings "" estimator=nsf --repeats 5
    python examples/benchmark_sampling.py --task slcp --settings "" estimator=nsf "estimator=nsf,space=truncated"
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import simulators
from sbiflows.simulate import simulate_from_prior

from benchmark_npe_training import emit, fit_setting


def main(argv: list[str] | None = None) -> None:
    """Run the timing; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="two_moons", choices=simulators.names())
    parser.add_argument("--simulations", type=int, default=1_000)
    parser.add_argument("--settings", nargs="+", default=["", "estimator=nsf"],
                        help="comma-separated NPE / fit options per setting; '' is the defaults; the first is the baseline")
    parser.add_argument("--samples", type=int, default=10_000, help="samples per observation")
    parser.add_argument("--observations", type=int, default=100, help="observations per sample_batched call")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None, help="append one JSON record per setting to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    task = simulators.get(args.task)
    sims = simulate_from_prior(task.simulate, task.prior, args.simulations, seed=0)
    theta, x = sims.theta[sims.valid], sims.x[sims.valid]
    xs = simulate_from_prior(task.simulate, task.prior, args.observations, seed=1).x
    posteriors = {text or "defaults": fit_setting(task.prior, text, theta, x, seed=0) for text in args.settings}
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in posteriors}
    for _ in range(args.repeats):
        for name, posterior in posteriors.items():
            wall, cpu = time.perf_counter(), time.process_time()
            posterior.sample_batched(args.samples, xs, seed=0)
            times[name].append((time.perf_counter() - wall, time.process_time() - cpu))
    baseline = statistics.median(t[0] for t in times[next(iter(times))])
    for name, measured in times.items():
        wall = statistics.median(t[0] for t in measured)
        emit(args.json, {"task": args.task, "setting": name, "samples": args.samples,
                         "observations": args.observations, "repeats": args.repeats,
                         "median_wall_s": round(wall, 3),
                         "median_cpu_s": round(statistics.median(t[1] for t in measured), 3),
                         "ratio_to_baseline": round(wall / baseline, 2),
                         "support_mass_min": round(min(float(posteriors[name].support_mass(one)) for one in xs), 3)})


if __name__ == "__main__":
    main()

"""Time every benchmark task's simulator: 100,000 draws (10,000 for the ODE tasks), median of repeats.

Prints one row per task with the median and the spread over repeats, and, as a same-run baseline, the
time of drawing the same number of parameters from the prior (so a loaded machine shows up in both).

Usage:
    python examples/benchmark_simulators.py [--repeats 5] [--threads 1] [--tasks two_moons,slcp]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import simulators

ODE_TASKS = {"sir": 10_000, "lotka_volterra": 10_000}


def time_call(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--tasks", default=",".join(simulators.names()))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch threads: {torch.get_num_threads()}, repeats: {args.repeats}")
    print(f"{'task':24s} {'draws':>8s} {'median s':>9s} {'min s':>7s} {'max s':>7s} {'prior s':>8s} {'invalid':>8s}")
    for name in args.tasks.split(","):
        task = simulators.get(name)
        n = ODE_TASKS.get(name, 100_000)
        repeats = min(args.repeats, 3) if name in ODE_TASKS else args.repeats
        theta = task.prior.sample((n,))
        prior_times = time_call(lambda: task.prior.sample((n,)), repeats)
        x_holder = {}
        sim_times = time_call(lambda: x_holder.update(x=task.simulate(theta, seed=0)), repeats)
        invalid = int((~torch.isfinite(x_holder["x"]).all(-1)).sum())
        print(f"{name:24s} {n:8d} {statistics.median(sim_times):9.3f} {min(sim_times):7.3f} "
              f"{max(sim_times):7.3f} {statistics.median(prior_times):8.4f} {invalid:8d}")


if __name__ == "__main__":
    main()

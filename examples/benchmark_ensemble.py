"""What an ensemble of flows does to accuracy and calibration: NPE(prior, ensemble=K) against one flow.

For each seed, both are trained on the same simulations (the benchmark's seeded draws). Reported per
seed: mean C2ST over the observations against the task's reference posterior, the expected coverage
of HPD regions at the 50% and 90% levels on fresh simulations (below the level = over-confident),
the coverage verdict in words, and training CPU seconds.

``--balancing L`` adds a third configuration, one flow trained as balanced NPE
(``NPE(prior, balancing=L)``, :mod:`sbiflows.balance`), the other remedy for over-confidence; ``--ensemble 1``
leaves the ensemble out.

Usage:
    python examples/benchmark_ensemble.py --task two_moons --simulations 1000 --ensemble 5 --seeds 0 1 2
    python examples/benchmark_ensemble.py --task slcp --simulations 10000 --ensemble 1 --balancing 100 --seeds 0
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import simulators
from sbiflows import NPE
from sbiflows.diagnostics import c2st, expected_coverage, verdict
from sbiflows.seeding import derive_seed
from sbiflows.simulate import simulate_from_prior


def measure(task, posterior, observations, *, seed, datasets):
    accuracy = statistics.mean(
        c2st(task.reference_posterior(i, 10_000), posterior.sample(10_000, task.observation(i), seed=seed),
             seed=seed).accuracy
        for i in observations
    )
    fresh = simulate_from_prior(task.simulate, task.prior, datasets, seed=derive_seed(seed, "coverage"),
                                progress=False)
    valid = fresh.valid
    coverage = expected_coverage(posterior, theta=fresh.theta[valid], x=fresh.x[valid], num_posterior_samples=500,
                                 seed=seed, levels=[0.5, 0.9])
    return accuracy, [float(c) for c in coverage.empirical], verdict(coverage)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="two_moons")
    parser.add_argument("--simulations", type=int, default=1000)
    parser.add_argument("--ensemble", type=int, default=5)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--observations", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    parser.add_argument("--coverage-datasets", type=int, default=300)
    parser.add_argument("--balancing", type=float, default=None, help="also train balanced NPE with this weight")
    args = parser.parse_args()
    torch.set_num_threads(1)
    task = simulators.get(args.task)
    print(f"{args.task}, {args.simulations} simulations, observations {args.observations}, "
          f"{args.coverage_datasets} coverage datasets")
    print("| seed | configuration | mean C2ST | coverage at 50% | at 90% | coverage verdict | training CPU s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    configurations = {"one flow": {"ensemble": 1}}
    if args.ensemble > 1:
        configurations[f"{args.ensemble} flows"] = {"ensemble": args.ensemble}
    if args.balancing is not None:
        configurations[f"balanced ({args.balancing:g})"] = {"balancing": args.balancing, "ensemble": 1}
    rows = {name: [] for name in configurations}
    for seed in args.seeds:
        sims = simulate_from_prior(task.simulate, task.prior, args.simulations, seed=seed, progress=False)
        for k, options in configurations.items():
            start = time.process_time()
            posterior = NPE(task.prior, **options).fit(sims.theta, sims.x, seed=seed, progress=False)
            cpu = time.process_time() - start
            accuracy, coverage, word = measure(task, posterior, args.observations, seed=seed,
                                               datasets=args.coverage_datasets)
            rows[k].append((accuracy, coverage, cpu))
            print(f"| {seed} | {k} | {accuracy:.3f} | {coverage[0]:.3f} | {coverage[1]:.3f} | {word} | {cpu:.1f} |",
                  flush=True)
    for k, values in rows.items():
        print(f"{k}: mean C2ST {statistics.mean(v[0] for v in values):.3f}, coverage at 50% "
              f"{statistics.mean(v[1][0] for v in values):.3f}, at 90% {statistics.mean(v[1][1] for v in values):.3f}, "
              f"training CPU {sum(v[2] for v in values):.1f} s in all")


if __name__ == "__main__":
    main()

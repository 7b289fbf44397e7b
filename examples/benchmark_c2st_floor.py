"""What C2ST does a perfect posterior get? Reference draws against a second, independent set of them.

The benchmarks score a posterior by C2ST against the task's reference draws (seed 0). A posterior
that *is* the reference posterior does not score 0.5 exactly: the classifier overfits a little to
finite samples. This script measures that floor on the same protocol (:func:`sbiflows.diagnostics.c2st`,
the same sample counts): reference draws of seed 0, as the benchmarks use, against reference draws of
another seed. Differences between methods near the floor are within the scorer's own noise.

Closed-form reference posteriors (two_moons, gaussian_linear, gaussian_linear_uniform) cost nothing;
for the MCMC tasks a second seed runs (and caches) a second MCMC.

Usage:
    python examples/benchmark_c2st_floor.py --tasks two_moons --observations 1..5 --seeds 1 2 3
"""

from __future__ import annotations

import argparse
import statistics

from benchmark_npe import parse_observations  # examples/ is on sys.path when this runs as a script
from benchmark_npe_training import emit

import simulators
from sbiflows.diagnostics.c2st import c2st


def floor(task_name: str, observation: int, *, seed: int, num_samples: int) -> float:
    """C2ST accuracy of the reference draws of ``seed`` against those of seed 0 (the benchmarks' reference).

    The classifier's seed is ``seed`` too, as the benchmarks seed it with the run's seed.
    """
    if seed == 0:
        raise ValueError("seed must differ from 0, the seed of the benchmarks' reference draws, got 0")
    task = simulators.get(task_name)
    reference = task.reference_posterior(observation, num_samples)
    other = task.reference_posterior(observation, num_samples, seed=seed)
    return c2st(reference, other.float(), seed=seed).accuracy


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["two_moons"], choices=simulators.names())
    parser.add_argument("--observations", default="1..5", help='"1..5" or "1,2,3"')
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="seeds of the second draws (not 0)")
    parser.add_argument("--num-samples", type=int, default=10_000, help="draws per set, as the benchmarks use")
    parser.add_argument("--json", default=None, help="append one JSON record per task and seed")
    args = parser.parse_args(argv)
    observations = parse_observations(args.observations)
    for task_name in args.tasks:
        means = []
        for seed in args.seeds:
            scores = {i: floor(task_name, i, seed=seed, num_samples=args.num_samples) for i in observations}
            means.append(statistics.mean(scores.values()))
            print(f"{task_name} seed {seed}: " + " ".join(f"{i}:{v:.3f}" for i, v in scores.items())
                  + f"  mean {means[-1]:.3f}")
            emit(args.json, {"task": task_name, "seed": seed, "num_samples": args.num_samples, "c2st": scores})
        print(f"{task_name}: floor {statistics.mean(means):.3f} (mean over {len(means)} seeds "
              f"and {len(observations)} observations)")


if __name__ == "__main__":
    main()

"""Diagnose the cost of NPE's unconstrained space on a box-prior task (a measurement, not a feature).

NPE learns ``u = biject_to(prior.support)^{-1}(theta)`` so that samples never leave the prior's
support and no rejection loop can stall. This script measures what that choice costs in accuracy: on
the same simulations and seed it trains

* ``unconstrained``: ``NPE(task.prior)``, the default;
* ``theta space``: ``NPE(task.prior, space="truncated")``, the same NPE in theta itself (z-scored
  only), as sbi does, its samples restricted to the box by rejection (see
  :mod:`sbiflows.truncated_space`).

It prints, per observation, the C2ST of both against the reference posterior and the acceptance rate
of the rejection step (the share of theta-space draws inside the box, estimated from the seeded draws
that normalize ``log_prob``).

Usage:
    python examples/benchmark_bounded_space.py --task slcp --simulations 10000 --seeds 0 1 2
    python examples/benchmark_bounded_space.py --task two_moons --simulations 1000 --seeds 0 1 2 \
        --estimator nsf --observations 1..5 --json results.jsonl
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import simulators
from benchmark_npe import parse_observations  # examples/ is on the path of a script run from it
from sbiflows import NPE
from sbiflows.diagnostics.c2st import c2st
from sbiflows.estimator import ESTIMATORS
from sbiflows.simulate import simulate_from_prior


def samples_and_acceptance(posterior, task, observation: int, num_samples: int, seed: int) -> tuple[torch.Tensor, float]:
    """``num_samples`` posterior draws and the share of the flow's mass inside the support (1 when unconstrained)."""
    x = task.observation(observation)
    return posterior.sample(num_samples, x=x, seed=seed), float(posterior.support_mass(x))


def main(argv: list[str] | None = None) -> None:
    """Run the comparison; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="slcp", choices=simulators.names())
    parser.add_argument("--simulations", type=int, default=10_000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--num-samples", type=int, default=10_000)
    parser.add_argument("--estimator", default="maf", choices=sorted(ESTIMATORS))
    parser.add_argument("--observations", default="1..10", help='"1..10" or "1,2,3"')
    parser.add_argument("--json", default=None, help="append one JSON record per seed to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    task = simulators.get(args.task)
    observations = parse_observations(args.observations)
    for seed in args.seeds:
        sims = simulate_from_prior(task.simulate, task.prior, args.simulations, seed=seed)
        theta, x = sims.theta[sims.valid], sims.x[sims.valid]
        record = {"task": args.task, "simulations": args.simulations, "seed": seed, "estimator": args.estimator}
        for name, space in (("unconstrained", "unconstrained"), ("theta space", "truncated")):
            start = time.process_time()
            posterior = NPE(task.prior, args.estimator, space=space).fit(theta, x, seed=seed, progress=False)
            train_cpu_s = time.process_time() - start
            scores, acceptance = {}, {}
            for i in observations:
                samples, acceptance[i] = samples_and_acceptance(posterior, task, i, args.num_samples, seed + i)
                reference = task.reference_posterior(i, args.num_samples)
                scores[i] = round(c2st(reference, samples.float(), seed=seed).accuracy, 3)
            record[name] = {"mean_c2st": round(statistics.mean(scores.values()), 4), "c2st": scores,
                            "acceptance": {i: round(a, 3) for i, a in acceptance.items()},
                            "epochs": posterior.history.epochs, "train_cpu_s": round(train_cpu_s, 1)}
        print(json.dumps(record), flush=True)
        if args.json:
            with open(args.json, "a") as stream:
                stream.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()

"""Probe: would a new network after TSNPE fit better z-scored on the last round's rows only?

A new network on all of a TSNPE run's rows (``retrain_from_scratch``) z-scores theta and x on all of them,
and round 1's rows span the whole prior, so the posterior around ``x_o`` fills a small part of the
spline's interval. This probe runs TSNPE with its defaults, then fits two new NPEs (NPE's defaults, the
patience of a TSNPE round) on the run's rows: z-scored on all rows, and on the last round's rows (the
region around ``x_o``; round 1's rows then lie far out, in the splines' identity tails). It prints one
JSON record per observation with the three C2STs against the reference posterior.

The "last round" variant replaces :meth:`sbiflows.estimator.PosteriorNet.set_standardization` for its
fit: a probe of an idea, not a library option.

Usage:
    python examples/probe_refit_standardization.py --task two_moons --simulations 10000 --seed 0 \\
        --observations 1,2,3 --json refit.jsonl
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import simulators
from sbiflows import NPE, TSNPE
from sbiflows.diagnostics.c2st import c2st
from sbiflows.estimator import PosteriorNet


def refit(theta: torch.Tensor, x: torch.Tensor, prior, *, seed: int, last_rows: int | None,
          max_epochs: int):
    """The posterior of a new NPE on all rows, z-scored on the last ``last_rows`` rows (None: on all rows)."""
    original = PosteriorNet.set_standardization

    def standardize(self, u, x_rows):
        return original(self, u if last_rows is None else u[-last_rows:],
                        x_rows if last_rows is None else x_rows[-last_rows:])

    PosteriorNet.set_standardization = standardize
    try:
        return NPE(prior).fit(theta, x, seed=seed + 77, progress=False, patience=30, drop_patience=30,
                              max_epochs=max_epochs)
    finally:
        PosteriorNet.set_standardization = original


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="two_moons", choices=simulators.names())
    parser.add_argument("--simulations", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--observations", default="1,2,3")
    parser.add_argument("--num-samples", type=int, default=10_000)
    parser.add_argument("--max-epochs", type=int, default=1000, help="of every fit (small for a smoke test)")
    parser.add_argument("--json", default=None, help="append one JSON record per observation")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    task, records = simulators.get(args.task), []
    for i in (int(o) for o in args.observations.split(",")):
        x_o, reference = task.observation(i), task.reference_posterior(i, args.num_samples)
        start = time.process_time()
        tsnpe = TSNPE(task.prior)
        posterior = tsnpe.run(task.simulate, x_o, rounds=args.rounds, simulations=args.simulations, seed=args.seed,
                              check_simulations=0, fit_options={"max_epochs": args.max_epochs})
        record = {"task": args.task, "seed": args.seed, "obs": i, "sims": args.simulations,
                  "tsnpe": c2st(reference, posterior.sample(args.num_samples, seed=args.seed), seed=args.seed).accuracy,
                  "tsnpe_cpu": time.process_time() - start}
        for name, last in (("all", None), ("region", tsnpe.rounds[-1].simulations)):
            start = time.process_time()
            fitted = refit(tsnpe.npe.theta, tsnpe.npe.x, task.prior, seed=args.seed, last_rows=last,
                           max_epochs=args.max_epochs)
            draws = fitted.sample(args.num_samples, x_o, seed=args.seed)
            record[name] = c2st(reference, draws, seed=args.seed).accuracy
            record[f"{name}_cpu"], record[f"{name}_epochs"] = time.process_time() - start, fitted.history.epochs
        print(json.dumps(record), flush=True)
        if args.json:
            with open(args.json, "a") as file:
                file.write(json.dumps(record) + "\n")
        records.append(record)
    return records


if __name__ == "__main__":
    main()

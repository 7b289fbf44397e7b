"""Time a posterior's batched draws and evaluations at several chunk sizes (``max_batch_elements``).

A posterior passes at most ``max_batch_elements`` rows through its flow at once. This script fits the
default flow of a task (``--epochs`` epochs: the cost of a pass does not depend on the weights, only the
truncated space's rejection does) and times, for each chunk size in ``--chunks``:

* ``check``: :func:`sbiflows.ensemble.auto_check` on the fit's validation rows (100 draws each);
* ``coverage``: :func:`sbiflows.diagnostics.expected_coverage` on 300 of them, 500 draws each;
* ``sample``: ``posterior.sample(100_000, x)`` for one observation;
* ``log_prob``: ``posterior.log_prob`` of those draws.

The chunk sizes alternate within each of ``--repeats`` repeats (the same machine load); the record holds
median CPU and wall seconds, each size's CPU ratio to the first size's, and the largest difference of each
job's result (HPD ranks, draws, densities) from the first size's. Seeded draws (the check, ``sample``) do
not depend on the chunk: the flow's arithmetic on batches of other sizes may round differently in the last
bit. ``expected_coverage`` draws from torch's global generator, whose draws follow the chunks: its ranks
are other random draws of the same distribution.

Usage:
    cd examples && PYTHONPATH=.. OMP_NUM_THREADS=1 python benchmark_chunks.py --tasks two_moons gaussian_linear_uniform \\
        --simulations 10000 --chunks 131072 16384 --repeats 5 --json chunks.jsonl
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import simulators
from sbiflows import NPE
from sbiflows.diagnostics import expected_coverage
from sbiflows.ensemble import auto_check
from sbiflows.simulate import simulate_from_prior

SAMPLES, COVERAGE_ROWS, COVERAGE_DRAWS = 100_000, 300, 500


def chunk_cost(task_name: str, simulations: int, chunks: list[int], *, repeats: int, epochs: int = 1,
               seed: int = 0) -> dict[str, object]:
    """Median CPU and wall seconds of each job at each chunk size, and the results' largest differences."""
    task = simulators.get(task_name)
    sims = simulate_from_prior(task.simulate, task.prior, simulations, seed=seed, progress=False)
    npe = NPE(task.prior, ensemble=1)  # one flow (the default mixes snapshots where its check fails)
    posterior = npe.fit(sims.theta[sims.valid], sims.x[sims.valid], max_epochs=epochs, seed=seed, progress=False)
    theta, x = npe.theta[npe.validation], npe.x[npe.validation]
    jobs = {
        "check": lambda: auto_check(posterior, theta, x, seed=seed).hpd_ranks,
        "coverage": lambda: expected_coverage(posterior, theta=theta[:COVERAGE_ROWS], x=x[:COVERAGE_ROWS],
                                              num_posterior_samples=COVERAGE_DRAWS, seed=seed).hpd_ranks,
        "sample": lambda: posterior.sample(SAMPLES, x[0], seed=seed),
    }
    cpu = {(job, c): [] for job in [*jobs, "log_prob"] for c in chunks}
    wall = {key: [] for key in cpu}
    results: dict[tuple[str, int], torch.Tensor] = {}
    for _ in range(repeats):
        for c in chunks:
            posterior.max_batch_elements = c
            for job, run in [*jobs.items(), ("log_prob", lambda: posterior.log_prob(results["sample", c], x[0]))]:
                start, start_wall = time.process_time(), time.perf_counter()
                results[job, c] = run()
                cpu[job, c].append(time.process_time() - start)
                wall[job, c].append(time.perf_counter() - start_wall)
    record: dict[str, object] = {"task": task_name, "simulations": simulations, "epochs": epochs, "repeats": repeats,
                                 "space": npe.space, "rows": len(theta)}
    for (job, c), times in cpu.items():
        record[f"{job}_{c}_cpu_seconds"] = round(statistics.median(times), 3)
        record[f"{job}_{c}_wall_seconds"] = round(statistics.median(wall[job, c]), 3)
        record[f"{job}_{c}_cpu_ratio"] = round(statistics.median(times) / statistics.median(cpu[job, chunks[0]]), 3)
        record[f"{job}_{c}_max_difference"] = float((results[job, c] - results[job, chunks[0]]).abs().max())
    return record


def main(argv: list[str] | None = None) -> None:
    """Run the measurement; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["two_moons"], choices=simulators.names())
    parser.add_argument("--simulations", type=int, default=10_000)
    parser.add_argument("--chunks", type=int, nargs="+", default=[2**17, 2**14])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--json", help="append one JSON record per task to this file")
    args = parser.parse_args(argv)
    for task in args.tasks:
        record = chunk_cost(task, args.simulations, args.chunks, repeats=args.repeats, epochs=args.epochs)
        line = json.dumps(record)
        print(line, flush=True)
        if args.json:
            with open(args.json, "a") as handle:
                handle.write(line + "\n")


if __name__ == "__main__":
    main()

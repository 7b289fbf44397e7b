"""Time the calibration checks on a trained two-moons posterior (2-D), medians over repeats.

Trains NPE (MAF) on ``--simulations`` two-moons draws, then times, each ``--repeats`` times:

* SBC with ``--datasets`` datasets x ``--draws`` posterior draws (the issue's target: 1,000 x 1,000
  well under a minute on 2 cores), expected coverage and TARP on the same pairs, and the three in one
  :func:`~sbiflows.diagnostics.calibration` call (their posterior draws made once);
* C2ST on 10,000 vs 10,000 samples in 2-D (target: under 30 seconds);
* as a same-run baseline, the batched posterior sampling that SBC starts with (``sample_batched``
  of ``draws`` per dataset), so a loaded machine shows up in both numbers.

Usage:
    python examples/benchmark_diagnostics.py [--repeats 3] [--datasets 1000] [--draws 1000] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

import simulators
from sbiflows import NPE, Posterior, diagnostics, load


def median_seconds(fn: Callable[[Posterior], object], fresh: Callable[[], Posterior],
                   repeats: int) -> tuple[float, float, float]:
    """Median, min and max wall time of ``fn(fresh())`` over ``repeats`` calls, ``fresh()`` not timed: each call
    gets the posterior as loaded from its file, so no call finds another's cached normalizers (the truncated
    space's per-observation constant, which a first call computes and ``log_prob`` then reuses)."""
    times = []
    for _ in range(repeats):
        posterior = fresh()
        start = time.perf_counter()
        fn(posterior)
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times), max(times)


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--simulations", type=int, default=10_000)
    parser.add_argument("--datasets", type=int, default=1000)
    parser.add_argument("--draws", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads for the checks")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    task = simulators.get("two_moons")
    torch.manual_seed(0)
    theta = task.prior.sample((args.simulations,))
    posterior = NPE(task.prior).fit(theta, task.simulate(theta, seed=0), seed=0, progress=False)
    theta_c, x_c = diagnostics.simulate_datasets(task.prior, task.simulate, args.datasets, seed=1)
    options = {"theta": theta_c, "x": x_c, "num_posterior_samples": args.draws, "seed": 0}
    reference = task.reference_posterior(1, num_samples=10_000)
    samples = posterior.sample(10_000, x=task.observation(1), seed=0)

    rows = [
        (f"baseline: sample_batched({args.draws}, {args.datasets} observations)",
         lambda p: p.sample_batched(args.draws, x_c, seed=0)),
        (f"sbc ({args.datasets} datasets x {args.draws} draws)", lambda p: diagnostics.sbc(p, **options)),
        ("expected_coverage (same pairs)", lambda p: diagnostics.expected_coverage(p, **options)),
        ("tarp (same pairs)", lambda p: diagnostics.tarp(p, **options)),
        ("calibration: the three on the same draws", lambda p: diagnostics.calibration(p, **options)),
        ("c2st (10,000 vs 10,000, 2-D)", lambda p: diagnostics.c2st(reference, samples, seed=0)),
    ]
    print(f"threads={args.threads} repeats={args.repeats}")
    baseline = None
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder, "posterior.pt")
        posterior.save(path)
        for name, fn in rows:
            med, low, high = median_seconds(fn, lambda: load(path), args.repeats)
            baseline = baseline or med
            print(f"{name:55s} median {med:7.2f} s  (min {low:.2f}, max {high:.2f})  x{med / baseline:.1f} baseline")


if __name__ == "__main__":
    main()

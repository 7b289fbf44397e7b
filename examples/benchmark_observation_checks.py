"""Time the per-observation checks of ``sbiflows fit`` one observation at a time and batched.

Reads a finished run of a benchmark task (``sbiflows fit two_moons --simulations 10000 --out runs/two_moons``,
the README's main job): its ``posterior.pt`` and ``samples.npz``. Then, ``--repeats`` times, interleaved:

* C2ST of each observation's first ``--c2st-samples`` posterior draws against its reference posterior, one
  :func:`~sbiflows.diagnostics.c2st` call per observation, and all in one
  :func:`~sbiflows.diagnostics.c2st_batched` call (what ``sbiflows fit`` does);
* the MAP with ``sbiflows fit``'s options (1,000 starts, 10 refined, 100 Adam steps), one
  :meth:`~sbiflows.Posterior.map` call per observation, and one :meth:`~sbiflows.Posterior.map_batched`.

Prints the median CPU and wall seconds of each, their same-run ratio, and how far the batched results lie
from the one-by-one results (largest difference of a C2ST accuracy, of a MAP coordinate).

Usage:
    python examples/benchmark_observation_checks.py --run runs/two_moons [--task two_moons] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

import simulators
from sbiflows import diagnostics, load

MAP_OPTIONS = {"num_init_samples": 1000, "num_to_optimize": 10, "num_iter": 100, "seed": 0}


def timed(fn: Callable[[], object]) -> tuple[object, float, float]:
    """``fn()``, its CPU seconds and its wall seconds."""
    cpu, wall = time.process_time(), time.perf_counter()
    out = fn()
    return out, time.process_time() - cpu, time.perf_counter() - wall


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="output folder of a finished sbiflows fit")
    parser.add_argument("--task", default="two_moons")
    parser.add_argument("--c2st-samples", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    task = simulators.get(args.task)
    posterior = load(args.run / "posterior.pt", prior=task.prior)
    with np.load(args.run / "samples.npz") as stored:
        names = sorted(stored.files, key=lambda name: int(name.removeprefix("obs")))
        draws = [torch.from_numpy(stored[name])[: args.c2st_samples] for name in names]
    numbers = [int(name.removeprefix("obs")) for name in names]
    references = [task.reference_posterior(i, num_samples=args.c2st_samples, progress=False) for i in numbers]
    xs = torch.stack([task.observation(i).reshape(-1) for i in numbers])
    pairs = list(zip(references, draws))

    rows = {
        "c2st, one call per observation": lambda: [diagnostics.c2st(a, b, seed=0).accuracy for a, b in pairs],
        "c2st_batched, one call": lambda: [r.accuracy for r in diagnostics.c2st_batched(pairs, seed=0)],
        "map, one call per observation": lambda: torch.stack([posterior.map(x, **MAP_OPTIONS) for x in xs]),
        "map_batched, one call": lambda: posterior.map_batched(xs, **MAP_OPTIONS),
    }
    seconds: dict[str, list[tuple[float, float]]] = {name: [] for name in rows}
    results: dict[str, object] = {}
    for _ in range(args.repeats):
        for name, fn in rows.items():
            results[name], cpu, wall = timed(fn)
            seconds[name].append((cpu, wall))
    print(f"{args.task}: {len(names)} observations, {args.c2st_samples} draws per side, repeats={args.repeats}")
    for name in rows:
        cpu = statistics.median(c for c, _ in seconds[name])
        wall = statistics.median(w for _, w in seconds[name])
        print(f"{name:34s} CPU {cpu:6.2f} s  wall {wall:6.2f} s")
    for one, batched in (("c2st, one call per observation", "c2st_batched, one call"),
                         ("map, one call per observation", "map_batched, one call")):
        ratio = statistics.median(b[0] / a[0] for a, b in zip(seconds[one], seconds[batched]))
        apart = float((torch.as_tensor(results[one]) - torch.as_tensor(results[batched])).abs().max())
        print(f"{batched} / {one}: CPU ratio {ratio:.2f} (median of same-repeat ratios), "
              f"largest difference {apart:.2g}")


if __name__ == "__main__":
    main()

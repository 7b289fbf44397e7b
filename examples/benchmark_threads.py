"""Time sbiflows' calls on one torch thread (the rule of ``sbiflows.threads``) against torch's default.

For each repeat, every call runs once with ``num_threads=1`` and once with torch's default thread
count (one per core), interleaved, so both see the same machine load. Reported: median wall and CPU
seconds per call and the same-run ratio of medians (default / one thread).

``--load N`` starts N busy processes (each spinning one core) for the duration, the situation of a
shared machine or of simulator workers running beside training.

Usage:
    python examples/benchmark_threads.py --repeats 5 --load 2
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch

import simulators
from sbiflows import NPE


def timed(call: Callable[[], object]) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    call()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="two_moons")
    parser.add_argument("--simulations", type=int, default=2_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--load", type=int, default=0, help="busy processes running beside the benchmark")
    args = parser.parse_args()
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.load)]
    try:
        run(args)
    finally:
        for process in busy:
            process.kill()


def run(args: argparse.Namespace) -> None:
    default = torch.get_num_threads()
    task = simulators.get(args.task)
    theta = task.prior.sample((args.simulations,))
    x = task.simulate(theta)
    x_o = task.observation(1)
    posterior = NPE(task.prior).fit(theta, x, seed=0, max_epochs=30, progress=False)
    xs = x[:100]
    calls = {
        "fit (30 epochs)": lambda: NPE(task.prior).fit(theta, x, seed=0, max_epochs=30, progress=False),
        "sample 10,000": lambda: posterior.sample(10_000, x_o, seed=0),
        "sample_batched 1,000 x 100 obs": lambda: posterior.sample_batched(1_000, xs, seed=0),
        "map (defaults)": lambda: posterior.map(x_o),
    }
    results: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for _ in range(args.repeats):
        for name, call in calls.items():
            for threads in (1, default):
                torch.set_num_threads(threads)  # the user's choice: sbiflows leaves it alone
                results.setdefault((name, threads), []).append(timed(call))
    print(f"task {args.task}, {args.simulations} simulations, torch default threads {default}, "
          f"{args.repeats} repeats, {args.load} busy processes beside; median wall s / CPU s")
    print(f"| call | 1 thread | {default} threads | ratio (wall) |")
    print("| --- | --- | --- | --- |")
    for name in calls:
        one, many = results[(name, 1)], results[(name, default)]
        w1, c1 = statistics.median(t[0] for t in one), statistics.median(t[1] for t in one)
        wd, cd = statistics.median(t[0] for t in many), statistics.median(t[1] for t in many)
        print(f"| {name} | {w1:.3f} / {c1:.3f} | {wd:.3f} / {cd:.3f} | {wd / w1:.2f} |")


if __name__ == "__main__":
    main()

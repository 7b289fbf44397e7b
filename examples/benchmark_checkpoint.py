"""What a training checkpoint costs: the default NPE fit with and without ``checkpoint=``, writing after every epoch.

:class:`sbiflows.checkpoint.Checkpoint` writes the training's whole state (weights, Adam's moments, the
weight average, the best weights and the snapshot trail) at most every 60 s by default; this script
makes it write after every epoch (``every=0``), the worst case, and reports per seed the training's
CPU seconds without and with it, the number of writes and the file's size, so the cost of one write
and of the default interval follow. The two fits run in the same process one after the other and end
with the same weights (checked).

Usage:
    python examples/benchmark_checkpoint.py --task two_moons --simulations 10000 --seeds 0 1
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

import simulators
from sbiflows import NPE
from sbiflows.checkpoint import Checkpoint


def fit(task, theta, x, *, seed: int, checkpoint: Checkpoint | None):
    start = time.process_time()
    posterior = NPE(task.prior).fit(theta, x, seed=seed, progress=False, checkpoint=checkpoint)
    return posterior, time.process_time() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", default="two_moons", choices=simulators.names())
    parser.add_argument("--simulations", type=int, default=10_000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    task = simulators.get(args.task)
    print("task simulations seed | CPU s without / with a write every epoch | writes | file MB | ms per write")
    for seed in args.seeds:
        torch.manual_seed(seed)
        theta = task.prior.sample((args.simulations,))
        x = task.simulate(theta, seed=seed)
        plain, without = fit(task, theta, x, seed=seed, checkpoint=None)
        with tempfile.TemporaryDirectory() as folder:
            checkpoint = Checkpoint(Path(folder) / "training.ckpt", every=0.0)
            writes = []
            save = checkpoint.save
            checkpoint.save = lambda state: (writes.append(1), save(state))[1]
            checked, with_writes = fit(task, theta, x, seed=seed, checkpoint=checkpoint)
            size = checkpoint.path.stat().st_size / 1e6
        pairs = zip(plain.net.state_dict().values(), checked.net.state_dict().values())
        assert all(torch.equal(a, b) for a, b in pairs), "a checkpoint must not change the fit's weights"
        per_write = (with_writes - without) / len(writes) * 1e3
        print(f"{args.task} {args.simulations} {seed} | {without:.1f} / {with_writes:.1f} | {len(writes)} | "
              f"{size:.1f} | {per_write:.0f}")


if __name__ == "__main__":
    main()

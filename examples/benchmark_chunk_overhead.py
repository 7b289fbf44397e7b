"""What one chunk costs the engine beyond the simulator: the number behind chunk sizing in docs/scaling.md.

A simulator that does nothing (``x = theta``) is run as ``--chunks`` chunks of ``--batch-size`` rows,
in-process, with two local worker processes, on a two-worker Dask ``LocalCluster`` (if ``distributed``
is installed), each with and without a store. Seconds per chunk = wall time / chunks, after a warm-up
run that starts the worker processes. With ``T`` seconds of simulation per chunk and ``w`` workers, the
engine's share of the run is about ``overhead / (overhead + T)`` per worker slot.

Run:
    python examples/benchmark_chunk_overhead.py --chunks 2000 --repeats 3
"""

from __future__ import annotations

import argparse
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch

from sbiflows import simulate


def identity(theta: torch.Tensor, seed: int) -> torch.Tensor:
    """A simulator that costs nothing."""
    return theta


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and its reaped children."""
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(u.ru_utime + u.ru_stime for u in usage)


def measure(options: dict, *, chunks: int, batch_size: int, store: bool, repeats: int) -> list[tuple[float, float]]:
    """``(wall s, CPU s)`` per run."""
    theta = torch.zeros(chunks * batch_size, 2)
    simulate(identity, theta[: 2 * batch_size], batch_size=batch_size, **options)  # warm-up: start workers
    runs = []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "sims.zarr" if store else None
            wall, cpu = time.perf_counter(), cpu_seconds()
            simulate(identity, theta, batch_size=batch_size, store=path, **options)
            runs.append((time.perf_counter() - wall, cpu_seconds() - cpu))
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--chunks", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    configurations: list[tuple[str, dict, object]] = [("in-process", {}, None), ("2 local workers", {"workers": 2}, None)]
    cluster = client = None
    try:
        import distributed

        cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                           dashboard_address=":0", silence_logs=40)
        client = distributed.Client(cluster)
        configurations.append(("Dask LocalCluster, 2 workers", {"executor": client}, None))
    except ImportError:
        print("distributed is not installed: Dask skipped")
    print(f"{args.chunks} chunks of {args.batch_size} row(s), a simulator that costs nothing; "
          f"median (min-max) of {args.repeats} runs; CPU = this process and reaped children")
    print("| engine | store | ms per chunk, wall | CPU s per run |")
    print("| --- | --- | --- | --- |")
    try:
        for name, options, _ in configurations:
            for store in (False, True):
                runs = measure(options, chunks=args.chunks, batch_size=args.batch_size, store=store,
                               repeats=args.repeats)
                per_chunk = [1000 * wall / args.chunks for wall, _ in runs]
                print(f"| {name} | {'yes' if store else 'no'} | {statistics.median(per_chunk):.2f} "
                      f"({min(per_chunk):.2f}-{max(per_chunk):.2f}) | "
                      f"{statistics.median(cpu for _, cpu in runs):.1f} |", flush=True)
    finally:
        if client is not None:
            client.close()
            cluster.close()


if __name__ == "__main__":
    main()

"""Time the simulation engine (issue 13): rows per second in-process, on 2 local workers, on Dask and in sbi.

Measured, each configuration ``--repeats`` times, interleaved (every configuration sees the same
machine load), reporting the median, min and max of the wall time and of the CPU time of the whole
process tree (this process, its live descendants via psutil, or /proc when psutil is missing, plus
``resource.getrusage(RUSAGE_CHILDREN)`` for descendants already reaped), rows per second at the median
wall time, its ratio to the in-process rate of the same run, and ``other s``: the CPU seconds that
processes outside this benchmark used during a repeat (``/proc/stat``; median over the repeats; near
0 on a quiet machine, about the wall time when another job keeps one of the 2 cores busy):

1. A CPU-bound simulator of about ``--row-ms`` (20) ms of pure-Python work per row (a fixed number of
   loop iterations, calibrated once at start-up, so every row costs the same), ``--rows`` rows in
   chunks of ``--batch-size``: (a) ``simulate_from_prior`` in-process, (b) ``workers=2`` starting its
   worker processes (cold) and reusing those of the previous run (warm), (c) a 2-worker
   Dask ``LocalCluster`` passed as ``executor=client`` (a fresh one per repeat, started and closed
   outside the timing, so each timed call also starts the engine's worker processes in the Dask
   workers, as ``workers=2`` does on every call), (d) sbi's ``simulate_for_sbi`` with
   ``num_workers=1`` and ``2`` and the same ``simulation_batch_size``, run in a separate interpreter
   (``--sbi-python``: sbi is not a dependency of sbiflows), one subprocess per repeat.
2. The fixed start-up cost: a trivial simulator, 2 rows in chunks of 1, in-process, with
   ``workers=2`` (which starts 2 worker processes that import torch) and on Dask (first call, which
   starts a worker process in each Dask worker, and later calls, which reuse them).
3. The store's cost: a ``--store-row-ms`` (1) ms-per-row simulator, ``--store-rows`` rows at
   ``--store-batch-size`` (1,000), in-process, without and with ``store=`` (a fresh temporary directory).

Batch sizes: 10 rows per call for the 20 ms simulator (ours and sbi's ``simulation_batch_size``): a
call then takes 0.2 s, so the cost of sending a chunk to a worker process is small against it, and
1,000 rows make 100 calls, which two workers share evenly (the last call ends at most 0.2 s after the
other worker's). 1,000 rows per call for the store, as the issue's target says.

Targets of the issue (reported, never asserted: timings on a shared machine are noisy): 2 workers
>= 1.8x the in-process rate on 2 cores; Dask within 15% of local workers; the store costs < 5%.

Usage:
    python examples/benchmark_simulate.py --quick                    # a smoke run of about 20 s
    python examples/benchmark_simulate.py --rows 1000 --store-rows 20000 --repeats 3 \\
        --sbi-python /work/sbi-venv/bin/python
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch
from torch.distributions import Independent, Uniform

# sbiflows is imported inside the functions that use it: this file also runs, as the sbi part, in an
# interpreter that has sbi but not sbiflows.

THETA_DIM = 3
X_DIM = 4


# ------------------------------------------------------------------------------------ simulators
def busy_loop(iterations: int, state: int) -> int:
    """``iterations`` steps of a linear congruential generator: fixed pure-Python work (one core, no BLAS)."""
    for _ in range(iterations):
        state = (state * 1103515245 + 12345) & 0x7FFFFFFF
    return state


class BusySimulator:
    """``(N, THETA_DIM) -> (N, X_DIM)`` with ``iterations`` loop steps of CPU work per row.

    Defined at module level (and a plain object) so that worker processes can unpickle it. Accepts a
    tensor or a NumPy array (sbi hands NumPy arrays to the simulator with ``num_workers > 1``) and
    returns a float32 tensor (sbi concatenates the outputs with ``torch.cat``). The output depends on
    theta, on the loop's final state and on NumPy's global generator (which both engines seed), so the
    equality of results across backends means something.
    """

    def __init__(self, iterations: int):
        self.iterations = int(iterations)

    def __call__(self, theta) -> torch.Tensor:
        theta = np.asarray(theta, dtype=np.float64).reshape(-1, THETA_DIM)
        x = np.empty((len(theta), X_DIM))
        for i, row in enumerate(theta):
            state = busy_loop(self.iterations, int(abs(row[0]) * 1e6) & 0x7FFFFFFF)
            x[i, :THETA_DIM] = row
            x[i, THETA_DIM] = state / 0x7FFFFFFF
        x += 0.01 * np.random.standard_normal(x.shape)
        return torch.from_numpy(x.astype(np.float32))


def trivial_simulator(theta) -> np.ndarray:
    """No work at all: for the fixed start-up cost of a run."""
    return 2.0 * np.asarray(theta, dtype=np.float32)


def make_prior() -> Independent:
    """Uniform on the unit cube (the simulator's cost does not depend on theta)."""
    return Independent(Uniform(torch.zeros(THETA_DIM), torch.ones(THETA_DIM)), 1)


def calibrate(row_ms: float, probe: int = 200_000, tries: int = 5) -> int:
    """Loop iterations that take ``row_ms`` ms here (fastest of ``tries`` timings of ``probe`` steps)."""
    best = min(_timed(lambda: busy_loop(probe, 1)) for _ in range(tries))
    return max(1, round(probe * row_ms / 1e3 / best))


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# ------------------------------------------------------------------------------------ CPU time
def _live_descendants_cpu() -> tuple[float, str]:
    """CPU seconds (own + reaped children) of this process's live descendants, and how they were found."""
    try:
        import psutil
    except ImportError:
        return _proc_descendants_cpu(), "/proc"
    total = 0.0
    for child in psutil.Process().children(recursive=True):
        try:
            t = child.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total, "psutil"


def _proc_descendants_cpu() -> float:
    ticks = os.sysconf("SC_CLK_TCK")
    stats: dict[int, tuple[int, float]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        # after the command name: state ppid ... utime(14) stime(15) cutime(16) cstime(17), 1-indexed overall
        stats[int(entry)] = (int(fields[1]), sum(int(v) for v in fields[11:15]) / ticks)
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    total, todo = 0.0, list(children.get(os.getpid(), []))
    while todo:
        pid = todo.pop()
        total += stats[pid][1]
        todo.extend(children.get(pid, []))
    return total


def tree_cpu_seconds() -> tuple[float, str]:
    """CPU seconds so far of this process, its reaped descendants and its live ones (and the method).

    The difference of two readings is the CPU time the process tree spent in between: a descendant
    alive at the first reading and reaped by the second is counted by its live total first and by
    ``RUSAGE_CHILDREN`` later, so only its increase remains.
    """
    own = resource.getrusage(resource.RUSAGE_SELF)
    reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
    live, method = _live_descendants_cpu()
    return own.ru_utime + own.ru_stime + reaped.ru_utime + reaped.ru_stime + live, method


class Timing:
    """Repeated measurements (wall and CPU seconds) of one configuration of ``rows`` rows.

    A plain class, not a dataclass: ``tests/test_examples.py`` loads examples without registering them
    in ``sys.modules``, which ``@dataclass`` needs.
    """

    def __init__(self, rows: int):
        self.rows = rows
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self.other: list[float] = []

    def add(self, wall: float, cpu: float, other: float = float("nan")) -> None:
        self.wall.append(wall)
        self.cpu.append(cpu)
        self.other.append(other)

    @property
    def rate(self) -> float:
        """Rows per second at the median wall time."""
        return self.rows / statistics.median(self.wall)


def machine_busy_seconds() -> float:
    """CPU seconds all processes of the machine have used (``/proc/stat``; NaN where there is none)."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return float("nan")
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def measure(fn: Callable[[], object]) -> tuple[float, float, float, object]:
    """Wall seconds, process-tree CPU seconds, CPU seconds of other processes and the value of ``fn()``.

    The third number (the machine's busy time less ours) shows how much a run was disturbed by other
    work on a shared machine.
    """
    busy0, (cpu0, _) = machine_busy_seconds(), tree_cpu_seconds()
    start = time.perf_counter()
    value = fn()
    wall = time.perf_counter() - start
    cpu1, _ = tree_cpu_seconds()
    busy1 = machine_busy_seconds()
    return wall, cpu1 - cpu0, max(0.0, busy1 - busy0 - (cpu1 - cpu0)), value


# ------------------------------------------------------------------------------------ sbi (other interpreter)
def sbi_child(config: dict) -> None:
    """Runs in the sbi interpreter: ``simulate_for_sbi`` with each ``num_workers``; prints one JSON line."""
    from sbi import __version__ as sbi_version
    from sbi.inference import simulate_for_sbi

    simulator, prior = BusySimulator(config["iterations"]), make_prior()
    out = {"sbi": sbi_version, "torch": torch.__version__, "python": platform.python_version(), "runs": {}}
    for workers in config["workers"]:
        wall, cpu, other, (_, x) = measure(lambda: simulate_for_sbi(
            simulator, prior, config["rows"], num_workers=workers, simulation_batch_size=config["batch_size"],
            seed=0, show_progress_bar=False))
        ok = tuple(x.shape) == (config["rows"], X_DIM) and bool(torch.isfinite(x).all())
        out["runs"][str(workers)] = {"wall": wall, "cpu": cpu, "other": other, "ok": ok}
    out["cpu_method"] = tree_cpu_seconds()[1]
    print("SBI_RESULT " + json.dumps(out), flush=True)


def run_sbi(python: str, iterations: int, rows: int, batch_size: int, workers: list[int]) -> dict:
    """One sbi subprocess (fresh joblib worker processes): its JSON result."""
    config = {"iterations": iterations, "rows": rows, "batch_size": batch_size, "workers": workers}
    done = subprocess.run([python, str(Path(__file__).resolve()), "--sbi-child", json.dumps(config)],
                          capture_output=True, text=True, timeout=3600)
    for line in done.stdout.splitlines():
        if line.startswith("SBI_RESULT "):
            return json.loads(line[len("SBI_RESULT "):])
    raise RuntimeError(f"the sbi subprocess failed (exit code {done.returncode}):\n{done.stderr[-3000:]}")


# ------------------------------------------------------------------------------------ ours
def has_dask() -> bool:
    """Whether ``dask.distributed`` is importable."""
    try:
        import distributed  # noqa: F401
    except ImportError:
        return False
    return True


@contextmanager
def dask_client(workers: int = 2) -> Iterator:
    """A fresh local Dask cluster of ``workers`` single-threaded worker processes; yields its client."""
    from distributed import Client, LocalCluster

    cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                           silence_logs=logging.ERROR)
    client = Client(cluster)
    try:
        yield client
    finally:
        client.close()
        cluster.close()


def ours(simulator: Callable, rows: int, batch_size: int, **options):
    """``simulate_from_prior`` on the unit-cube prior, seed 0."""
    from sbiflows import simulate_from_prior

    return simulate_from_prior(simulator, make_prior(), rows, seed=0, batch_size=batch_size, **options)


def guarded(timing: Timing, fn: Callable[[], object]) -> object | None:
    """Time ``fn`` into ``timing``; a ``SimulationError`` is printed (with the run's message) and not timed."""
    from sbiflows.simulate import SimulationError

    try:
        wall, cpu, other, value = measure(fn)
    except SimulationError as error:
        print(f"  ENGINE ERROR (run not timed): {type(error).__name__}: {error}")
        return None
    timing.add(wall, cpu, other)
    return value


def check(name: str, result, rows: int) -> None:
    """Print a note if a run lost rows (a benchmark must not assert, but must not hide failures)."""
    if len(result.x) != rows or result.num_invalid:
        print(f"  NOTE {name}: {result.summary()}")


# ------------------------------------------------------------------------------------ report
def row(name: str, t: Timing, base: Timing | None) -> str:
    """One line of a table: medians, min and max, rows/s, ratio of rates to ``base``, other processes' CPU."""
    wall, cpu = t.wall, t.cpu
    if not wall:
        return f"{name:30s} {t.rows:6d}  no successful run"
    ratio = f"{t.rate / base.rate:5.2f}" if base is not None and base.wall else "    -"
    return (f"{name:30s} {t.rows:6d} {statistics.median(wall):7.2f} {min(wall):6.2f} {max(wall):6.2f} "
            f"{statistics.median(cpu):7.2f} {min(cpu):6.2f} {max(cpu):6.2f} {t.rate:8.1f} {ratio} "
            f"{statistics.median(t.other):7.2f}")


HEADER = (f"{'configuration':30s} {'rows':>6s} {'wall s':>7s} {'min':>6s} {'max':>6s} {'CPU s':>7s} {'min':>6s} "
          f"{'max':>6s} {'rows/s':>8s} {'ratio'} {'other s':>7s}")


def verdict(met: bool) -> str:
    return "MET" if met else "NOT MET"


def close_idle_workers() -> None:
    """Close the worker processes that earlier runs left idle, so that the next run starts its own."""
    from sbiflows.engine.backends import close_idle_workers as close

    close()


def startup_section(repeats: int, dask: bool) -> dict[str, Timing]:
    """Trivial simulator, 2 rows in chunks of 1: the fixed cost of a run in each backend."""
    print(f"\n[start-up] trivial simulator, 2 rows, batch_size=1, {repeats} runs each, interleaved")
    startup = {"in-process": Timing(2), "workers=2": Timing(2), "workers=2, warm": Timing(2)}
    if dask:
        startup["Dask, first call"] = Timing(2)
        startup["Dask, later calls"] = Timing(2)
    with dask_client(2) if dask else nullcontext() as client:
        if client is not None:
            guarded(startup["Dask, first call"], lambda: ours(trivial_simulator, 2, 1, executor=client))
        for _ in range(repeats):
            guarded(startup["in-process"], lambda: ours(trivial_simulator, 2, 1))
            close_idle_workers()  # cold: the run starts its worker processes
            guarded(startup["workers=2"], lambda: ours(trivial_simulator, 2, 1, workers=2))
            guarded(startup["workers=2, warm"], lambda: ours(trivial_simulator, 2, 1, workers=2))  # reuses them
            if client is not None:
                guarded(startup["Dask, later calls"], lambda: ours(trivial_simulator, 2, 1, executor=client))
    print(HEADER)
    for name, t in startup.items():
        print(row(name, t, None))
    return startup


def cpu_bound_section(args: argparse.Namespace, busy: BusySimulator, dask: bool,
                      sbi_python: str | None) -> tuple[dict[str, Timing], list[float]]:
    """The ~20 ms-per-row simulator in every configuration; returns the timings and the Dask start times.

    Every Dask repeat gets a fresh cluster (started and closed outside the timing), so its first call
    starts the engine's worker processes in the Dask workers, as ``workers=2`` does on every call, and
    no idle cluster runs next to the other configurations.
    """
    print(f"\n[CPU-bound] ~{args.row_ms:g} ms/row, {args.rows} rows, batch_size={args.batch_size} "
          f"(sbi: simulation_batch_size={args.batch_size}), {args.repeats} repeats, interleaved")
    names = ["(a) in-process", "(b) workers=2", "(b) workers=2, warm"] + (["(c) Dask 2 workers"] if dask else [])
    if sbi_python is not None:
        names += ["(d) sbi num_workers=1", "(d) sbi num_workers=2"]
    timings = {name: Timing(args.rows) for name in names}
    same: dict[str, bool] = {}  # bitwise equal to the first in-process x (a chunk retried row by row is not)
    reference: torch.Tensor | None = None
    started: list[float] = []
    sbi_info = None

    def run(name: str, **options) -> None:
        nonlocal reference
        result = guarded(timings[name], lambda: ours(busy, args.rows, args.batch_size, **options))
        if result is not None:
            check(name, result, args.rows)
            reference = result.x if reference is None else reference
            same[name] = same.get(name, True) and torch.equal(result.x, reference)

    for _ in range(args.repeats):
        run("(a) in-process")
        close_idle_workers()  # cold: this run starts its two worker processes (1.4 s of importing torch)
        run("(b) workers=2", workers=2)
        run("(b) workers=2, warm", workers=2)  # the next run of the same process reuses them
        if dask:
            start = time.perf_counter()
            with dask_client(2) as client:
                started.append(time.perf_counter() - start)
                run("(c) Dask 2 workers", executor=client)
        if sbi_python is not None:
            try:
                sbi_info = run_sbi(sbi_python, busy.iterations, args.rows, args.batch_size, [1, 2])
            except (RuntimeError, OSError, subprocess.SubprocessError) as error:
                print(f"  NOTE sbi skipped from here on: {error}")
                sbi_python = None
                continue
            for workers, result in sbi_info["runs"].items():
                timings[f"(d) sbi num_workers={workers}"].add(result["wall"], result["cpu"], result["other"])
                if not result["ok"]:
                    print(f"  NOTE sbi num_workers={workers}: output has the wrong shape or non-finite rows")
    print(HEADER)
    for name, t in timings.items():
        print(row(name, t, timings["(a) in-process"]))
    print("x bitwise equal to the in-process x in every repeat: "
          + ", ".join(f"{name} {'yes' if ok else 'NO'}" for name, ok in same.items()))
    if sbi_info is not None:
        print(f"sbi {sbi_info['sbi']} (python {sbi_info['python']}, torch {sbi_info['torch']}), CPU time by "
              f"{sbi_info['cpu_method']}, one subprocess per repeat; ratios are against our in-process rate")
    return timings, started


def store_section(args: argparse.Namespace, light: BusySimulator) -> dict[str, Timing]:
    """The ~1 ms-per-row simulator in-process, without and with ``store=``."""
    print(f"\n[store] ~{args.store_row_ms:g} ms/row, {args.store_rows} rows, batch_size={args.store_batch_size}, "
          f"in-process, {args.repeats} repeats, interleaved")
    store = {"no store": Timing(args.store_rows), "store= (fresh temp dir)": Timing(args.store_rows)}
    for _ in range(args.repeats):
        result = guarded(store["no store"], lambda: ours(light, args.store_rows, args.store_batch_size))
        if result is not None:
            check("no store", result, args.store_rows)
        with tempfile.TemporaryDirectory(prefix="sbiflows-bench-") as tmp:  # created and removed untimed
            result = guarded(store["store= (fresh temp dir)"],
                             lambda: ours(light, args.store_rows, args.store_batch_size, store=Path(tmp) / "sims.zarr"))
        if result is not None:
            check("store", result, args.store_rows)
    print(HEADER)
    for name, t in store.items():
        print(row(name, t, store["no store"]))
    return store


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1000, help="rows for the CPU-bound simulator")
    parser.add_argument("--row-ms", type=float, default=20.0, help="CPU work per row of that simulator (ms)")
    parser.add_argument("--batch-size", type=int, default=10, help="rows per simulator call (ours and sbi)")
    parser.add_argument("--store-rows", type=int, default=20_000)
    parser.add_argument("--store-row-ms", type=float, default=1.0)
    parser.add_argument("--store-batch-size", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--startup-repeats", type=int, default=5, help="trivial 2-row runs per start-up case")
    parser.add_argument("--sbi-python", default=None, help="an interpreter with sbi installed (sbi part skipped "
                                                           "without it)")
    parser.add_argument("--quick", action="store_true", help="small sizes, one repeat (a smoke run)")
    parser.add_argument("--sbi-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.sbi_child is not None:
        sbi_child(json.loads(args.sbi_child))
        return
    if args.quick:
        args.rows, args.store_rows, args.repeats, args.startup_repeats = 40, 2000, 1, 2

    import sbiflows
    import zarr

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    versions = (f"python {platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}, "
                f"zarr {zarr.__version__}, sbiflows {getattr(sbiflows, '__version__', '?')}")
    try:
        import distributed
        versions += f", distributed {distributed.__version__}"
    except ImportError:
        pass
    print(f"machine: {cores} usable cores (os.cpu_count {os.cpu_count()}), {platform.machine()}, "
          f"load average {os.getloadavg()[0]:.2f}")
    print(versions)
    print(f"CPU time: process tree, by {tree_cpu_seconds()[1]} (live descendants) + getrusage(SELF + CHILDREN); "
          "'other s': CPU seconds other processes used during a repeat (median)")

    iterations = calibrate(args.row_ms)
    store_iterations = calibrate(args.store_row_ms)
    print(f"simulator: {iterations} loop steps per row (~{args.row_ms:g} ms here), store simulator: "
          f"{store_iterations} (~{args.store_row_ms:g} ms)")

    sbi_python = args.sbi_python
    if sbi_python is None:
        print("sbi: skipped (no --sbi-python given)")
    elif not Path(sbi_python).exists():
        print(f"sbi: skipped ({sbi_python} not found)")
        sbi_python = None

    dask = has_dask()
    if not dask:
        print("Dask: skipped (distributed is not installed)")
    startup = startup_section(args.startup_repeats, dask)
    timings, started = cpu_bound_section(args, BusySimulator(iterations), dask, sbi_python)
    if started:
        print(f"a fresh Dask LocalCluster(n_workers=2, threads_per_worker=1, processes=True) per repeat, started in "
              f"{statistics.median(started):.2f} s (median; not counted above)")
    store = store_section(args, BusySimulator(store_iterations))

    print("\n[targets] (medians of this run; timings on a shared machine are noisy)")
    base, local = timings["(a) in-process"], timings["(b) workers=2"]
    if base.wall and local.wall:
        speedup = local.rate / base.rate
        print(f"2 workers >= 1.8x in-process: {speedup:.2f}x -> {verdict(speedup >= 1.8)} (cold: starting the workers)")
        warm = timings["(b) workers=2, warm"]
        if warm.wall:
            speedup = warm.rate / base.rate
            print(f"2 workers >= 1.8x in-process: {speedup:.2f}x -> {verdict(speedup >= 1.8)} (warm: reusing them)")
    on_dask = timings.get("(c) Dask 2 workers")
    if on_dask is not None and on_dask.wall and local.wall:
        ratio = on_dask.rate / local.rate
        print(f"Dask within 15% of local workers: Dask/workers=2 = {ratio:.2f} -> {verdict(ratio >= 0.85)}")
    if store["store= (fresh temp dir)"].wall and store["no store"].wall:
        overhead = 1 - store["store= (fresh temp dir)"].rate / store["no store"].rate
        print(f"store costs < 5%: {overhead:+.1%} -> {verdict(overhead < 0.05)}")
    extra = 0.0
    if startup["workers=2"].wall and startup["in-process"].wall:
        extra = statistics.median(startup["workers=2"].wall) - statistics.median(startup["in-process"].wall)
        print(f"fixed start-up of workers=2 (2 worker processes importing torch): {extra:.2f} s more than in-process")
    if base.wall and local.wall and statistics.median(local.wall) > extra > 0:
        without = args.rows / (statistics.median(local.wall) - extra) / base.rate
        print(f"workers=2 without that start-up: {without:.2f}x in-process")
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()

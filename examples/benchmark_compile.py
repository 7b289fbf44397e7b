"""Measure ``torch.compile`` for a training step of the default NPE network, counting the compile time.

A training step of the default spline flow on two_moons at 1,000 simulations (60 rows, about 4,000
steps a fit) costs what its operations' fixed costs add up to: about 60 operations forward and 100
autograd nodes backward. ``torch.compile`` (inductor, C++ kernels on the CPU) fuses those operations,
forward and backward, into a few generated kernels. This script asks whether that pays for the time
it takes to compile. It builds the network exactly as the library does (``NPE(...).fit``), wraps the
loss (``-net.log_prob(theta, x).mean()``) in ``torch.compile`` with ``dynamic=False``, and

* times the first compiled step (forward, backward and Adam step; the forward's and the backward's
  compile both happen in it) in wall and CPU seconds, the CPU counting the C++ compiler's processes,
  with an empty inductor cache (a user's first run; each such cost in a process's first compile, as a
  process keeps the kernels it built in memory), and with that cache on disk: again in this process
  after ``torch._dynamo.reset()``, and in a new process run after this one (a later run of the code);
* checks that the compiled loss and its gradients equal the eager ones (largest absolute difference);
* with ``--max-autotune``, also ``mode="max-autotune-no-cudagraphs"`` at 60 rows;
* times eager and compiled steps interleaved, on one thread, in blocks of ``--calls`` steps: median
  wall and CPU microseconds a step, and the ratio to eager from the same blocks;
* gives the break-even, compile seconds / per-step saving, in steps;
* at 200 rows, also the recompile a smaller last batch causes (70 rows, as 9,000 training rows in
  batches of 190 leave at 10,000 simulations): a second static graph with ``dynamic=False``, or with
  the default ``dynamic=None`` a dynamic-shape graph, whose steps are timed as well.

Inductor compiles in its process (``compile_threads = 1``), gcc as its child; a new process is started only
while this one waits, so one runs at a time.

Usage:
    cd examples && PYTHONPATH=.. python benchmark_compile.py --repeats 15 [--max-autotune]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import types
from typing import Callable

import torch
import torch._dynamo
import torch._inductor.config
from torch import Tensor, nn
from torch._dynamo.utils import counters

import simulators
from sbiflows import NPE

Loss = Callable[[Tensor, Tensor], Tensor]


def clocks() -> tuple[float, float, float]:
    """Wall seconds, CPU seconds of this process, and CPU seconds of its finished children (the C++ compiler)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.perf_counter(), time.process_time(), children.ru_utime + children.ru_stime


def fresh_cache() -> str:
    """Point inductor at a new, empty cache folder (a cold compile, as in a user's first run) and return it."""
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-")
    return os.environ["TORCHINDUCTOR_CACHE_DIR"]


def make_loss(net: nn.Module, name: str) -> Loss:
    """``-net.log_prob(theta, x).mean()`` as a function with its own code object named ``name``.

    torch.compile keeps its compiled graphs, and what it learned about shapes, per code object (and
    name), so each compiled variant gets a fresh one and no variant reuses another's graph.
    """
    def loss(theta: Tensor, x: Tensor) -> Tensor:
        return -net.log_prob(theta, x).mean()

    code = loss.__code__.replace(co_name=name, co_qualname=name)
    return types.FunctionType(code, loss.__globals__, name, None, loss.__closure__)


class Bench:
    """The default NPE network for two_moons at 1,000 simulations, its Adam and the training step."""

    def __init__(self) -> None:
        task = simulators.get("two_moons")
        torch.manual_seed(0)
        self.theta = task.prior.sample((1000,))
        self.x = task.simulate(self.theta, seed=0)
        fit = NPE(task.prior, ensemble=1).fit(self.theta, self.x, max_epochs=1, progress=False, num_threads=None)
        self.net = fit.net.train()
        self.weights = list(self.net.parameters())
        self.optimizer = torch.optim.Adam(self.weights, lr=1e-5, fused=True)  # as sbiflows.training._adam

    def rows(self, n: int) -> Tensor:
        return torch.randint(0, 1000, (n,), generator=torch.Generator().manual_seed(n))

    def step(self, loss_fn: Loss, rows: Tensor) -> None:
        """One training step as ``sbiflows.training.train`` takes it (less its ``loss.item()``)."""
        loss = loss_fn(self.theta[rows], self.x[rows])
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(self.weights, 5.0)
        self.optimizer.step()

    def first_step(self, loss_fn: Loss, rows: Tensor, what: str) -> tuple[float, float]:
        """Wall and CPU seconds of one step (the compile, where there is one), printed with dynamo's counts."""
        counters.clear()
        start = clocks()
        self.step(loss_fn, rows)
        wall, own, children = (end - begin for end, begin in zip(clocks(), start))
        graphs = counters["stats"]["unique_graphs"]
        breaks = sum(counters["graph_break"].values())
        print(f"  first step, {what}: {wall:.2f} s wall, {own + children:.2f} s CPU ({children:.2f} s of it "
              f"in the C++ compiler; graphs compiled {graphs}, graph breaks {breaks})", flush=True)
        return wall, own + children

    def difference(self, eager: Loss, compiled: Loss, rows: Tensor, what: str) -> None:
        """Largest absolute difference of the compiled loss and of its gradients from the eager ones."""
        values, grads = [], []
        for fn in (eager, compiled):
            loss = fn(self.theta[rows], self.x[rows])
            grads.append(torch.autograd.grad(loss, self.weights))
            values.append(loss.detach())
        grad_diff = max(float((a - b).abs().max()) for a, b in zip(*grads))
        largest = max(float(g.abs().max()) for g in grads[0])
        print(f"  {what} minus eager: loss {float((values[0] - values[1]).abs()):.2e} (loss {float(values[0]):.4f}),"
              f" gradients largest {grad_diff:.2e} (largest gradient {largest:.2e})")

    def timed(self, variants: dict[str, Loss], rows: Tensor, repeats: int, calls: int) -> dict[str, list[float]]:
        """Interleaved blocks: for each variant, its (wall us, CPU us) per step of each block, medians printed."""
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
        for _ in range(repeats):
            for name, fn in variants.items():
                wall, cpu = time.perf_counter(), time.process_time()
                for _ in range(calls):
                    self.step(fn, rows)
                times[name].append(((time.perf_counter() - wall) / calls * 1e6,
                                    (time.process_time() - cpu) / calls * 1e6))
        base = [wall for wall, _ in times["eager"]]
        medians = {}
        for name, values in times.items():
            wall = statistics.median(v[0] for v in values)
            cpu = statistics.median(v[1] for v in values)
            ratio = statistics.median(v[0] / b for v, b in zip(values, base))  # same-block ratio to eager
            medians[name] = [wall, cpu, ratio]
            print(f"  {name}: {wall:.0f} us wall, {cpu:.0f} us CPU a step, x{ratio:.2f} of eager (same blocks)")
        return medians


def break_even(cost: tuple[float, float], eager: list[float], compiled: list[float], what: str) -> None:
    """Steps after which the saving a step repays the compile (wall and CPU separately)."""
    parts = []
    for label, seconds, before, after in (("wall", cost[0], eager[0], compiled[0]),
                                          ("CPU", cost[1], eager[1], compiled[1])):
        saving = (before - after) * 1e-6
        parts.append(f"{label} {seconds / saving:,.0f} steps" if saving > 0 else f"{label} never (no saving)")
    print(f"  break-even, {what}: " + ", ".join(parts))


def new_process(rows: int, mode: str, cache: str | None) -> tuple[float, float]:
    """The first compiled step in a new process, with inductor's cache in ``cache`` (``None``: a new, empty one).

    A process keeps the kernels it compiled in memory, so a compile after the first in one process can
    skip the C++ compiler where a kernel's source is the same: each cold cost is taken in a process of its own.
    """
    command = [sys.executable, os.path.abspath(__file__), "--child-rows", str(rows), "--mode", mode]
    done = subprocess.run(command + (["--cache", cache] if cache else []), capture_output=True, text=True,
                          check=True)  # this process waits: one process at a time
    lines = done.stdout.splitlines()
    print("\n".join(line for line in lines[:-1] if line.startswith("  first step")))
    wall, cpu = lines[-1].split()
    return float(wall), float(cpu)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=15, help="interleaved blocks per variant")
    parser.add_argument("--calls", type=int, default=50, help="training steps per block")
    parser.add_argument("--max-autotune", action="store_true",
                        help='also mode="max-autotune-no-cudagraphs" at 60 rows')
    parser.add_argument("--child-rows", type=int, help="(internal) only the first compiled step, of this batch")
    parser.add_argument("--mode", default="default", help="(internal) torch.compile's mode for --child-rows")
    parser.add_argument("--cache", help="(internal) inductor's cache for --child-rows (default: a new one)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch._inductor.config.compile_threads = 1  # compile in this process: no pool of workers
    bench = Bench()
    eager = make_loss(bench.net, "eager_loss")
    for _ in range(20):  # warm the eager path (allocator, first-call costs) before timing anything
        bench.step(eager, bench.rows(60))
    if args.child_rows:
        cache = args.cache or fresh_cache()
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
        compiled = torch.compile(make_loss(bench.net, f"compiled_{args.child_rows}"), dynamic=False, mode=args.mode)
        what = f"mode={args.mode!r}, new process, " + ("cache on disk" if args.cache else "empty cache")
        print(*bench.first_step(compiled, bench.rows(args.child_rows), what))
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread; inductor caches under {tempfile.gettempdir()}")

    print("batch 60 (1,000 simulations: 900 training rows, 15 steps an epoch, no smaller last batch)")
    rows = bench.rows(60)
    bench.first_step(eager, rows, "eager")
    cache = fresh_cache()
    compiled = torch.compile(make_loss(bench.net, "compiled_60"), dynamic=False)
    cold = bench.first_step(compiled, rows, "compile, this process's first, empty cache")
    variants = {"eager": eager, "compiled": compiled}
    if args.max_autotune:
        autotune_cost = new_process(60, "max-autotune-no-cudagraphs", None)
        fresh_cache()
        autotuned = torch.compile(make_loss(bench.net, "autotuned_60"), dynamic=False,
                                  mode="max-autotune-no-cudagraphs")
        bench.first_step(autotuned, rows, 'compile, mode="max-autotune-no-cudagraphs", this process\'s second')
        variants["compiled, max-autotune"] = autotuned
    for name, fn in variants.items():
        if name != "eager":
            bench.difference(eager, fn, rows, name)
    medians = bench.timed(variants, rows, args.repeats, args.calls)
    break_even(cold, medians["eager"], medians["compiled"], "compile with an empty cache")
    if args.max_autotune:
        break_even(autotune_cost, medians["eager"], medians["compiled, max-autotune"], "max-autotune, empty cache")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
    torch._dynamo.reset()  # forget the compiled graphs in memory; inductor's cache on disk stays
    again = torch.compile(make_loss(bench.net, "compiled_60"), dynamic=False)
    warm = bench.first_step(again, rows, "compile again in this process after torch._dynamo.reset(), cache on disk")
    break_even(warm, medians["eager"], medians["compiled"], "compile again in this process")
    torch._dynamo.reset()
    warm = new_process(60, "default", cache)
    break_even(warm, medians["eager"], medians["compiled"], "compile in a new process, cache on disk")

    print("batch 200 (close to 10,000 simulations: 9,000 training rows in 190s leave a last batch of 70)")
    rows, last = bench.rows(200), bench.rows(70)
    cold = new_process(200, "default", None)
    fresh_cache()
    static = torch.compile(make_loss(bench.net, "compiled_200"), dynamic=False)
    bench.first_step(static, rows, "compile, dynamic=False, this process's third")
    bench.difference(eager, static, rows, "compiled")
    bench.first_step(static, last, "dynamic=False, a 70-row batch: a second static graph")
    fresh_cache()
    default = torch.compile(make_loss(bench.net, "default_200"))
    bench.first_step(default, rows, "compile, dynamic=None (the default), the same graph as dynamic=False's")
    recompile = bench.first_step(default, last, "dynamic=None, a 70-row batch: a dynamic-shape graph")
    bench.first_step(default, rows, "dynamic=None, 200 rows again")
    bench.difference(eager, default, rows, "dynamic-shape graph")
    variants = {"eager": eager, "compiled": static, "compiled, dynamic shapes": default}
    medians = bench.timed(variants, rows, args.repeats, args.calls)
    break_even(cold, medians["eager"], medians["compiled"], "dynamic=False, one graph, new process")
    both = (cold[0] + recompile[0], cold[1] + recompile[1])
    break_even(both, medians["eager"], medians["compiled, dynamic shapes"],
               "dynamic=None, the static graph (new process) + the dynamic one")


if __name__ == "__main__":
    main()

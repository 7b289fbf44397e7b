"""Time one NPE training step (forward, backward, gradient clipping, Adam) of ours and, if installed, sbi's.

A training run is epochs x steps per epoch x the cost of one step; this script measures the last
factor in isolation, on random data of a task's dimensions, so that it is not mixed up with the
number of epochs (which depends on the data and early stopping). Reported: the median over
``--repeats`` blocks of 50 steps, for our default estimator with the fused Adam kernel and with
``foreach`` Adam, with the fused kernel over the separate parameter tensors instead of one flat buffer
(training before :mod:`sbiflows.flat_parameters`), with the flat buffer's gradients zeroed and clipped by
``optimizer.zero_grad`` and ``torch.nn.utils.clip_grad_norm_`` instead of the buffer's own methods, with the fused kernel and torch's softmax for the spline bins at every size (the
code before the written-out softmax of :func:`sbiflows.transforms.transformers._softmax_rows`), with
the fused kernel plus the weight average that training keeps (ours, one
foreach lerp, and torch's ``AveragedModel`` with the same decay), and for sbi's flows
(``--sbi-estimators``, default its MAF and its NSF); the timings are interleaved, so the ratios
compare the same machine load. It also counts the operations torch dispatches for one loss (the
forward pass) and one whole step of ours, which on small batches is what a step's time follows.

Usage:
    python examples/benchmark_training_step.py --task slcp --batch-sizes 128 200
    python examples/benchmark_training_step.py --task bernoulli_glm_raw --simulations 10000 --batch-sizes 190 200
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch.optim.swa_utils import AveragedModel
from torch.utils._python_dispatch import TorchDispatchMode

import simulators
from sbiflows import NPE
from sbiflows.flat_parameters import FlatParameters
from sbiflows.training import WeightAverage
from sbiflows.transforms import transformers


def our_step(prior, theta, x, *, fused: bool, average: str | None = None, flat: bool = True,
             torch_clip: bool = False) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """A training step of our default NPE network (built by a one-epoch fit on the data).

    ``average``: None, ``"ours"`` (:class:`sbiflows.training.WeightAverage`, what training uses) or
    ``"AveragedModel"`` (torch's, with the same decay rule), updated after every step. ``flat``: the
    parameters as views of one buffer (:class:`sbiflows.flat_parameters.FlatParameters`, what training
    uses), else Adam and the clipping over the separate parameter tensors (training before it). With flat
    buffers the gradients are zeroed and clipped by the buffers' own methods, as training does, unless
    ``torch_clip``: then by ``optimizer.zero_grad`` and ``torch.nn.utils.clip_grad_norm_`` (training before
    commit "flat buffers zero and clip their own gradients").
    """
    net = NPE(prior, ensemble=1).fit(theta, x, max_epochs=1, progress=False, num_threads=None).net.train()
    buffers = FlatParameters(list(net.parameters())) if flat else None
    params = list(buffers.flat) if buffers is not None else list(net.parameters())
    options = {"fused": True} if fused else {"foreach": True}
    optimizer = torch.optim.Adam(params, lr=1e-5, **options)
    update: Callable[[], None] = lambda: None
    if average == "ours":
        update = WeightAverage(net, steps=47).update  # one epoch of 9,000 rows in batches of 190
    elif average == "AveragedModel":
        def lerp(averaged, current, num_averaged):
            n = int(num_averaged)
            torch._foreach_lerp_(averaged, current, 1.0 - min(1 - 1 / 47, (1 + n) / (10 + n)))

        averaged_model = AveragedModel(net, multi_avg_fn=lerp, use_buffers=False)

        def update() -> None:
            averaged_model.update_parameters(net)

    def step(t, c):
        loss = -net.log_prob(t, c).mean()
        if buffers is not None and not torch_clip:
            buffers.zero_grad()
            loss.backward()
            buffers.clip_grad_norm_(5.0)
        else:
            optimizer.zero_grad(set_to_none=not flat)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 5.0)
        optimizer.step()
        update()

    return step


def torch_softmax(step: Callable[[torch.Tensor, torch.Tensor], None]) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """``step`` with the spline's bin softmax left to ``torch.softmax`` at every size (as before commit 267309e)."""

    def wrapped(t, c):
        threshold = transformers.SOFTMAX_ROWS_WRITTEN_OUT
        transformers.SOFTMAX_ROWS_WRITTEN_OUT = sys.maxsize
        try:
            step(t, c)
        finally:
            transformers.SOFTMAX_ROWS_WRITTEN_OUT = threshold

    return wrapped


def sbi_step(prior, theta, x, *, estimator_name: str = "maf") -> Callable | None:
    """A training step of sbi's ``estimator_name`` flow with sbi's optimizer settings; None without sbi."""
    try:
        from sbi.neural_nets import posterior_nn
    except ImportError:
        return None
    estimator = posterior_nn(estimator_name)(theta, x)
    params = list(estimator.parameters())
    optimizer = torch.optim.Adam(params, lr=1e-5)

    def step(t, c):
        loss = estimator.loss(t, c).mean()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 5.0)
        optimizer.step()

    return step


class _OperationCount(TorchDispatchMode):
    """Counts the operations torch dispatches while active (autograd's backward on the CPU included)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def count_operations(prior, theta, x, batch_size: int) -> tuple[int, int]:
    """The operations of one loss ``-log q(theta | x)`` and of one whole training step of our default network."""
    net = NPE(prior, ensemble=1).fit(theta, x, max_epochs=1, progress=False, num_threads=None).net.train()
    step = our_step(prior, theta, x, fused=True)
    t, c = theta[:batch_size], x[:batch_size]
    with _OperationCount() as forward:
        net.log_prob(t, c).mean()
    step(t, c)  # Adam's first step creates its state
    with _OperationCount() as whole:
        step(t, c)
    return forward.count, whole.count


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", default="slcp", choices=simulators.names())
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 200])
    parser.add_argument("--repeats", type=int, default=15, help="blocks of 50 steps per variant")
    parser.add_argument("--simulations", type=int, default=2000,
                        help="rows the networks are built for (our default depth depends on the budget)")
    parser.add_argument("--sbi-estimators", nargs="*", default=["maf", "nsf"],
                        help="sbi density estimators to time beside ours (when sbi is installed)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    task = simulators.get(args.task)
    torch.manual_seed(0)
    theta = task.prior.sample((args.simulations,))
    x = task.simulate(theta, seed=0)
    steps = {"ours (fused Adam)": our_step(task.prior, theta, x, fused=True),
             "ours fused, torch softmax": torch_softmax(our_step(task.prior, theta, x, fused=True)),
             "ours (foreach Adam)": our_step(task.prior, theta, x, fused=False),
             "ours, separate parameters": our_step(task.prior, theta, x, fused=True, flat=False),
             "ours, torch's clip and zero": our_step(task.prior, theta, x, fused=True, torch_clip=True),
             "ours fused + average": our_step(task.prior, theta, x, fused=True, average="ours"),
             "ours fused + AveragedModel": our_step(task.prior, theta, x, fused=True, average="AveragedModel")}
    for name in args.sbi_estimators:
        sbi = sbi_step(task.prior, theta, x, estimator_name=name)
        if sbi is not None:
            steps[f"sbi 0.27 {name.upper()}"] = sbi
    print(f"task={args.task} theta_dim={theta.shape[1]} x_dim={x.shape[1]} one torch thread; "
          f"median ms per step over {args.repeats} blocks of 50 steps")
    generator = torch.Generator().manual_seed(0)
    for batch_size in args.batch_sizes:
        forward, whole = count_operations(task.prior, theta, x, batch_size)
        print(f"batch {batch_size:4d}  ours: {forward} operations a loss (forward), {whole} a whole step")
        times: dict[str, list[float]] = {name: [] for name in steps}
        for _ in range(args.repeats):
            idx = torch.randint(0, len(theta), (50, batch_size), generator=generator)
            for name, step in steps.items():  # interleaved: every variant sees the same load
                start = time.perf_counter()
                for rows in idx:
                    step(theta[rows], x[rows])
                times[name].append((time.perf_counter() - start) / 50 * 1e3)
        base = statistics.median(times["ours (fused Adam)"])
        for name, values in times.items():
            median = statistics.median(values)
            print(f"batch {batch_size:4d}  {name:28s} {median:6.2f} ms  (x{median / base:.2f} of ours fused)")


if __name__ == "__main__":
    main()

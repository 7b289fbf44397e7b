"""Measure a hand-written backward pass for the rational-quadratic spline (measured, not adopted).

A training step of the default spline flow on two_moons at 1,000 simulations spends most of its time in
the five spline layers, about 60 operations forward and 100 autograd nodes backward on 60 rows, where
each operation's fixed cost dominates. This script asks whether a closed-form backward (a
``torch.autograd.Function``: the forward's values computed with autograd off, the partial derivatives
of the output and log-determinant with respect to the bin's knots and the input scattered onto the knot
table and taken back through the cumulative sum, bin softmax and softplus by hand) makes the spline
cheaper to train. It first checks the gradients (``gradcheck`` in float64, and the largest difference
from autograd's in float32), then times, interleaved on one thread, the spline alone (forward and
backward) and a whole training step of the default NPE network with each backward.

Usage:
    python examples/benchmark_spline_backward.py --repeats 15
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

import simulators
from sbiflows import NPE
from sbiflows.transforms import transformers
from sbiflows.transforms.transformers import MIN_BIN_SIZE, MIN_DERIVATIVE, RationalQuadraticSpline


def _knot_table(spline: RationalQuadraticSpline, params: Tensor) -> tuple[Tensor, Tensor]:
    """The library's knot table (``RationalQuadraticSpline._knots``) and the bin softmax it comes from."""
    k, bound = spline.bins, spline.bound
    softmax = transformers._softmax_rows(params[..., : 2 * k].unflatten(-1, (2, k)))
    sizes = softmax * (1 - MIN_BIN_SIZE * k) + MIN_BIN_SIZE
    inner = torch.cumsum(sizes[..., :-1], dim=-1) * (2 * bound) - bound
    knots = F.pad(F.pad(inner, (1, 0), value=-bound), (0, 1), value=bound)
    interior = F.softplus(params[..., 2 * k :] + spline._derivative_shift) + MIN_DERIVATIVE
    derivatives = F.pad(interior, (1, 1), value=1.0)
    return torch.cat([knots, derivatives.unsqueeze(-2)], dim=-2), softmax


def spline_forward(spline: Any, v: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
    """``spline.forward(v, params)`` (the same values) with the hand-written backward."""
    out, logdet, *_ = _SplineForward.apply(v, params, spline)
    return out, logdet


class _SplineForward(torch.autograd.Function):
    """``(out, logdet)`` of the spline's forward direction, plus the intermediates its backward needs."""

    generate_vmap_rule = True

    @staticmethod
    def forward(v: Tensor, params: Tensor, spline: Any) -> tuple[Tensor, ...]:  # type: ignore[override]
        bound, k = spline.bound, spline.bins
        inside = (v >= -bound) & (v <= bound)
        clamped = v.clamp(-bound, bound)
        table, softmax = _knot_table(spline, params)
        knots = table[..., 0, :].detach().contiguous()
        index = torch.searchsorted(knots, clamped.unsqueeze(-1).contiguous(), right=True).sub(1).clamp(0, k - 1)
        ends = torch.cat([index, index + 1], dim=-1).unsqueeze(-2).expand(*table.shape[:-1], 2)
        (x_k, y_k, d_k), (x_k1, y_k1, d_k1) = (side.unbind(-1) for side in table.gather(-1, ends).unbind(-1))
        w, h = x_k1 - x_k, y_k1 - y_k
        slope = h / w
        curvature = d_k1 + d_k - 2 * slope
        raw = (clamped - x_k) / w
        xi = raw.clamp(0, 1)
        one_minus = 1 - xi
        both = xi * one_minus
        denominator = slope + curvature * both
        out = y_k + h * (slope * xi.square() + d_k * both) / denominator
        numerator = slope.square() * (d_k1 * xi.square() + 2 * slope * both + d_k * one_minus.square())
        logdet = torch.log(numerator) - 2 * torch.log(denominator)
        # what backward needs, stacked: one saved tensor per kind
        keep = inside & (raw >= 0) & (raw <= 1)  # where the gradient reaches the bin position
        local = torch.stack([xi, slope, h, w, d_k, d_k1, denominator, keep.to(xi.dtype)], dim=-1)
        return torch.where(inside, out, v), torch.where(inside, logdet, 0.0), local, inside, ends, softmax

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
        _, params, spline = inputs
        _, _, local, inside, ends, softmax = output
        ctx.mark_non_differentiable(local, inside, ends, softmax)
        ctx.save_for_backward(params, local, inside, ends, softmax)
        ctx.spline = spline

    @staticmethod
    def backward(ctx: Any, g_out: Tensor, g_logdet: Tensor, *_: Any) -> tuple[Tensor | None, Tensor | None, None]:
        params, local, inside, ends, softmax = ctx.saved_tensors
        spline = ctx.spline
        t, s, h, w, d_k, d_k1, den, keep = local.unbind(-1)
        g_tail, g_out = g_out, torch.where(inside, g_out, 0.0)  # outside, out = v and logdet = 0
        g_logdet = torch.where(inside, g_logdet, 0.0)
        one_minus = 1 - t
        q = t * one_minus
        linear = 1 - 2 * t
        n = s * t.square() + d_k * q
        m = d_k1 * t.square() + 2 * s * q + d_k * one_minus.square()
        g_n = g_out * h / den
        g_den = -(g_n * n + 2 * g_logdet) / den
        r = g_logdet / m
        g_t = (g_n * (2 * s * t + d_k * linear) + g_den * (d_k1 + d_k - 2 * s) * linear
               + 2 * r * (d_k1 * t + s * linear - d_k * one_minus)) * keep
        g_s = g_n * t.square() + g_den * (1 - 2 * q) + 2 * g_logdet / s + 2 * r * q
        g_h = g_out * n / den + g_s / w
        g_w = -(g_s * s + g_t * t) / w
        g_v = torch.where(inside, g_t / w, g_tail) if ctx.needs_input_grad[0] else None
        g_params = None
        if ctx.needs_input_grad[1]:
            g_d_k = (g_n + g_den) * q + r * one_minus.square()
            g_d_k1 = g_den * q + r * t.square()
            lower = torch.stack([-g_t / w - g_w, g_out - g_h, g_d_k], dim=-1)
            upper = torch.stack([g_w, g_h, g_d_k1], dim=-1)
            g_table = local.new_zeros(*local.shape[:-1], 3, spline.bins + 1).scatter(
                -1, ends, torch.stack([lower, upper], dim=-1))
            g_params = _params_gradient(spline, params, g_table, softmax)
        return g_v, g_params, None


def _params_gradient(spline: Any, params: Tensor, g_table: Tensor, softmax: Tensor) -> Tensor:
    """The gradient of the parameters from that of the knot table ``(*, 3, K + 1)`` (positions, derivatives)."""
    k = spline.bins
    # interior knot j (1 <= j < K) is -B + 2B * (sizes[0] + ... + sizes[j - 1]): size m gets the sum over j > m
    inner = g_table[..., :2, 1:k]
    after = inner.flip(-1).cumsum(-1).flip(-1)
    g_sizes = torch.nn.functional.pad(after, (0, 1)) * (2 * spline.bound * (1 - MIN_BIN_SIZE * k))
    g_raw = softmax * (g_sizes - (g_sizes * softmax).sum(-1, keepdim=True))
    g_derivatives = g_table[..., 2, 1:k] * torch.sigmoid(params[..., 2 * k :] + spline._derivative_shift)
    return torch.cat([g_raw.flatten(-2), g_derivatives], dim=-1)


def check_gradients() -> None:
    """gradcheck in float64 (points in the tails and inside), then the float32 difference from autograd."""
    spline = RationalQuadraticSpline(bins=5, bound=3.0)
    generator = torch.Generator().manual_seed(0)
    v = (torch.randn(40, 3, generator=generator, dtype=torch.float64) * 2.5).requires_grad_()
    params = torch.randn(40, 3, 14, generator=generator, dtype=torch.float64).requires_grad_()
    ok = torch.autograd.gradcheck(lambda a, b: spline_forward(spline, a, b), (v, params))
    spline = RationalQuadraticSpline()
    v = (torch.randn(2000, 2, generator=generator) * 3).requires_grad_()
    params = torch.randn(2000, 2, spline.num_params, generator=generator).requires_grad_()
    weights = torch.randn(2, 2000, 2, generator=generator)
    grads = []
    for fn in (lambda: spline._apply(v, params, inverse=False), lambda: spline_forward(spline, v, params)):
        out, logdet = fn()
        grads.append(torch.autograd.grad((out * weights[0] + logdet * weights[1]).sum(), (v, params)))
    difference = max(float((a - b).abs().max()) for a, b in zip(*grads))
    print(f"gradcheck float64: {ok}; float32 largest gradient difference from autograd: {difference:.2e}")


def timed(fn, repeats: int, calls: int) -> list[float]:
    """Microseconds per call of ``fn``, one value per block of ``calls`` calls."""
    values = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        values.append((time.perf_counter() - start) / calls * 1e6)
    return values


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=15, help="interleaved blocks per variant")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    check_gradients()
    spline = RationalQuadraticSpline()
    autograd_forward = RationalQuadraticSpline.forward
    hand_forward = lambda self, x, params: spline_forward(self, x, params)  # noqa: E731
    for rows in (60, 200, 2000):
        v = torch.randn(rows, 1, requires_grad=True)
        params = torch.randn(rows, 1, spline.num_params, requires_grad=True)

        def run(hand: bool) -> None:
            out, logdet = spline_forward(spline, v, params) if hand else spline._apply(v, params, inverse=False)
            (out.sum() + logdet.sum()).backward()

        times: dict[str, list[float]] = {"autograd": [], "hand-written": []}
        for _ in range(args.repeats):
            times["autograd"] += timed(lambda: run(False), 1, 100)
            times["hand-written"] += timed(lambda: run(True), 1, 100)
        base = statistics.median(times["autograd"])
        print(f"spline alone, {rows:4d} rows x 1 feature: " + ", ".join(
            f"{name} {statistics.median(t):.0f} us (x{statistics.median(t) / base:.2f})" for name, t in times.items()))
    task = simulators.get("two_moons")
    torch.manual_seed(0)
    theta = task.prior.sample((1000,))
    x = task.simulate(theta, seed=0)
    net = NPE(task.prior, ensemble=1).fit(theta, x, max_epochs=1, progress=False, num_threads=None).net.train()
    weights = list(net.parameters())
    optimizer = torch.optim.Adam(weights, lr=1e-5, fused=True)
    rows = torch.randint(0, 1000, (60,), generator=torch.Generator().manual_seed(0))

    def step():
        loss = -net.log_prob(theta[rows], x[rows]).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(weights, 5.0)
        optimizer.step()

    times = {"autograd": [], "hand-written": []}
    for _ in range(args.repeats):
        for name, forward in (("autograd", autograd_forward), ("hand-written", hand_forward)):
            RationalQuadraticSpline.forward = forward
            try:
                times[name] += timed(step, 1, 50)
            finally:
                RationalQuadraticSpline.forward = autograd_forward
    base = statistics.median(times["autograd"])
    summary = (f"{name} {statistics.median(t) / 1e3:.2f} ms (x{statistics.median(t) / base:.2f})"
               for name, t in times.items())
    print("two_moons training step, batch 60 (5 spline couplings): " + ", ".join(summary))


if __name__ == "__main__":
    main()

"""Measure a box-preserving spline flow against NPE's sigmoid space on a box-prior task (issue 16, item 4).

NPE keeps every sample of a box prior inside the box by learning in an unconstrained space (a
scaled sigmoid per parameter, :mod:`sbiflows.unconstrained`). This script measures a design that
keeps the same guarantee without the sigmoid, on the same simulations and seeds:

* ``sigmoid``: ``NPE(prior, estimator="nsf", space="unconstrained")``, the spline flow in the unconstrained space;
* ``theta space``: the same flow in theta itself (z-scored), samples truncated to the box by rejection
  (no guarantee: the reference point ``examples/benchmark_bounded_space.py`` also measures);
* ``box``: theta mapped affinely onto ``[-B, B]^D`` (``B`` the splines' bound, 3), a uniform base on that
  box and only spline couplings in between, whose splines map ``[-B, B]`` onto itself: every sample lies
  in the box and the density is normalized on it, with no sigmoid, z-scoring or rejection.

* ``linear-log``: theta mapped by a bijection of the box onto the real line that is linear on the central
  ``--linear`` share of each side (default 0.9) and has logarithmic tails only in the outer margins (C1 at
  the joins), so posteriors away from the bounds are not distorted at all, where the sigmoid distorts
  every posterior; the same NPE is trained on the mapped parameters and its samples mapped back (always
  inside the box).

Prints one JSON record per seed with the mean C2ST over the observations (lower is better).

Usage:
    python examples/benchmark_box_flow.py --task two_moons --simulations 1000 --seeds 0 1 2 --observations 1..5
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch import nn

import simulators
from benchmark_npe import parse_observations  # examples/ is on the path of a script run from it
from sbiflows import NPE
from sbiflows.diagnostics.c2st import c2st
from sbiflows.distributions import BoxUniform
from sbiflows.estimator import PosteriorNet, build_flow, default_transforms
from sbiflows.simulate import simulate_from_prior
from sbiflows.training import default_batch_size, default_learning_rate, split_sizes, train
from sbiflows.transforms.transformers import DEFAULT_BOUND
from sbiflows.unconstrained import Unconstrained


def box_bounds(prior) -> tuple[torch.Tensor, torch.Tensor]:
    """The box ``[low, high]`` of a box prior (an ``Independent(Uniform)`` or the support's bounds)."""
    support = prior.support
    while hasattr(support, "base_constraint"):
        support = support.base_constraint
    return support.lower_bound.float(), support.upper_bound.float()


def linear_log(s: torch.Tensor, c: float) -> torch.Tensor:
    """The bijection ``(-1, 1) -> R``: ``s`` on ``[-c, c]``, ``+-(c - (1 - c) log((1 - |s|) / (1 - c)))`` outside."""
    a = s.abs()
    tail = c - (1 - c) * torch.log((1 - a).clamp_min(1e-12) / (1 - c))
    return torch.where(a <= c, s, torch.sign(s) * tail)


def linear_log_inverse(u: torch.Tensor, c: float) -> torch.Tensor:
    """The inverse of :func:`linear_log`: ``R -> (-1, 1)``."""
    a = u.abs()
    tail = 1 - (1 - c) * torch.exp(-(a - c) / (1 - c))
    return torch.where(a <= c, u, torch.sign(u) * tail)


def fit_box_flow(theta, x, low, high, *, seed: int, bound: float = DEFAULT_BOUND):
    """Train the box-preserving spline flow; returns a sampler ``(n, x_o) -> theta``."""
    half, mid = (high - low) / 2, (high + low) / 2
    z = ((theta - mid) / half).clamp(-1 + 1e-6, 1 - 1e-6) * bound
    n_train = split_sizes(len(z), 0.1)[0]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        flow = build_flow("nsf", z.shape[1], x.shape[1], transforms=default_transforms(n_train, z.shape[1]),
                          hidden_features=(50, 50), activation="tanh", seed=seed, bound=bound)
    flow.base = BoxUniform(-bound, bound, features=z.shape[1])
    net = PosteriorNet(flow, nn.Identity(), theta_dim=z.shape[1], x_dim=x.shape[1])
    net.set_standardization(z, x)
    net.u_shift.zero_()  # no z-scoring of theta: the flow's domain is exactly the box [-B, B]^D
    net.u_scale.fill_(1.0)
    batch = default_batch_size(n_train)
    history = train(net, z, x, batch_size=batch, learning_rate=default_learning_rate(batch), patience=10,
                    seed=seed, ema_epochs=1.0)

    @torch.no_grad()
    def sample(n: int, x_o: torch.Tensor) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        draws = net.sample_given_context(n, net.context(x_o[None]), generator=generator)[:, 0]
        return draws / bound * half + mid

    return sample, history.epochs


def main(argv: list[str] | None = None) -> None:
    """Run the comparison; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="two_moons", choices=simulators.names())
    parser.add_argument("--simulations", type=int, default=1000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--observations", default="1..5", help='"1..10" or "1,2,3"')
    parser.add_argument("--num-samples", type=int, default=10_000)
    parser.add_argument("--json", default=None, help="append one JSON record per seed to this file")
    parser.add_argument("--variants", nargs="+", default=["sigmoid", "theta space", "box", "linear-log"])
    parser.add_argument("--linear", type=float, default=0.9, help="linear share of the linear-log map")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    task = simulators.get(args.task)
    observations = parse_observations(args.observations)
    low, high = box_bounds(task.prior)
    space = Unconstrained(task.prior.support)
    for seed in args.seeds:
        sims = simulate_from_prior(task.simulate, task.prior, args.simulations, seed=seed)
        theta, x = sims.theta[sims.valid], sims.x[sims.valid]
        dim = theta.shape[1]
        wide = torch.distributions.Independent(torch.distributions.Normal(torch.zeros(dim), 100 * torch.ones(dim)), 1)
        samplers, epochs, seconds = {}, {}, {}
        half, mid, c = (high - low) / 2, (high + low) / 2, args.linear
        for name in [v for v in args.variants if v in ("sigmoid", "theta space", "linear-log")]:
            start = time.process_time()
            rows = linear_log(((theta - mid) / half).clamp(-1 + 1e-7, 1 - 1e-7), c) if name == "linear-log" else theta
            posterior = NPE(task.prior if name == "sigmoid" else wide, "nsf", space="unconstrained").fit(rows, x, seed=seed, progress=False)
            seconds[name], epochs[name] = time.process_time() - start, posterior.history.epochs

            def draw(n, x_o, posterior=posterior, name=name):
                if name == "linear-log":
                    return linear_log_inverse(posterior.sample(n, x=x_o, seed=seed), c) * half + mid
                samples = posterior.sample(n if name == "sigmoid" else 40 * n, x=x_o, seed=seed)
                return samples if name == "sigmoid" else samples[space.inside(samples)][:n]

            samplers[name] = draw
        if "box" in args.variants:
            start = time.process_time()
            samplers["box"], epochs["box"] = fit_box_flow(theta, x, low, high, seed=seed)
            seconds["box"] = time.process_time() - start
        record = {"task": args.task, "simulations": args.simulations, "seed": seed}
        for name, draw in samplers.items():
            scores = {}
            for i in observations:
                samples = draw(args.num_samples, task.observation(i))
                if name in ("box", "linear-log") and not bool(space.inside(samples).all()):
                    raise AssertionError("a box-flow sample left the box")
                reference = task.reference_posterior(i, args.num_samples)
                scores[i] = round(c2st(reference, samples.float()[:len(reference)], seed=seed).accuracy, 3)
            record[name] = {"mean_c2st": round(statistics.mean(scores.values()), 4), "c2st": scores,
                            "epochs": epochs[name], "train_cpu_s": round(seconds[name], 1)}
        print(json.dumps(record), flush=True)
        if args.json:
            with open(args.json, "a") as stream:
                stream.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()

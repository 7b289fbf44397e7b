"""How often does ``ensemble="auto"``'s check fire? Exact and slightly too narrow Gaussian posteriors.

``NPE(prior, ensemble="auto")`` adds flows when :func:`sbiflows.ensemble.auto_check` finds the first
flow over-confident on its validation rows. This script runs that check on a posterior known in
closed form: ``theta ~ N(0, I_D)``, ``x = theta + N(0, I_D)``, posterior ``N(x / 2, I_D / 2)``, its
standard deviation scaled by ``--narrow`` factors (1: the exact posterior, where every firing is a
false alarm; below 1: over-confident, where firing is right). For each factor it draws ``--repeats``
fresh sets of ``--rows`` pairs and reports how often the check fires and how often the most negative
``z = (coverage - level) / sqrt(level (1 - level) / rows)`` over the levels 0.05, ..., 0.95 falls
below -2, -2.5 and -3.

Usage:
    python examples/benchmark_auto_check.py --dims 3 --repeats 200 --narrow 1 0.97 0.95
"""

from __future__ import annotations

import argparse
import json

import torch
from torch import Tensor

from sbiflows.ensemble import AUTO_ROWS, auto_check, auto_summary

THRESHOLDS = (-2.0, -2.5, -3.0)


class ScaledGaussianPosterior:
    """``N(x / 2, narrow^2 I / 2)``: the exact posterior of the model above for ``narrow = 1``."""

    def __init__(self, narrow: float):
        self.sd = narrow * 0.5**0.5

    def sample_batched(self, n: int, xs: Tensor) -> Tensor:
        return xs / 2 + self.sd * torch.randn(n, *xs.shape)

    def log_prob_batched(self, theta: Tensor, xs: Tensor) -> Tensor:
        return torch.distributions.Normal(xs / 2, self.sd).log_prob(theta).sum(-1)

    def log_prob(self, theta: Tensor, x: Tensor) -> Tensor:
        return self.log_prob_batched(theta, x)


def firing(narrow: float, *, dims: int, rows: int, repeats: int) -> dict[str, object]:
    """The check's firing rate and worst-z quantiles over ``repeats`` seeded sets of ``rows`` pairs."""
    fired, worst = 0, []
    for repeat in range(repeats):
        generator = torch.Generator().manual_seed(repeat)
        theta = torch.randn(rows, dims, generator=generator)
        x = theta + torch.randn(rows, dims, generator=generator)
        result = auto_check(ScaledGaussianPosterior(narrow), theta, x, seed=repeat)
        fired += not result.passed
        worst.append(auto_summary(result)["worst_z"])
    z = torch.tensor(worst)
    return {"narrow": narrow, "dims": dims, "rows": min(rows, AUTO_ROWS), "repeats": repeats,
            "fired": fired / repeats, **{f"z_below_{-t:g}": float((z < t).float().mean()) for t in THRESHOLDS},
            "median_worst_z": float(z.median())}


def main(argv: list[str] | None = None) -> None:
    """Run the measurement; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, default=3)
    parser.add_argument("--rows", type=int, default=AUTO_ROWS, help="held-out rows (the check uses at most "
                        f"{AUTO_ROWS})")
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--narrow", type=float, nargs="+", default=[1.0, 0.97, 0.95])
    parser.add_argument("--json", default=None, help="append one JSON record per factor to this file")
    args = parser.parse_args(argv)
    torch.manual_seed(0)  # the posterior's draws use the global generator, which the check seeds and restores
    print("| sd factor | rows | repeats | check fires | z < -2 | z < -2.5 | z < -3 | median worst z |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for narrow in args.narrow:
        record = firing(narrow, dims=args.dims, rows=args.rows, repeats=args.repeats)
        if args.json:
            with open(args.json, "a") as stream:
                stream.write(json.dumps(record) + "\n")
        print(f"| {narrow:g} | {record['rows']} | {args.repeats} | {record['fired']:.3f} | {record['z_below_2']:.3f} "
              f"| {record['z_below_2.5']:.3f} | {record['z_below_3']:.3f} | {record['median_worst_z']:+.2f} |")


if __name__ == "__main__":
    main()

"""Is a single flow over-confident because it weighs its posterior's symmetric modes wrongly?

On three benchmark tasks the exact posterior is invariant under a group ``G`` of reflections of theta,
because the prior is and the likelihood is, for every ``x``:

- slcp and slcp_distractors: flipping the signs of theta_3 and theta_4 (the simulator uses only their
  squares), so the posterior has four mirror-image modes, each holding exactly 1/4 of the mass;
- two_moons: ``(theta_1, theta_2) -> (-theta_2, -theta_1)`` (the simulator uses ``|theta_1 + theta_2|``),
  two modes of 1/2 each.

A cell of ``G`` is the region one mode lives in (the signs of theta_3 and theta_4; the sign of
``theta_1 + theta_2``). For each task, seed and setting this trains the posterior as
``benchmark_coverage.py`` does, draws ``--datasets`` fresh datasets from the prior and reports

- how the flow spreads its mass over the cells (from ``--posterior-samples`` draws per dataset): the
  mean over datasets of the largest ``|mass - 1/|G||``, the share of datasets where some cell holds
  less than a fifth of its due (a mode nearly lost), and the mean mass of the cell holding the true
  parameters;
- the expected HPD coverage (worst ``z`` over the levels 0.05-0.95, as ``benchmark_coverage.py``) and the
  held-out NLL of the flow and of its *symmetrized* version ``q_G(theta | x) = mean_g q(g theta | x)``,
  which imposes the exact posterior's symmetry (it samples by applying a random ``g`` to a flow draw)
  and so gives every mode its exact weight.

If the symmetrized flow is calibrated where the flow is not, the flow's over-confidence is its mode
weights. This is a measurement, not a library feature.

Usage:
    python examples/benchmark_mode_weights.py --tasks slcp --simulations 10000 --seeds 0 --json modes.jsonl
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

import torch
from torch import Tensor

import simulators
from sbiflows.diagnostics import expected_coverage
from sbiflows.posterior import observations_unchecked
from sbiflows.seeding import derive_seed
from sbiflows.simulate import simulate_from_prior

from benchmark_coverage import worst_z  # examples/ is on sys.path when this runs as a script
from benchmark_npe_training import emit, fit_setting


def _sign_flips(dim: int, indices: tuple[int, ...]) -> Tensor:
    """All ``2 ** len(indices)`` diagonal sign flips of the given coordinates, as ``(G, dim, dim)``."""
    maps = []
    for k in range(2 ** len(indices)):
        diag = torch.ones(dim)
        for j, i in enumerate(indices):
            if k >> j & 1:
                diag[i] = -1.0
        maps.append(torch.diag(diag))
    return torch.stack(maps)


def _slcp_cell(theta: Tensor) -> Tensor:
    return (theta[..., 2] > 0).long() + 2 * (theta[..., 3] > 0).long()


def _two_moons_cell(theta: Tensor) -> Tensor:
    return (theta[..., 0] + theta[..., 1] > 0).long()


#: Per task: the symmetry group of its exact posterior (orthogonal maps, identity first) and the cell of theta.
SYMMETRIES: dict[str, tuple[Tensor, Callable[[Tensor], Tensor]]] = {
    "slcp": (_sign_flips(5, (2, 3)), _slcp_cell),
    "slcp_distractors": (_sign_flips(5, (2, 3)), _slcp_cell),
    "two_moons": (torch.stack([torch.eye(2), torch.tensor([[0.0, -1.0], [-1.0, 0.0]])]), _two_moons_cell),
}


class Symmetrized:
    """``q_G(theta | x) = mean over g of q(g theta | x)`` for a group of orthogonal maps ``g``.

    Example:
        >>> class Base:
        ...     def log_prob_batched(self, theta, xs, normalized=True):
        ...         return torch.where(theta[..., 0] > 0, 0.0, -math.inf)
        >>> q = Symmetrized(Base(), _sign_flips(1, (0,)), seed=0)
        >>> q.log_prob_batched(torch.tensor([[[1.0]], [[-1.0]]]), torch.zeros(1, 1)).exp()
        tensor([[0.5000],
                [0.5000]])
    """

    def __init__(self, posterior: object, maps: Tensor, *, seed: int):
        self.posterior, self.maps = posterior, maps
        self.generator = torch.Generator().manual_seed(seed)

    def sample_batched(self, n: int, xs: Tensor) -> Tensor:
        draws = self.posterior.sample_batched(n, xs)
        g = torch.randint(len(self.maps), draws.shape[:2], generator=self.generator)
        return torch.einsum("nbij,nbj->nbi", self.maps.to(draws)[g], draws)

    def log_prob_batched(self, theta: Tensor, xs: Tensor) -> Tensor:
        maps = self.maps.to(theta)
        # The truncated space's normalizer is a constant per x, the same for every g (the support is
        # symmetric too): estimate it once, from the identity's normalized and unnormalized log-densities.
        parts = torch.stack([self.posterior.log_prob_batched(theta @ g.T, xs, normalized=False) for g in maps])
        shift = self.posterior.log_prob_batched(theta[:1], xs) - parts[0, :1]
        return torch.logsumexp(parts, dim=0) - math.log(len(maps)) + shift

    def log_prob(self, theta: Tensor, x: Tensor) -> Tensor:
        return self.log_prob_batched(theta[:, None], x[None])[:, 0]


def cell_masses(draws: Tensor, cell: Callable[[Tensor], Tensor], cells: int) -> Tensor:
    """``(B, cells)``: the share of each dataset's draws ``(n, B, D)`` in each cell.

    Example:
        >>> cell_masses(torch.tensor([[[1.0, 1.0]], [[-1.0, -1.0]], [[2.0, 0.0]]]), _two_moons_cell, 2)
        tensor([[0.3333, 0.6667]])
    """
    one_hot = torch.nn.functional.one_hot(cell(draws), cells).to(draws.dtype)
    return one_hot.mean(dim=0)


def measure(task_name: str, simulations: int, seed: int, setting: str, *, datasets: int, posterior_samples: int,
            test_size: int) -> dict[str, object]:
    """Train one posterior and return its mode weights and the coverage and NLL of it and its symmetrized version."""
    task = simulators.get(task_name)
    maps, cell = SYMMETRIES[task_name]
    sims = simulate_from_prior(task.simulate, task.prior, simulations, seed=seed, progress=False)
    posterior = fit_setting(task.prior, setting, sims.theta[sims.valid], sims.x[sims.valid], seed=seed)
    fresh = simulate_from_prior(task.simulate, task.prior, datasets, seed=derive_seed(seed, "coverage"), progress=False)
    test = simulate_from_prior(task.simulate, task.prior, test_size, seed=derive_seed(seed, "heldout"), progress=False)
    theta, x = fresh.theta[fresh.valid], fresh.x[fresh.valid]
    record: dict[str, object] = {"task": task_name, "simulations": simulations, "seed": seed, "setting": setting,
                                 "datasets": len(theta), "posterior_samples": posterior_samples,
                                 "ensemble": posterior.config.get("ensemble", 1)}
    with observations_unchecked(), torch.no_grad():
        masses = cell_masses(posterior.sample_batched(posterior_samples, x, seed=seed), cell, len(maps))
        due = 1.0 / len(maps)
        truth = masses.gather(1, cell(theta)[:, None])[:, 0]
        record.update({"max_cell_error": round(float((masses - due).abs().amax(1).mean()), 4),
                       "lost_mode_share": round(float((masses.amin(1) < due / 5).float().mean()), 4),
                       "truth_cell_mass": round(float(truth.mean()), 4)})
        for name, q in (("flow", posterior), ("symmetrized", Symmetrized(posterior, maps, seed=seed))):
            result = expected_coverage(q, theta=theta, x=x, num_posterior_samples=posterior_samples, seed=seed)
            z, at = worst_z(result.levels, result.empirical, result.num_datasets)
            nll = -float(q.log_prob_batched(test.theta[test.valid][None], test.x[test.valid]).mean())
            record[name] = {"coverage_50": round(float(result.empirical[9]), 3),
                            "coverage_90": round(float(result.empirical[17]), 3), "worst_z": z, "worst_level": at,
                            "heldout_nll": round(nll, 4)}
    return record


def main(argv: list[str] | None = None) -> None:
    """Run the measurement; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["slcp"], choices=sorted(SYMMETRIES))
    parser.add_argument("--simulations", type=int, default=10_000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--settings", nargs="*", default=[""], help="comma-separated NPE / fit options; '' = defaults")
    parser.add_argument("--datasets", type=int, default=300, help="fresh prior datasets")
    parser.add_argument("--posterior-samples", type=int, default=500, help="posterior draws per dataset")
    parser.add_argument("--test-size", type=int, default=2000, help="fresh pairs for the held-out NLL")
    parser.add_argument("--json", default=None, help="append one JSON record per row to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print("| task | seed | setting | largest cell error | modes nearly lost | truth's cell mass (due) "
          "| worst z: flow | symmetrized | held-out NLL: flow | symmetrized |")
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for task_name in args.tasks:
        for seed in args.seeds:
            for setting in args.settings:
                r = measure(task_name, args.simulations, seed, setting, datasets=args.datasets,
                            posterior_samples=args.posterior_samples, test_size=args.test_size)
                emit(args.json, r)
                flow, sym = r["flow"], r["symmetrized"]
                due = 1.0 / len(SYMMETRIES[task_name][0])
                print(f"| {task_name} | {seed} | {setting or 'defaults'} | {r['max_cell_error']:.3f} "
                      f"| {r['lost_mode_share']:.3f} | {r['truth_cell_mass']:.3f} ({due:.2f}) "
                      f"| {flow['worst_z']:+.2f} ({flow['worst_level']:.2f}) | {sym['worst_z']:+.2f} ({sym['worst_level']:.2f}) "
                      f"| {flow['heldout_nll']:.3f} | {sym['heldout_nll']:.3f} |", flush=True)


if __name__ == "__main__":
    main()

"""The main job from Python, on a benchmark task: simulate, train NPE, sample, check, plot, save.

This is what ``sbiflows fit two_moons`` does, written out as an analysis script you can adapt:

1. simulate ``--simulations`` parameter sets from the task's prior (invalid rows are counted),
2. train a conditional MAF posterior (NPE),
3. draw posterior samples for the published observations in one batched call,
4. compare with the task's reference posterior (C2ST; 0.5 = indistinguishable),
5. check calibration on fresh simulations (SBC, expected coverage, TARP),
6. save the corner plot, the calibration plots and the posterior.

Usage:
    python examples/npe_benchmark_task.py [--task two_moons] [--simulations 5000] [--out runs/example_task]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import simulators  # noqa: E402
from sbiflows import NPE, diagnostics, load, plots  # noqa: E402
from sbiflows.simulate import simulate_from_prior  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    """Run the example; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="two_moons", choices=simulators.names())
    parser.add_argument("--simulations", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/example_task"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    task = simulators.get(args.task)

    # 1. Simulations (seeded; NaN rows are counted in sims.summary() and excluded by fit).
    sims = simulate_from_prior(task.simulate, task.prior, args.simulations, seed=args.seed, progress=True)
    print(sims.summary())

    # 2. Train NPE; the history holds the losses per epoch.
    posterior = NPE(task.prior, estimator="maf").fit(sims.theta, sims.x, seed=args.seed)
    print(f"trained {posterior.history.epochs} epochs, best validation loss "
          f"{posterior.history.best_validation_loss:.3f}")

    # 3. Posterior samples for all ten observations at once: (n, 10, theta_dim).
    xs = torch.stack([task.observation(i) for i in range(1, 11)])
    samples = posterior.sample_batched(5000, xs, seed=args.seed)

    # 4. Accuracy against the reference posterior of observation 1.
    reference = task.reference_posterior(1, num_samples=5000)
    print(diagnostics.c2st(reference, samples[:, 0], seed=args.seed))

    # 5. Calibration on fresh simulations: the same (theta, x) pairs serve all three checks.
    theta_c, x_c = diagnostics.simulate_datasets(task.prior, task.simulate, 300, seed=args.seed + 1)
    checks = {
        "sbc": diagnostics.sbc(posterior, theta=theta_c, x=x_c, num_posterior_samples=500,
                               parameter_names=task.parameter_names),
        "coverage": diagnostics.expected_coverage(posterior, theta=theta_c, x=x_c, num_posterior_samples=500),
        "tarp": diagnostics.tarp(posterior, theta=theta_c, x=x_c, num_posterior_samples=500),
    }
    for result in checks.values():
        print(result)

    # 6. Figures and the saved posterior (a state dict + JSON config; nothing is pickled).
    figures = {
        "corner.png": plots.corner(samples[:, 0], truths=task.true_parameters(1), reference=reference,
                                   labels=task.parameter_names),
        "sbc_ranks.png": plots.sbc_ranks(checks["sbc"], labels=task.parameter_names),
        "coverage.png": plots.coverage(checks["coverage"]),
        "tarp.png": plots.tarp(checks["tarp"]),
    }
    for name, figure in figures.items():
        figure.savefig(args.out / name, dpi=100)
        plt.close(figure)
    posterior.save(args.out / "posterior.pt")
    assert load(args.out / "posterior.pt").sample(3, x=xs[0]).shape == (3, task.theta_dim)
    print(f"figures and posterior.pt written to {args.out.resolve()}")


if __name__ == "__main__":
    main()

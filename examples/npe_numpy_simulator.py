"""NPE for your own simulator: a plain NumPy model, a torch prior, one observed data set.

The model: a signal decays as ``A * exp(-k * t)`` and is measured at 12 times with Gaussian noise of
unknown size ``sigma``. The parameters are ``theta = (A, k, sigma)`` with a box prior (NPE learns in
theta itself, restricted to the box: posterior samples never leave it). The simulator below is written
in NumPy, takes a batch of parameter rows and knows nothing of torch or sbiflows; some parameter sets
fail (NaN), as real simulators do, and sbiflows counts and excludes them.

Steps: simulate, train NPE, sample the posterior for the observed data, check that the posterior is
calibrated (SBC, expected coverage, TARP) and that it reproduces the data (posterior predictive), then
save the corner plot with the true parameters that generated the "observed" data.

Usage:
    python examples/npe_numpy_simulator.py [--simulations 5000] [--out runs/example_numpy]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.distributions import Independent, Uniform  # noqa: E402

from sbiflows import NPE, diagnostics, plots  # noqa: E402
from sbiflows.simulate import simulate, simulate_from_prior  # noqa: E402

TIMES = np.linspace(0.0, 5.0, 12)
NAMES = ["A", "k", "sigma"]


def decay_simulator(theta: np.ndarray, seed: int | None = None) -> np.ndarray:
    """Noisy exponential decay ``A exp(-k t) + sigma * eps`` at 12 times, for each row of ``theta``.

    Args:
        theta: ``(N, 3)`` rows ``(A, k, sigma)`` (a tensor works too: it is converted).
        seed: Seeds NumPy's generator (sbiflows passes one per batch, so runs are reproducible).

    Returns:
        ``(N, 12)`` measurements; rows with ``k > 2.9`` fail (NaN), to show how failures are handled.
    """
    theta = np.asarray(theta, dtype=np.float64)
    rng = np.random.default_rng(seed)
    amplitude, rate, sigma = theta[:, :1], theta[:, 1:2], theta[:, 2:3]
    x = amplitude * np.exp(-rate * TIMES) + sigma * rng.standard_normal((len(theta), len(TIMES)))
    x[theta[:, 1] > 2.9] = np.nan
    return x


def make_prior() -> Independent:
    """A box prior: ``A`` in [0.5, 3], ``k`` in [0.1, 3], ``sigma`` in [0.05, 0.5]."""
    return Independent(Uniform(torch.tensor([0.5, 0.1, 0.05]), torch.tensor([3.0, 3.0, 0.5])), 1)


def main(argv: list[str] | None = None) -> None:
    """Run the example; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--simulations", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/example_numpy"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    prior = make_prior()

    # "Observed" data, generated here from known parameters so that we can check the answer.
    true_theta = torch.tensor([[1.7, 0.8, 0.15]])
    x_obs = torch.as_tensor(decay_simulator(true_theta, seed=12345)[0], dtype=torch.float32)

    # Simulate (failed rows become NaN, are counted, and fit() excludes them with a warning).
    sims = simulate_from_prior(decay_simulator, prior, args.simulations, seed=args.seed, progress=True)
    print(sims.summary())
    posterior = NPE(prior).fit(sims.theta, sims.x, seed=args.seed)

    samples = posterior.sample(10_000, x=x_obs, seed=args.seed)
    for name, truth, column in zip(NAMES, true_theta[0], samples.T):
        low, high = torch.quantile(column, torch.tensor([0.05, 0.95])).tolist()
        print(f"{name}: true {truth:.3f}, posterior mean {column.mean():.3f}, 90% interval [{low:.3f}, {high:.3f}]")

    # Calibration on fresh simulations (only valid rows), and a posterior predictive check.
    fresh = simulate_from_prior(decay_simulator, prior, 400, seed=args.seed + 1)
    theta_c, x_c = fresh.theta[fresh.valid], fresh.x[fresh.valid]
    for check in (diagnostics.sbc, diagnostics.expected_coverage, diagnostics.tarp):
        print(check(posterior, theta=theta_c, x=x_c, num_posterior_samples=500, seed=args.seed))

    def tensor_simulator(theta: torch.Tensor) -> torch.Tensor:
        return simulate(decay_simulator, theta, seed=args.seed + 2).x

    print(diagnostics.posterior_predictive(posterior, tensor_simulator, x_obs, num_samples=1000))

    figure = plots.corner(samples, truths=true_theta[0], labels=NAMES)
    figure.savefig(args.out / "corner.png", dpi=100)
    plt.close(figure)
    posterior.save(args.out / "posterior.pt")
    print(f"corner.png and posterior.pt written to {args.out.resolve()}")


if __name__ == "__main__":
    main()

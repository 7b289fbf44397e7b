"""A posterior 200 times narrower than its box prior: C2ST against the exact posterior per estimator.

The analytic case of ``tests/test_sequential_accuracy.py``: ``theta ~ U([-14, 14]^2)``,
``x = theta + 0.07 * noise``, ``x_o = (1, -2)``, so the posterior is ``N(x_o, 0.07^2 I)``
(``--noise 0.02``, the test's case, makes it 700 times narrower). For each
estimator, amortized NPE on 2,000 prior simulations and TSNPE (4 rounds of 500) are scored by C2ST
(5,000 samples against 5,000 exact draws; 0.5 is perfect). This is where NPE's default spline flow
and the affine MAF differ most.

Usage:
    python examples/benchmark_narrow_posterior.py --estimators maf nsf --seeds 0 1
    python examples/benchmark_narrow_posterior.py --estimators maf nsf --seeds 0 1 --noise 0.02
    python examples/benchmark_narrow_posterior.py --estimators nsf --seeds 0 1 --noise 0.02 --retrain-from-scratch
"""

from __future__ import annotations

import argparse
import functools
import time

import torch

from sbiflows import NPE, TSNPE, box_uniform, simulate_from_prior
from sbiflows.diagnostics import c2st

from benchmark_npe_training import emit  # examples/ is on sys.path when this runs as a script

HALF, SIGMA = 14.0, 0.07
X_O = torch.tensor([1.0, -2.0])


def simulator(theta: torch.Tensor, seed: int, *, noise: float = SIGMA) -> torch.Tensor:
    """``theta + noise * N(0, 1)`` with the engine's per-chunk seed."""
    return theta + noise * torch.randn(theta.shape, generator=torch.Generator().manual_seed(int(seed)))


def main(argv: list[str] | None = None) -> None:
    """Run the comparison; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--estimators", nargs="+", default=["maf", "nsf"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--noise", type=float, default=SIGMA, help="the simulator's noise: the posterior's std")
    parser.add_argument("--retrain-from-scratch", action="store_true",
                        help="TSNPE trains a new network every round (fit option retrain_from_scratch)")
    parser.add_argument("--json", default=None, help="append one JSON record per estimator and seed")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    prior = box_uniform([-HALF, -HALF], [HALF, HALF])
    exact = X_O + args.noise * torch.randn(5000, 2, generator=torch.Generator().manual_seed(99))
    simulate = functools.partial(simulator, noise=args.noise)
    for seed in args.seeds:
        sims = simulate_from_prior(simulate, prior, 2000, seed=seed)
        for estimator in args.estimators:
            start = time.process_time()
            amortized = NPE(prior, estimator).fit(sims.theta, sims.x, seed=seed, progress=False)
            single = c2st(exact, amortized.sample(5000, X_O, seed=seed + 1), seed=0).accuracy
            npe_cpu = time.process_time() - start
            tsnpe = TSNPE(prior, estimator=estimator)
            start = time.process_time()
            posterior = tsnpe.run(simulate, X_O, rounds=4, simulations=2000, seed=seed, check_simulations=0,
                                  progress=False, fit_options={"retrain_from_scratch": args.retrain_from_scratch})
            sequential = c2st(exact, posterior.sample(5000, seed=seed + 1), seed=0).accuracy
            emit(args.json, {"estimator": estimator, "noise": args.noise, "seed": seed,
                             "retrain_from_scratch": args.retrain_from_scratch,
                             "amortized_c2st": round(single, 3), "tsnpe_c2st": round(sequential, 3),
                             "volumes": [round(r.volume, 5) for r in tsnpe.rounds],
                             "amortized_cpu_s": round(npe_cpu, 1), "tsnpe_cpu_s": round(time.process_time() - start, 1)})


if __name__ == "__main__":
    main()

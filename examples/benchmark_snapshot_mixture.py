"""Would a mixture of one training run's own snapshots calibrate an over-confident posterior, for free?

Three flows trained with different seeds (``NPE(prior, ensemble=3)``) make the default posterior
calibrated on every task where one flow is over-confident, at up to three times the training time.
A snapshot mixture (Huang et al. 2017, "Snapshot ensembles") trains once: its members are the weights
training kept at the best validation epoch and at earlier improvements, at least ``gap`` and
``2 gap`` epochs before it. This script measures whether such a mixture is calibrated, not a
library feature: it trains the default NPE once per task and seed (the training is unchanged; the
script only records the weights training snapshots at each validation improvement), and scores the
default posterior and each mixture like ``benchmark_coverage.py`` does: expected HPD coverage on
``--datasets`` fresh prior pairs, the worst deviation in binomial standard deviations, and the
held-out NLL on ``--test-size`` fresh pairs (the same pairs and datasets as ``benchmark_coverage.py``
with the same seed), and with ``--observations`` the C2ST against the reference posteriors as
``benchmark_npe.py`` scores it (10,000 draws per observation).

Usage:
    python examples/benchmark_snapshot_mixture.py --tasks slcp --simulations 10000 --seeds 0 --gaps 10 20
    python examples/benchmark_snapshot_mixture.py --tasks slcp --simulations 10000 --seeds 0 1 --gaps 20 --observations 1..5
    python examples/benchmark_snapshot_mixture.py --tasks two_moons --simulations 10000 --seeds 1 --gaps --gap-fractions 0.3
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

import simulators
import sbiflows.training as training
from sbiflows import NPE, Posterior
from sbiflows.early_stopping import Plateau
from sbiflows.ensemble import mixture
from sbiflows.seeding import derive_seed
from sbiflows.simulate import simulate_from_prior

from benchmark_coverage import score  # examples/ is on sys.path when this runs as a script
from benchmark_npe import parse_observations, score as c2st_scores
from benchmark_npe_training import emit


class Recorder:
    """Records ``(epoch, weights)`` of every improvement snapshot training takes (single flows only)."""

    def __init__(self) -> None:
        self.snapshots: list[tuple[int, dict]] = []
        self._epoch = -1

    def __enter__(self) -> Recorder:
        self._snapshot, self._observe = training._snapshot, Plateau.observe
        recorder = self

        def observe(plateau, loss, epoch):
            recorder._epoch = epoch
            return recorder._observe(plateau, loss, epoch)

        def snapshot(model):
            state = recorder._snapshot(model)
            recorder.snapshots.append((recorder._epoch, state))
            return state

        training._snapshot, Plateau.observe = snapshot, observe
        return self

    def __exit__(self, *exc) -> None:
        training._snapshot, Plateau.observe = self._snapshot, self._observe

    def members(self, best_epoch: int, gap: int) -> list[tuple[int, dict]]:
        """``(epoch, weights)`` of the best epoch and of the latest snapshots at least ``gap`` and ``2 gap``
        epochs before it, oldest first (distinct ones: fewer members where training improved rarely)."""
        chosen: list[tuple[int, dict]] = []
        for lag in (0, gap, 2 * gap):
            earlier = [(e, s) for e, s in self.snapshots if 0 <= e <= best_epoch - lag]
            if earlier and all(earlier[-1][0] != epoch for epoch, _ in chosen):  # one snapshot per epoch
                chosen.append(earlier[-1])
        return chosen[::-1]


def c2st_record(task, posterior, observations: list[int], *, seed: int, num_samples: int = 10_000) -> dict:
    """C2ST per observation (the draws and scorer of ``benchmark_npe.py``) and their mean; empty without observations."""
    if not observations:
        return {}
    samples = {i: posterior.sample(num_samples, x=task.observation(i), seed=seed + i) for i in observations}
    scores = c2st_scores(task, samples, observations, seed)
    return {"c2st": {i: round(v, 4) for i, v in scores.items()}, "c2st_mean": round(sum(scores.values()) / len(scores), 4)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["slcp"], choices=simulators.names())
    parser.add_argument("--simulations", type=int, default=10_000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--gaps", type=int, nargs="*", default=[10, 20], help="epochs between snapshot members")
    parser.add_argument("--gap-fractions", type=float, nargs="*", default=[],
                        help="gaps as fractions of the best epoch (e.g. 0.3: members 0.3 and 0.6 of it before the best)")
    parser.add_argument("--datasets", type=int, default=300)
    parser.add_argument("--posterior-samples", type=int, default=500)
    parser.add_argument("--test-size", type=int, default=2000)
    parser.add_argument("--observations", default="", help="C2ST on these observations, e.g. 1..5 (default none)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    observations = parse_observations(args.observations) if args.observations else []
    for task_name in args.tasks:
        task = simulators.get(task_name)
        for seed in args.seeds:
            sims = simulate_from_prior(task.simulate, task.prior, args.simulations, seed=seed, progress=False)
            start = time.process_time()
            with Recorder() as recorder:
                posterior = NPE(task.prior).fit(sims.theta[sims.valid], sims.x[sims.valid], seed=seed, progress=False)
            train_cpu = round(time.process_time() - start, 1)
            history = posterior.history
            fresh = simulate_from_prior(task.simulate, task.prior, args.datasets, seed=derive_seed(seed, "coverage"),
                                        progress=False)
            test = simulate_from_prior(task.simulate, task.prior, args.test_size, seed=derive_seed(seed, "heldout"),
                                       progress=False)
            base = {"task": task_name, "simulations": args.simulations, "seed": seed, "train_cpu_seconds": train_cpu,
                    "best_epoch": history.best_epoch, "epochs": history.epochs,
                    "step_drop_epochs": history.step_drop_epochs}
            emit(args.json, {**base, "setting": "defaults", "members": [history.best_epoch],
                             **score(posterior, fresh, test, seed=seed, posterior_samples=args.posterior_samples),
                             **c2st_record(task, posterior, observations, seed=seed)})
            gaps = [("gap", gap, gap) for gap in args.gaps]
            gaps += [("gap_fraction", f, max(1, round(f * history.best_epoch))) for f in args.gap_fractions]
            for kind, value, gap in gaps:
                members = recorder.members(history.best_epoch, gap)
                nets = []
                for _, state in members:
                    net = copy.deepcopy(posterior.net)
                    net.load_state_dict(state)
                    nets.append(net.eval())
                mixed = Posterior(mixture(nets), task.prior, config={**posterior.config, "ensemble": len(nets)})
                emit(args.json, {**base, "setting": f"snapshots {kind}={value}", "members": [epoch for epoch, _ in members],
                                 **score(mixed, fresh, test, seed=seed, posterior_samples=args.posterior_samples),
                                 **c2st_record(task, mixed, observations, seed=seed)})


if __name__ == "__main__":
    main()

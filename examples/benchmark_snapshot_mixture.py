"""Would a mixture of one training run's own snapshots calibrate an over-confident posterior, for free?

Three flows trained with different seeds (``NPE(prior, ensemble=3)``) make the default posterior
calibrated on every task where one flow is over-confident, at up to three times the training time.
A snapshot mixture (Huang et al. 2017, "Snapshot ensembles"; ``NPE(prior, ensemble="snapshots")``,
:mod:`sbiflows.snapshots`) trains once: its members are the weights training kept at the best
validation epoch and at earlier improvements, at least ``gap`` and ``2 gap`` epochs before it. This
script trains ``NPE(task.prior, ensemble="snapshots")`` once per task and seed (its last member is the
default single flow, weight for weight), keeps the trail of snapshots the fit made, and scores the
single flow and the mixtures of each gap like ``benchmark_coverage.py`` does: expected HPD coverage on
``--datasets`` fresh prior pairs, the worst deviation in binomial standard deviations, and the held-out
NLL on ``--test-size`` fresh pairs (the same pairs and datasets as ``benchmark_coverage.py`` with the
same seed), and with ``--observations`` the C2ST against the reference posteriors as ``benchmark_npe.py``
scores it (10,000 draws per observation). ``--gap-fractions 0.4`` is the library's choice
(:data:`~sbiflows.snapshots.SNAPSHOT_GAP`): that row is the posterior the fit returned. Every row also
records ``auto_check``: the check of ``ensemble="auto"`` (:func:`~sbiflows.ensemble.auto_check`) on the
single flow's validation rows, which says whether a rule "mix only where the check fails" would mix;
``--check-only`` trains and records that check without scoring anything. ``--previous-members`` also scores,
for each gap fraction, the mixture of the member rule before session 68 (``members(distinct=False)``: two
targets without an improvement between them gave one member) wherever its members differ. ``--stacked`` also
scores, for each gap fraction, the members weighted to maximize their mixture's likelihood on the single flow's
validation rows (:meth:`~sbiflows.snapshots.SnapshotTrail.stacked`, members below 1% weight dropped) where the
check passes the flow (where it fails, the default mixes with equal weights); the record holds the members kept
and their weights. ``--stacked-only`` scores nothing else, and only where the stacked mixture differs from the
single flow (the other runs get an unscored record with their check and the members stacking kept).

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
import sbiflows.npe as npe_module
from sbiflows import NPE, Posterior
from sbiflows.ensemble import auto_check, auto_summary, members_of, mixture
from sbiflows.seeding import derive_seed
from sbiflows.simulate import simulate_from_prior
from sbiflows.snapshots import SNAPSHOT_GAP, SnapshotTrail

from benchmark_coverage import score  # examples/ is on sys.path when this runs as a script
from benchmark_npe import parse_observations, score as c2st_scores
from benchmark_npe_training import emit


class Recorder:
    """Keeps the :class:`~sbiflows.snapshots.SnapshotTrail` that ``NPE(ensemble="snapshots").fit`` makes
    (the fit itself is unchanged; ``trail`` is None until a fit made one)."""

    def __init__(self) -> None:
        self.trail: SnapshotTrail | None = None

    def __enter__(self) -> Recorder:
        self._class = npe_module.SnapshotTrail
        recorder = self

        def make(*args, **kwargs) -> SnapshotTrail:
            recorder.trail = recorder._class(*args, **kwargs)
            return recorder.trail

        npe_module.SnapshotTrail = make
        return self

    def __exit__(self, *exc) -> None:
        npe_module.SnapshotTrail = self._class


def snapshot_mixture(single: Posterior, trail: SnapshotTrail, **choice) -> tuple[Posterior, list[int]]:
    """The mixture of ``trail``'s members chosen by ``choice`` (:meth:`SnapshotTrail.networks`), in copies of
    ``single``'s network (which holds the best weights), and the members' epochs."""
    nets, epochs = trail.networks(copy.deepcopy(single.net), single.history.best_epoch, **choice)
    return Posterior(mixture(nets), single.prior, config={**single.config, "ensemble": len(nets)}), epochs


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
    parser.add_argument("--check-only", action="store_true",
                        help="train and record the auto check of the single flow, score nothing")
    parser.add_argument("--previous-members", action="store_true",
                        help="also score the member rule before session 68 where its members differ")
    parser.add_argument("--stacked", action="store_true",
                        help="also score the likelihood-stacked mixture where the check passes the single flow")
    parser.add_argument("--stacked-only", action="store_true",
                        help="(implies --stacked) score only the single flow and the stacked mixture, and only where "
                        "they differ (the check passes and stacking keeps an earlier snapshot); other runs are "
                        "recorded with their check, unscored")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.stacked_only and not args.gap_fractions:
        parser.error("--stacked-only scores the stacked mixture of each --gap-fractions value; give at least one")
    observations = parse_observations(args.observations) if args.observations else []
    for task_name in args.tasks:
        task = simulators.get(task_name)
        for seed in args.seeds:
            sims = simulate_from_prior(task.simulate, task.prior, args.simulations, seed=seed, progress=False)
            start = time.process_time()
            npe = NPE(task.prior, ensemble="snapshots")
            with Recorder() as recorder:
                fitted = npe.fit(sims.theta[sims.valid], sims.x[sims.valid], seed=seed, progress=False)
            train_cpu = round(time.process_time() - start, 1)
            history = fitted.history
            config = {key: value for key, value in fitted.config.items() if key != "snapshot_epochs"}
            posterior = Posterior(copy.deepcopy(members_of(fitted.net)[-1]), task.prior,  # the default single flow
                                  config={**config, "ensemble": 1}, history=history)
            start = time.process_time()
            check = auto_check(posterior, npe.theta[npe.validation], npe.x[npe.validation], seed=seed)
            check_cpu = round(time.process_time() - start, 1)
            base = {"task": task_name, "simulations": args.simulations, "seed": seed, "train_cpu_seconds": train_cpu,
                    "best_epoch": history.best_epoch, "epochs": history.epochs,
                    "step_drop_epochs": history.step_drop_epochs, "auto_check": auto_summary(check),
                    "check_cpu_seconds": check_cpu}
            if args.check_only:
                emit(args.json, {**base, "setting": "defaults", "members": [history.best_epoch]})
                continue
            if args.stacked_only:
                stacked_only(args, task, recorder.trail, posterior, npe, check, base, observations, seed=seed)
                continue
            fresh = simulate_from_prior(task.simulate, task.prior, args.datasets, seed=derive_seed(seed, "coverage"),
                                        progress=False)
            test = simulate_from_prior(task.simulate, task.prior, args.test_size, seed=derive_seed(seed, "heldout"),
                                       progress=False)
            emit(args.json, {**base, "setting": "defaults", "members": [history.best_epoch],
                             **score(posterior, fresh, test, seed=seed, posterior_samples=args.posterior_samples),
                             **c2st_record(task, posterior, observations, seed=seed)})
            settings = [("gap", gap, {"gap": gap}) for gap in args.gaps]
            settings += [("gap_fraction", f, {"fraction": f}) for f in args.gap_fractions]
            for fraction in args.gap_fractions if args.previous_members else ():
                today, before = ([epoch for epoch, _ in recorder.trail.members(
                    history.best_epoch, fraction=fraction, distinct=distinct)] for distinct in (True, False))
                if today != before:  # the rule before session 68 chooses other members
                    settings.append(("gap_fraction", f"{fraction} previous", {"fraction": fraction, "distinct": False}))
            for kind, value, option in settings:
                mixed, epochs = snapshot_mixture(posterior, recorder.trail, **option)
                if option.get("fraction") == SNAPSHOT_GAP and option.get("distinct", True):  # what the fit returned
                    assert epochs == fitted.config["snapshot_epochs"]
                emit(args.json, {**base, "setting": f"snapshots {kind}={value}", "members": epochs,
                                 **score(mixed, fresh, test, seed=seed, posterior_samples=args.posterior_samples),
                                 **c2st_record(task, mixed, observations, seed=seed)})
            for fraction in args.gap_fractions if args.stacked and check.passed else ():
                nets, kept, weights = recorder.trail.stacked(  # what NPE(ensemble="auto-stacked") returns
                    copy.deepcopy(posterior.net), history.best_epoch, task.prior, posterior.config,
                    npe.theta[npe.validation], npe.x[npe.validation], fraction=fraction)
                stacked = Posterior(mixture(nets, weights), task.prior,
                                    config={**posterior.config, "ensemble": len(kept)})
                members = [epoch for epoch, _ in recorder.trail.members(history.best_epoch, fraction=fraction)]
                emit(args.json, {**base, "setting": f"stacked gap_fraction={fraction}", "members": members,
                                 "kept": kept, "weights": [round(float(w), 4) for w in weights],
                                 **score(stacked, fresh, test, seed=seed, posterior_samples=args.posterior_samples),
                                 **c2st_record(task, stacked, observations, seed=seed)})


def stacked_only(args, task, trail: SnapshotTrail, posterior: Posterior, npe: NPE, check, base: dict,
                 observations: list[int], *, seed: int) -> None:
    """``--stacked-only``: score the single flow and the stacked mixture of each gap fraction where stacking keeps
    an earlier snapshot; record the others (the check fails, or stacking keeps the flow alone) unscored.

    The coverage and held-out pairs are simulated, and the single flow scored, once per run: on the first
    fraction that needs them."""
    pairs: tuple = ()

    def scored(setting: str, scored_posterior: Posterior, extra: dict) -> None:
        emit(args.json, {**base, "setting": setting, **extra,
                         **score(scored_posterior, *pairs, seed=seed, posterior_samples=args.posterior_samples),
                         **c2st_record(task, scored_posterior, observations, seed=seed)})

    for fraction in args.gap_fractions:
        stacking = None
        if check.passed:
            nets, kept, weights = trail.stacked(copy.deepcopy(posterior.net), posterior.history.best_epoch, task.prior,
                                                posterior.config, npe.theta[npe.validation], npe.x[npe.validation],
                                                fraction=fraction)
            stacking = {"kept": kept, "weights": [round(float(w), 4) for w in weights]}
        members = [epoch for epoch, _ in trail.members(posterior.history.best_epoch, fraction=fraction)]
        if stacking is None or stacking["kept"] == [posterior.history.best_epoch]:
            emit(args.json, {**base, "setting": f"unscored gap_fraction={fraction}", "members": members,
                             **(stacking or {})})
            continue
        if not pairs:
            pairs = (simulate_from_prior(task.simulate, task.prior, args.datasets, seed=derive_seed(seed, "coverage"),
                                         progress=False),
                     simulate_from_prior(task.simulate, task.prior, args.test_size, seed=derive_seed(seed, "heldout"),
                                         progress=False))
            scored("defaults", posterior, {"members": [posterior.history.best_epoch]})
        stacked = Posterior(mixture(nets, weights), task.prior, config={**posterior.config, "ensemble": len(kept)})
        scored(f"stacked gap_fraction={fraction}", stacked, {"members": members, **stacking})


if __name__ == "__main__":
    main()

"""Benchmark TSNPE against amortized NPE at the same budget, and against sbi's TSNPE when sbi is installed.

For each seed and observation, C2ST against the task's reference posterior (10,000 samples by default)
of:

* **ours TSNPE**: ``sbiflows.TSNPE(task.prior).run(task.simulate, x_o, rounds=R, simulations=N)``
  (``--no-tsnpe`` skips it; ``--ensemble K`` trains K flows per round);
* **ours NPE**: amortized NPE on ``N`` simulations from the prior (one network per seed, evaluated at
  every observation), by default NPE's own default flow (``--npe-estimator``), so TSNPE is compared
  with what a user gets from ``NPE(prior)``; ``--no-npe`` skips it;
* **sbi TSNPE** (sbi 0.27's tutorial recipe): ``NPE`` trained round by round with
  ``force_first_round_loss=True`` on draws from ``RestrictedPrior(prior, get_density_thresholder(posterior,
  quantile=1e-4), sample_with="rejection")``, the same rounds and per-round budget
  (:func:`sbiflows.sequential.split_budget`), simulated by the same simulator through
  ``sbiflows.simulate`` with seeds derived from the same seed; sbi's default flow (its MAF) unless
  ``--sbi-estimator`` says otherwise.

Each of our TSNPE's rounds after the first also records ``reference_inside``, the share of the reference
posterior's draws inside that round's truncated region (the truncation's promise is that it is about
1, as the issue's "every region contains the posterior's mass" asks; the run's own coverage check
cannot see a shortfall), and ``samples_inside``, the share of the final posterior's draws inside it.

Wall and CPU seconds (this process's CPU time; simulating included) are reported per method and
observation, medians over the runs in the summary; ours NPE trains once per seed for all observations,
and its time is that one training.

Example:
    python examples/benchmark_tsnpe.py --task two_moons --simulations 1000 --rounds 2 --seeds 0 1 --observations 1..3
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import simulators
from sbiflows import NPE, TSNPE
from sbiflows.diagnostics.c2st import c2st
from sbiflows.estimator import DEFAULT_ESTIMATOR
from sbiflows.ensemble import ENSEMBLE_CHOICES
from sbiflows.seeding import derive_seed
from sbiflows.sequential import split_budget
from sbiflows.simulate import simulate, simulate_from_prior
from sbiflows.truncated_space import SPACE_OPTIONS, resolve_space


def parse_observations(text: str) -> list[int]:
    """``"1..10"`` -> 1..10, ``"1,3"`` -> [1, 3]."""
    if ".." in text:
        first, last = text.split("..")
        return list(range(int(first), int(last) + 1))
    return [int(v) for v in text.split(",")]


def timed(function, *args, **kwargs):
    """``(result, wall seconds, CPU seconds)``."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - wall, time.process_time() - cpu


def run_ours_tsnpe(task, x_o, args, seed):
    tsnpe = TSNPE(task.prior, estimator=args.estimator, space=args.space, ensemble=args.ensemble)
    fit_options = {key: value for key, value in (("patience", args.patience), ("step_drops", args.step_drops),
                                                 ("retrain_from_scratch", args.retrain_from_scratch or None))
                   if value is not None}
    truncation = {} if args.quantile is None else {"quantile": args.quantile}
    posterior = tsnpe.run(task.simulate, x_o, rounds=args.rounds, simulations=args.simulations, seed=seed,
                          check_simulations=0, first_round=args.first_round, fit_options=fit_options, **truncation)
    samples = posterior.sample(args.num_samples, seed=seed)
    rounds = [{"volume": r.volume, "method": r.method, "acceptance": r.acceptance, "epochs": r.epochs,
               "cpu_seconds": r.cpu_seconds, "validation_loss": r.validation_loss}
              for r in tsnpe.rounds]
    return samples, rounds, tsnpe.proposals


def region_shares(rounds: list[dict], proposals: list, reference, samples) -> None:
    """Add ``reference_inside`` and ``samples_inside`` to the records of the rounds with a truncated region."""
    with torch.no_grad():
        for record, proposal in zip(rounds[1:], proposals[1:]):
            record["reference_inside"] = float(proposal.inside(reference.to(samples.dtype)).float().mean())
            record["samples_inside"] = float(proposal.inside(samples).float().mean())


def run_ours_npe(task, args, seed):
    sims = simulate_from_prior(task.simulate, task.prior, args.simulations, seed=seed)
    valid = sims.valid
    return NPE(task.prior, args.npe_estimator, space=args.space).fit(sims.theta[valid], sims.x[valid], seed=seed, progress=False)


def run_sbi_tsnpe(task, x_o, args, seed):
    """sbi's TSNPE recipe on the same simulator and per-round budget; None without sbi."""
    from benchmark_npe import (
        _NullTracker,  # examples/ is on the path: no TensorBoard files from sbi
    )
    from sbi.inference import NPE as SbiNPE
    from sbi.utils import RestrictedPrior, get_density_thresholder

    torch.manual_seed(seed)
    inference = SbiNPE(prior=task.prior, density_estimator=args.sbi_estimator, show_progress_bars=False,
                       tracker=_NullTracker())
    proposal, volumes = task.prior, [1.0]  # as ours: round 1 draws from the whole prior
    for r, n in enumerate(split_budget(args.simulations, args.rounds, args.first_round)):
        theta = proposal.sample((n,))
        x = simulate(task.simulate, theta, seed=derive_seed(seed, f"sbi/{r}")).x
        valid = torch.isfinite(x).all(1)
        inference.append_simulations(theta[valid], x[valid]).train(force_first_round_loss=True)
        posterior = inference.build_posterior().set_default_x(x_o)
        if r < args.rounds - 1:
            accept_reject_fn = get_density_thresholder(posterior, quantile=1e-4)
            proposal = RestrictedPrior(task.prior, accept_reject_fn, sample_with="rejection")
            volumes.append(float(accept_reject_fn(task.prior.sample((100_000,))).float().mean()))
    return posterior.sample((args.num_samples,), show_progress_bars=False), volumes


def sbi_available() -> bool:
    try:
        import sbi  # noqa: F401
    except ImportError:
        return False
    return True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", default="two_moons", choices=simulators.names())
    parser.add_argument("--simulations", type=int, default=1000, help="total budget of every method")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--first-round", type=int, default=None, help="simulations of round 1 (default: equal)")
    parser.add_argument("--quantile", type=float, default=None,
                        help="our TSNPE's posterior mass left outside each region (default: TSNPE's, 1e-4)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--observations", default="1..3", help='"1..10" or "1,2,3"')
    parser.add_argument("--num-samples", type=int, default=10_000)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads for every method")
    parser.add_argument("--no-sbi", action="store_true")
    parser.add_argument("--estimator", default=DEFAULT_ESTIMATOR,
                        help=f"our TSNPE's flow (default: TSNPE's, {DEFAULT_ESTIMATOR})")
    parser.add_argument("--npe-estimator", default=DEFAULT_ESTIMATOR,
                        help=f"our amortized NPE's flow (default: NPE's, {DEFAULT_ESTIMATOR})")
    parser.add_argument("--sbi-estimator", default="maf", help="sbi's density_estimator (default: sbi's, maf)")
    parser.add_argument("--patience", type=int, default=None, help="our TSNPE's per-round patience (default: TSNPE's)")
    parser.add_argument("--step-drops", type=int, default=None, help="our TSNPE's per-round step drops (default: NPE's)")
    parser.add_argument("--retrain-from-scratch", action="store_true",
                        help="our TSNPE trains a new network every round (fit option retrain_from_scratch)")
    parser.add_argument("--no-npe", action="store_true", help="skip the amortized NPE")
    parser.add_argument("--no-tsnpe", action="store_true", help="skip our TSNPE (e.g. to add sbi's to earlier records)")
    parser.add_argument("--space", default="auto", choices=list(SPACE_OPTIONS),
                        help="where our flow models a bounded prior's parameters (NPE's space option; "
                        "auto: truncated for a box prior)")
    parser.add_argument("--ensemble", default=1, type=lambda v: v if v in ENSEMBLE_CHOICES else int(v),
                        help="flows per round of our TSNPE (TSNPE(prior, ensemble=K); default 1; or one of NPE's "
                        f"string choices {', '.join(ENSEMBLE_CHOICES)})")
    parser.add_argument("--json", default=None, help="append one JSON record per seed and observation")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    task = simulators.get(args.task)
    observations = parse_observations(args.observations)
    with_sbi = not args.no_sbi and sbi_available()
    print(f"task={args.task} simulations={args.simulations} rounds={args.rounds} "
          f"split={split_budget(args.simulations, args.rounds, args.first_round)} seeds={args.seeds} "
          f"observations={observations} sbi={'yes' if with_sbi else 'no'}")
    records = []
    for seed in args.seeds:
        npe = None if args.no_npe else timed(run_ours_npe, task, args, seed)
        for i in observations:
            x_o, reference = task.observation(i), task.reference_posterior(i, args.num_samples)
            record = {"task": args.task, "simulations": args.simulations, "rounds": args.rounds, "seed": seed,
                      "observation": i, "estimator": args.estimator, "ensemble": args.ensemble, "patience": args.patience,
                      "step_drops": args.step_drops, "retrain_from_scratch": args.retrain_from_scratch,
                      "first_round": args.first_round, "quantile": args.quantile,
                      "space": resolve_space(task.prior.support, args.space)}
            line = f"seed {seed} obs {i}:"
            if not args.no_tsnpe:
                (samples, rounds, proposals), wall, cpu = timed(run_ours_tsnpe, task, x_o, args, seed)
                region_shares(rounds, proposals, reference, samples)
                record["ours_tsnpe"] = {"c2st": c2st(reference, samples, seed=seed).accuracy, "seconds": wall,
                                        "cpu_seconds": cpu, "rounds": rounds}
                line += (f" ours TSNPE {record['ours_tsnpe']['c2st']:.3f} ({wall:.0f} s, {cpu:.0f} CPU s;"
                         f" volumes {[round(r['volume'], 4) for r in rounds]})")
            if npe is not None:
                posterior, npe_wall, npe_cpu = npe
                amortized = posterior.sample(args.num_samples, x_o, seed=seed)
                record["npe_estimator"] = args.npe_estimator
                record["ours_npe"] = {"c2st": c2st(reference, amortized, seed=seed).accuracy, "seconds": npe_wall,
                                      "cpu_seconds": npe_cpu}
                line += f" ours NPE ({args.npe_estimator}) {record['ours_npe']['c2st']:.3f}"
            if with_sbi:
                (sbi_samples, volumes), wall, cpu = timed(run_sbi_tsnpe, task, x_o, args, seed)
                record["sbi_tsnpe"] = {"c2st": c2st(reference, sbi_samples.float(), seed=seed).accuracy,
                                       "seconds": wall, "cpu_seconds": cpu, "volumes": volumes,
                                       "density_estimator": args.sbi_estimator}
                line += (f" sbi TSNPE {record['sbi_tsnpe']['c2st']:.3f} ({wall:.0f} s, {cpu:.0f} CPU s; "
                         f"volumes {[round(v, 4) for v in volumes]})")
            print(line, flush=True)
            records.append(record)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps(record) + "\n")
    print("summary (mean C2ST over seeds and observations; median wall / CPU seconds per run):")
    for key in ("ours_tsnpe", "ours_npe", "sbi_tsnpe"):
        if records and all(key in r for r in records):
            values = [r[key]["c2st"] for r in records]
            print(f"  {key}: C2ST {statistics.mean(values):.3f} (min {min(values):.3f}, max {max(values):.3f}); "
                  f"{statistics.median(r[key]['seconds'] for r in records):.1f} s wall, "
                  f"{statistics.median(r[key]['cpu_seconds'] for r in records):.1f} s CPU")


if __name__ == "__main__":
    main()

"""Benchmark sbiflows NPE (and, when installed, sbi's NPE on the same simulations) on a simulator task.

Simulates ``--simulations`` pairs with the task, trains, draws 10,000 posterior samples per
observation and reports the C2ST accuracy against the task's reference posterior (0.5 is perfect),
training seconds, epochs and sampling seconds. If the ``sbi`` package is importable, it trains sbi's
NPE (MAF, default settings) on exactly the same draws in the same run and prints the ratios.

Example:
    python examples/benchmark_npe.py --task two_moons --simulations 1000 --seeds 0 1 2 --observations 1..10

``--estimator nsf`` (or ``--transformer spline --bins 8``) benchmarks our spline flows, and
``--sbi-estimator nsf`` sbi's neural spline flow. Training is reported in wall and CPU seconds (the
process's CPU time; the machine may be shared).

Options ``--threads 1 2`` trains ours once per thread count (the effect of ``num_threads``);
``--json FILE`` appends one JSON record per seed. Before anything is timed, both libraries
train one untimed epoch (see :func:`warm_up`).
"""

from __future__ import annotations

import argparse
import inspect
import json
import statistics
import time

import torch

import simulators
from sbiflows import NPE
from sbiflows.diagnostics.c2st import c2st  # the project's C2ST (sbibm protocol)
from sbiflows.estimator import ESTIMATORS
from sbiflows.flows import MIXINGS
from sbiflows.simulate import simulate_from_prior
from sbiflows.truncated_space import SPACE_OPTIONS, resolve_space


def parse_observations(text: str) -> list[int]:
    """``"1..10"`` -> 1..10, ``"1,3"`` -> [1, 3]."""
    if ".." in text:
        first, last = text.split("..")
        return list(range(int(first), int(last) + 1))
    return [int(v) for v in text.split(",")]


def run_ours(task, theta, x, observations, *, estimator, activation, hidden_features, seed, threads, num_samples,
             transforms=None, transformer=None, bins=None, bound=None, space=None, mixing=None, coverage_penalty=None,
             embedding="auto", **fit_options):
    """Train our NPE and return (record, samples per observation)."""
    options = {} if hidden_features is None else {"hidden_features": hidden_features}
    options.update({key: value for key, value in (("transformer", transformer), ("bins", bins), ("bound", bound),
                                                  ("space", space), ("mixing", mixing),
                                                  ("coverage_penalty", coverage_penalty)) if value is not None})
    if transforms is not None:
        options["transforms"] = transforms
    options["embedding_net"] = None if embedding == "none" else "auto"
    fit_options = {key: value for key, value in fit_options.items() if value is not None}  # None: NPE's default
    start, cpu_start = time.perf_counter(), time.process_time()
    posterior = NPE(task.prior, estimator, activation=activation, **options).fit(theta, x, seed=seed, progress=False, num_threads=threads,
                                               **fit_options)
    train_seconds, train_cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    samples, sample_seconds = {}, []
    for i in observations:
        start = time.perf_counter()
        samples[i] = posterior.sample(num_samples, x=task.observation(i), seed=seed + i)
        sample_seconds.append(time.perf_counter() - start)
    record = {"train_seconds": train_seconds, "train_cpu_seconds": train_cpu_seconds, "epochs": posterior.history.epochs,
              "transformer": posterior.config.get("transformer"), "bins": posterior.config.get("bins"),
              "bound": posterior.config.get("bound"),
              "sample_seconds": statistics.median(sample_seconds), "batch_size": posterior.history.batch_size,
              "learning_rate": posterior.history.learning_rate, "transforms": posterior.config["transforms"],
              "ema_epochs": posterior.history.ema_epochs, "best_epoch": posterior.history.best_epoch,
              "step_drop_epochs": posterior.history.step_drop_epochs,
              "embedding": posterior.config["embedding"], "context_features": posterior.config["context_features"],
              "validation_loss": posterior.history.validation_loss}
    return record, samples


class _NullTracker:
    """sbi's tracker protocol, logging nothing (sbi's default writes TensorBoard files into ./sbi-logs)."""

    log_dir = None

    def log_metric(self, name, value, step=None):
        pass

    def log_metrics(self, metrics, step=None):
        pass

    def log_params(self, params):
        pass

    def add_figure(self, name, figure, step=None):
        pass

    def flush(self):
        pass


def run_sbi(task, theta, x, observations, *, seed, threads, num_samples, density_estimator="maf"):
    """Train sbi's NPE (``density_estimator``, default settings) on the same draws; None if sbi is not installed."""
    try:
        from sbi.inference import NPE as SbiNPE
    except ImportError:
        return None, None
    old = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        torch.manual_seed(seed)
        inference = SbiNPE(prior=task.prior, density_estimator=density_estimator, show_progress_bars=False,
                           tracker=_NullTracker())
        start, cpu_start = time.perf_counter(), time.process_time()
        estimator = inference.append_simulations(theta, x).train()
        train_seconds, train_cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    finally:
        torch.set_num_threads(old)
    posterior = inference.build_posterior(estimator)
    samples, sample_seconds = {}, []
    for i in observations:
        start = time.perf_counter()
        samples[i] = posterior.sample((num_samples,), x=task.observation(i), show_progress_bars=False)
        sample_seconds.append(time.perf_counter() - start)
    epochs = len(inference.summary["epoch_durations_sec"])
    return {"train_seconds": train_seconds, "train_cpu_seconds": train_cpu_seconds, "epochs": epochs,
            "sample_seconds": statistics.median(sample_seconds), "density_estimator": density_estimator}, samples


def score(task, samples, observations, seed):
    """C2ST accuracy per observation against the reference posterior (c2st itself trains on one thread)."""
    return {i: c2st(task.reference_posterior(i, len(samples[i])), samples[i].float(), seed=seed).accuracy
            for i in observations}


def warm_up(task, *, with_sbi: bool) -> None:
    """Pay each library's one-off costs before anything is timed.

    The first Adam optimizer of a process imports ``torch._dynamo`` (about 1 s on this machine) and
    first calls trigger lazy imports, so whichever library trained first paid for both. One untimed
    epoch of each on 200 rows removes that bias.
    """
    sims = simulate_from_prior(task.simulate, task.prior, 200, seed=999_999)  # unrelated to the benchmark's seeds
    theta, x = sims.theta[sims.valid], sims.x[sims.valid]
    NPE(task.prior).fit(theta, x, max_epochs=1, progress=False)
    if with_sbi:
        try:
            from sbi.inference import NPE as SbiNPE
        except ImportError:
            return
        SbiNPE(prior=task.prior, show_progress_bars=False, tracker=_NullTracker()).append_simulations(
            theta, x).train(max_num_epochs=1)


def run_seed(task, args, observations, seed: int) -> dict:
    """Simulate, train ours (and sbi's) on the same rows, score both; returns the JSON record."""
    sims = simulate_from_prior(task.simulate, task.prior, args.simulations, seed=seed)
    theta, x = sims.theta[sims.valid], sims.x[sims.valid]  # both libraries get the same valid rows
    print(f"task={args.task} simulations={args.simulations} seed={seed} observations={observations}")
    fit_defaults = inspect.signature(NPE.fit).parameters
    patience = fit_defaults["patience"].default if args.patience is None else args.patience
    step_drops = fit_defaults["step_drops"].default if args.step_drops is None else args.step_drops
    drop_patience = fit_defaults["drop_patience"].default if args.drop_patience is None else args.drop_patience
    record = {"task": args.task, "simulations": args.simulations, "seed": seed,
              "observations": observations, "estimator": args.estimator, "activation": args.activation,
              "batch_size": args.batch_size, "learning_rate": args.learning_rate, "patience": patience,
              "step_drops": step_drops, "drop_patience": drop_patience,
              "step_drop_factor": fit_defaults["step_drop_factor"].default if args.step_drop_factor is None
              else args.step_drop_factor,
              "drop_batch_factor": fit_defaults["drop_batch_factor"].default if args.drop_batch_factor is None
              else args.drop_batch_factor,
              "hidden_features": args.hidden_features, "transforms": args.transforms, "transformer": args.transformer,
              "bins": args.bins, "bound": args.bound, "mixing": args.mixing, "coverage_penalty": args.coverage_penalty,
              "embedding": args.embedding, "ema_epochs": args.ema_epochs,
              "space": resolve_space(task.prior.support, args.space),
              "ours": {}}
    ours_c2st = None
    for threads in args.threads:
        run, samples = run_ours(task, theta, x, observations, estimator=args.estimator,
                                activation=args.activation, hidden_features=args.hidden_features, seed=seed,
                                threads=threads, num_samples=args.num_samples, transforms=args.transforms,
                                batch_size=args.batch_size, learning_rate=args.learning_rate,
                                patience=args.patience, step_drops=args.step_drops, ema_epochs=args.ema_epochs,
                                drop_patience=args.drop_patience, step_drop_factor=args.step_drop_factor,
                                drop_batch_factor=args.drop_batch_factor, transformer=args.transformer,
                                bins=args.bins, bound=args.bound, space=args.space, mixing=args.mixing,
                                coverage_penalty=args.coverage_penalty, embedding=args.embedding)
        if ours_c2st is None:
            ours_c2st = score(task, samples, observations, seed)
            record["ours_c2st"] = ours_c2st
        record["ours"][threads] = run
        spline = f", spline {run['bins']} bins on +-{run['bound']:g}" if run["transformer"] == "spline" else ""
        print(f"  sbiflows {args.estimator} ({run['transforms']} layers{spline}, {args.activation}, batch {run['batch_size']}, "
              f"lr {run['learning_rate']:.2g}, patience {patience}, step drops {step_drops}, ema_epochs {run['ema_epochs']:g}) "
              f"threads={threads}: train {run['train_seconds']:.1f} s ({run['train_cpu_seconds']:.1f} CPU s), "
              f"{run['epochs']} epochs, sampling {run['sample_seconds']:.3f} s")
    print("  sbiflows C2ST: " + " ".join(f"{i}:{v:.3f}" for i, v in ours_c2st.items())
          + f"  mean {statistics.mean(ours_c2st.values()):.3f}")
    if not args.no_sbi:
        run, samples = run_sbi(task, theta, x, observations, seed=seed, threads=args.sbi_threads,
                               num_samples=args.num_samples, density_estimator=args.sbi_estimator)
        if run is None:
            print("  sbi is not installed: no comparison")
        else:
            sbi_c2st = score(task, samples, observations, seed)
            record.update(sbi=run, sbi_c2st=sbi_c2st, sbi_threads=args.sbi_threads)
            print(f"  sbi NPE {args.sbi_estimator}: train {run['train_seconds']:.1f} s "
                  f"({run['train_cpu_seconds']:.1f} CPU s), {run['epochs']} epochs, "
                  f"sampling {run['sample_seconds']:.3f} s")
            print("  sbi C2ST: " + " ".join(f"{i}:{v:.3f}" for i, v in sbi_c2st.items())
                  + f"  mean {statistics.mean(sbi_c2st.values()):.3f}")
            ours_run = record["ours"][args.threads[0]]
            ours_mean, sbi_mean = statistics.mean(ours_c2st.values()), statistics.mean(sbi_c2st.values())
            print(f"  ours vs sbi: mean C2ST {ours_mean:.3f} vs {sbi_mean:.3f} (difference {ours_mean - sbi_mean:+.3f}); "
                  f"training time ratio {ours_run['train_seconds'] / run['train_seconds']:.2f}; "
                  f"sampling time ratio {ours_run['sample_seconds'] / run['sample_seconds']:.2f}")
    return record


def summarize(records: list[dict], threads: int) -> None:
    """Means over seeds: C2ST (mean over observations, then over seeds) and total training time."""
    ours = [statistics.mean(r["ours_c2st"].values()) for r in records]
    ours_time = sum(r["ours"][threads]["train_seconds"] for r in records)
    ours_cpu = sum(r["ours"][threads]["train_cpu_seconds"] for r in records)
    line = (f"over seeds {[r['seed'] for r in records]}: ours mean C2ST {statistics.mean(ours):.3f}, training "
            f"{ours_time:.1f} s wall / {ours_cpu:.1f} s CPU in total")
    if all("sbi" in r for r in records):
        sbi = [statistics.mean(r["sbi_c2st"].values()) for r in records]
        sbi_time = sum(r["sbi"]["train_seconds"] for r in records)
        wins = sum(o <= s for o, s in zip(ours, sbi))
        line += (f", sbi {statistics.mean(sbi):.3f} (difference {statistics.mean(ours) - statistics.mean(sbi):+.3f}, "
                 f"ours <= sbi on {wins} of {len(records)} seeds); training time ours/sbi "
                 f"{ours_time:.1f} s / {sbi_time:.1f} s = {ours_time / sbi_time:.2f}")
    print(line)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", default="two_moons", choices=simulators.names())
    parser.add_argument("--simulations", type=int, default=1000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="one run (simulations, training, sampling, C2ST) per seed")
    parser.add_argument("--observations", default="1..10", help='"1..10" or "1,2,3"')
    parser.add_argument("--estimator", default="maf", choices=sorted(ESTIMATORS))
    parser.add_argument("--transformer", default=None, choices=["affine", "spline"],
                        help="our layers' elementwise map (default: the estimator's)")
    parser.add_argument("--bins", type=int, default=None, help="our spline bins (default: NPE's)")
    parser.add_argument("--bound", type=float, default=None, help="our spline interval half-width (default: NPE's)")
    parser.add_argument("--sbi-estimator", default="maf", help="sbi's density_estimator (maf, nsf, ...)")
    parser.add_argument("--num-samples", type=int, default=10_000)
    parser.add_argument("--threads", type=int, nargs="+", default=[1], help="intra-op threads for our training")
    parser.add_argument("--sbi-threads", type=int, default=1, help="intra-op threads for sbi (default 1, as ours)")
    parser.add_argument("--activation", default="tanh", help="our conditioner activation (tanh, relu, ...)")
    parser.add_argument("--batch-size", type=int, default=None, help="our training batch size (default: NPE's)")
    parser.add_argument("--learning-rate", type=float, default=None, help="our Adam step size (default: NPE's)")
    parser.add_argument("--patience", type=int, default=None, help="our early-stopping patience (default: NPE's)")
    parser.add_argument("--step-drops", type=int, default=None,
                        help="our plateaus that lower the step size before stopping (default: NPE's)")
    parser.add_argument("--drop-patience", type=int, default=None,
                        help="our patience after a step drop (default: NPE's)")
    parser.add_argument("--step-drop-factor", type=float, default=None,
                        help="our step's factor at a drop (default: NPE's)")
    parser.add_argument("--drop-batch-factor", type=float, default=None,
                        help="our batch size's factor at a drop (default: NPE's, 1)")
    parser.add_argument("--ema-epochs", type=float, default=None,
                        help="our weight-average length in epochs, 0 for none (default: NPE's)")
    parser.add_argument("--hidden-features", type=int, nargs="+", default=None,
                        help="our hidden layer sizes (default: NPE's default)")
    parser.add_argument("--transforms", type=int, default=None, help="our number of flow layers (default: NPE's)")
    parser.add_argument("--no-sbi", action="store_true", help="skip sbi even if it is installed")
    parser.add_argument("--embedding", default="auto", choices=["auto", "none"],
                        help="our embedding_net: NPE's default 'auto' (a linear summary of long x) or none (x straight "
                        "to every flow layer, the default before session 46)")
    parser.add_argument("--mixing", default=None, choices=list(MIXINGS),
                        help="our coupling flows' layer between couplings (default: NPE's)")
    parser.add_argument("--space", default="auto", choices=list(SPACE_OPTIONS),
                        help="where our flow models the parameters (NPE's space option; default: auto)")
    parser.add_argument("--coverage-penalty", type=float, default=None,
                        help="weight of our calibrated NPE's coverage penalty (default: NPE's, none)")
    parser.add_argument("--json", default=None, help="append one JSON record per seed to this file")
    args = parser.parse_args(argv)

    task = simulators.get(args.task)
    observations = parse_observations(args.observations)
    warm_up(task, with_sbi=not args.no_sbi)
    records = []
    for seed in args.seeds:
        records.append(run_seed(task, args, observations, seed))
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(records[-1]) + "\n")
    summarize(records, args.threads[0])


if __name__ == "__main__":
    main()

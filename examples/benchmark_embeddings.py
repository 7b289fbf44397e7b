"""Benchmark the embedding networks: an iid example with an exact posterior, and the benchmark tasks.

**iid** (default): the mean ``theta`` (2-D) of Gaussian trials with known unit variance, prior
``N(0, I)``. Each training simulation has a random number of trials, 1 to ``--max-trials`` (NaN-padded
to that size), and ONE :class:`~sbiflows.embeddings.PermutationInvariant` network serves every count.
The exact posterior given ``n`` trials with mean ``m`` is ``N(n m / (n + 1), I / (n + 1))``; the script
reports the C2ST accuracy (0.5 is perfect) of 10,000 posterior samples against 10,000 exact ones for
``--observations`` observations at each of ``--trials`` counts::

    python examples/benchmark_embeddings.py iid --simulations 10000 --trials 1 10 50 --seeds 0

**task**: a benchmark task with its default embedding on its structured x (``task.x_shape``), and,
when ``sbi`` is importable, sbi's NPE with the matching embedding (``FCEmbedding``,
``CNNEmbedding``, ``PermutationInvariantEmbedding``) on the same draws; C2ST against the reference
posteriors of observations 1-5::

    PYTHONPATH=. /work/sbi-venv/bin/python examples/benchmark_embeddings.py task --task slcp_distractors \\
        --simulations 10000 --seeds 0

Training is reported in wall and CPU seconds (the process's CPU time; the machine may be shared).
Both libraries train a MAF (:data:`ESTIMATOR`): the numbers in docs/embeddings.md and
docs/benchmarks.md were measured with it, before NPE's default became the neural spline flow.
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import torch
from torch.distributions import Independent, Normal

from sbiflows import NPE
from sbiflows.diagnostics.c2st import c2st
from sbiflows.embeddings import PermutationInvariant, from_name

DIM = 2
#: Our flow in this benchmark (see the module docstring).
ESTIMATOR = "maf"


def iid_prior() -> Independent:
    return Independent(Normal(torch.zeros(DIM), torch.ones(DIM)), 1)


def iid_simulate(theta: torch.Tensor, counts: torch.Tensor, max_trials: int, generator: torch.Generator) -> torch.Tensor:
    """``(N, max_trials, DIM)`` trials ``theta + N(0, I)``, row ``i`` with ``counts[i]`` of them and NaN padding."""
    x = theta[:, None, :] + torch.randn(len(theta), max_trials, DIM, generator=generator)
    x[torch.arange(max_trials)[None, :] >= counts[:, None]] = float("nan")
    return x


def exact_posterior(x: torch.Tensor, num_samples: int, generator: torch.Generator) -> torch.Tensor:
    """Samples of ``p(theta | x)`` for one set ``x`` ``(n, DIM)`` under the ``N(0, I)`` prior."""
    n = len(x)
    mean = x.sum(0) / (n + 1)
    return mean + torch.randn(num_samples, DIM, generator=generator) / (n + 1) ** 0.5


def run_iid(*, simulations: int, max_trials: int, trials: list[int], observations: int, seed: int,
            num_samples: int = 10_000, max_epochs: int = 1000, out_features: int = 20,
            pooling: str | None = None) -> dict:
    """Train one network on 1..max_trials trials and score it at each count; returns the record."""
    generator = torch.Generator().manual_seed(seed)
    prior = iid_prior()
    theta = torch.randn(simulations, DIM, generator=generator)  # the N(0, I) prior, from the seeded generator
    counts = torch.randint(1, max_trials + 1, (simulations,), generator=generator)
    x = iid_simulate(theta, counts, max_trials, generator)
    embedding = PermutationInvariant(DIM, out_features=out_features, **({"pooling": pooling} if pooling else {}))
    start, cpu = time.perf_counter(), time.process_time()
    posterior = NPE(prior, ESTIMATOR, embedding_net=embedding).fit(theta, x, seed=seed, max_epochs=max_epochs,
                                                                   progress=False)
    record = {"seed": seed, "simulations": simulations, "pooling": embedding.config["pooling"], "train_seconds": time.perf_counter() - start,
              "train_cpu_seconds": time.process_time() - cpu, "epochs": posterior.history.epochs, "c2st": {}}
    for n in trials:
        scores = []
        for k in range(observations):
            truth = torch.randn(DIM, generator=generator)
            x_o = truth + torch.randn(n, DIM, generator=generator)  # fewer trials than max_trials: padded by sbiflows
            ours = posterior.sample(num_samples, x=x_o, seed=seed + k)
            exact = exact_posterior(x_o, num_samples, generator)
            scores.append(c2st(exact, ours, seed=seed).accuracy)
        record["c2st"][n] = scores
    return record


# ------------------------------------------------------------------------------------ tasks
def run_task_ours(task, theta, x, observations, *, seed, num_samples, embedding_options=None):
    embedding = from_name(task.default_embedding, task.x_shape, **(embedding_options or {}))
    start, cpu = time.perf_counter(), time.process_time()
    posterior = NPE(task.prior, ESTIMATOR, embedding_net=embedding).fit(theta, x, seed=seed, progress=False)
    record = {"train_seconds": time.perf_counter() - start, "train_cpu_seconds": time.process_time() - cpu,
              "epochs": posterior.history.epochs, "embedding_config": dict(embedding.config)}
    samples = {i: posterior.sample(num_samples, x=task.structured(task.observation(i)), seed=seed)
               for i in observations}
    return record, samples


def run_task_sbi(task, theta, x, observations, *, seed, num_samples):
    """sbi 0.27 NPE (MAF, its defaults) with the embedding that matches the task's default one."""
    from benchmark_npe import _NullTracker  # examples/ is on the path when this runs as a script
    from sbi.inference import NPE as SbiNPE
    from sbi.neural_nets import posterior_nn
    from sbi.neural_nets.embedding_nets import CNNEmbedding, FCEmbedding, PermutationInvariantEmbedding

    torch.manual_seed(seed)
    name, shape = task.default_embedding, task.x_shape
    if name == "mlp":
        embedding = FCEmbedding(input_dim=shape[0], output_dim=20)
    elif name == "cnn1d":
        embedding = CNNEmbedding(input_shape=shape[1:], in_channels=shape[0], output_dim=20)
    else:
        trial_net = FCEmbedding(input_dim=shape[1], output_dim=50, num_hiddens=100)
        embedding = PermutationInvariantEmbedding(trial_net, trial_net_output_dim=50, output_dim=20)
    inference = SbiNPE(prior=task.prior, density_estimator=posterior_nn(model="maf", embedding_net=embedding),
                       show_progress_bars=False, tracker=_NullTracker())
    start, cpu = time.perf_counter(), time.process_time()
    estimator = inference.append_simulations(theta, x).train()
    record = {"train_seconds": time.perf_counter() - start, "train_cpu_seconds": time.process_time() - cpu,
              "epochs": len(inference.summary["epoch_durations_sec"])}
    posterior = inference.build_posterior(estimator)
    samples = {i: posterior.sample((num_samples,), x=task.structured(task.observation(i))[None],
                                   show_progress_bars=False) for i in observations}
    return record, samples


def run_task(task_name: str, *, simulations: int, seed: int, num_samples: int, with_sbi: bool,
             observations: list[int], embedding_options: dict | None = None) -> dict:
    """Train ours (``embedding_options`` go to its embedding) and sbi on the same draws; C2ST per observation."""
    import simulators
    from sbiflows.simulate import simulate_from_prior

    task = simulators.get(task_name)
    sims = simulate_from_prior(task.simulate_structured, task.prior, simulations, seed=seed)
    theta, x = sims.theta[sims.valid], sims.x[sims.valid]
    references = {i: task.reference_posterior(i, num_samples) for i in observations}
    out = {"task": task_name, "seed": seed, "simulations": simulations, "embedding": task.default_embedding}
    runners = {"ours": partial(run_task_ours, embedding_options=embedding_options)}
    if with_sbi:
        runners["sbi"] = run_task_sbi
    for label, runner in runners.items():
        record, samples = runner(task, theta, x, observations, seed=seed, num_samples=num_samples)
        record["c2st"] = [c2st(references[i], samples[i], seed=seed).accuracy for i in observations]
        out[label] = record
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="mode")
    iid = sub.add_parser("iid", help="the Gaussian-mean example with an exact posterior")
    iid.add_argument("--simulations", type=int, default=10_000)
    iid.add_argument("--max-trials", type=int, default=50)
    iid.add_argument("--trials", type=int, nargs="+", default=[1, 10, 50])
    iid.add_argument("--observations", type=int, default=5, help="observations per trial count")
    iid.add_argument("--seeds", type=int, nargs="+", default=[0])
    iid.add_argument("--num-samples", type=int, default=10_000)
    iid.add_argument("--pooling", choices=["mean", "sum"], help="the set network's pooling (default: its own)")
    task = sub.add_parser("task", help="a benchmark task with its default embedding (and sbi's matching one)")
    task.add_argument("--task", default="slcp_distractors",
                      choices=["slcp_distractors", "bernoulli_glm_raw", "sir", "lotka_volterra"])
    task.add_argument("--simulations", type=int, default=10_000)
    task.add_argument("--seeds", type=int, nargs="+", default=[0])
    task.add_argument("--num-samples", type=int, default=10_000)
    task.add_argument("--observations", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    task.add_argument("--no-sbi", action="store_true")
    task.add_argument("--pooling", choices=["mean", "sum"], help="ours: the set network's pooling (default: its own)")
    task.add_argument("--out-features", type=int, help="ours: the embedding's output size (default: its own)")
    task.add_argument("--hidden-features", type=int, nargs="+", help="ours: the embedding's hidden sizes")
    args = parser.parse_args(argv if argv is not None else None)
    records = []
    if args.mode in (None, "iid"):
        if args.mode is None:
            args = parser.parse_args(["iid", *(argv or [])])
        for seed in args.seeds:
            record = run_iid(simulations=args.simulations, max_trials=args.max_trials, trials=args.trials,
                             observations=args.observations, seed=seed, num_samples=args.num_samples,
                             pooling=args.pooling)
            records.append(record)
            print(f"seed {seed}: {record['simulations']} simulations, {record['pooling']} pooling, {record['epochs']} epochs, training "
                  f"{record['train_seconds']:.1f} s wall / {record['train_cpu_seconds']:.1f} s CPU")
            for n, scores in record["c2st"].items():
                print(f"  {n:3d} trials: C2ST mean {statistics.mean(scores):.3f} "
                      f"(per observation {', '.join(f'{s:.3f}' for s in scores)})")
        return records
    try:
        import sbi  # noqa: F401
        with_sbi = not args.no_sbi
    except ImportError:
        with_sbi = False
    import simulators

    options = {"out_features": args.out_features, "hidden_features": args.hidden_features, "pooling": args.pooling}
    options = {k: v for k, v in options.items() if v}
    if "pooling" in options and simulators.get(args.task).default_embedding != "set":
        parser.error(f"--pooling is for a task with the set embedding; {args.task} uses another")
    for seed in args.seeds:
        record = run_task(args.task, simulations=args.simulations, seed=seed, num_samples=args.num_samples,
                          with_sbi=with_sbi, observations=args.observations, embedding_options=options)
        records.append(record)
        for label in ("ours", "sbi"):
            if label in record:
                r = record[label]
                config = f" {r['embedding_config']}" if "embedding_config" in r else ""
                print(f"{args.task} seed {seed} {label} ({record['embedding']}{config}): C2ST mean "
                      f"{statistics.mean(r['c2st']):.3f} ({', '.join(f'{s:.3f}' for s in r['c2st'])}); "
                      f"{r['epochs']} epochs, training {r['train_seconds']:.1f} s wall / "
                      f"{r['train_cpu_seconds']:.1f} s CPU")
    return records


if __name__ == "__main__":
    main()

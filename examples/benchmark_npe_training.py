"""Compare NPE training settings by held-out posterior log-density (cheap and low-noise, no C2ST).

For a task and budget, trains NPE once per setting on the same simulations and reports the mean
negative log posterior density ``-log q(theta | x)`` on 20,000 fresh ``(theta, x)`` pairs (lower is
better: it is the expected KL divergence to the true posterior up to a constant), training seconds and
epochs. This is how the defaults (tanh conditioners, the batch size rule) were chosen.

With ``--sbi`` (and the ``sbi`` package installed) it also trains sbi's NPE (default settings;
``--sbi-estimator nsf`` for its spline flow, MAF otherwise) on the same simulations and scores it on
the same pairs. sbi's density is the flow's density in
theta space without its leakage correction (mass outside a bounded prior), which can only favour sbi.
``--seeds 0 1 2`` repeats everything (simulations, test pairs, training) per seed.

Usage:
    python examples/benchmark_npe_training.py --task two_moons --simulations 10000 \\
        --settings batch_size=256 batch_size=128 batch_size=256,patience=40 activation=relu
    python examples/benchmark_npe_training.py --task slcp --simulations 10000 --seeds 0 1 2 \\
        --settings hidden_features=50x50 hidden_features=100x100
    python examples/benchmark_npe_training.py --task slcp --simulations 10000 --settings "" --sbi --seeds 0 1 2
    python examples/benchmark_npe_training.py --task two_moons --simulations 1000 --settings "" compile=True
    python examples/benchmark_npe_training.py --task two_moons --settings device=cuda device=cuda,ensemble=5

CPU seconds count child processes too (running or finished): ``compile=True`` compiles in inductor's
worker processes.
"""

from __future__ import annotations

import argparse
import inspect
import json
import time

import torch

import simulators
from sbiflows import NPE
from sbiflows.simulate import simulate_from_prior

from benchmark_npe import _NullTracker, warm_up  # examples/ is on sys.path when this runs as a script

#: Setting keys that go to ``NPE(...)`` (its keyword parameters); the rest go to ``NPE.fit``.
NPE_OPTIONS = set(inspect.signature(NPE.__init__).parameters) - {"self", "prior"}


def parse_setting(text: str) -> dict[str, object]:
    """``"batch_size=64,learning_rate=5e-4"`` -> ``{"batch_size": 64, "learning_rate": 0.0005}``.

    Values become ints or floats where they parse as such, ``None`` becomes None (e.g.
    ``drop_patience=None``), anything else stays a string (e.g. ``activation=relu``);
    ``hidden_features=100x100`` becomes ``(100, 100)``.
    """
    options: dict[str, object] = {}
    for part in filter(None, text.split(",")):
        key, _, value = part.partition("=")
        if key == "hidden_features":
            options[key] = tuple(int(h) for h in value.split("x"))
            continue
        if value in ("None", "True", "False"):
            options[key] = {"None": None, "True": True, "False": False}[value]
            continue
        for kind in (int, float, str):
            try:
                options[key] = kind(value)
                break
            except ValueError:
                continue
    return options


def fit_setting(prior, text: str, theta, x, *, seed: int):
    """Train NPE on ``(theta, x)`` with one setting's options (NPE options to ``NPE``, the rest to ``fit``)."""
    options = parse_setting(text)
    npe_options = {k: v for k, v in options.items() if k in NPE_OPTIONS}
    fit_options = {k: v for k, v in options.items() if k not in NPE_OPTIONS}
    return NPE(prior, **npe_options).fit(theta, x, seed=seed, progress=False, **fit_options)


def main(argv: list[str] | None = None) -> None:
    """Run the comparison; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="two_moons", choices=simulators.names())
    parser.add_argument("--simulations", type=int, default=10_000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="one full run per seed")
    parser.add_argument("--settings", nargs="*", default=["batch_size=256", "batch_size=128"],
                        help="comma-separated NPE / fit options per setting; '' is the defaults")
    parser.add_argument("--sbi", action="store_true", help="also train and score sbi's NPE")
    parser.add_argument("--sbi-estimator", default="maf", help="sbi's density_estimator (maf, nsf, ...)")
    parser.add_argument("--test-size", type=int, default=20_000,
                        help="fresh (theta, x) pairs scored (a truncated-space posterior estimates its mass inside the "
                        "support from 8,192 draws per pair, so keep this small for it)")
    parser.add_argument("--json", default=None, help="append one JSON record per setting and seed to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    task = simulators.get(args.task)
    warm_up(task, with_sbi=args.sbi)
    warm_up_devices(task, args.settings)
    for seed in args.seeds:
        test = simulate_from_prior(task.simulate, task.prior, args.test_size, seed=seed + 1234)
        test_theta, test_x = test.theta[test.valid], test.x[test.valid]
        sims = simulate_from_prior(task.simulate, task.prior, args.simulations, seed=seed)
        theta, x = sims.theta[sims.valid], sims.x[sims.valid]
        record = {"task": args.task, "simulations": args.simulations, "seed": seed}
        for text in args.settings:
            start, cpu_start = time.perf_counter(), tree_cpu_seconds()
            posterior = fit_setting(task.prior, text, theta, x, seed=seed)
            seconds, cpu_seconds = time.perf_counter() - start, tree_cpu_seconds() - cpu_start
            with torch.no_grad():
                log_q = posterior.log_prob_batched(test_theta[None], test_x)[0]
            emit(args.json, {**record, "setting": text or "defaults", "heldout_nll": round(-log_q.mean().item(), 4),
                             "train_seconds": round(seconds, 1), "train_cpu_seconds": round(cpu_seconds, 1),
                             "epochs": posterior.history.epochs, "best_epoch": posterior.history.best_epoch,
                             "step_drop_epochs": posterior.history.step_drop_epochs,
                             "batch_size": posterior.history.batch_size,
                             "learning_rate": posterior.history.learning_rate,
                             "transforms": posterior.config["transforms"], "test_size": len(test_theta)})
        if args.sbi:
            emit(args.json, {**record, **run_sbi(task, theta, x, test_theta, test_x, seed=seed,
                                                    density_estimator=args.sbi_estimator)})


def warm_up_devices(task, settings: list[str]) -> None:
    """One untimed epoch on each device other than the CPU that a setting names (``device=cuda``): the first
    CUDA call of a process creates its context and loads its kernels, which no setting should pay for."""
    devices = {parse_setting(text).get("device") for text in settings} - {None, "cpu"}
    if devices:
        sims = simulate_from_prior(task.simulate, task.prior, 200, seed=999_999)
        for device in sorted(devices):
            NPE(task.prior, device=device).fit(sims.theta[sims.valid], sims.x[sims.valid], max_epochs=1,
                                               progress=False)


def tree_cpu_seconds() -> float:
    """CPU seconds of this process and its child processes, running or finished (``compile=True`` compiles
    in inductor's worker processes and runs the C++ compiler as their children)."""
    import resource

    import psutil

    finished = resource.getrusage(resource.RUSAGE_CHILDREN)
    running = 0.0
    for child in psutil.Process().children(recursive=True):
        try:
            times = child.cpu_times()  # with the children it has waited for (g++ under inductor's workers)
            running += times.user + times.system + times.children_user + times.children_system
        except psutil.Error:  # ended since it was listed: counted once it is waited for
            pass
    return time.process_time() + finished.ru_utime + finished.ru_stime + running


def emit(path: str | None, record: dict) -> None:
    """Print ``record`` as one JSON line and append it to ``path`` if given."""
    line = json.dumps(record)
    print(line, flush=True)
    if path:
        with open(path, "a") as stream:
            stream.write(line + "\n")


def run_sbi(task, theta, x, test_theta, test_x, *, seed: int, density_estimator: str = "maf") -> dict[str, object]:
    """Train sbi's NPE (``density_estimator``, defaults) on the same rows and score its flow on the same pairs."""
    from sbi.inference import NPE as SbiNPE

    torch.manual_seed(seed)
    inference = SbiNPE(prior=task.prior, density_estimator=density_estimator, show_progress_bars=False,
                       tracker=_NullTracker())
    start, cpu_start = time.perf_counter(), time.process_time()
    estimator = inference.append_simulations(theta, x).train()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    with torch.no_grad():
        log_q = torch.cat([estimator.log_prob(t[None], c)[0] for t, c in zip(test_theta.split(5000), test_x.split(5000))])
    return {"setting": f"sbi {density_estimator}", "heldout_nll": round(-log_q.mean().item(), 4),
            "train_seconds": round(seconds, 1), "train_cpu_seconds": round(cpu_seconds, 1),
            "epochs": len(inference.summary["epoch_durations_sec"]), "test_size": len(test_theta)}


if __name__ == "__main__":
    main()

"""The main job behind ``sbiflows fit``: simulate, train, sample, check calibration, write a report.

Everything a run paid for is written as soon as it exists: every chunk of simulations as it finishes
(into the stores ``simulations.zarr`` and ``calibration.zarr``), the posterior right after training,
the samples right after sampling. Rerunning the same command into the same folder resumes: it reads
the finished simulations, and reuses the posterior and the samples when ``resume.json`` says they were
made with the same settings, so a kill or Ctrl-C at any step loses at most the step in progress.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from torch import Tensor
from torch.distributions import Distribution

import sbiflows
from sbiflows import diagnostics, plots
from sbiflows.npe import NPE
from sbiflows.report import jsonable, write_markdown
from sbiflows.seeding import derive_seed
from sbiflows.serialization import load
from sbiflows.simulate import simulate, simulate_from_prior
from sbiflows.training import MAX_EPOCHS


def run(
    *,
    name: str,
    task,
    simulator: Callable,
    prior: Distribution,
    observations: list[tuple[str, Tensor, Tensor | None]],
    out: Path,
    simulations: int = 10_000,
    estimator: str = "maf",
    seed: int = 0,
    num_samples: int = 10_000,
    calibration_datasets: int = 500,
    calibration_samples: int = 1000,
    c2st_samples: int = 10_000,
    reference: bool = True,
    max_epochs: int = MAX_EPOCHS,
    progress: bool = True,
    log: Callable[[str], None] = print,
    batch_size: int = 100,
    workers: int | None = None,
    executor: object = None,
    timeout: float | None = None,
) -> dict:
    """Run the whole job (resuming from what ``out`` holds) and write its outputs; returns the report.

    ``batch_size``, ``workers``, ``executor`` and ``timeout`` go to :func:`sbiflows.simulate` for every
    simulation of the run (training set, posterior predictive, calibration).

    Outputs: ``posterior.pt`` (load with :func:`sbiflows.load`), ``simulations.zarr`` and
    ``calibration.zarr`` (load with :func:`sbiflows.load_simulations`), ``resume.json``,
    ``samples.npz`` (posterior samples per observation), ``corner.png`` (and ``corner_<name>.png``
    per further observation), ``sbc_ranks.png``, ``coverage.png``, ``tarp.png``, ``report.md`` and
    ``report.json``.

    Example:
        >>> import simulators, tempfile
        >>> task = simulators.get("two_moons")
        >>> report = run(name="two_moons", task=task, simulator=task.simulate, prior=task.prior,
        ...              observations=[("obs1", task.observation(1), task.true_parameters(1))],
        ...              out=Path(tempfile.mkdtemp()), simulations=500, num_samples=500,
        ...              calibration_datasets=100, calibration_samples=100, c2st_samples=500,
        ...              max_epochs=3, progress=False, log=lambda s: None)
        >>> sorted(report["calibration"])
        ['coverage', 'sbc', 'tarp']
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    engine = {"batch_size": batch_size, "workers": workers, "executor": executor, "timeout": timeout}
    resume = _Resume(out / "resume.json")
    timings: dict[str, float] = {}
    report: dict = {
        "name": name,
        "simulations": simulations,
        "estimator": estimator,
        "seed": seed,
        "versions": _versions(),
    }

    log(f"[1/5] simulating {simulations} parameter sets from the prior (store: {out / 'simulations.zarr'})")
    start = time.perf_counter()
    sims = simulate_from_prior(simulator, prior, simulations, seed=seed, progress=progress,
                               store=out / "simulations.zarr", **engine)
    timings["simulate"] = time.perf_counter() - start
    report["simulation_summary"] = sims.summary()
    report["invalid_simulations"] = sims.num_invalid
    if sims.reused:
        log(f"      reused {sims.reused} finished simulations from the store")
    log(f"      {sims.summary()}")

    trained = {"simulations": simulations, "seed": seed, "estimator": estimator, "max_epochs": max_epochs,
               "batch_size": batch_size, "simulator": report["name"]}
    start = time.perf_counter()
    if resume.matches("train", trained, out / "posterior.pt"):
        log(f"[2/5] reusing the posterior trained by an earlier run ({out / 'posterior.pt'})")
        posterior = load(out / "posterior.pt", prior=prior)
    else:
        log(f"[2/5] training NPE ({estimator})")
        posterior = NPE(prior, estimator=estimator).fit(
            sims.theta, sims.x, seed=seed, max_epochs=max_epochs, progress=progress
        )
        posterior.save(out / "posterior.pt", allow_unsaved_prior=True)  # reloaded with load(prior=prior) above
        resume.done("train", trained)
    timings["train"] = time.perf_counter() - start
    history = posterior.history
    report["training"] = {
        "epochs": history.epochs,
        "best_epoch": history.best_epoch,
        "best_validation_loss": history.best_validation_loss,
        "stopped_early": history.stopped_early,
        "diverged": history.diverged,
        "batch_size": history.batch_size,
        "learning_rate": history.learning_rate,
        "train_loss": history.train_loss,
        "validation_loss": history.validation_loss,
    }
    log(f"      {history.epochs} epochs" + (f" in {timings['train']:.1f} s" if "train" in resume.fresh else "")
        + f", best validation loss {history.best_validation_loss:.3f}")

    start = time.perf_counter()
    xs = torch.stack([x.reshape(-1) for _, x, _ in observations])
    sampled = dict(trained, num_samples=num_samples, observations={k: x.reshape(-1).tolist() for k, x, _ in observations})
    if resume.matches("sample", sampled, out / "samples.npz"):
        log(f"[3/5] reusing the posterior samples of an earlier run ({out / 'samples.npz'})")
        with np.load(out / "samples.npz") as stored:
            samples = torch.stack([torch.from_numpy(stored[key]) for key, _, _ in observations], dim=1)
    else:
        log(f"[3/5] sampling {num_samples} posterior draws for {len(observations)} observation(s)")
        samples = posterior.sample_batched(num_samples, xs, seed=seed)  # (n, B, D): one batched call
        np.savez_compressed(out / "samples.npz", **{key: samples[:, b].numpy() for b, (key, _, _) in enumerate(observations)})
        resume.done("sample", sampled)
    timings["sample"] = time.perf_counter() - start

    log("[4/5] per-observation checks" + (" (C2ST against the reference posterior)" if reference else ""))
    start = time.perf_counter()
    per_observation = []
    labels = list(getattr(task, "parameter_names", [])) or None

    def as_tensor_simulator(theta: Tensor) -> Tensor:
        """The user's simulator as tensor -> float32 tensor, seeded, failures as NaN rows."""
        return simulate(simulator, theta, seed=derive_seed(seed, "predictive"), **engine).x.to(torch.float32)

    for b, (key, x_o, truth) in enumerate(observations):
        entry: dict = {"name": key, "observation": x_o.reshape(-1).tolist()}
        if truth is not None:
            entry["true_parameters"] = truth.tolist()
        ref = None
        if reference:
            index = int(key.removeprefix("obs"))
            ref = task.reference_posterior(index, num_samples=c2st_samples)
            result = diagnostics.c2st(ref, samples[:c2st_samples, b], seed=seed)
            entry["c2st"] = result.accuracy
            log(f"      {key}: C2ST {result.accuracy:.3f}")
        predictive = diagnostics.posterior_predictive(
            posterior, as_tensor_simulator, x_o.reshape(-1), num_samples=1000, seed=seed
        )
        entry["predictive"] = {"passed": predictive.passed, "summary": str(predictive)}
        # quiet: corner logs "Too few points to create valid contours" for very concentrated panels
        figure = plots.corner(samples[:, b], truths=truth, reference=ref, labels=labels, quiet=True)
        figure.savefig(out / ("corner.png" if b == 0 else f"corner_{key}.png"), dpi=100)
        plt.close(figure)
        per_observation.append(entry)
    timings["observation_checks"] = time.perf_counter() - start
    report["observations"] = per_observation
    if reference:
        c2sts = [e["c2st"] for e in per_observation]
        report["mean_c2st"] = float(np.mean(c2sts))

    log(f"[5/5] calibration on {calibration_datasets} fresh simulations x {calibration_samples} posterior draws")
    start = time.perf_counter()
    fresh = simulate_from_prior(simulator, prior, calibration_datasets, seed=derive_seed(seed, "calibration"),
                                store=out / "calibration.zarr", progress=progress, **engine)
    if fresh.reused:
        log(f"      reused {fresh.reused} calibration simulations from the store")
    valid = fresh.valid
    theta_c, x_c = fresh.theta[valid], fresh.x[valid]
    options = {"num_posterior_samples": calibration_samples, "seed": seed, "theta": theta_c, "x": x_c}
    sbc_names = {"parameter_names": labels} if labels else {}
    checks = {
        "sbc": diagnostics.sbc(posterior, prior, simulator, **options, **sbc_names),
        "coverage": diagnostics.expected_coverage(posterior, prior, simulator, **options),
        "tarp": diagnostics.tarp(posterior, prior, simulator, **options),
    }
    timings["calibration"] = time.perf_counter() - start
    report["calibration"] = {key: {"passed": bool(r.passed), "summary": str(r), "result": jsonable(r)} for key, r in checks.items()}
    for key, figure in (
        ("sbc_ranks", plots.sbc_ranks(checks["sbc"], labels=labels)),
        ("coverage", plots.coverage(checks["coverage"])),
        ("tarp", plots.tarp(checks["tarp"])),
    ):
        figure.savefig(out / f"{key}.png", dpi=100)
        plt.close(figure)
    for key, r in checks.items():
        log(f"      {key}: {'passed' if r.passed else 'FAILED'}")

    report["timings_seconds"] = timings
    (out / "report.json").write_text(json.dumps(jsonable(report), indent=2))
    write_markdown(report, out / "report.md")
    log(f"done: report in {(out / 'report.md').resolve()}")
    return report


class _Resume:
    """``resume.json``: the settings each finished step (training, sampling) was made with."""

    def __init__(self, path: Path):
        self.path = path
        self.fresh: set[str] = set()  # steps run (not reused) by this run
        try:
            self.steps = json.loads(path.read_text()) if path.exists() else {}
        except ValueError:
            self.steps = {}

    def matches(self, step: str, settings: dict, output: Path) -> bool:
        """Whether ``step`` finished with these settings and its output is still there."""
        return output.exists() and self.steps.get(step) == jsonable(settings)

    def done(self, step: str, settings: dict) -> None:
        """Record that ``step`` finished with these settings (written atomically)."""
        self.steps[step] = jsonable(settings)
        self.fresh.add(step)
        temporary = self.path.with_suffix(".tmp")
        temporary.write_text(json.dumps(self.steps, indent=1))
        temporary.replace(self.path)


def _versions() -> dict[str, str]:
    import scipy

    return {
        "sbiflows": sbiflows.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "platform": platform.platform(),
    }

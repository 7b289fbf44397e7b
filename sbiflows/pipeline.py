"""The main job behind ``sbiflows fit``: simulate, train, sample, check calibration, write a report.

Everything a run paid for is written as soon as it exists (the simulations right after simulating, the
posterior right after training), so a failure later in the run loses nothing.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402
from torch.distributions import Distribution  # noqa: E402

import sbiflows  # noqa: E402
from sbiflows import diagnostics, plots  # noqa: E402
from sbiflows.npe import NPE  # noqa: E402
from sbiflows.report import jsonable, write_markdown  # noqa: E402
from sbiflows.simulate import simulate, simulate_from_prior  # noqa: E402


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
    max_epochs: int = 500,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """Run the whole job and write its outputs into ``out``; returns the report as a dictionary.

    Outputs: ``posterior.pt`` (load with :func:`sbiflows.load`), ``simulations.npz``,
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
    timings: dict[str, float] = {}
    report: dict = {
        "name": name,
        "simulations": simulations,
        "estimator": estimator,
        "seed": seed,
        "versions": _versions(),
    }

    log(f"[1/5] simulating {simulations} parameter sets from the prior")
    start = time.perf_counter()
    sims = simulate_from_prior(simulator, prior, simulations, seed=seed, progress=progress)
    timings["simulate"] = time.perf_counter() - start
    np.savez_compressed(out / "simulations.npz", theta=sims.theta.numpy(), x=sims.x.numpy())
    report["simulation_summary"] = sims.summary()
    report["invalid_simulations"] = sims.num_invalid
    log(f"      {sims.summary()}")

    log(f"[2/5] training NPE ({estimator})")
    start = time.perf_counter()
    posterior = NPE(prior, estimator=estimator).fit(
        sims.theta, sims.x, seed=seed, max_epochs=max_epochs, progress=progress
    )
    timings["train"] = time.perf_counter() - start
    posterior.save(out / "posterior.pt")
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
    log(f"      {history.epochs} epochs in {timings['train']:.1f} s, best validation loss "
        f"{history.best_validation_loss:.3f}")

    log(f"[3/5] sampling {num_samples} posterior draws for {len(observations)} observation(s)")
    start = time.perf_counter()
    xs = torch.stack([x.reshape(-1) for _, x, _ in observations])
    samples = posterior.sample_batched(num_samples, xs, seed=seed)  # (n, B, D): one batched call
    timings["sample"] = time.perf_counter() - start
    np.savez_compressed(out / "samples.npz", **{key: samples[:, b].numpy() for b, (key, _, _) in enumerate(observations)})

    log("[4/5] per-observation checks" + (" (C2ST against the reference posterior)" if reference else ""))
    start = time.perf_counter()
    per_observation = []
    labels = list(getattr(task, "parameter_names", [])) or None

    def as_tensor_simulator(theta: Tensor) -> Tensor:
        """The user's simulator as tensor -> float32 tensor, seeded, failures as NaN rows."""
        return simulate(simulator, theta, seed=seed + 2).x

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
    fresh = simulate_from_prior(simulator, prior, calibration_datasets, seed=seed + 1)
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

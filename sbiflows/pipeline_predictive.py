"""The posterior predictive check of ``sbiflows fit``, per observation: stored, resumable, never a crash.

The check simulates :data:`PREDICTIVE_SAMPLES` draws of the posterior (:func:`sbiflows.diagnostics.
posterior_predictive`). Those simulations go to ``predictive/<observation>.zarr`` chunk by chunk, so a rerun
with the same posterior simulates none of them again. A simulator that fails at the posterior's draws
makes the check "not decided", with the reason, instead of stopping the run before its calibration and
report.
"""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from sbiflows import diagnostics
from sbiflows.diagnostics.predictive import set_statistic_names
from sbiflows.seeding import derive_seed
from sbiflows.simulate import SimulationError, StoreMismatchError, simulate

__all__ = ["PREDICTIVE", "PREDICTIVE_SAMPLES", "predictive_entry"]

#: Posterior-predictive simulations per observation.
PREDICTIVE_SAMPLES = 1000
#: The folder of the predictive checks' simulation stores, one per observation.
PREDICTIVE = "predictive"


def predictive_simulator(job, store: Path, log: Callable[[str], None]) -> Callable[[Tensor], Tensor]:
    """The user's simulator as tensor -> float32 tensor for a predictive check: seeded, failures as NaN rows,
    each chunk kept in ``store`` as it finishes. A store of another posterior's draws (it was retrained) is
    replaced. After a call, the returned function's ``valid`` attribute counts the valid rows."""

    def simulator(theta: Tensor) -> Tensor:
        seed = derive_seed(job.seed, "predictive")
        with warnings.catch_warnings():  # their failures are logged below, saying which simulations they are
            warnings.filterwarnings("ignore", message=r"\d+ simulations in ", category=UserWarning)
            try:
                result = simulate(job.simulator, theta, seed=seed, store=store, **job.engine)
            except StoreMismatchError:
                log(f"      {store.stem}: the posterior changed since its predictive simulations; simulating again")
                shutil.rmtree(store)
                result = simulate(job.simulator, theta, seed=seed, store=store, **job.engine)
        result.padded_trials = job.embedding == "set"  # NaN-padded trials of a set are not failures
        if result.reused:
            log(f"      {store.stem}: reused {result.reused} predictive simulations from {store.parent.name}/")
        if result.failures or result.num_invalid:
            log(f"      {store.stem}: posterior predictive simulations: {result.summary()}")
        simulator.valid = int(result.valid.sum())
        return result.x.to(torch.float32)

    simulator.valid = None
    return simulator


def predictive_entry(job, posterior, observation, log: Callable[[str], None]) -> dict:
    """The report's ``predictive`` entry of one observation: ``passed`` (True, False, or None when the check
    could not decide) and a one-line ``summary``."""
    simulator = predictive_simulator(job, Path(job.out) / PREDICTIVE / f"{observation.name}.zarr", log)
    sets = job.embedding == "set" and observation.x.ndim == 2  # compared by their statistics
    x_dim = len(set_statistic_names(observation.x.shape[-1])) if sets else observation.x.numel()

    def check(metric: str) -> dict:
        result = diagnostics.posterior_predictive(posterior, simulator, observation.x, num_samples=PREDICTIVE_SAMPLES,
                                                  seed=job.seed, metric=metric)
        log(f"      {observation.name}: posterior predictive " + ("typical" if result.passed else "FLAGGED (atypical)")
            + f" ({metric} distance {result.distance:.3g}, p = {result.distance_pvalue:.3g})")
        return {"passed": result.passed, "summary": str(result), "distance": float(result.distance),
                "pvalue": float(result.distance_pvalue), "metric": metric}

    # Mahalanobis needs many more draws than values; large (structured) x is compared value by value
    metric = "mahalanobis" if x_dim < PREDICTIVE_SAMPLES // 2 else "standardized"
    try:
        return check(metric)
    except SimulationError as error:
        return _undecided(observation, log, f"the simulator failed at the posterior's draws ({error})")
    except ValueError:
        if simulator.valid is None:  # raised before simulating: a real bug, not the user's simulator
            raise
        if simulator.valid < 2:
            return _undecided(observation, log, f"only {simulator.valid} of {PREDICTIVE_SAMPLES} predictive "
                                                "simulations are valid")
        if metric == "mahalanobis" and simulator.valid <= x_dim:  # too few valid rows for a covariance of x:
            return check("standardized")  # value by value, on the same (stored) simulations
        raise


def _undecided(observation, log: Callable[[str], None], why: str) -> dict:
    log(f"      {observation.name}: posterior predictive check not decided: {why}")
    return {"passed": None, "summary": f"not decided: {why}"}

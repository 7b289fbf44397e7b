"""sbiflows: simulation-based inference with normalizing flows, built from first principles."""

__version__ = "0.1.0"

from sbiflows.npe import NPE  # noqa: E402
from sbiflows.posterior import Posterior, load  # noqa: E402
from sbiflows.priors import IndependentPrior, box_uniform  # noqa: E402
from sbiflows.sequential import TSNPE  # noqa: E402
from sbiflows.simulate import (  # noqa: E402  (binds the name sbiflows.simulate to the function)
    SimulationError,
    SimulationInterrupted,
    SimulationResult,
    load_simulations,
    simulate,
    simulate_from_prior,
)
from sbiflows.truncated_space import LeakageError  # noqa: E402

__all__ = [
    "NPE",
    "TSNPE",
    "IndependentPrior",
    "LeakageError",
    "Posterior",
    "SimulationError",
    "SimulationInterrupted",
    "SimulationResult",
    "__version__",
    "box_uniform",
    "load",
    "load_simulations",
    "simulate",
    "simulate_from_prior",
]

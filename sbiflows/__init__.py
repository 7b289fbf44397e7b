"""sbiflows: simulation-based inference with normalizing flows, built from first principles."""

__version__ = "0.1.0"

from sbiflows.npe import NPE  # noqa: E402
from sbiflows.posterior import Posterior  # noqa: E402
from sbiflows.serialization import load  # noqa: E402

__all__ = ["NPE", "Posterior", "__version__", "load"]

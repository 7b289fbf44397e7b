"""The `Task` base class: prior, simulator, published observations and reference posterior.

A task bundles what a benchmark needs: a prior over parameters ``theta``, a vectorized simulator
``x ~ p(x | theta)``, the ten fixed observations published with the sbibm benchmark (Lueckmann et al.
2021), a tractable ``log_likelihood`` and samples of the reference posterior, cached on disk.

Subclasses implement ``_prior``, ``_simulate`` and ``log_likelihood`` and, where the posterior is not
available in closed form, ``_reference_posterior`` (typically MCMC on ``log_likelihood``).
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
from functools import cached_property
from importlib import resources
from pathlib import Path

import torch
from torch import Tensor
from torch.distributions import Distribution

#: Bump when a reference sampler changes, so that stale cache files are recomputed.
CACHE_VERSION = 1
NUM_OBSERVATIONS = 10


def cache_dir() -> Path:
    """Directory for cached reference-posterior samples.

    ``$SBIFLOWS_CACHE`` if set, else ``$XDG_CACHE_HOME/sbiflows``, else ``~/.cache/sbiflows``.

    Example:
        >>> isinstance(cache_dir(), Path)
        True
    """
    if os.environ.get("SBIFLOWS_CACHE"):
        return Path(os.environ["SBIFLOWS_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sbiflows"


def read_csv_row(folder: str, filename: str) -> Tensor:
    """Read the single data row of a packaged CSV file (with a header) as a float32 tensor.

    Args:
        folder: Path inside ``simulators/data``, e.g. ``"two_moons/1"``.
        filename: File name, e.g. ``"observation.csv"``.
    """
    text = resources.files("simulators").joinpath("data", *folder.split("/"), filename).read_text()
    rows = list(csv.reader(io.StringIO(text)))
    return torch.tensor([float(v) for v in rows[1]], dtype=torch.float32)


def data_path(*parts: str):
    """A traversable path to a packaged data file, e.g. ``data_path("slcp", "distractor_gmm.npz")``."""
    return resources.files("simulators").joinpath("data", *parts)


class Task:
    """A simulation-based-inference benchmark task.

    Subclasses set the class attributes and implement the underscored hooks. All tensors are float32
    on the CPU; ``theta`` has shape ``(N, theta_dim)`` and ``x`` has shape ``(N, x_dim)``.

    Attributes:
        name: Registry name, e.g. ``"two_moons"``.
        theta_dim: Number of parameters.
        x_dim: Dimension of one simulation.
        parameter_names: Plot labels, one per parameter.
        data_folder: Folder under ``simulators/data`` with the published observations.
        observation_file: CSV with the observation in each ``<data_folder>/<i>/`` folder.
    """

    name: str = ""
    theta_dim: int = 0
    x_dim: int = 0
    parameter_names: tuple[str, ...] = ()
    data_folder: str = ""
    observation_file: str = "observation.csv"

    # ----------------------------------------------------------------------------------- hooks
    def _prior(self) -> Distribution:
        raise NotImplementedError(f"{type(self).__name__} must define its prior")

    def _simulate(self, theta: Tensor, generator: torch.Generator) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} must define its simulator")

    def log_likelihood(self, theta: Tensor, x: Tensor) -> Tensor:
        """log p(x | theta) for ``theta`` of shape (N, theta_dim) and ``x`` of (x_dim,) or (N, x_dim)."""
        raise NotImplementedError(f"{type(self).__name__} has no tractable likelihood")

    def _reference_posterior(self, i: int, num_samples: int, generator: torch.Generator) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no reference posterior sampler")

    # ------------------------------------------------------------------------------ public API
    @cached_property
    def prior(self) -> Distribution:
        """The prior over ``theta`` (a torch distribution with event shape ``(theta_dim,)``)."""
        return self._prior()

    def simulate(self, theta: Tensor, *, seed: int | None = None) -> Tensor:
        """Simulate one ``x`` per row of ``theta``.

        Args:
            theta: Parameters of shape ``(N, theta_dim)`` (a single ``(theta_dim,)`` vector is accepted
                and gives ``(1, x_dim)``).
            seed: Makes the simulation reproducible; ``None`` draws from torch's global generator.

        Returns:
            Simulations of shape ``(N, x_dim)``, float32. Failed simulations (ODE solver errors) are
            rows of NaN, which callers count and report.
        """
        theta = self._check_theta(theta)
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        generator = torch.Generator().manual_seed(int(seed))
        x = self._simulate(theta, generator)
        return x.to(torch.float32)

    def __call__(self, theta: Tensor) -> Tensor:
        """The task as a plain simulator: ``task(theta) -> x``."""
        return self.simulate(theta)

    def observation(self, i: int) -> Tensor:
        """The published observation number ``i`` (1..10), shape ``(x_dim,)``."""
        self._check_index(i)
        return read_csv_row(f"{self.data_folder}/{i}", self.observation_file)

    def true_parameters(self, i: int) -> Tensor:
        """The parameters that generated observation ``i`` (1..10), shape ``(theta_dim,)``."""
        self._check_index(i)
        return read_csv_row(f"{self.data_folder}/{i}", "true_parameters.csv")

    def reference_posterior(self, i: int, num_samples: int = 10_000, *, seed: int = 0) -> Tensor:
        """Samples of the reference posterior for observation ``i``, shape ``(num_samples, theta_dim)``.

        Closed-form posteriors are sampled directly; MCMC-based ones are computed once and cached in
        :func:`cache_dir` (a corrupt or outdated cache file is recomputed, never trusted).

        Args:
            i: Observation number, 1..10.
            num_samples: Number of samples to return.
            seed: Seed of the sampler.
        """
        self._check_index(i)
        if not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
        if not self.cache_reference:
            return self._reference_posterior(i, num_samples, torch.Generator().manual_seed(seed))
        path = cache_dir() / f"{self.name}_obs{i}_n{num_samples}_seed{seed}_v{CACHE_VERSION}.pt"
        cached = _load_cached(path, self.name, i, num_samples, self.theta_dim)
        if cached is not None:
            return cached
        samples = self._reference_posterior(i, num_samples, torch.Generator().manual_seed(seed))
        _save_cached(path, samples, self.name, i)
        return samples

    #: Whether reference samples are expensive (MCMC) and therefore cached on disk.
    cache_reference: bool = False

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, theta_dim={self.theta_dim}, x_dim={self.x_dim})"

    # ------------------------------------------------------------------------------- checking
    def _check_theta(self, theta: Tensor) -> Tensor:
        if not isinstance(theta, Tensor):
            raise TypeError(f"theta must be a torch.Tensor, got {type(theta).__name__}")
        if not theta.is_floating_point():
            raise TypeError(f"theta must have a floating dtype, got {theta.dtype}")
        if theta.ndim == 1:
            theta = theta.unsqueeze(0)
        if theta.ndim != 2 or theta.shape[1] != self.theta_dim:
            raise ValueError(
                f"theta must have shape (N, {self.theta_dim}) for task {self.name!r}, "
                f"got {tuple(theta.shape)}"
            )
        return theta.detach().to("cpu", torch.float32)

    def _check_likelihood_args(self, theta: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        """Validate ``log_likelihood(theta, x)`` arguments; ``theta`` keeps its graph and dtype.

        Returns ``theta`` as ``(N, theta_dim)`` and ``x`` as ``(N, x_dim)`` or ``(1, x_dim)`` (broadcasts),
        in ``theta``'s floating dtype.
        """
        for arg, value in (("theta", theta), ("x", x)):
            if not isinstance(value, Tensor):
                raise TypeError(f"{arg} must be a torch.Tensor, got {type(value).__name__}")
        if not theta.is_floating_point():
            raise TypeError(f"theta must have a floating dtype, got {theta.dtype}")
        theta = theta.unsqueeze(0) if theta.ndim == 1 else theta
        if theta.ndim != 2 or theta.shape[1] != self.theta_dim:
            raise ValueError(
                f"theta must have shape (N, {self.theta_dim}) or ({self.theta_dim},) for task {self.name!r}, "
                f"got {tuple(theta.shape)}"
            )
        x = x.unsqueeze(0) if x.ndim == 1 else x
        if x.ndim != 2 or x.shape[1] != self.x_dim or x.shape[0] not in (1, theta.shape[0]):
            raise ValueError(
                f"x must have shape ({self.x_dim},) or (N, {self.x_dim}) with N = {theta.shape[0]} rows of "
                f"theta, for task {self.name!r}; got {tuple(x.shape)}"
            )
        return theta, x.to(theta.device, theta.dtype)

    @staticmethod
    def _check_index(i: int) -> None:
        if isinstance(i, bool) or not isinstance(i, int) or not 1 <= i <= NUM_OBSERVATIONS:
            raise ValueError(f"observation number must be an int in 1..{NUM_OBSERVATIONS}, got {i!r}")


def _digest(samples: Tensor) -> str:
    return hashlib.sha256(samples.contiguous().numpy().tobytes()).hexdigest()


def _load_cached(path: Path, name: str, i: int, num_samples: int, theta_dim: int) -> Tensor | None:
    if not path.exists():
        return None
    try:
        blob = torch.load(path, weights_only=True)
        samples = blob["samples"]
        ok = (
            blob["version"] == CACHE_VERSION
            and blob["task"] == name
            and blob["observation"] == i
            and tuple(samples.shape) == (num_samples, theta_dim)
            and blob["sha256"] == _digest(samples)
            and bool(torch.isfinite(samples).all())
        )
    except Exception:  # noqa: BLE001 - any unreadable file is recomputed
        return None
    return samples if ok else None


def _save_cached(path: Path, samples: Tensor, name: str, i: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = {
        "version": CACHE_VERSION,
        "task": name,
        "observation": i,
        "samples": samples.contiguous(),
        "sha256": _digest(samples),
    }
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(blob, tmp)
    os.replace(tmp, path)

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
import json
import os
import re
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.distributions import Distribution

from simulators.mcmc.slice import show_progress

from sbiflows.seeding import derive_seed

#: Stream tag of the simulator noise (see :func:`sbiflows.seeding.derive_seed`).
_NOISE_STREAM = 0x5E1A

if TYPE_CHECKING:
    from simulators.mcmc import Diagnostics

#: Bump when a reference sampler changes, so that stale cache files are recomputed.
CACHE_VERSION = 2
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
        structure: The shape of one simulation as :meth:`structured` lays it out for an embedding net
            (empty: flat, ``(x_dim,)``), e.g. ``(channels, time)`` or ``(trials, features)``.
        default_embedding: The :data:`sbiflows.embeddings.EMBEDDINGS` name made for that structure
            (``"none"``: the flat x goes to the flow as it is); ``sbiflows fit``'s default.
    """

    name: str = ""
    theta_dim: int = 0
    x_dim: int = 0
    structure: tuple[int, ...] = ()
    default_embedding: str = "none"
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
                The noise generator is seeded with a seed *derived* from ``seed``, so that
                ``torch.manual_seed(s); theta = prior.sample(...); simulate(theta, seed=s)`` does not
                reuse the prior's random stream as noise (that made ``x = 2 * theta`` exactly).

        Returns:
            Simulations of shape ``(N, x_dim)``, float32. Failed simulations (ODE solver errors) and
            rows of non-finite ``theta`` are rows of NaN, which callers count and report.
        """
        theta = self._check_theta(theta)
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        generator = torch.Generator().manual_seed(derive_seed(int(seed), _NOISE_STREAM))
        finite = torch.isfinite(theta).all(-1)
        if bool(finite.all()):
            return self._simulate(theta, generator).to(torch.float32)
        # NaN/inf parameters give NaN rows, never data (bernoulli_glm turned NaN theta into all zeros)
        x = torch.full((len(theta), self.x_dim), float("nan"))
        if bool(finite.any()):
            x[finite] = self._simulate(theta[finite], generator).to(torch.float32)
        return x

    def __call__(self, theta: Tensor) -> Tensor:
        """The task as a plain simulator: ``task(theta) -> x``."""
        return self.simulate(theta)

    @property
    def x_shape(self) -> tuple[int, ...]:
        """The shape of one structured simulation (:attr:`structure`, or ``(x_dim,)`` for a flat task)."""
        return tuple(self.structure) or (self.x_dim,)

    def structured(self, x: Tensor) -> Tensor:
        """Flat simulations ``(..., x_dim)`` laid out as ``(..., *x_shape)`` for an embedding net.

        The layout carries the same information as ``x`` (the reference posteriors stay valid); this
        default reshapes the same values in order (``(channels, time)`` for a flat ``x`` stored channel
        after channel). Subclasses may add known constants, e.g. the design row of each trial.
        """
        if x.shape[-1:] != (self.x_dim,):
            raise ValueError(f"x must have shape (..., {self.x_dim}), got {tuple(x.shape)}")
        return x.reshape(*x.shape[:-1], *self.x_shape)

    def simulate_structured(self, theta: Tensor, *, seed: int | None = None) -> Tensor:
        """:meth:`simulate`, laid out by :meth:`structured`: ``(N, *x_shape)``."""
        return self.structured(self.simulate(theta, seed=seed))

    def observation(self, i: int) -> Tensor:
        """The published observation number ``i`` (1..10), shape ``(x_dim,)``."""
        self._check_index(i)
        return read_csv_row(f"{self.data_folder}/{i}", self.observation_file)

    def true_parameters(self, i: int) -> Tensor:
        """The parameters that generated observation ``i`` (1..10), shape ``(theta_dim,)``."""
        self._check_index(i)
        return read_csv_row(f"{self.data_folder}/{i}", "true_parameters.csv")

    def reference_posterior(self, i: int, num_samples: int = 10_000, *, seed: int = 0, progress: bool = False) -> Tensor:
        """Samples of the reference posterior for observation ``i``, shape ``(num_samples, theta_dim)``.

        Closed-form posteriors are sampled directly. MCMC-based ones are computed once and cached in
        :func:`cache_dir`, together with the MCMC settings (``mcmc_options``) and the convergence
        diagnostics. A cache file is used only if it is intact (checksum), from this
        :data:`CACHE_VERSION`, for the same settings and seed, and its run passed the convergence
        checks; anything else is recomputed, never trusted. A request for fewer samples than a valid
        cache file holds returns the first ``num_samples`` of its (randomly ordered) samples, so the
        samples returned for a given seed can depend on which files the cache already holds.
        :attr:`last_diagnostics` then holds the diagnostics of the run (cached or new).

        Args:
            i: Observation number, 1..10.
            num_samples: Number of samples to return.
            seed: Seed of the sampler.
            progress: Show progress bars while MCMC runs (a cached or closed-form posterior needs none).

        Raises:
            ValueError: On a bad observation number or sample count.
        """
        self._check_index(i)
        if not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
        if not self.cache_reference:
            return self._reference_posterior(i, num_samples, torch.Generator().manual_seed(seed))
        settings = self.reference_settings()
        key = CacheKey(self.name, i, seed, settings, self.theta_dim)
        cached = key.load(num_samples)
        if cached is not None:
            samples, self.last_diagnostics = cached
            return samples
        self.last_diagnostics = None
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # many tiny batched ops: a second thread only adds synchronisation
        try:  # many tiny batched ops: one thread (see sbiflows.threads)
            with show_progress(progress):
                samples = self._reference_posterior(i, num_samples, torch.Generator().manual_seed(seed))
        finally:
            torch.set_num_threads(threads)
        if self.last_diagnostics is None:
            raise RuntimeError(f"{type(self).__name__}._reference_posterior must set last_diagnostics")
        key.save(samples, self.last_diagnostics)
        return samples

    def reference_settings(self) -> dict[str, Any]:
        """The settings that determine cached reference samples: ``mcmc_options`` without ``on_failure``
        (which only decides between an error and a warning)."""
        options = getattr(self, "mcmc_options", {})
        return {k: options[k] for k in sorted(options) if k != "on_failure"}

    #: Whether reference samples are expensive (MCMC) and therefore cached on disk.
    cache_reference: bool = False
    #: Convergence diagnostics of the latest MCMC reference posterior (``None`` before the first).
    last_diagnostics: Diagnostics | None = None

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


class CacheKey:
    """Where and how MCMC reference samples of one task, observation, seed and settings are cached.

    Files are named ``<task>_obs<i>_n<num_samples>_seed<seed>_v<CACHE_VERSION>_<settings hash>.pt`` and
    hold the samples, their SHA-256, the settings and the :class:`simulators.mcmc.Diagnostics`.

    Args:
        task: Task name.
        observation: Observation number.
        seed: Seed of the sampler.
        settings: MCMC settings (JSON-serializable), see :meth:`Task.reference_settings`.
        theta_dim: Parameter dimension, checked on load.
    """

    def __init__(self, task: str, observation: int, seed: int, settings: dict[str, Any], theta_dim: int) -> None:
        self.task, self.observation, self.seed, self.theta_dim = task, observation, seed, theta_dim
        self.settings = settings
        text = json.dumps(settings, sort_keys=True)
        self.settings_hash = hashlib.sha256(text.encode()).hexdigest()[:12]

    def path(self, num_samples: int) -> Path:
        """The cache file for ``num_samples`` samples."""
        stem = f"{self.task}_obs{self.observation}_n{num_samples}_seed{self.seed}"
        return cache_dir() / f"{stem}_v{CACHE_VERSION}_{self.settings_hash}.pt"

    def load(self, num_samples: int) -> tuple[Tensor, Diagnostics] | None:
        """Valid cached samples: from the file for ``num_samples``, else the first ``num_samples`` of the
        smallest valid larger file; ``None`` if there is none."""
        pattern = re.compile(
            rf"{re.escape(self.task)}_obs{self.observation}_n(\d+)_seed{self.seed}_v{CACHE_VERSION}_{self.settings_hash}\.pt"
        )
        sizes = []
        if cache_dir().is_dir():
            for path in cache_dir().iterdir():
                match = pattern.fullmatch(path.name)
                if match and int(match.group(1)) >= num_samples:
                    sizes.append(int(match.group(1)))
        for size in sorted(sizes):
            loaded = self._load_file(self.path(size), size)
            if loaded is not None:
                samples, diagnostics = loaded
                return samples[:num_samples].clone(), diagnostics
        return None

    def _load_file(self, path: Path, num_samples: int) -> tuple[Tensor, Diagnostics] | None:
        from simulators.mcmc import Diagnostics

        try:
            blob = torch.load(path, weights_only=True)
            samples = blob["samples"]
            diagnostics = Diagnostics.from_dict(blob["diagnostics"])
            ok = (
                blob["version"] == CACHE_VERSION
                and blob["task"] == self.task
                and blob["observation"] == self.observation
                and blob["seed"] == self.seed
                and blob["settings"] == self.settings
                and tuple(samples.shape) == (num_samples, self.theta_dim)
                and blob["sha256"] == _digest(samples)
                and bool(torch.isfinite(samples).all())
                and diagnostics.converged is True
                and diagnostics.num_samples == num_samples
            )
        except Exception:  # noqa: BLE001 - any unreadable file is recomputed
            return None
        return (samples, diagnostics) if ok else None

    def save(self, samples: Tensor, diagnostics: Diagnostics) -> None:
        """Write ``samples`` with the settings and diagnostics (atomically: a temporary file, then a rename).

        A run that failed the convergence checks (``on_failure="warn"``) is saved too, for inspection,
        but :meth:`load` never returns it.
        """
        path = self.path(len(samples))
        path.parent.mkdir(parents=True, exist_ok=True)
        blob = {
            "version": CACHE_VERSION,
            "task": self.task,
            "observation": self.observation,
            "seed": self.seed,
            "settings": self.settings,
            "diagnostics": diagnostics.to_dict(),
            "samples": samples.contiguous(),
            "sha256": _digest(samples),
        }
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save(blob, tmp)
        os.replace(tmp, path)

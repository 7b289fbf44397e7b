"""The ten standard SBI benchmark tasks (sbibm, Lueckmann et al. 2021), in pure, vectorized Python.

Example:
    >>> import simulators
    >>> task = simulators.get("two_moons")
    >>> task.simulate(task.prior.sample((5,)), seed=0).shape
    torch.Size([5, 2])
"""

from __future__ import annotations

from importlib import import_module

from simulators.base import Task, cache_dir

# name -> "module:Class"; modules are imported on first use so that `import simulators` is cheap.
_REGISTRY: dict[str, str] = {
    "gaussian_linear": "simulators.gaussian_linear:GaussianLinear",
    "gaussian_linear_uniform": "simulators.gaussian_linear:GaussianLinearUniform",
    "two_moons": "simulators.two_moons:TwoMoons",
    "slcp": "simulators.slcp:SLCP",
    "slcp_distractors": "simulators.slcp:SLCPDistractors",
    "bernoulli_glm": "simulators.bernoulli_glm:BernoulliGLM",
    "bernoulli_glm_raw": "simulators.bernoulli_glm:BernoulliGLMRaw",
    "gaussian_mixture": "simulators.gaussian_mixture:GaussianMixture",
    "sir": "simulators.sir:SIR",
    "lotka_volterra": "simulators.lotka_volterra:LotkaVolterra",
}

__all__ = ["Task", "cache_dir", "get", "names"]


def names() -> list[str]:
    """The names of all registered tasks."""
    return list(_REGISTRY)


def get(name: str) -> Task:
    """A new instance of the task called ``name``.

    Raises:
        ValueError: If no task has that name (the message lists the valid names).
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown task {name!r}; valid names are: {', '.join(_REGISTRY)}")
    module, cls = _REGISTRY[name].split(":")
    return getattr(import_module(module), cls)()

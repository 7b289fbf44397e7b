"""Priors as a JSON-able spec: saved without pickle, rebuilt on any device (used by ``save``/``load``/``.to``).

:func:`prior_spec` / :func:`build_prior` turn a prior made of whitelisted classes (:data:`PRIOR_CLASSES`,
``Independent``, and :class:`~sbiflows.priors.IndependentPrior` of such marginals) into a JSON config plus
named tensors and back. Classes are only looked up in the whitelist, never imported by name.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.distributions import (
    Beta,
    Distribution,
    Exponential,
    Gamma,
    HalfNormal,
    Independent,
    Laplace,
    LogNormal,
    MultivariateNormal,
    Normal,
    Uniform,
)

from sbiflows.priors import IndependentPrior, prior_device

__all__ = ["PRIOR_CLASSES", "build_prior", "move_prior", "prior_spec"]

#: Distribution classes a prior spec may name, with the constructor arguments that rebuild them.
#: A subclass (e.g. sbi's ``BoxUniform``, an ``Independent``) is described as its nearest whitelisted
#: base class if the rebuilt prior has the same ``log_prob`` on a few of its samples (see :func:`prior_spec`).
PRIOR_CLASSES: dict[str, tuple[type[Distribution], tuple[str, ...]]] = {
    "Uniform": (Uniform, ("low", "high")),
    "Normal": (Normal, ("loc", "scale")),
    "LogNormal": (LogNormal, ("loc", "scale")),
    "MultivariateNormal": (MultivariateNormal, ("loc", "scale_tril")),
    "Beta": (Beta, ("concentration1", "concentration0")),
    "Gamma": (Gamma, ("concentration", "rate")),
    "Exponential": (Exponential, ("rate",)),
    "HalfNormal": (HalfNormal, ("scale",)),
    "Laplace": (Laplace, ("loc", "scale")),
}

#: Every class name a saved spec may hold.
KNOWN = ["Independent", "IndependentPrior", *PRIOR_CLASSES]


# ------------------------------------------------------------------------------------ prior specs
def prior_spec(prior: Distribution, prefix: str = "prior") -> tuple[dict, dict[str, Tensor]] | None:
    """A JSON config and named tensors that rebuild ``prior``, or None if it uses other classes.

    A subclass of ``Independent`` or of a class in :data:`PRIOR_CLASSES` (e.g. sbi's ``BoxUniform``)
    is described as that base class with the same parameters, provided the rebuilt prior has the
    same support, event shape and ``log_prob`` on a few samples; a subclass that changes the
    distribution (or cannot be checked, e.g. on the meta device) gives None, like any other class.

    Example:
        >>> spec, tensors = prior_spec(Independent(Uniform(torch.zeros(2), torch.ones(2)), 1))
        >>> spec["class"], spec["base"]["class"], sorted(tensors)
        ('Independent', 'Uniform', ['prior.base.high', 'prior.base.low'])
    """
    spec = _spec(prior, prefix)
    if spec is None or _is_whitelisted_exactly(prior) or _same_distribution(prior, build_prior(*spec)):
        return spec
    return None


def _spec(prior: Distribution, prefix: str) -> tuple[dict, dict[str, Tensor]] | None:
    """:func:`prior_spec` without the check that a subclass is rebuilt faithfully."""
    if type(prior) is IndependentPrior:  # exactly: a subclass may change sample or log_prob
        parts = [_spec(m, f"{prefix}.marginals.{i}") for i, m in enumerate(prior.marginals)]
        if any(part is None for part in parts):
            return None
        tensors = {k: v for part in parts for k, v in part[1].items()}
        return {"class": "IndependentPrior", "marginals": [part[0] for part in parts]}, tensors
    if isinstance(prior, Independent):
        base = _spec(prior.base_dist, f"{prefix}.base")
        if base is None:
            return None
        config = {"class": "Independent", "reinterpreted_batch_ndims": prior.reinterpreted_batch_ndims}
        return {**config, "base": base[0]}, base[1]
    by_class = {cls: (name, params) for name, (cls, params) in PRIOR_CLASSES.items()}
    for cls in type(prior).__mro__:  # the nearest whitelisted ancestor
        if cls in by_class:
            name, params = by_class[cls]
            tensors = {f"{prefix}.{p}": getattr(prior, p).detach().clone() for p in params}
            return {"class": name, "params": {p: f"{prefix}.{p}" for p in params}}, tensors
    return None


def _is_whitelisted_exactly(prior: Distribution) -> bool:
    """Whether ``prior`` and every nested base distribution are of exactly whitelisted classes."""
    if type(prior) is Independent:
        return _is_whitelisted_exactly(prior.base_dist)
    if type(prior) is IndependentPrior:
        return all(_is_whitelisted_exactly(m) for m in prior.marginals)
    return any(type(prior) is cls for cls, _ in PRIOR_CLASSES.values())


def _same_distribution(prior: Distribution, rebuilt: Distribution) -> bool:
    """Whether ``rebuilt`` has the support, shapes and ``log_prob`` (on 8 samples) of ``prior``."""
    if (prior.event_shape, prior.batch_shape) != (rebuilt.event_shape, rebuilt.batch_shape):
        return False
    try:
        if str(prior.support) != str(rebuilt.support):
            return False
        with torch.no_grad(), torch.random.fork_rng(devices=[]):  # must not move the global RNG
            sample = prior.sample((8,))
            return bool(torch.allclose(prior.log_prob(sample), rebuilt.log_prob(sample), equal_nan=True))
    except Exception:  # noqa: BLE001 - a prior that cannot be checked (e.g. on "meta") is not described
        return False


def build_prior(spec: dict, tensors: dict[str, Tensor], device: torch.device | str | None = None) -> Distribution:
    """Rebuild a prior from :func:`prior_spec` output, its tensors moved to ``device``.

    Raises:
        ValueError: On a class outside the whitelist or a missing tensor.
    """
    name = spec.get("class") if isinstance(spec, dict) else None
    if name == "Independent":
        base = build_prior(spec["base"], tensors, device)
        return Independent(base, int(spec["reinterpreted_batch_ndims"]), validate_args=False)
    if name == "IndependentPrior":
        return IndependentPrior(*(build_prior(m, tensors, device) for m in spec["marginals"]), validate_args=False)
    if name not in PRIOR_CLASSES:
        raise ValueError(f"unknown prior class {name!r} in the saved config; known: {KNOWN}")
    cls, params = PRIOR_CLASSES[name]
    if set(spec.get("params", {})) != set(params):
        raise ValueError(f"prior class {name} needs parameters {list(params)}, got {list(spec.get('params', {}))}")
    kwargs = {}
    for p in params:
        key = spec["params"][p]
        if key not in tensors:
            raise ValueError(f"the saved file lacks the prior tensor {key!r}")
        kwargs[p] = tensors[key].to(device) if device is not None else tensors[key]
    return cls(**kwargs, validate_args=False)


def move_prior(prior: Distribution, device: torch.device | str) -> Distribution:
    """``prior`` with its tensors on ``device``: ``prior`` itself if it is there, else rebuilt from its spec.

    Raises:
        ValueError: If the prior is not built from whitelisted classes (or faithful subclasses of
            them, see :func:`prior_spec`) and is on another device.
    """
    if prior_device(prior) == torch.device(device):
        return prior
    spec = prior_spec(prior)
    if spec is not None:
        return build_prior(*spec, device=device)
    raise ValueError(
        f"cannot move a {type(prior).__name__} prior to {device}: only priors made of "
        f"{KNOWN} (or subclasses with the same log_prob) are rebuilt on a device; "
        f"construct the prior on {device} instead"
    )

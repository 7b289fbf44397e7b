"""Priors for neural posterior estimation: validation, the unconstrained space, and a JSON-able spec.

* :func:`check_prior` validates a ``torch.distributions.Distribution`` and gives it an event shape
  ``(D,)`` (a scalar prior becomes 1-D, a batch of ``D`` scalar priors becomes ``Independent(prior, 1)``).
* :class:`Unconstrained` is ``theta = T(u)`` with ``T = biject_to(prior.support)``: the flow models ``u``
  on ``R^D`` and ``log p(theta) = log q(u) - log|det dT/du|``, so samples never leave the support and
  the density is normalized on it, with no rejection sampling.
* :func:`prior_spec` / :func:`build_prior` turn a prior made of whitelisted classes into a JSON
  config plus named tensors and back, so that a prior can be saved without pickle and rebuilt on
  another device.
"""

from __future__ import annotations

from typing import Any

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
    biject_to,
    constraints,
)

__all__ = ["Unconstrained", "build_prior", "check_prior", "move_prior", "prior_device", "prior_spec"]

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


def check_prior(prior: Any) -> tuple[Distribution, int]:
    """Validate ``prior`` and return it with event shape ``(D,)``, and ``D``.

    Raises:
        TypeError: If ``prior`` is not a ``torch.distributions.Distribution``.
        ValueError: If it has no support, a support that is not a ``D``-dimensional manifold of ``R^D``,
            an event shape other than ``()`` or ``(D,)``, or ``sample``/``log_prob`` that are not batched.

    Example:
        >>> prior, dim = check_prior(Normal(torch.zeros(3), torch.ones(3)))
        >>> dim, prior.event_shape
        (3, torch.Size([3]))
    """
    if not isinstance(prior, Distribution):
        raise TypeError(f"prior must be a torch.distributions.Distribution, got {type(prior).__name__}")
    event, batch = tuple(prior.event_shape), tuple(prior.batch_shape)
    if event == () and batch == ():
        prior = Independent(prior.expand((1,)), 1)
    elif event == () and len(batch) == 1:
        prior = Independent(prior, 1)
    elif len(event) != 1 or batch != ():
        raise ValueError(
            "prior must have event shape (D,) and no batch shape (e.g. Independent(Uniform(low, high), 1)), "
            f"got event shape {event} and batch shape {batch}"
        )
    dim = prior.event_shape[0]
    try:
        support = prior.support
    except NotImplementedError:
        support = None
    if support is None:
        raise ValueError(f"prior {type(prior).__name__} has no support; NPE needs it to map theta to R^D")
    try:
        transform = biject_to(support)
    except NotImplementedError:
        raise ValueError(f"the prior's support {support} has no bijection from R^D (torch.distributions.biject_to)") from None
    if tuple(transform.inverse_shape((dim,))) != (dim,):
        raise ValueError(f"the prior's support {support} is not a {dim}-dimensional region of R^{dim}")
    with torch.no_grad(), torch.random.fork_rng(devices=[]):  # validation must not move the global RNG
        sample = prior.sample((2,))
        if tuple(sample.shape) != (2, dim):
            raise ValueError(f"prior.sample((2,)) must have shape (2, {dim}), got {tuple(sample.shape)}")
        log_prob = prior.log_prob(sample)
        if tuple(log_prob.shape) != (2,):
            raise ValueError(f"prior.log_prob of 2 samples must have shape (2,), got {tuple(log_prob.shape)}")
    return prior, dim


def prior_device(prior: Distribution) -> torch.device:
    """The device of the prior's samples (drawn without changing torch's global RNG state)."""
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        return prior.sample((1,)).device


class Unconstrained:
    """The bijection ``theta = T(u)`` from ``R^D`` onto the prior's support (``biject_to(support)``).

    Points mapped onto the support are clamped one floating-point step inside its bounds, so that a
    saturated sigmoid or an underflowing exp never yields a boundary value (where ``u`` is infinite).

    Args:
        support: The prior's support constraint (event dimension 1 after :func:`check_prior`).

    Example:
        >>> box = Independent(Uniform(-torch.ones(2), torch.ones(2)), 1)
        >>> space = Unconstrained(box.support)
        >>> theta = space.to_constrained(torch.tensor([[0.0, 100.0]]))
        >>> bool(space.inside(theta).all())
        True
    """

    def __init__(self, support: constraints.Constraint):
        self.support = support
        self.transform = biject_to(support)
        base = support
        while isinstance(base, constraints.independent):
            base = base.base_constraint
        self._lower = getattr(base, "lower_bound", None)
        self._upper = getattr(base, "upper_bound", None)

    def to_constrained(self, u: Tensor) -> Tensor:
        """``theta = T(u)``, strictly inside the support's bounds, in ``u``'s dtype."""
        return self._clamp(self.transform(u).to(u.dtype))

    def to_unconstrained(self, theta: Tensor) -> Tensor:
        """``u = T^{-1}(theta)`` in ``theta``'s dtype; may be infinite for ``theta`` on the boundary.

        The bounds of a prior built from NumPy arrays are float64: without the cast they would promote
        float32 parameters to float64 and mismatch the flow.
        """
        return self.transform.inv(theta).to(theta.dtype)

    def log_abs_det_jacobian(self, u: Tensor) -> Tensor:
        """``log|det dT/du|`` of shape ``u.shape[:-1]``, in ``u``'s dtype."""
        ladj = self.transform.log_abs_det_jacobian(u, self.transform(u)).to(u.dtype)
        return ladj.sum(-1) if ladj.shape == u.shape else ladj

    def inside(self, theta: Tensor, *, boundary: bool = True) -> Tensor:
        """Boolean ``theta.shape[:-1]``: rows inside the support (NaN excluded).

        Args:
            theta: Points ``(*batch, D)``.
            boundary: Whether points on the support's bounds count as inside.
        """
        ok = self.support.check(theta)
        while ok.ndim >= theta.ndim:
            ok = ok.all(-1)
        ok = ok & ~torch.isnan(theta).any(-1)
        return ok if boundary else ok & (self._clamp(theta) == theta).all(-1)

    def nudge_inside(self, theta: Tensor) -> Tensor:
        """Move boundary values one floating-point step inside (for training data drawn on a bound)."""
        return self._clamp(theta)

    def _clamp(self, theta: Tensor) -> Tensor:
        if self._lower is not None:
            low = torch.as_tensor(self._lower, dtype=theta.dtype, device=theta.device)
            theta = torch.maximum(theta, torch.nextafter(low, torch.full_like(low, torch.inf)))
        if self._upper is not None:
            high = torch.as_tensor(self._upper, dtype=theta.dtype, device=theta.device)
            theta = torch.minimum(theta, torch.nextafter(high, torch.full_like(high, -torch.inf)))
        return theta


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
    if name not in PRIOR_CLASSES:
        raise ValueError(
            f"unknown prior class {name!r} in the saved config; known: {['Independent', *PRIOR_CLASSES]}"
        )
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
    """``prior`` with its tensors on ``device`` (rebuilt from its spec).

    Raises:
        ValueError: If the prior is not built from whitelisted classes (or faithful subclasses of
            them, see :func:`prior_spec`) and is on another device.
    """
    spec = prior_spec(prior)
    if spec is not None:
        return build_prior(*spec, device=device)
    if prior_device(prior) == torch.device(device):
        return prior
    raise ValueError(
        f"cannot move a {type(prior).__name__} prior to {device}: only priors made of "
        f"{['Independent', *PRIOR_CLASSES]} (or subclasses with the same log_prob) are rebuilt on a device; "
        f"construct the prior on {device} instead"
    )

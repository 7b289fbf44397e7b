"""Priors for neural posterior estimation: helpers and validation.

* :func:`box_uniform` and :class:`IndependentPrior` build the priors people write most: a uniform box,
  and independent parameters with different distributions (uniform, normal, log-normal, ...).
* :func:`check_prior` validates a ``torch.distributions.Distribution`` and gives it an event shape
  ``(D,)`` (a scalar prior becomes 1-D, a batch of ``D`` scalar priors becomes ``Independent(prior, 1)``);
  it checks that the prior's own samples lie inside its declared support.
* :func:`flat_support` and :class:`Unconstrained` (the space the flow models) live in
  :mod:`sbiflows.unconstrained` and are importable from here too.

Saving priors without pickle lives in :mod:`sbiflows.prior_specs`.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.distributions import (
    Distribution,
    Independent,
    Uniform,
    biject_to,
    constraints,
)

from sbiflows.seeding import global_seed
from sbiflows.unconstrained import Unconstrained, flat_support

__all__ = [
    "IndependentPrior", "Unconstrained", "box_uniform", "check_prior", "draws_float64", "flat_support", "prior_device",
    "prior_dtype", "sample_seeded",
]

#: Prior samples :func:`check_prior` compares with the declared support (a support violated by 0.7% of
#: the samples is caught with probability 0.999).
SUPPORT_CHECK_SAMPLES = 1000


# ------------------------------------------------------------------------------------ helpers
def box_uniform(low: Any, high: Any, *, dtype: torch.dtype | None = None, device: Any = None) -> Independent:
    """The uniform prior on the box ``[low_1, high_1] x ... x [low_D, high_D]`` (like sbi's ``BoxUniform``).

    Returns ``Independent(Uniform(low, high), 1)``, which ``save``/``load`` rebuild without pickle.

    Args:
        low: Lower bounds: a number or a sequence/array/tensor of ``D`` numbers (broadcast with ``high``).
        high: Upper bounds, likewise; every ``high`` must exceed its ``low``.
        dtype: Floating dtype of the bounds; default: that of floating tensors/arrays, else torch's default.
        device: Device of the bounds.

    Raises:
        ValueError: For bounds of more than one dimension, that do not broadcast, are not finite, or
            where ``high <= low`` (the message names the columns).

    Example:
        >>> prior = box_uniform([0.0, -1.0], [1.0, 1.0])
        >>> prior.event_shape, prior.sample((4,)).shape
        (torch.Size([2]), torch.Size([4, 2]))
        >>> prior.log_prob(torch.tensor([0.5, 0.0]))
        tensor(-0.6931)
    """
    low_t, high_t = (_bounds(b, n, dtype, device) for b, n in ((low, "low"), (high, "high")))
    dtype = dtype or torch.promote_types(low_t.dtype, high_t.dtype)
    try:
        low_t, high_t = torch.broadcast_tensors(low_t.to(dtype), high_t.to(dtype))
    except RuntimeError:
        raise ValueError(f"low of shape {tuple(low_t.shape)} and high of shape {tuple(high_t.shape)} do not broadcast") from None
    low_t, high_t = low_t.reshape(-1).clone(), high_t.reshape(-1).clone()
    bad = torch.nonzero(~(high_t > low_t)).flatten().tolist()
    if bad:
        raise ValueError(
            f"high must exceed low in every column; column(s) {bad[:10]} have low {low_t[bad[:10]].tolist()} "
            f"and high {high_t[bad[:10]].tolist()}"
        )
    return Independent(Uniform(low_t, high_t), 1)


def _bounds(value: Any, name: str, dtype: torch.dtype | None, device: Any) -> Tensor:
    # Python numbers straight into the requested dtype: through float32 first, 0.1 became 0.10000000149 in float64
    tensor = value if isinstance(value, Tensor) else torch.as_tensor(value, dtype=dtype)
    if not tensor.is_floating_point():
        tensor = tensor.to(torch.get_default_dtype())
    tensor = tensor.to(device=device, dtype=dtype or tensor.dtype)
    if tensor.ndim > 1:
        raise ValueError(f"{name} must be a number or have shape (D,), got shape {tuple(tensor.shape)}")
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{name} must be finite, got {tensor.tolist()}")
    return tensor


class IndependentPrior(Distribution):
    """Independent parameters, each with its own distribution: ``theta = (theta_1, ..., theta_K)``.

    Each marginal is a scalar distribution (one parameter, e.g. ``Uniform(0., 1.)``), a batch of scalar
    ones (``Normal(torch.zeros(2), torch.ones(2))``: two parameters) or a distribution with event shape
    ``(k,)`` (e.g. a ``MultivariateNormal``, a :func:`box_uniform`); their columns are concatenated in
    order. The support is the ``cat`` of the marginals' supports, so NPE maps every column onto its own
    range (a sigmoid for a bounded one, ``exp`` for a positive one), and ``log_prob`` is the sum of the
    marginals' (``-inf`` outside the support). ``save``/``load`` rebuild it without pickle when every
    marginal is of a class in :data:`sbiflows.prior_specs.PRIOR_CLASSES`.

    Args:
        *marginals: The marginal distributions, in column order (a single list is accepted too).
        validate_args: As for ``torch.distributions`` (``None``: torch's global default).

    Raises:
        TypeError: If a marginal is not a ``torch.distributions.Distribution``.
        ValueError: If there is no marginal, one has a vector-valued support that is not per-column
            (e.g. a simplex) or fails :func:`check_prior`, or they live on different devices.

    Example:
        >>> from torch.distributions import LogNormal, Normal, Uniform
        >>> prior = IndependentPrior(Uniform(0.0, 1.0), Normal(0.0, 1.0), LogNormal(0.0, 1.0))
        >>> prior.event_shape, prior.sample((5,)).shape
        (torch.Size([3]), torch.Size([5, 3]))
        >>> bool(prior.support.check(torch.tensor([0.5, -3.0, 2.0]))), bool(prior.support.check(torch.tensor([0.5, 0.0, -2.0])))
        (True, False)
        >>> prior.log_prob(torch.tensor([0.5, 0.0, 1.0]))
        tensor(-1.8379)
    """

    arg_constraints: ClassVar[dict[str, constraints.Constraint]] = {}

    def __init__(self, *marginals: Distribution, validate_args: bool | None = None):
        if len(marginals) == 1 and isinstance(marginals[0], (list, tuple)):
            marginals = tuple(marginals[0])
        if not marginals:
            raise ValueError("IndependentPrior needs at least one marginal distribution, got none")
        parts, sizes, supports = [], [], []
        for i, marginal in enumerate(marginals):
            if not isinstance(marginal, Distribution):
                raise TypeError(
                    f"marginal {i} must be a torch.distributions.Distribution, got {type(marginal).__name__}"
                )
            try:
                part, size = check_prior(marginal)
                support = flat_support(part.support, size)
            except ValueError as error:
                raise ValueError(f"marginal {i} ({type(marginal).__name__}): {error}") from None
            if not isinstance(support, constraints.independent) or support.base_constraint.event_dim != 0:
                raise ValueError(
                    f"marginal {i} ({type(marginal).__name__}) has the vector-valued support {support}; "
                    "IndependentPrior combines marginals whose supports are per column (real, interval, positive, ...)"
                )
            parts.append(part), sizes.append(size), supports.append(support.base_constraint)
        devices = {prior_device(p) for p in parts}
        if len(devices) > 1:
            raise ValueError(f"the marginals live on different devices {sorted(map(str, devices))}; build them on one")
        self.marginals, self._parts, self.sizes = tuple(marginals), tuple(parts), tuple(sizes)
        base = supports[0] if len(supports) == 1 else constraints.cat(supports, dim=-1, lengths=list(sizes))
        self._support = constraints.independent(base, 1)
        self._spaces = tuple(Unconstrained(p.support) for p in parts)
        self.has_rsample = all(p.has_rsample for p in parts)
        super().__init__(torch.Size(), torch.Size((sum(sizes),)), validate_args=validate_args)

    @constraints.dependent_property(is_discrete=False, event_dim=1)
    def support(self) -> constraints.Constraint:
        """``independent(cat([...per-column supports], dim=-1, lengths=sizes), 1)``."""
        return self._support

    @property
    def mean(self) -> Tensor:
        return torch.cat([p.mean for p in self._parts], -1)

    @property
    def variance(self) -> Tensor:
        return torch.cat([p.variance for p in self._parts], -1)

    def sample(self, sample_shape: Any = ()) -> Tensor:
        """Samples of shape ``(*sample_shape, D)``: each marginal's samples, concatenated."""
        with torch.no_grad():
            return torch.cat([p.sample(torch.Size(sample_shape)) for p in self._parts], -1)

    def rsample(self, sample_shape: Any = ()) -> Tensor:
        """Reparameterized samples (when every marginal has ``rsample``)."""
        if not self.has_rsample:
            names = [type(m).__name__ for m, p in zip(self.marginals, self._parts) if not p.has_rsample]
            raise NotImplementedError(f"rsample needs every marginal to have it; {names} do not")
        return torch.cat([p.rsample(torch.Size(sample_shape)) for p in self._parts], -1)

    def log_prob(self, value: Tensor) -> Tensor:
        """Sum of the marginals' log-densities: shape ``value.shape[:-1]``; ``-inf`` outside the support."""
        if self._validate_args:
            self._validate_sample(value)
        total, start = 0, 0
        for part, size, space in zip(self._parts, self.sizes, self._spaces):
            piece = value[..., start : start + size]
            inside = space.inside(piece)
            safe = torch.where(inside[..., None], piece, space.to_constrained(torch.zeros_like(piece)))
            log_prob = part.log_prob(safe)  # evaluated inside the support only: no validation error, no NaN
            total = total + torch.where(inside, log_prob, torch.full_like(log_prob, -math.inf))
            start += size
        return torch.where(torch.isnan(value).any(-1), torch.full_like(total, math.nan), total)

    def __repr__(self) -> str:
        return f"IndependentPrior({', '.join(repr(m) for m in self.marginals)})"


# --------------------------------------------------------------------------------- validation
def as_vector_prior(prior: Distribution) -> Distribution:
    """``prior`` with event shape ``(D,)``: a scalar prior as ``D = 1``, a batch of ``D`` scalar priors as one
    ``D``-dimensional one (:class:`~torch.distributions.Independent`), one of event shape ``(D,)`` unchanged.

    Raises:
        ValueError: For other event and batch shapes.

    Example:
        >>> from torch.distributions import Normal, Uniform
        >>> as_vector_prior(Normal(0.0, 1.0)).event_shape, as_vector_prior(Uniform(torch.zeros(2), 1)).event_shape
        (torch.Size([1]), torch.Size([2]))
    """
    event, batch = tuple(prior.event_shape), tuple(prior.batch_shape)
    if event == () and batch == ():
        return Independent(prior.expand((1,)), 1)
    if event == () and len(batch) == 1:
        return Independent(prior, 1)
    if len(event) != 1 or batch != ():
        raise ValueError(
            "prior must have event shape (D,) and no batch shape (e.g. Independent(Uniform(low, high), 1)), "
            f"got event shape {event} and batch shape {batch}"
        )
    return prior


def check_prior(prior: Any) -> tuple[Distribution, int]:
    """Validate ``prior`` and return it with event shape ``(D,)``, and ``D``.

    Raises:
        TypeError: If ``prior`` is not a ``torch.distributions.Distribution``.
        ValueError: If it has no support, a support that is not a ``D``-dimensional manifold of ``R^D``,
            an event shape other than ``()`` or ``(D,)``, ``sample``/``log_prob`` that are not batched,
            or samples outside its declared support (the message names the columns and values).

    Example:
        >>> from torch.distributions import Normal
        >>> prior, dim = check_prior(Normal(torch.zeros(3), torch.ones(3)))
        >>> dim, prior.event_shape
        (3, torch.Size([3]))
    """
    if not isinstance(prior, Distribution):
        raise TypeError(f"prior must be a torch.distributions.Distribution, got {type(prior).__name__}")
    name = type(prior).__name__
    prior = as_vector_prior(prior)
    dim = prior.event_shape[0]
    try:
        support = prior.support
    except NotImplementedError:
        support = None
    if support is None:
        raise ValueError(f"prior {name} has no support; NPE needs it to map theta to R^D")
    support = flat_support(support, dim)
    try:
        transform = biject_to(support)
    except NotImplementedError:
        raise ValueError(f"the prior's support {support} has no bijection from R^D (torch.distributions.biject_to)") from None
    if tuple(transform.inverse_shape((dim,))) != (dim,):
        raise ValueError(f"the prior's support {support} is not a {dim}-dimensional region of R^{dim}")
    with torch.no_grad(), torch.random.fork_rng(devices=[]):  # validation must not move the global RNG
        torch.random.default_generator.manual_seed(0)  # and gives the same verdict on every call
        sample = prior.sample((SUPPORT_CHECK_SAMPLES,))
        if tuple(sample.shape) != (SUPPORT_CHECK_SAMPLES, dim):
            raise ValueError(f"prior.sample((n,)) must have shape (n, {dim}), got {tuple(sample.shape)} for n = "
                             f"{SUPPORT_CHECK_SAMPLES}")
        if sample.device.type != "meta":
            _check_samples_in_support(name, sample, support)
        log_prob = prior.log_prob(sample[:2])
        if tuple(log_prob.shape) != (2,):
            raise ValueError(f"prior.log_prob of 2 samples must have shape (2,), got {tuple(log_prob.shape)}")
    return prior, dim


def _check_samples_in_support(name: str, sample: Tensor, support: constraints.Constraint) -> None:
    """A clear ValueError when some of the prior's own samples violate its declared support."""
    inside = Unconstrained(support).inside(sample)
    if bool(inside.all()):
        return
    base = support.base_constraint if isinstance(support, constraints.independent) else support
    per_column = base.check(sample) if base.event_dim == 0 else inside[:, None].expand_as(sample)
    per_column = per_column & ~torch.isnan(sample)
    columns = torch.nonzero(~per_column.all(0)).flatten().tolist()
    shown = "; ".join(
        f"column {j}: {int((~per_column[:, j]).sum())} values, e.g. {sample[~per_column[:, j], j][:3].tolist()}"
        for j in columns[:5]
    )
    raise ValueError(
        f"prior {name} declares the support {support}, but {int((~inside).sum())} of {len(sample)} of its own "
        f"samples lie outside it ({shown}). Fix the prior's support or its sample(); "
        "sbiflows.priors.IndependentPrior and box_uniform build priors with matching supports"
    )


def prior_device(prior: Distribution) -> torch.device:
    """The device of the prior's samples (drawn without changing torch's global RNG state)."""
    return _one_draw(prior).device


def prior_dtype(prior: Distribution) -> torch.dtype:
    """The dtype of the prior's samples (drawn without changing torch's global RNG state).

    Example:
        >>> prior_dtype(torch.distributions.Normal(torch.zeros(2, dtype=torch.float64), 1.0))
        torch.float64
    """
    return _one_draw(prior).dtype


def draws_float64(prior: Distribution) -> bool:
    """Whether the prior's samples are float64 (then float64 theta is the prior's precision, not a choice
    whose loss a cast to float32 should warn about).

    Example:
        >>> draws_float64(torch.distributions.Normal(torch.zeros(2), torch.ones(2)))
        False
        >>> draws_float64(torch.distributions.Normal(torch.zeros(2, dtype=torch.float64), 1.0))
        True
    """
    return _one_draw(prior).dtype == torch.float64


def _one_draw(prior: Distribution) -> Tensor:
    with torch.no_grad(), torch.random.fork_rng(devices=[]):  # torch's global RNG state is left as it was
        return prior.sample((1,))


def sample_seeded(prior: Distribution, shape: tuple[int, ...], seed: int) -> Tensor:
    """``prior.sample(shape)`` with torch's global generators seeded with ``seed``, and left as they were.

    Torch distributions take no generator, so the global ones are seeded inside a fork
    (:func:`sbiflows.seeding.global_seed`: the CPU's and those of initialized CUDA devices, where a prior on
    the GPU draws).

    Example:
        >>> prior = torch.distributions.Normal(torch.zeros(2), torch.ones(2))
        >>> state = torch.random.get_rng_state()
        >>> torch.equal(sample_seeded(prior, (3,), 7), sample_seeded(prior, (3,), 7))
        True
        >>> torch.equal(torch.random.get_rng_state(), state)
        True
    """
    with global_seed(seed):
        return prior.sample(shape)


def __getattr__(name: str) -> Any:
    """The prior-spec functions moved to :mod:`sbiflows.prior_specs`; old imports keep working."""
    if name in ("PRIOR_CLASSES", "build_prior", "move_prior", "prior_spec"):
        from sbiflows import prior_specs

        return getattr(prior_specs, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

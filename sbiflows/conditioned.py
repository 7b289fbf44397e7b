"""The posterior for one observation as a distribution over theta: :meth:`sbiflows.Posterior.condition`.

:class:`ConditionedPosterior` is a ``pyro.distributions.TorchDistribution`` (hence also a
``torch.distributions.Distribution``), so it can be used wherever a distribution over theta is
expected: in ``pyro.sample("theta", ...)`` (with pyro's ``expand``, ``to_event``, ``Predictive``,
NUTS/HMC and SVI), or as the prior of the next experiment (``NPE(posterior.condition(x_o))``).

* ``rsample`` is reparameterized: ``theta = T(f(z; x_o))`` with ``z ~ N(0, I)``, ``f`` the flow and
  ``T`` the map from the unconstrained space onto the prior's support, so gradients flow from samples
  to the flow's parameters (and to ``z``'s deterministic transform, not through any rejection step).
* ``sample`` draws exactly what ``posterior.sample(n, x_o)`` draws (same generator, same values),
  without gradients and chunked like it.
* ``log_prob`` equals ``posterior.log_prob(theta, x_o)`` but is differentiable with respect to the
  value (and the flow's parameters); ``-inf`` outside the support, NaN for NaN values.

The distribution shares the posterior's network (no copy): it never mutates the posterior, and
conditioning on another observation returns another object (unlike sbi's ``set_default_x``).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from pyro.distributions import TorchDistribution
from torch import Tensor
from torch.distributions import constraints

from sbiflows.observation_range import observations_unchecked
from sbiflows.seeding import SeededNoise
from sbiflows.threads import torch_threads
from sbiflows.truncated_space import draw_inside

if TYPE_CHECKING:
    from sbiflows.posterior import Posterior

__all__ = ["ConditionedPosterior"]


class ConditionedPosterior(TorchDistribution):
    """``p(theta | x_o)`` of a trained :class:`~sbiflows.Posterior` for one observation ``x_o``.

    Build it with :meth:`sbiflows.Posterior.condition`. Its event shape is ``(D,)``, its support the
    prior's support, and its batch shape ``()`` unless expanded (``expand``, pyro plates), in which
    case every batch element is an independent draw from the same ``p(theta | x_o)``.

    Args:
        posterior: The trained posterior (its network is shared, not copied).
        x: One observation, shape ``x_shape`` or ``(1, *x_shape)``; checked like in
            :meth:`~sbiflows.Posterior.sample` (a warning if it lies far outside the training x).
        validate_args: As for ``torch.distributions`` (``None``: torch's global default).

    Example:
        >>> import torch
        >>> from torch.distributions import MultivariateNormal
        >>> from sbiflows import NPE
        >>> prior = MultivariateNormal(torch.zeros(2), torch.eye(2))
        >>> theta = prior.sample((300,)); x = theta + 0.1 * torch.randn_like(theta)
        >>> posterior = NPE(prior, transforms=1, hidden_features=(16, 16)).fit(theta, x, max_epochs=3, progress=False)
        >>> dist = posterior.condition(torch.zeros(2))
        >>> dist.sample((5,)).shape, dist.event_shape, dist.batch_shape
        (torch.Size([5, 2]), torch.Size([2]), torch.Size([]))
        >>> dist.expand((3,)).rsample((4,)).shape
        torch.Size([4, 3, 2])
        >>> bool(torch.allclose(dist.log_prob(theta[:3]), posterior.log_prob(theta[:3], torch.zeros(2))))
        True
    """

    arg_constraints: ClassVar[dict[str, constraints.Constraint]] = {}
    has_rsample = True

    def __init__(self, posterior: Posterior, x: Any, *, validate_args: bool | None = None):
        from sbiflows.posterior import Posterior

        if not isinstance(posterior, Posterior):
            raise TypeError(f"posterior must be a sbiflows Posterior, got {type(posterior).__name__}")
        self._posterior = posterior
        self._x = posterior._single_observation(x)  # (1, *x_shape), checked and warned about once, here
        super().__init__(torch.Size(), torch.Size((posterior.theta_dim,)), validate_args=validate_args)

    # ---------------------------------------------------------------------------------- basics
    @property
    def posterior(self) -> Posterior:
        """The :class:`~sbiflows.Posterior` this distribution conditions (shared, never modified)."""
        return self._posterior

    @property
    def x(self) -> Tensor:
        """The observation, shape ``(1, *x_shape)`` (a copy: the distribution is immutable)."""
        return self._x.clone()

    @constraints.dependent_property(is_discrete=False, event_dim=1)
    def support(self) -> constraints.Constraint:
        """The prior's support, with event dimension 1 (e.g. ``independent(interval(low, high), 1)``)."""
        return self._posterior._space.support

    def expand(self, batch_shape: Any, _instance: ConditionedPosterior | None = None) -> ConditionedPosterior:
        """The same distribution with batch shape ``batch_shape`` (independent, identical elements)."""
        new = self._get_checked_instance(ConditionedPosterior, _instance)
        new._posterior, new._x = self._posterior, self._x
        super(ConditionedPosterior, new).__init__(torch.Size(batch_shape), self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    def __repr__(self) -> str:
        return (
            f"ConditionedPosterior(theta_dim={self._posterior.theta_dim}, x={self._x[0].tolist()}, "
            f"batch_shape={tuple(self.batch_shape)}, support={self.support})"
        )

    # -------------------------------------------------------------------------------- sampling
    @torch_threads()
    def rsample(self, sample_shape: Any = (), *, generator: torch.Generator | None = None) -> Tensor:
        """Reparameterized samples ``(*sample_shape, *batch_shape, D)``: differentiable in the flow's parameters.

        Drawn in one vectorized pass (not chunked: the whole graph is kept for the backward pass; in the
        truncated space, in rounds of rejection until ``n`` draws are inside the support). With
        the same ``generator`` state the values equal :meth:`sample`'s (the same seeded base noise).
        """
        shape = self._extended_shape(torch.Size(sample_shape))
        n = math.prod(shape[:-1])
        post = self._posterior
        if n == 0:
            return torch.empty(shape, device=post.device, dtype=post.dtype)
        context = self._context()
        noise = None if generator is None else SeededNoise(generator, n, post.net.flow.base, post.device)

        def propose(start: int, m: int, active: Tensor) -> Tensor:
            if noise is None:
                return post.net.sample_given_context(m, context)
            # as Posterior.sample_batched: noise in fixed seeded blocks, then the flow (with gradients)
            return post.net.sample_from_base(noise.rows(start, m, range(1)), context)

        if post._space.truncated:  # the flow's draws inside the support (rejection), as Posterior.sample
            u = draw_inside(propose, post._space.inside, n, 1, max_rows=max(n, post.chunk_rows),
                            device=post.device)
        else:
            u = propose(0, n, torch.zeros(1, dtype=torch.long))
        return post._space.to_constrained(u[:, 0]).reshape(shape)

    def sample(self, sample_shape: Any = (), *, generator: torch.Generator | None = None) -> Tensor:
        """Samples ``(*sample_shape, *batch_shape, D)`` without gradients.

        The same draws as ``posterior.sample(n, x)`` for ``n = prod(sample_shape + batch_shape)`` and the
        same ``generator`` state (chunked like it to bound memory).
        """
        shape = self._extended_shape(torch.Size(sample_shape))
        n = math.prod(shape[:-1])
        post = self._posterior
        if n == 0:
            return torch.empty(shape, device=post.device, dtype=post.dtype)
        with torch.no_grad(), observations_unchecked():  # x was checked by the constructor
            return post.sample_batched(n, self._x, generator=generator)[:, 0].reshape(shape)

    # ------------------------------------------------------------------------------- densities
    @torch_threads()
    def log_prob(self, value: Tensor) -> Tensor:
        """``log p(value | x)`` of shape ``broadcast(value.shape[:-1], batch_shape)``, differentiable in ``value``.

        Computed in the posterior's dtype on its device and returned in ``value``'s dtype; ``-inf``
        outside the support (or on its boundary), NaN where ``value`` has a NaN.

        Raises:
            TypeError: If ``value`` is not a floating-point tensor.
            ValueError: If its last dimension is not ``D`` or its batch shape does not broadcast with
                ``batch_shape`` (and, with ``validate_args``, if it lies outside the support).
        """
        if not isinstance(value, Tensor) or not value.is_floating_point():
            got = value.dtype if isinstance(value, Tensor) else type(value).__name__
            raise TypeError(f"value must be a floating-point torch.Tensor of shape (..., {self.event_shape[0]}), got {got}")
        if value.ndim == 0 or value.shape[-1] != self.event_shape[0]:
            raise ValueError(f"value must have shape (..., {self.event_shape[0]}), got {tuple(value.shape)}")
        try:
            batch = torch.broadcast_shapes(value.shape[:-1], self.batch_shape)
        except RuntimeError:
            raise ValueError(
                f"value of shape {tuple(value.shape)} does not broadcast with the batch shape {tuple(self.batch_shape)}"
            ) from None
        if self._validate_args:
            self._validate_sample(value)
        post = self._posterior
        theta = value.to(device=post.device, dtype=post.dtype)
        log_prob = post._log_prob(theta, self._context()[0])
        log_prob = torch.where(torch.isnan(theta).any(-1), torch.full_like(log_prob, torch.nan), log_prob)
        return log_prob.to(value.dtype).expand(batch)

    def _context(self) -> Tensor:
        """The flow's context for ``x``: ``(1, C)``, on the posterior's current device."""
        post = self._posterior
        return post.net.context(self._x.to(post.device))

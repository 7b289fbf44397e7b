"""The unconstrained space of a prior's support: where the flow lives.

* :func:`flat_support` brings a support (``independent``, ``cat`` of per-column constraints, nested)
  into one form with event dimension 1 that ``torch.distributions.biject_to`` handles.
* :class:`Unconstrained` is ``theta = T(u)`` with ``T = biject_to(support)``: the flow models ``u``
  on ``R^D`` and ``log p(theta) = log q(u) - log|det dT/du|``, so samples never leave the support and
  the density is normalized on it, with no rejection sampling.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.distributions import biject_to, constraints

__all__ = ["Unconstrained", "flat_support"]


# ------------------------------------------------------------------------------------ supports
def flat_support(support: constraints.Constraint, dim: int | None = None) -> constraints.Constraint:
    """``support`` for vectors ``(D,)`` as ``independent(c, 1)``, ``c`` per column where possible.

    ``independent`` wrappers are unwrapped and a ``cat`` (along ``dim=-1``, or torch's default ``dim=0``:
    both name the parameter axis of a ``(D,)`` event; possibly nested, possibly of ``independent``
    pieces, which torch's own ``cat`` cannot check) becomes a ``cat`` of per-column
    constraints; a genuinely vector-valued support (event dimension 1, e.g. ``ordered_vector``) is
    returned unchanged. A support already in this form is returned as is.

    Raises:
        ValueError: For a ``cat`` along another dimension, lengths that do not sum to ``dim``, or a
            vector-valued constraint inside a ``cat``.

    Example:
        >>> c = constraints
        >>> support = flat_support(c.cat([c.independent(c.unit_interval, 1), c.positive], dim=-1, lengths=[2, 1]), 3)
        >>> support.base_constraint.lengths, support.check(torch.tensor([[0.5, 0.5, 2.0], [0.5, 0.5, -2.0]])).tolist()
        ([2, 1], [True, False])
    """
    if isinstance(support, constraints.independent) and support.reinterpreted_batch_ndims == 1 \
            and support.base_constraint.event_dim == 0 and not isinstance(support.base_constraint, constraints.cat):
        return support
    blocks = _blocks(support, dim)
    if blocks is None:
        return support
    base = blocks[0][0] if len(blocks) == 1 else constraints.cat([c for c, _ in blocks], dim=-1, lengths=[n for _, n in blocks])
    return constraints.independent(base, 1)


def _blocks(support: constraints.Constraint, length: int | None) -> list[tuple[constraints.Constraint, int]] | None:
    """Per-column pieces ``(constraint with event_dim 0, number of columns)``, or None if vector-valued."""
    while isinstance(support, constraints.independent):
        support = support.base_constraint
    if isinstance(support, constraints.cat):
        if support.dim not in (0, -1):  # of a (D,) event, both name the parameter axis (0 is torch's default)
            raise ValueError(f"a cat support must join the parameters along dim=-1 (or 0), got dim={support.dim}")
        if length is not None and sum(support.lengths) != length:
            raise ValueError(f"the cat support's lengths {support.lengths} do not add up to the {length} parameters")
        blocks = []
        for piece, n in zip(support.cseq, support.lengths):
            inner = _blocks(piece, n)
            if inner is None:
                raise ValueError(
                    f"a cat support may only join per-column constraints (real, interval, positive, ...), "
                    f"got the vector-valued {piece}"
                )
            blocks.extend(inner)
        return blocks
    if support.event_dim == 0:
        return [(support, length)]
    return None


class Unconstrained:
    """The bijection ``theta = T(u)`` from ``R^D`` onto the prior's support (``biject_to(support)``).

    Points mapped onto the support are clamped one floating-point step inside its bounds, so that a
    saturated sigmoid or an underflowing exp never yields a boundary value (where ``u`` is infinite).
    A support made of per-column pieces (``cat``) gets per-column bounds.

    Args:
        support: The prior's support constraint (event dimension 1 after :func:`check_prior`); brought
            into the form of :func:`flat_support` (available as :attr:`support`).

    Example:
        >>> from torch.distributions import Independent, Uniform
        >>> box = Independent(Uniform(-torch.ones(2), torch.ones(2)), 1)
        >>> space = Unconstrained(box.support)
        >>> theta = space.to_constrained(torch.tensor([[0.0, 100.0]]))
        >>> bool(space.inside(theta).all())
        True
    """

    truncated = False  # samples never need rejection (see sbiflows.truncated_space for the space that does)

    def __init__(self, support: constraints.Constraint):
        self.support = flat_support(support)
        self.transform = biject_to(self.support)
        base = self.support.base_constraint if isinstance(self.support, constraints.independent) else self.support
        pieces = list(zip(base.cseq, base.lengths)) if isinstance(base, constraints.cat) else None
        if pieces is None:
            self._lower = getattr(base, "lower_bound", None)
            self._upper = getattr(base, "upper_bound", None)
        else:  # per-column bounds, +-inf for unbounded columns
            self._lower = _column_bounds(pieces, "lower_bound", -math.inf)
            self._upper = _column_bounds(pieces, "upper_bound", math.inf)

    @property
    def bounded(self) -> bool:
        """Whether every column has a finite lower and upper bound (the support is a box).

        Example:
            >>> from torch.distributions import Independent, Normal, Uniform
            >>> Unconstrained(Independent(Uniform(-torch.ones(2), torch.ones(2)), 1).support).bounded
            True
            >>> Unconstrained(Independent(Normal(torch.zeros(2), 1.0), 1).support).bounded
            False
        """
        return all(bound is not None and bool(torch.isfinite(torch.as_tensor(bound)).all())
                   for bound in (self._lower, self._upper))

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

    def project(self, u: Tensor) -> Tensor:
        """``u`` unchanged: every point of the unconstrained space is valid."""
        return u

    def _clamp(self, theta: Tensor) -> Tensor:
        for bound, toward, limit in ((self._lower, math.inf, torch.maximum), (self._upper, -math.inf, torch.minimum)):
            if bound is not None:
                bound = torch.as_tensor(bound, dtype=theta.dtype, device=theta.device)
                inner = torch.nextafter(bound, torch.full_like(bound, toward))
                theta = limit(theta, torch.where(torch.isinf(bound), bound, inner))
        return theta


def _column_bounds(pieces: list[tuple[constraints.Constraint, int]], attribute: str, missing: float) -> Tensor | None:
    """One bound per column (float64, on the bounds' device) from per-column pieces, or None if none has one."""
    values = [getattr(c, attribute, missing) for c, _ in pieces]
    if all(v is missing for v in values):
        return None
    device = next((v.device for v in values if isinstance(v, Tensor)), None)
    return torch.cat([torch.as_tensor(v, dtype=torch.float64, device=device).detach().expand(n)
                      for v, (_, n) in zip(values, pieces)])

"""Dequantization: fitting a continuous flow to discrete data through a lower bound on log p(x).

For integer data ``x`` and noise ``u`` in ``[0, 1)^D`` with density ``q(u | x)``, the probability mass of
``x`` under a continuous density ``p`` is ``P(x) = int p(x + u) du`` and, by Jensen's inequality,

    log P(x) >= E_{u ~ q(u|x)} [ log p(x + u) - log q(u | x) ].

* :class:`UniformDequantization`: ``q = U[0, 1)^D`` (``log q = 0``), the simplest bound.
* :class:`VariationalDequantization`: ``q(u | x)`` is a learned conditional flow squashed into
  ``(0, 1)`` by a sigmoid (Ho et al. 2019, "Flow++"), which tightens the bound because the noise can
  follow the shape of ``p`` inside each unit cell.

These modules are **not** bijections, so they live apart from :mod:`sbiflows.transforms`. Both have
``log_prob(x, context=None)`` returning a one-sample estimate of the bound, so they train with
:func:`sbiflows.training.train` like any flow, and :meth:`bound` for a many-sample evaluation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sbiflows.flows import Flow, maf


def _into_cell(x: Tensor, u: Tensor) -> Tensor:
    """``x + u`` for noise ``u`` in ``[0, 1]``, guaranteed to lie in ``[x, x + 1)`` in ``x``'s dtype.

    In floating point ``x + u`` rounds to ``x + 1`` whenever ``1 - u`` is below half the spacing of
    floats near ``x`` (about ``3e-5`` at ``x = 1000`` in float32), which would put ``v`` in the next
    cell. Such values are rounded down instead, to the largest float below ``x + 1``: ``v`` moves by at
    most one float spacing, as ordinary rounding would. The gradient is the one of ``x + u`` (the
    correction is a rounding, not part of the model), so every row trains the noise.

    Example:
        >>> _into_cell(torch.tensor([1000.0]), torch.tensor([1.0])) < 1001.0
        tensor([True])
    """
    v = x + u
    # The largest float below x + 1 (x itself once floats near x are spaced by 2 or more).
    below_next = torch.nextafter(x + 1.0, x)
    return v + (torch.minimum(v, below_next) - v).detach()


def _check_discrete(x: Tensor, features: int) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor of integer values, got {type(x).__name__}")
    if x.ndim < 1 or x.shape[-1] != features:
        raise ValueError(f"x must have shape (*batch, {features}), got {tuple(x.shape)}")
    if x.is_floating_point() and not bool((x == torch.round(x)).all()):
        raise ValueError("x must hold integer values (discrete data); got non-integer entries")
    return x


class UniformDequantization(nn.Module):
    """Uniform dequantization: ``v = x + u`` with ``u ~ U[0, 1)^D``.

    Args:
        flow: The continuous density ``p(v)`` (or ``p(v | context)``).

    Example:
        >>> deq = UniformDequantization(maf(2, transforms=1, hidden_features=(8, 8)))
        >>> deq.log_prob(torch.tensor([[0.0, 3.0]])).shape
        torch.Size([1])
    """

    def __init__(self, flow: Flow):
        super().__init__()
        self.flow = flow
        self.features = flow.features

    def dequantize(self, x: Tensor, *, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Continuous ``v = x + u`` in ``[x, x + 1)`` and ``log q(u | x)`` (zero for uniform noise).

        ``x + u`` is rounded down when it would round up to ``x + 1`` in the working dtype, so that
        ``floor(v) == x`` holds exactly for every row.
        """
        x = _check_discrete(x, self.features).to(self.flow._dtype())
        u = torch.rand(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        return _into_cell(x, u), x.new_zeros(x.shape[:-1])

    def log_prob(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """A one-sample estimate of the lower bound on ``log P(x)`` (what training maximises)."""
        v, log_q = self.dequantize(x)
        return self.flow.log_prob(v, context) - log_q

    @torch.no_grad()
    def bound(self, x: Tensor, context: Tensor | None = None, *, num_samples: int = 16) -> Tensor:
        """Monte-Carlo estimate of ``E_q[log p(x + u) - log q(u | x)]`` per row, ``num_samples`` draws each."""
        return torch.stack([self.log_prob(x, context) for _ in range(num_samples)]).mean(0)


class VariationalDequantization(UniformDequantization):
    """Variational dequantization: ``u = sigmoid(y)``, ``y ~ q(y | x)`` a conditional flow.

    ``log q(u | x) = log q(y | x) - sum_i log sigmoid'(y_i)``, with ``log sigmoid'(y) =
    log sigmoid(y) + log sigmoid(-y)``. The noise flow is reparameterised (samples are a differentiable
    function of base noise), so the bound is trained jointly over ``p`` and ``q`` by gradient ascent.

    Args:
        flow: The continuous density ``p(v)``.
        noise_flow: A conditional flow over ``R^D`` with ``context_features = D`` (the discrete ``x``);
            default: a small conditional MAF.

    Example:
        >>> deq = VariationalDequantization(maf(2, transforms=1, hidden_features=(8, 8)))
        >>> v, log_q = deq.dequantize(torch.tensor([[1.0, 2.0]]))
        >>> bool(((v >= 1) & (v < 3)).all())
        True
    """

    def __init__(self, flow: Flow, noise_flow: Flow | None = None):
        super().__init__(flow)
        d = flow.features
        self.noise_flow = noise_flow or maf(d, d, transforms=2, hidden_features=(32, 32))
        if self.noise_flow.features != d or self.noise_flow.context_features != d:
            raise ValueError(
                f"noise_flow must model {d} features given {d} context features (the discrete x), got "
                f"features={self.noise_flow.features}, context_features={self.noise_flow.context_features}"
            )

    def dequantize(self, x: Tensor, *, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Continuous ``v = x + u`` in ``[x, x + 1)`` with ``u ~ q(u | x)``, and ``log q(u | x)``.

        ``log q`` is the density of the drawn noise ``u = sigmoid(y)``, evaluated at ``y`` itself;
        ``v`` is ``x + u`` in the working dtype, rounded down to the largest float below ``x + 1`` when
        it would round up to ``x + 1`` (see :func:`_into_cell`), so ``floor(v) == x`` for every row.
        Like any rounding, this moves ``v`` by at most one float spacing near ``x``; that spacing is
        coarse for large counts in float32 (``2^-7`` at ``x = 1e5``), so use float64 for such data.
        """
        x = _check_discrete(x, self.features).to(self.flow._dtype())
        y, log_qy = self.noise_flow.sample_and_log_prob(1, x, generator=generator)
        y, log_qy = y.squeeze(0), log_qy.squeeze(0)
        log_q = log_qy - (F.logsigmoid(y) + F.logsigmoid(-y)).sum(-1)
        return _into_cell(x, torch.sigmoid(y)), log_q

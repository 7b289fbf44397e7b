"""Elementwise monotonic maps ("transformers") of autoregressive and coupling layers.

A transformer maps each feature ``x_i`` to ``y_i`` with parameters that a conditioner (a MADE, a
coupling network) computes from other features and the context. It is the one place that says how
many parameters a feature needs (:attr:`Transformer.num_params`), so MAF and coupling layers work
with any transformer without a copy per map.

Both directions take ``params`` of shape ``(*batch, D, num_params)`` and return ``(y, logabsdet)``
with ``logabsdet`` **per element** (``(*batch, D)``); the layer sums it.

* :class:`Affine`: ``y = x * exp(s) + m`` with ``s`` softly bounded (MAF's and RealNVP's map).
* :class:`RationalQuadraticSpline`: the monotonic rational-quadratic spline of Durkan et al. (2019,
  "Neural Spline Flows") on ``[-B, B]`` with ``K`` bins, identity tails outside, analytic inverse.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from sbiflows.checks import check_int, check_positive_number
from sbiflows.nn import soft_clamp

__all__ = [
    "DEFAULT_BINS", "DEFAULT_BOUND", "TRANSFORMERS", "Affine", "RationalQuadraticSpline", "Transformer", "make_transformer",
]

#: Names accepted by the factories' ``transformer`` option.
TRANSFORMERS = ("affine", "spline")


class Transformer:
    """An elementwise monotonic map with ``num_params`` parameters per feature (a base class).

    ``forward(x, params)`` and ``inverse(y, params)`` return ``(output, logabsdet)``; ``logabsdet`` is
    ``log|d output / d input|`` per element. ``identity_params`` is what a zero conditioner output
    means: every transformer here is the identity map when its parameters are all zero.
    """

    num_params: int

    def forward(self, x: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        """``y = f(x)`` and ``log|f'(x)|`` elementwise."""
        raise NotImplementedError

    def inverse(self, y: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        """``x = f^{-1}(y)`` and ``log|d x / d y|`` elementwise."""
        raise NotImplementedError


class Affine(Transformer):
    """``y = x * exp(s) + m``: params ``(m, s_raw)`` with ``s = log_scale_bound * tanh(s_raw / log_scale_bound)``.

    Args:
        log_scale_bound: Soft bound on the log-scale (5 in MAF layers, 3 in RealNVP couplings).

    Example:
        >>> y, logdet = Affine(3.0).forward(torch.ones(2), torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
        >>> y.tolist(), logdet.tolist()
        ([2.0, 1.0], [0.0, 0.0])
    """

    num_params = 2

    def __init__(self, log_scale_bound: float):
        self.log_scale_bound = log_scale_bound

    def _split(self, params: Tensor) -> tuple[Tensor, Tensor]:
        return params[..., 0], soft_clamp(params[..., 1], self.log_scale_bound)

    def forward(self, x: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        m, s = self._split(params)
        return x * torch.exp(s) + m, s

    def inverse(self, y: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        m, s = self._split(params)
        neg_s = -s
        return (y - m) * torch.exp(neg_s), neg_s

    def __repr__(self) -> str:
        return f"Affine(log_scale_bound={self.log_scale_bound})"


#: Default number of spline bins and half-width of the spline interval (in the flow's standardized
#: space). Outside ``[-bound, bound]`` a spline layer is the identity. Chosen by held-out posterior
#: log-density on all ten benchmark tasks (docs/benchmarks.md, "Defaults from all ten tasks"): 8 bins
#: on ``[-5, 5]`` fitted better than sbi 0.27's ``nsf`` defaults (10 bins on ``[-3, 3]``, our earlier
#: default) on eight of the ten tasks at 1,000 simulations and seven at 10,000; two_moons preferred the
#: narrower interval at both budgets. A wider interval keeps
#: posteriors that are narrow or off-centre relative to the prior inside the splines' range.
DEFAULT_BINS = 8
DEFAULT_BOUND = 5.0

#: Smallest bin width and height (one floor for both, as a fraction of ``2B``) and smallest knot
#: derivative of the spline.
MIN_BIN_SIZE = 1e-3
MIN_DERIVATIVE = 1e-3


#: From this many rows on, :func:`_softmax_rows` writes the softmax out instead of calling torch's.
SOFTMAX_ROWS_WRITTEN_OUT = 512


def _softmax_rows(raw: Tensor) -> Tensor:
    """``torch.softmax(raw, dim=-1)`` for rows of a few values (the bins), computed the faster way.

    On CPU, torch's softmax kernel is slow on rows of a few values (its cost grows with the rows far
    faster than the written-out ``exp(raw - max) / sum``'s), while below a few hundred rows the
    written-out form's extra operations cost more than it saves; so torch's softmax is used below
    :data:`SOFTMAX_ROWS_WRITTEN_OUT` rows, where the values are then exactly as before the written-out
    form existed (``examples/benchmark_training_step.py``; docs/benchmarks.md, "The spline's bin
    softmax written out"). The max it subtracts is detached: a softmax does not change under a shift,
    so the gradient is exactly the softmax's. Both forms agree to rounding.

    Example:
        >>> raw = torch.randn(600, 8)
        >>> bool(torch.allclose(_softmax_rows(raw), torch.softmax(raw, dim=-1), atol=1e-6))
        True
    """
    if raw.numel() < SOFTMAX_ROWS_WRITTEN_OUT * raw.shape[-1]:
        return torch.softmax(raw, dim=-1)
    raw = raw.contiguous()
    scaled = (raw - raw.detach().amax(dim=-1, keepdim=True)).exp()
    return scaled / scaled.sum(dim=-1, keepdim=True)


class RationalQuadraticSpline(Transformer):
    """Monotonic rational-quadratic spline on ``[-bound, bound]`` with identity (linear) tails.

    Each feature has ``3 * bins - 1`` parameters: ``bins`` unnormalized widths, ``bins`` heights (a
    softmax each, floored at :data:`MIN_BIN_SIZE` of the interval) and the
    derivatives at the ``bins - 1`` interior knots (``MIN_DERIVATIVE + softplus``, shifted so that a
    raw 0 gives derivative 1). The derivatives at ``+-bound`` are 1, so the map and its slope are
    continuous with the identity outside. All parameters 0 give equal bins and unit derivatives:
    the identity map.

    Numerical safety: both directions evaluate the spline on inputs clamped into the interval (the
    tails select the identity with ``torch.where``, so no NaN or inf reaches a gradient); the bin
    position is clamped to ``[0, 1]`` and the inverse's discriminant to ``>= 0``.

    Args:
        bins: Number of bins ``K`` (>= 1).
        bound: Half-width ``B`` of the interval (> 0).

    Example:
        >>> spline = RationalQuadraticSpline(bins=4, bound=3.0)
        >>> spline.num_params
        11
        >>> x = torch.tensor([-5.0, -1.0, 0.5, 3.0])
        >>> y, logdet = spline.forward(x, torch.zeros(4, 11))  # zero params: the identity
        >>> torch.allclose(y, x), bool(logdet.abs().max() < 1e-6)
        (True, True)
    """

    def __init__(self, *, bins: int = DEFAULT_BINS, bound: float = DEFAULT_BOUND):
        self.bins = check_int(bins, "bins", minimum=1)
        self.bound = check_positive_number(bound, "bound")
        self.num_params = 3 * self.bins - 1
        # softplus(raw + shift) + MIN_DERIVATIVE == 1 at raw == 0
        self._derivative_shift = math.log(math.expm1(1.0 - MIN_DERIVATIVE))
        self._cache: dict[tuple[torch.dtype, torch.device], tuple[Tensor, Tensor, Tensor]] = {}

    def __repr__(self) -> str:
        return f"RationalQuadraticSpline(bins={self.bins}, bound={self.bound})"

    def _constants(self, like: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per dtype and device: the knots' ``(K, K+1)`` matrix and offsets, and the offsets ``[0, 1]`` of a bin's
        two knots.

        Knot ``j`` of ``K + 1`` sits at ``-B + 2B (MIN_BIN_SIZE * j + (1 - MIN_BIN_SIZE * K) * c_j)``
        with ``c_j`` the sum of the bin softmax below it: the matrix sums and scales, the offsets add the
        rest. The end knots' columns are zero and their offsets ``-B`` and ``B``, so they are exactly
        ``-B`` and ``B`` whatever the rounding.
        """
        key = (like.dtype, like.device)
        constants = self._cache.get(key)
        if constants is None:
            k, bound = self.bins, self.bound
            below = torch.arange(k)[:, None] < torch.arange(k + 1)[None, :]  # bin i lies below knot j
            below[:, -1] = False
            matrix = below.to(torch.float64) * (2 * bound * (1 - MIN_BIN_SIZE * k))
            offset = torch.arange(k + 1, dtype=torch.float64) * (2 * bound * MIN_BIN_SIZE) - bound
            offset[0], offset[-1] = -bound, bound
            ends = torch.arange(2, device=like.device)
            constants = self._cache[key] = (matrix.to(like.device, like.dtype), offset.to(like.device, like.dtype),
                                            ends)
        return constants

    def _knots(self, params: Tensor) -> Tensor:
        """The knots as one ``(*, 3, K+1)`` table: positions in x, positions in y, derivatives.

        The end knots are exactly ``-bound`` and ``bound``, so the spline meets the identity tails
        there (:meth:`_constants`). Written with few operations: on small batches a training step
        costs what its operations' fixed costs add up to.
        """
        k = self.bins
        matrix, offset, _ = self._constants(params)
        # widths and heights as one (*, 2, K) softmax, summed and scaled into knots by one matrix product
        sizes = _softmax_rows(params[..., : 2 * k].unflatten(-1, (2, k)))
        knots = torch.addmm(offset, sizes.reshape(-1, k), matrix).view(*sizes.shape[:-1], k + 1)
        interior = F.softplus(params[..., 2 * k :] + self._derivative_shift) + MIN_DERIVATIVE
        derivatives = F.pad(interior, (1, 1), value=1.0)
        return torch.cat([knots, derivatives.unsqueeze(-2)], dim=-2)

    def _spline(self, v: Tensor, params: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        table = self._knots(params)
        _, _, ends = self._constants(params)
        # the bin of v: the number of interior knots at or below it (0 to K - 1; v made contiguous: under
        # vmap it may not be, and searchsorted then copies it with a warning)
        interior = table[..., 1 if inverse else 0, 1:-1].detach().contiguous()
        index = torch.searchsorted(interior, v.unsqueeze(-1).contiguous(), right=True)
        # both knots of the bin (x, y and derivative) in one gather
        both_ends = (index + ends).unsqueeze(-2).expand(*table.shape[:-1], 2)
        (x_k, y_k, d_k), (x_k1, y_k1, d_k1) = (side.unbind(-1) for side in table.gather(-1, both_ends).unbind(-1))
        w, h = x_k1 - x_k, y_k1 - y_k
        slope = h / w
        two_slope = slope + slope
        curvature = d_k1 + d_k - two_slope
        if inverse:
            dy = v - y_k
            a = h * (slope - d_k) + dy * curvature
            b = h * d_k - dy * curvature
            c = -slope * dy
            # The stable root of a * xi^2 + b * xi + c = 0. Rounding can make the discriminant <= 0 or
            # the denominator >= 0 (both impossible in exact arithmetic); "double where" keeps those
            # points (root 0, or the linear guess dy / h) finite in value and gradient.
            disc = b.square() - 4 * a * c
            positive = disc > 0
            root = torch.where(positive, torch.sqrt(torch.where(positive, disc, torch.ones_like(disc))), 0.0)
            denominator = -b - root
            negative = denominator < 0
            safe = torch.where(negative, denominator, -torch.ones_like(denominator))
            xi = torch.where(negative, 2 * c / safe, dy / h).clamp(0, 1)
            out = x_k + xi * w
        else:
            xi = ((v - x_k) / w).clamp(0, 1)
        one_minus = 1 - xi
        both = xi * one_minus
        xi_squared = xi.square()
        denominator = torch.addcmul(slope, curvature, both)
        if not inverse:
            out = torch.addcmul(y_k, h, torch.addcmul(d_k * both, slope, xi_squared) / denominator)
        inner = torch.addcmul(torch.addcmul(d_k1 * xi_squared, d_k, one_minus.square()), two_slope, both)
        logdet = torch.sub(torch.log(slope.square() * inner), torch.log(denominator), alpha=2)
        return out, -logdet if inverse else logdet

    def _apply(self, v: Tensor, params: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        inside = v.abs() <= self.bound
        out, logdet = self._spline(v.clamp(-self.bound, self.bound), params, inverse)
        return torch.where(inside, out, v), torch.where(inside, logdet, 0.0)

    def forward(self, x: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        return self._apply(x, params, inverse=False)

    def inverse(self, y: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        return self._apply(y, params, inverse=True)


def make_transformer(
    transformer: Any, *, bins: Any = DEFAULT_BINS, bound: Any = DEFAULT_BOUND, log_scale_bound: float
) -> Transformer:
    """The transformer of a factory's options: ``"affine"`` (with ``log_scale_bound``) or ``"spline"``.

    ``bins`` and ``bound`` are validated whatever the transformer, so a typo never passes silently.

    Raises:
        TypeError: If ``transformer`` is not a string, ``bins`` not an int or ``bound`` not a number.
        ValueError: For an unknown name, ``bins < 1`` or ``bound <= 0`` (or not finite).

    Example:
        >>> make_transformer("spline", bins=8, bound=5.0, log_scale_bound=3.0)
        RationalQuadraticSpline(bins=8, bound=5.0)
        >>> make_transformer("cubic", log_scale_bound=3.0)
        Traceback (most recent call last):
        ...
        ValueError: transformer must be one of ('affine', 'spline'), got 'cubic'
    """
    if not isinstance(transformer, str):
        raise TypeError(f"transformer must be one of {TRANSFORMERS}, got {type(transformer).__name__} {transformer!r}")
    if transformer not in TRANSFORMERS:
        raise ValueError(f"transformer must be one of {TRANSFORMERS}, got {transformer!r}")
    spline = RationalQuadraticSpline(bins=bins, bound=bound)
    return spline if transformer == "spline" else Affine(log_scale_bound)

"""Coupling layers with context-fed conditioners: NICE's additive coupling, and couplings with an
elementwise transformer (RealNVP's affine map, or a rational-quadratic spline as in Neural Spline Flows)."""

from __future__ import annotations

import math

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from sbiflows.nn import MLP
from sbiflows.transforms.base import Transform
from sbiflows.transforms.transformers import Affine, Transformer

#: Bound on the affine coupling log-scale per layer.
LOG_SCALE_BOUND = 3.0


def alternating_mask(features: int, *, parity: int = 0) -> Tensor:
    """A boolean mask selecting the dimensions ``i`` with ``i % 2 == parity`` (the identity part).

    Example:
        >>> alternating_mask(4, parity=1)
        tensor([False,  True, False,  True])
    """
    return torch.arange(features) % 2 == parity


def bit_mask(features: int, *, layer: int) -> Tensor:
    """The mask of coupling ``layer`` in the ``mixing="masks"`` schedule of :func:`sbiflows.flows.realnvp`.

    Layers ``2j`` and ``2j + 1`` split the dimensions by binary digit ``j mod ceil(log2(features))``
    of their index (kept where it is ``layer % 2``), so every pair of dimensions lies on opposite sides
    in some layer; layers 0 and 1 are :func:`alternating_mask`.

    Example:
        >>> bit_mask(4, layer=2)
        tensor([ True,  True, False, False])
    """
    bits = max(1, math.ceil(math.log2(features)))
    digit = (layer // 2) % bits
    return (torch.arange(features) >> digit) % 2 == layer % 2


def _as_slice(indices: Tensor) -> slice | None:
    """``indices`` (sorted, non-empty) as an equivalent slice if they are evenly spaced, else None.

    Example:
        >>> _as_slice(torch.tensor([1, 3, 5])), _as_slice(torch.tensor([0, 1, 3]))
        (slice(1, 6, 2), None)
    """
    values = indices.tolist()
    if not values:
        return None
    step = values[1] - values[0] if len(values) > 1 else 1
    if step < 1 or values != list(range(values[0], values[-1] + 1, step)):
        return None
    return slice(values[0], values[-1] + 1, step)


class _Coupling(Transform):
    """Shared mechanics: split by ``mask`` into ``x1`` (kept) and ``x2`` (transformed by ``x1`` and context).

    With one feature and a context, nothing is kept: the conditioner sees the context alone (as sbi's
    ``nsf`` does for one parameter).
    """

    params_per_feature: int = 1

    def __init__(
        self,
        features: int,
        context_features: int = 0,
        *,
        mask: Tensor | None = None,
        hidden_features: Sequence[int] = (64, 64),
        activation: type[nn.Module] = nn.ReLU,
    ):
        super().__init__()
        if features < 1 or (features == 1 and context_features < 1):
            raise ValueError(
                "coupling layers need features >= 2 (one dimension to condition on), or 1 feature with "
                f"context_features >= 1 (the conditioner then sees the context alone); got features={features}, "
                f"context_features={context_features}"
            )
        if mask is None:
            mask = alternating_mask(features) if features > 1 else torch.zeros(1, dtype=torch.bool)
        mask = torch.as_tensor(mask, dtype=torch.bool)
        if mask.shape != (features,) or mask.all() or (features > 1 and not mask.any()):
            raise ValueError(
                f"mask must be a boolean tensor of shape ({features},) with both True (kept) and False "
                f"(transformed) entries, got {mask.tolist()}"
            )
        self.features = features
        self.context_features = context_features
        self.register_buffer("identity_idx", torch.nonzero(mask).squeeze(-1))
        self.register_buffer("transform_idx", torch.nonzero(~mask).squeeze(-1))
        n_id, n_tr = len(self.identity_idx), len(self.transform_idx)
        self._set_slices()
        self.conditioner = MLP(
            n_id + context_features, self.params_per_feature * n_tr, hidden_features,
            activation=activation, zero_last=True,
        )

    def _set_slices(self) -> None:
        """The halves as strided slices (views) where the index buffers allow, as alternating masks do:
        cheaper than indexing on small batches. Set again whenever a state dict is loaded."""
        self._identity_slice, self._transform_slice = _as_slice(self.identity_idx), _as_slice(self.transform_idx)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._set_slices()  # a loaded mask is followed

    def _conditioner(self, x1: Tensor, context: Tensor | None) -> Tensor:
        inputs = x1 if context is None else torch.cat([x1, context], dim=-1)
        return self.conditioner(inputs)

    def _transform(self, x: Tensor, context: Tensor | None, inverse: bool) -> tuple[Tensor, Tensor]:
        context = self._context(x, context)
        x1 = x[..., self._identity_slice] if self._identity_slice is not None else x[..., self.identity_idx]
        x2 = x[..., self._transform_slice] if self._transform_slice is not None else x[..., self.transform_idx]
        y2, logdet = self._couple(x2, self._conditioner(x1, context), inverse)
        return x.index_copy(-1, self.transform_idx, y2), logdet  # one op: x with the moved half replaced

    def _couple(self, x2: Tensor, params: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._transform(x, context, inverse=False)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._transform(z, context, inverse=True)


class AdditiveCoupling(_Coupling):
    """NICE additive coupling (Dinh et al. 2015): ``z1 = x1``, ``z2 = x2 + m(x1, context)``.

    Volume preserving: ``logdet`` is exactly 0. The inverse is ``x2 = z2 - m(z1, context)``.

    Args:
        features: Dimension D (>= 2).
        context_features: Context dimension C (0: unconditional); the context is fed to ``m``.
        mask: Boolean ``(D,)``; True marks the kept part ``x1``. Default: even dimensions.
        hidden_features: Hidden sizes of ``m``.
        activation: Activation class of ``m``'s hidden layers.

    Example:
        >>> layer = AdditiveCoupling(4, context_features=2)
        >>> z, logdet = layer(torch.randn(3, 4), torch.randn(3, 2))
        >>> bool((logdet == 0).all())
        True
    """

    def _couple(self, x2: Tensor, params: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        y2 = x2 - params if inverse else x2 + params
        return y2, x2.new_zeros(x2.shape[:-1])


class Coupling(_Coupling):
    """A coupling layer with an elementwise transformer: ``z1 = x1``, ``z2 = f(x2; params(x1, context))``.

    The conditioner outputs ``num_params`` blocks of ``len(x2)`` values (parameter-major), reshaped to
    ``(*batch, len(x2), num_params)`` for the transformer. Its last layer starts at zero, so a new
    layer is the identity.

    Args:
        features: Dimension D (>= 2, or 1 with a context: then the conditioner sees the context alone).
        context_features: Context dimension C (0: unconditional); the context is fed to the conditioner.
        transformer: The elementwise map (e.g.
            :class:`~sbiflows.transforms.transformers.RationalQuadraticSpline`).
        mask: Boolean ``(D,)``; True marks the kept part ``x1``. Default: even dimensions.
        hidden_features: Hidden sizes of the conditioner.
        activation: Activation class of the conditioner's hidden layers.

    Example:
        >>> from sbiflows.transforms.transformers import RationalQuadraticSpline
        >>> layer = Coupling(3, 2, transformer=RationalQuadraticSpline(bins=4))
        >>> z, logdet = layer(torch.randn(5, 3), torch.randn(5, 2))
        >>> z.shape, logdet.shape
        (torch.Size([5, 3]), torch.Size([5]))
    """

    def __init__(self, features: int, context_features: int = 0, *, transformer: Transformer, **options):
        self.params_per_feature = transformer.num_params
        super().__init__(features, context_features, **options)
        self.transformer = transformer

    def _couple(self, x2: Tensor, params: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        params = params.unflatten(-1, (self.params_per_feature, x2.shape[-1])).transpose(-1, -2)
        y2, logdet = (self.transformer.inverse if inverse else self.transformer.forward)(x2, params)
        return y2, logdet.sum(-1)


class AffineCoupling(Coupling):
    """RealNVP affine coupling (Dinh et al. 2017): ``z1 = x1``, ``z2 = x2 * exp(s) + m``.

    ``s`` and ``m`` are functions of ``(x1, context)``; ``s`` is softly bounded to ``(-3, 3)`` so that
    training cannot overflow. ``logdet = sum(s)``; the inverse is ``x2 = (z2 - m) * exp(-s)``.
    The conditioner's outputs are all the ``m`` first, then all the ``s``.

    Args:
        features: Dimension D (>= 2, or 1 with a context).
        context_features: Context dimension C (0: unconditional); the context is fed to the conditioner.
        mask: Boolean ``(D,)``; True marks the kept part ``x1``. Default: even dimensions.
        hidden_features: Hidden sizes of the conditioner.
        activation: Activation class of the conditioner's hidden layers.

    Example:
        >>> layer = AffineCoupling(2)
        >>> x = torch.randn(5, 2)
        >>> torch.allclose(layer.inverse(layer(x)[0])[0], x)
        True
    """

    def __init__(self, features: int, context_features: int = 0, **options):
        super().__init__(features, context_features, transformer=Affine(LOG_SCALE_BOUND), **options)

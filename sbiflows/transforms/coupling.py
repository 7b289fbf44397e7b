"""Coupling layers: NICE's additive coupling and RealNVP's affine coupling, with context-fed conditioners."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from sbiflows.nn import MLP, soft_clamp
from sbiflows.transforms.base import Transform

#: Bound on the affine coupling log-scale per layer.
LOG_SCALE_BOUND = 3.0


def alternating_mask(features: int, *, parity: int = 0) -> Tensor:
    """A boolean mask selecting the dimensions ``i`` with ``i % 2 == parity`` (the identity part).

    Example:
        >>> alternating_mask(4, parity=1)
        tensor([False,  True, False,  True])
    """
    return torch.arange(features) % 2 == parity


class _Coupling(Transform):
    """Shared mechanics: split by ``mask`` into ``x1`` (kept) and ``x2`` (transformed by ``x1`` and context)."""

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
        if features < 2:
            raise ValueError(f"coupling layers need features >= 2 (one dimension to condition on), got {features}")
        mask = alternating_mask(features) if mask is None else torch.as_tensor(mask, dtype=torch.bool)
        if mask.shape != (features,) or mask.all() or not mask.any():
            raise ValueError(
                f"mask must be a boolean tensor of shape ({features},) with both True (kept) and False "
                f"(transformed) entries, got {mask.tolist()}"
            )
        self.features = features
        self.context_features = context_features
        self.register_buffer("identity_idx", torch.nonzero(mask).squeeze(-1))
        self.register_buffer("transform_idx", torch.nonzero(~mask).squeeze(-1))
        n_id, n_tr = len(self.identity_idx), len(self.transform_idx)
        self.conditioner = MLP(
            n_id + context_features, self.params_per_feature * n_tr, hidden_features,
            activation=activation, zero_last=True,
        )

    def _conditioner(self, x1: Tensor, context: Tensor | None) -> Tensor:
        inputs = x1 if context is None else torch.cat([x1, context], dim=-1)
        return self.conditioner(inputs)

    def _transform(self, x: Tensor, context: Tensor | None, inverse: bool) -> tuple[Tensor, Tensor]:
        context = self._context(x, context)
        x1, x2 = x[..., self.identity_idx], x[..., self.transform_idx]
        y2, logdet = self._couple(x2, self._conditioner(x1, context), inverse)
        y = torch.empty_like(x)
        y[..., self.identity_idx] = x1
        y[..., self.transform_idx] = y2
        return y, logdet

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


class AffineCoupling(_Coupling):
    """RealNVP affine coupling (Dinh et al. 2017): ``z1 = x1``, ``z2 = x2 * exp(s) + m``.

    ``s`` and ``m`` are functions of ``(x1, context)``; ``s`` is softly bounded to ``(-3, 3)`` so that
    training cannot overflow. ``logdet = sum(s)``; the inverse is ``x2 = (z2 - m) * exp(-s)``.

    Args:
        features: Dimension D (>= 2).
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

    params_per_feature = 2

    def _couple(self, x2: Tensor, params: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        m, s = params.chunk(2, dim=-1)
        s = soft_clamp(s, LOG_SCALE_BOUND)
        if inverse:
            return (x2 - m) * torch.exp(-s), -s.sum(-1)
        return x2 * torch.exp(s) + m, s.sum(-1)

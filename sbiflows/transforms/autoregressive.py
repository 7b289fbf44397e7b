"""Masked autoregressive flow (MAF) layers and their inverse, the inverse autoregressive flow (IAF)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from sbiflows.nn import soft_clamp
from sbiflows.transforms.base import Inverse, Transform
from sbiflows.transforms.made import MADE

#: Bound on the autoregressive log-scales per layer.
LOG_SCALE_BOUND = 5.0


class MaskedAutoregressive(Transform):
    """MAF layer (Papamakarios et al. 2017): the generative map ``x_i = z_i * exp(s_i) + m_i``.

    ``(m_i, s_i)`` come from a :class:`MADE` of ``x_{<i}`` (in the layer's ordering) and the context;
    ``s`` is softly bounded to ``(-5, 5)``.

    * ``forward`` (data -> latent, density): ``z = (x - m(x)) * exp(-s(x))``, **one** network pass,
      ``logdet = -sum(s)``.
    * ``inverse`` (latent -> data, sampling): ``D`` sequential passes, each fixing one more coordinate.

    Args:
        features: Dimension D.
        context_features: Context dimension C (0: unconditional); fed to every hidden unit of the MADE.
        hidden_features: Hidden sizes of the MADE.
        ordering: Autoregressive ordering (see :class:`MADE`).
        random_degrees: Random (True) or cyclic hidden connectivity integers.
        seed: Seed of random orderings and degrees.
        activation: Activation class of the MADE.

    Example:
        >>> layer = MaskedAutoregressive(3, context_features=2)
        >>> z, logdet = layer(torch.randn(5, 3), torch.randn(5, 2))
        >>> z.shape, logdet.shape
        (torch.Size([5, 3]), torch.Size([5]))
    """

    def __init__(
        self,
        features: int,
        context_features: int = 0,
        *,
        hidden_features: Sequence[int] = (64, 64),
        ordering: str | Sequence[int] | None = None,
        random_degrees: bool = True,
        seed: int = 0,
        activation: type[nn.Module] = nn.ReLU,
    ):
        super().__init__()
        self.features = features
        self.context_features = context_features
        self.made = MADE(
            features, 2, context_features, hidden_features=hidden_features, ordering=ordering,
            random_degrees=random_degrees, seed=seed, activation=activation, zero_last=True,
        )

    def _params(self, x: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        out = self.made(x, context)
        return out[..., 0], soft_clamp(out[..., 1], LOG_SCALE_BOUND)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        context = self._context(x, context)
        m, s = self._params(x, context)
        neg_s = -s
        return (x - m) * torch.exp(neg_s), neg_s.sum(-1)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        context = self._context(z, context)
        x = torch.zeros_like(z)
        for _ in range(self.features):
            m, s = self._params(x, context)
            x = z * torch.exp(s) + m
        return x, s.sum(-1)


class InverseAutoregressive(Inverse):
    """IAF layer (Kingma et al. 2016): a :class:`MaskedAutoregressive` layer used the other way round.

    ``inverse`` (latent -> data, sampling) is one network pass; ``forward`` (density of an arbitrary
    point) takes ``D`` sequential passes. The constructor takes the same arguments as
    :class:`MaskedAutoregressive`.

    Example:
        >>> layer = InverseAutoregressive(3)
        >>> layer.inverse(torch.randn(2, 3))[0].shape
        torch.Size([2, 3])
    """

    def __init__(self, features: int, context_features: int = 0, **options):
        super().__init__(MaskedAutoregressive(features, context_features, **options))

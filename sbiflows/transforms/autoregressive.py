"""Masked autoregressive flow (MAF) layers and their inverse, the inverse autoregressive flow (IAF)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from sbiflows.transforms.base import Inverse, Transform
from sbiflows.transforms.made import MADE
from sbiflows.transforms.transformers import Affine, Transformer

#: Bound on the autoregressive log-scales per layer.
LOG_SCALE_BOUND = 5.0


class MaskedAutoregressive(Transform):
    """MAF layer (Papamakarios et al. 2017): the generative map ``x_i = f(z_i; params_i)``.

    ``f`` is the layer's :class:`~sbiflows.transforms.transformers.Transformer`, elementwise and
    monotonic, and ``params_i`` come from a :class:`MADE` of ``x_{<i}`` (in the layer's ordering) and
    the context. The default is the affine map ``x_i = z_i * exp(s_i) + m_i`` with ``s`` softly
    bounded to ``(-5, 5)``; a :class:`~sbiflows.transforms.transformers.RationalQuadraticSpline`
    gives a spline MAF layer (Durkan et al. 2019).

    * ``forward`` (data -> latent, density): ``z = f^{-1}(x; params(x))``, **one** network pass
      (affine: ``z = (x - m(x)) * exp(-s(x))``, ``logdet = -sum(s)``).
    * ``inverse`` (latent -> data, sampling): ``D`` sequential passes, each fixing one more coordinate.

    Args:
        features: Dimension D.
        context_features: Context dimension C (0: unconditional); fed to every hidden unit of the MADE.
        hidden_features: Hidden sizes of the MADE.
        ordering: Autoregressive ordering (see :class:`MADE`).
        random_degrees: Random (True) or cyclic hidden connectivity integers.
        seed: Seed of random orderings and degrees.
        activation: Activation class of the MADE.
        transformer: The elementwise map; default ``Affine(LOG_SCALE_BOUND)``. The MADE's last layer
            starts at zero, so a new layer is the identity for every transformer here.

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
        transformer: Transformer | None = None,
    ):
        super().__init__()
        self.features = features
        self.context_features = context_features
        self.transformer = Affine(LOG_SCALE_BOUND) if transformer is None else transformer
        self.made = MADE(
            features, self.transformer.num_params, context_features, hidden_features=hidden_features, ordering=ordering,
            random_degrees=random_degrees, seed=seed, activation=activation, zero_last=True,
        )

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        context = self._context(x, context)
        z, logdet = self.transformer.inverse(x, self.made(x, context))
        return z, logdet.sum(-1)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        context = self._context(z, context)
        x = torch.zeros_like(z)
        for _ in range(self.features):
            x, logdet = self.transformer.forward(z, self.made(x, context))
        return x, logdet.sum(-1)


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

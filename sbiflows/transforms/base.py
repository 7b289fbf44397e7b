"""The transform protocol, composition and inversion.

Direction convention (used by every layer in :mod:`sbiflows.transforms`):

* ``forward(x, context) -> (z, logdet)`` maps **data to latent**, with ``logdet = log|det dz/dx|``.
  This is the direction density evaluation needs: ``log p(x) = log p_Z(z) + logdet``.
* ``inverse(z, context) -> (x, logdet)`` maps **latent to data**, with ``logdet = log|det dx/dz|``.
  This is the direction sampling needs, and the lecture's generative map ``x = f(z)``.

Shapes: ``x`` and ``z`` are ``(*batch, D)``, ``context`` is ``(*batch, C)`` (or broadcastable to it),
``logdet`` is ``(*batch,)``. Every layer accepts ``context`` even when it ignores it, so that a
composition never has to branch.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn


class Transform(nn.Module):
    """Base class of invertible layers: ``forward`` is data -> latent, ``inverse`` is latent -> data.

    Attributes:
        features: Dimension ``D`` of the inputs and outputs.
        context_features: Dimension ``C`` of the context (0 for an unconditional layer).
    """

    features: int
    context_features: int = 0

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Data -> latent. Returns ``(z, log|det dz/dx|)``."""
        raise NotImplementedError

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Latent -> data. Returns ``(x, log|det dx/dz|)``."""
        raise NotImplementedError

    def _context(self, x: Tensor, context: Tensor | None) -> Tensor | None:
        """The context broadcast to ``x``'s batch shape, or None for an unconditional layer."""
        return broadcast_context(x, context, self.context_features)


def broadcast_context(x: Tensor, context: Tensor | None, context_features: int) -> Tensor | None:
    """Broadcast ``context`` to ``x.shape[:-1] + (context_features,)``.

    Args:
        x: Inputs of shape ``(*batch, D)``.
        context: ``(*batch', C)`` with ``batch'`` broadcastable to ``batch``; ignored (None returned)
            when ``context_features == 0``.
        context_features: The ``C`` the layer was built for.

    Raises:
        ValueError: If a conditional layer gets no context or one of the wrong size.

    Example:
        >>> broadcast_context(torch.zeros(4, 2), torch.ones(3), 3).shape
        torch.Size([4, 3])
    """
    if context_features == 0:
        return None
    if context is None:
        raise ValueError(
            f"this layer is conditional: context of shape (*batch, {context_features}) is required, got None"
        )
    if context.shape[-1] != context_features:
        raise ValueError(
            f"context must have shape (*batch, {context_features}), got {tuple(context.shape)}"
        )
    try:
        return context.expand(*x.shape[:-1], context_features)
    except RuntimeError:
        raise ValueError(
            f"context batch shape {tuple(context.shape[:-1])} does not broadcast to the input batch "
            f"shape {tuple(x.shape[:-1])}"
        ) from None


class Compose(Transform):
    """Apply transforms in order (data -> latent); the inverse applies them in reverse.

    Example:
        >>> from sbiflows.transforms import ElementwiseAffine, Permutation
        >>> t = Compose(ElementwiseAffine(2), Permutation(2, order="reverse"))
        >>> z, logdet = t(torch.randn(5, 2))
        >>> z.shape, logdet.shape
        (torch.Size([5, 2]), torch.Size([5]))
    """

    def __init__(self, *transforms: Transform | Iterable[Transform]):
        super().__init__()
        flat: list[Transform] = []
        for t in transforms:
            flat.extend(t if not isinstance(t, nn.Module) else [t])
        if not flat:
            raise ValueError("Compose needs at least one transform")
        features = {t.features for t in flat}
        if len(features) != 1:
            raise ValueError(f"all transforms must have the same number of features, got {sorted(features)}")
        self.transforms = nn.ModuleList(flat)
        self.features = flat[0].features
        self.context_features = max(t.context_features for t in flat)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        x, total = self.transforms[0](x, context)
        for t in self.transforms[1:]:
            x, logdet = t(x, context)
            total = total + logdet
        return x, total

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        total = z.new_zeros(z.shape[:-1])
        for t in reversed(self.transforms):
            z, logdet = t.inverse(z, context)
            total = total + logdet
        return z, total


class Inverse(Transform):
    """The inverse of a transform: its ``forward`` is the wrapped ``inverse`` and vice versa.

    ``Inverse(MaskedAutoregressive(...))`` is an inverse autoregressive flow (IAF) layer.

    Example:
        >>> from sbiflows.transforms import ElementwiseAffine
        >>> layer = ElementwiseAffine(2, shift=1.0)
        >>> Inverse(layer)(torch.zeros(1, 2))[0].tolist()
        [[1.0, 1.0]]
    """

    def __init__(self, transform: Transform):
        super().__init__()
        self.transform = transform
        self.features = transform.features
        self.context_features = transform.context_features

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.transform.inverse(x, context)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.transform.forward(z, context)

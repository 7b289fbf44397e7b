"""Small networks shared by conditioners and embeddings."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


def soft_clamp(s: Tensor, bound: float) -> Tensor:
    """Softly bound ``s`` to ``(-bound, bound)``: ``bound * tanh(s / bound)``.

    Used on affine log-scales so that training cannot overflow ``exp(s)``; near zero it is the identity.

    Example:
        >>> soft_clamp(torch.tensor([0.0, 1e4]), 3.0)
        tensor([0., 3.])
    """
    return torch.tanh(s * (1.0 / bound)) * bound  # scalar multiplies: cheaper than a scalar division


class MLP(nn.Sequential):
    """A fully connected network ``in_features -> hidden_features... -> out_features``.

    Args:
        in_features: Input size.
        out_features: Output size.
        hidden_features: Sizes of the hidden layers.
        activation: Activation module class used between layers.
        zero_last: Initialise the last layer to zero, so that a conditioner starts as the identity map.

    Example:
        >>> MLP(3, 2, hidden_features=(8,))(torch.zeros(5, 3)).shape
        torch.Size([5, 2])
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        hidden_features: Sequence[int] = (64, 64),
        *,
        activation: type[nn.Module] = nn.ReLU,
        zero_last: bool = False,
    ):
        sizes = [in_features, *hidden_features, out_features]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                layers.append(activation())
        super().__init__(*layers)
        if zero_last:
            nn.init.zeros_(layers[-1].weight)
            nn.init.zeros_(layers[-1].bias)

"""Base distributions of flows, as modules so that ``.to(device)`` and ``.double()`` move them too."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class StandardNormal(nn.Module):
    """The standard normal ``N(0, I_D)``.

    Example:
        >>> StandardNormal(2).log_prob(torch.zeros(1, 2))
        tensor([-1.8379])
    """

    def __init__(self, features: int):
        super().__init__()
        self.features = features
        self.register_buffer("_anchor", torch.zeros(()))  # carries device and dtype

    def log_prob(self, z: Tensor) -> Tensor:
        """Log-density of ``z`` of shape ``(*batch, D)``; returns ``(*batch,)``."""
        return -0.5 * (z * z).sum(-1) - 0.5 * self.features * math.log(2 * math.pi)

    def sample(self, shape: tuple[int, ...], *, generator: torch.Generator | None = None) -> Tensor:
        """Samples of shape ``(*shape, D)``."""
        a = self._anchor
        return torch.randn(*shape, self.features, generator=generator, device=a.device, dtype=a.dtype)


class BoxUniform(nn.Module):
    """The uniform distribution on the box ``[low, high)^D`` (``log_prob`` is ``-inf`` outside).

    Args:
        low: Lower bound (scalar or per dimension).
        high: Upper bound (scalar or per dimension).
        features: Dimension D (needed when both bounds are scalars).

    Example:
        >>> BoxUniform(0.0, 2.0, features=1).log_prob(torch.tensor([[0.5], [3.0]]))
        tensor([-0.6931,    -inf])
    """

    def __init__(self, low: float | Tensor, high: float | Tensor, *, features: int | None = None):
        super().__init__()
        low_t, high_t = torch.as_tensor(low, dtype=torch.get_default_dtype()), torch.as_tensor(
            high, dtype=torch.get_default_dtype()
        )
        features = features or max(low_t.numel(), high_t.numel())
        low_t, high_t = low_t.expand(features).clone(), high_t.expand(features).clone()
        if not bool((high_t > low_t).all()):
            raise ValueError(f"high must exceed low in every dimension, got low={low_t.tolist()}, high={high_t.tolist()}")
        self.features = features
        self.register_buffer("low", low_t)
        self.register_buffer("high", high_t)

    def log_prob(self, z: Tensor) -> Tensor:
        """Log-density of ``z`` of shape ``(*batch, D)``; returns ``(*batch,)``."""
        inside = ((z >= self.low) & (z < self.high)).all(-1)
        value = -torch.log(self.high - self.low).sum()
        return torch.where(inside, value, torch.full_like(value, -math.inf))

    def sample(self, shape: tuple[int, ...], *, generator: torch.Generator | None = None) -> Tensor:
        """Samples of shape ``(*shape, D)``."""
        u = torch.rand(*shape, self.features, generator=generator, device=self.low.device, dtype=self.low.dtype)
        return self.low + (self.high - self.low) * u

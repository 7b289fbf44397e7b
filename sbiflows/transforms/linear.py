"""An invertible linear layer in LU form, the mixing layer between couplings of sbi's and nflows' NSF."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sbiflows.transforms.base import Transform

#: Smallest diagonal entry of ``U``: keeps the layer invertible and its inverse bounded.
MIN_DIAGONAL = 1e-3


class LULinear(Transform):
    """``z = x W^T + b`` with ``W = L U``: L unit lower-triangular, U upper-triangular, positive diagonal.

    ``logdet = sum(log diag U)``, the same for every input. The inverse solves two triangular systems
    (no matrix inverse is formed). The diagonal is ``MIN_DIAGONAL + softplus(d)``, so ``W`` stays
    invertible whatever the optimizer does. Starting from the identity (``W = I``, ``b = 0``), it
    lets a stack of couplings mix all dimensions, not only the two halves of their masks. The layer
    is unconditional; ``context`` is accepted and ignored.

    Args:
        features: Dimension D.

    Example:
        >>> layer = LULinear(3)
        >>> x = torch.randn(4, 3)
        >>> z, logdet = layer(x)
        >>> torch.allclose(z, x, atol=1e-6), torch.allclose(logdet, torch.zeros(4), atol=1e-6)
        (True, True)
        >>> torch.allclose(layer.inverse(z)[0], x, atol=1e-6)
        True
    """

    def __init__(self, features: int):
        super().__init__()
        if isinstance(features, bool) or not isinstance(features, int) or features < 1:
            raise ValueError(f"features must be an int >= 1, got {features!r}")
        self.features = features
        rows, cols = torch.tril_indices(features, features, offset=-1)
        self.register_buffer("_below", rows * features + cols, persistent=False)  # flat indices, row-major
        self.register_buffer("_above", cols * features + rows, persistent=False)
        self.lower = nn.Parameter(torch.zeros(len(rows)))  # L below its diagonal, row by row
        self.upper = nn.Parameter(torch.zeros(len(rows)))  # U above its diagonal, column by column
        # softplus(d) + MIN_DIAGONAL = 1 at the start
        self.diagonal = nn.Parameter(torch.full((features,), math.log(math.expm1(1.0 - MIN_DIAGONAL))))
        self.bias = nn.Parameter(torch.zeros(features))

    def _factors(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(L, U, diag U)``."""
        d = self.features
        diagonal = F.softplus(self.diagonal) + MIN_DIAGONAL
        lower = torch.eye(d, dtype=self.lower.dtype, device=self.lower.device).flatten()
        lower = lower.index_put((self._below,), self.lower).view(d, d)
        upper = torch.diag(diagonal).flatten().index_put((self._above,), self.upper).view(d, d)
        return lower, upper, diagonal

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        lower, upper, diagonal = self._factors()
        z = x @ (lower @ upper).T + self.bias
        return z, torch.log(diagonal).sum().expand(x.shape[:-1])

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        lower, upper, diagonal = self._factors()
        rows = (z - self.bias).reshape(-1, self.features)
        # x W^T = r with W^T = U^T L^T: solve y L^T = r (L^T upper, unit diagonal), then x U^T = y
        y = torch.linalg.solve_triangular(lower.T, rows, upper=True, left=False, unitriangular=True)
        x = torch.linalg.solve_triangular(upper.T, y, upper=False, left=False)
        return x.reshape(z.shape), (-torch.log(diagonal).sum()).expand(z.shape[:-1])


__all__ = ["LULinear"]

"""Elementwise layers: the affine shift-and-scale, permutations and the batch-norm flow layer."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from sbiflows.nn import MLP, soft_clamp
from sbiflows.transforms.base import Transform

#: Bound on context-dependent log-scales (|s| < 5 means a factor below ~150 per layer).
LOG_SCALE_BOUND = 5.0


class ElementwiseAffine(Transform):
    """Per-dimension shift and scale: the generative map ``x = z * exp(s) + m``.

    ``forward`` (data -> latent) is ``z = (x - m) * exp(-s)`` with ``logdet = -sum(s)``. Unconditional,
    ``m`` and ``s`` are learnable parameters; with ``context_features > 0`` they are the output of an
    MLP of the context (``s`` softly bounded to ``(-5, 5)``), added to the learnable parameters.

    This is the lecture's illustration: with ``shift=1`` and ``log_scale=log 2`` the map is
    ``f(z) = 2z + 1``, which sends U[0, 1] to the density 1/2 on [1, 3]. It is also the final diagonal
    scaling layer of NICE.

    Args:
        features: Dimension D.
        context_features: Context dimension C (0: unconditional).
        shift: Initial shift ``m`` (scalar or per dimension).
        log_scale: Initial log-scale ``s`` (scalar or per dimension).
        hidden_features: Hidden sizes of the context network.

    Example:
        >>> layer = ElementwiseAffine(1, shift=1.0, log_scale=math.log(2.0))
        >>> layer.inverse(torch.tensor([[0.5]]))[0].tolist()
        [[2.0]]
    """

    def __init__(
        self,
        features: int,
        context_features: int = 0,
        *,
        shift: float | Sequence[float] = 0.0,
        log_scale: float | Sequence[float] = 0.0,
        hidden_features: Sequence[int] = (64, 64),
    ):
        super().__init__()
        self.features = features
        self.context_features = context_features
        self.shift = nn.Parameter(torch.as_tensor(shift, dtype=torch.get_default_dtype()).expand(features).clone())
        self.log_scale = nn.Parameter(
            torch.as_tensor(log_scale, dtype=torch.get_default_dtype()).expand(features).clone()
        )
        self.net = (
            MLP(context_features, 2 * features, hidden_features, zero_last=True) if context_features else None
        )

    def _params(self, x: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        context = self._context(x, context)
        if self.net is None:
            return self.shift.expand_as(x), self.log_scale.expand_as(x)
        m, s = self.net(context).chunk(2, dim=-1)
        return self.shift + m, self.log_scale + soft_clamp(s, LOG_SCALE_BOUND)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        m, s = self._params(x, context)
        return (x - m) * torch.exp(-s), -s.sum(-1)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        m, s = self._params(z, context)
        return z * torch.exp(s) + m, s.sum(-1)


class Permutation(Transform):
    """A fixed permutation of the dimensions (``logdet = 0``).

    Args:
        features: Dimension D.
        order: ``"reverse"``, ``"random"`` (drawn with ``seed``) or an explicit permutation of ``0..D-1``.
        seed: Seed of the random permutation.

    Example:
        >>> Permutation(3, order="reverse")(torch.tensor([[1.0, 2.0, 3.0]]))[0]
        tensor([[3., 2., 1.]])
    """

    def __init__(self, features: int, *, order: str | Sequence[int] = "reverse", seed: int = 0):
        super().__init__()
        self.features = features
        if isinstance(order, str):
            if order == "reverse":
                perm = torch.arange(features - 1, -1, -1)
            elif order == "random":
                perm = torch.randperm(features, generator=torch.Generator().manual_seed(seed))
            else:
                raise ValueError(f"order must be 'reverse', 'random' or a permutation, got {order!r}")
        else:
            perm = torch.as_tensor(order, dtype=torch.long)
            if sorted(perm.tolist()) != list(range(features)):
                raise ValueError(f"order must be a permutation of 0..{features - 1}, got {perm.tolist()}")
        self.register_buffer("perm", perm)
        self.register_buffer("inverse_perm", torch.argsort(perm))

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return x[..., self.perm], x.new_zeros(x.shape[:-1])

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return z[..., self.inverse_perm], z.new_zeros(z.shape[:-1])


class BatchNorm(Transform):
    """The batch-normalisation flow layer of RealNVP (Dinh et al. 2017) and MAF (Papamakarios et al. 2017).

    ``forward`` (data -> latent): ``z = (x - mean) / sqrt(var + eps) * exp(log_gamma) + beta`` with
    ``logdet = sum(log_gamma - 0.5 * log(var + eps))``. In training mode ``mean``/``var`` are the
    statistics of the current batch (over all batch dimensions) and the running averages are updated;
    in eval mode, and always in ``inverse``, the running averages are used. The log-determinant is the
    one of the map actually applied in each mode, treating the statistics as constants.

    Args:
        features: Dimension D.
        momentum: Weight of the newest batch in the running averages.
        eps: Added to the variance for numerical stability.

    Example:
        >>> bn = BatchNorm(2).eval()
        >>> logdet = bn(torch.zeros(3, 2))[1]  # -sum(log sqrt(running_var + eps)), running_var = 1
        >>> [round(v, 6) for v in logdet.tolist()]
        [-1e-05, -1e-05, -1e-05]
    """

    def __init__(self, features: int, *, momentum: float = 0.1, eps: float = 1e-5):
        super().__init__()
        if not 0.0 < momentum <= 1.0:
            raise ValueError(f"momentum must be in (0, 1], got {momentum}")
        self.features = features
        self.momentum = momentum
        self.eps = eps
        self.log_gamma = nn.Parameter(torch.zeros(features))
        self.beta = nn.Parameter(torch.zeros(features))
        self.register_buffer("running_mean", torch.zeros(features))
        self.register_buffer("running_var", torch.ones(features))

    def _stats(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if not self.training:
            return self.running_mean, self.running_var
        flat = x.reshape(-1, self.features)
        if flat.shape[0] < 2:
            raise ValueError(f"BatchNorm in training mode needs a batch of at least 2 rows, got {flat.shape[0]}")
        mean, var = flat.mean(0), flat.var(0)
        with torch.no_grad():
            self.running_mean.lerp_(mean.detach(), self.momentum)
            self.running_var.lerp_(var.detach(), self.momentum)
        return mean, var

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        mean, var = self._stats(x)
        log_scale = self.log_gamma - 0.5 * torch.log(var + self.eps)
        z = (x - mean) * torch.exp(log_scale) + self.beta
        return z, log_scale.sum().expand(x.shape[:-1])

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        log_scale = self.log_gamma - 0.5 * torch.log(self.running_var + self.eps)
        x = (z - self.beta) * torch.exp(-log_scale) + self.running_mean
        return x, (-log_scale.sum()).expand(z.shape[:-1])


__all__ = ["BatchNorm", "ElementwiseAffine", "Permutation"]

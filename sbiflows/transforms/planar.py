"""The planar flow layer (Rezende & Mohamed 2015), with an exact inverse direction and a root-found one."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sbiflows.checks import check_int
from sbiflows.nn import MLP
from sbiflows.transforms.base import Transform

#: Lower bound of w^T u_hat; slightly above -1 so that |det| never reaches 0 in floating point.
_MIN_WTU = -0.999


class Planar(Transform):
    """Planar layer: the generative map ``x = z + u_hat * tanh(w^T z + b)``.

    ``|det dx/dz| = |1 + tanh'(w^T z + b) * u_hat^T w|``. Invertibility needs ``w^T u_hat >= -1``; it is
    enforced by reparameterising the free vector ``u`` as
    ``u_hat = u + (softplus(w^T u) - 0.999 - w^T u) * w / |w|^2``, so that
    ``w^T u_hat = softplus(w^T u) - 0.999 > -1`` (the margin keeps ``|det|`` away from 0 in floating point).

    Directions:
        * ``inverse`` (latent -> data, sampling) is the closed-form map above: **exact**.
        * ``forward`` (data -> latent, density) has no closed form. Writing ``a = w^T z``, the point
          satisfies ``g(a) = a + (w^T u_hat) tanh(a + b) - w^T x = 0``; ``g`` is strictly increasing and
          its root lies in ``[w^T x - |w^T u_hat|, w^T x + |w^T u_hat|]``, so a vectorized, bracketed
          Newton-bisection (it bisects whenever Newton leaves the bracket or stops converging fast)
          solves it to a relative ``tol`` (1e-12 in float64, 1e-6 in float32), then
          ``z = x - u_hat tanh(a + b)``. Gradients flow through one final Newton step (implicit
          differentiation), so ``forward`` can be trained by maximum likelihood.

    Convergence: a row counts as solved when ``|g(a)| <= tol * (1 + |w^T x| + |w^T u_hat|) *
    max(1, g'(a))``: the first factor is the scale of the rounding error in evaluating ``g``, the
    second allows for the float closest to the root when ``g`` is steep. If rows are still unsolved
    after ``max_iter`` iterations, ``forward`` emits a :class:`RuntimeWarning` naming how many rows and
    the largest residual; their latent points and log-determinants are then inaccurate.

    With ``context_features > 0`` the parameters ``(u, w, b)`` are learnable base values plus the output
    of an MLP of the context.

    Args:
        features: Dimension D.
        context_features: Context dimension C (0: unconditional).
        hidden_features: Hidden sizes of the context network.
        max_iter: Iteration cap of the root finder (a positive int).

    Raises:
        ValueError: If ``max_iter`` is not a positive int.

    Example:
        >>> layer = Planar(2)
        >>> x, _ = layer.inverse(torch.randn(4, 2))
        >>> z, _ = layer(x)
        >>> torch.allclose(layer.inverse(z)[0], x, atol=1e-5)
        True
    """

    def __init__(
        self,
        features: int,
        context_features: int = 0,
        *,
        hidden_features: Sequence[int] = (64, 64),
        max_iter: int = 100,
    ):
        super().__init__()
        check_int(max_iter, "max_iter", minimum=1)
        self.features = features
        self.context_features = context_features
        self.max_iter = max_iter
        bound = 1.0 / features**0.5
        self.u = nn.Parameter(torch.empty(features).uniform_(-bound, bound))
        self.w = nn.Parameter(torch.empty(features).uniform_(-bound, bound))
        self.b = nn.Parameter(torch.zeros(()))
        self.net = (
            MLP(context_features, 2 * features + 1, hidden_features, zero_last=True) if context_features else None
        )

    def _params(self, x: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """``(u_hat, w, b)`` broadcast to ``x``: shapes ``(*batch, D)``, ``(*batch, D)``, ``(*batch,)``."""
        context = self._context(x, context)
        u, w, b = self.u.expand_as(x), self.w.expand_as(x), self.b.expand(x.shape[:-1])
        if self.net is not None:
            du, dw, db = self.net(context).split([self.features, self.features, 1], dim=-1)
            u, w, b = u + du, w + dw, b + db.squeeze(-1)
        wu = (w * u).sum(-1, keepdim=True)
        u_hat = u + (F.softplus(wu) + _MIN_WTU - wu) * w / (w * w).sum(-1, keepdim=True).clamp_min(1e-12)
        return u_hat, w, b

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        u_hat, w, b = self._params(z, context)
        pre = (w * z).sum(-1) + b
        h = torch.tanh(pre)
        x = z + u_hat * h.unsqueeze(-1)
        logdet = torch.log1p((1.0 - h * h) * (w * u_hat).sum(-1))
        return x, logdet

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        u_hat, w, b = self._params(x, context)
        wx, c = (w * x).sum(-1), (w * u_hat).sum(-1)
        a = self._solve(wx.detach(), c.detach(), b.detach())
        # One Newton step with gradients: exact value at the root, implicit-function gradients.
        g = a + c * torch.tanh(a + b) - wx
        a = a - g / (1.0 + c * (1.0 - torch.tanh(a + b) ** 2))
        h = torch.tanh(a + b)
        z = x - u_hat * h.unsqueeze(-1)
        return z, -torch.log1p((1.0 - h * h) * c)

    def _solve(self, wx: Tensor, c: Tensor, b: Tensor) -> Tensor:
        """Root of ``a + c tanh(a + b) = wx`` by Newton steps kept inside a shrinking bracket.

        Warns (:class:`RuntimeWarning`) if some rows have not converged after ``max_iter`` iterations.
        """
        tol = 1e-12 if wx.dtype == torch.float64 else 1e-6
        scale = tol * (1.0 + wx.abs() + c.abs())

        def residual(a: Tensor) -> tuple[Tensor, Tensor]:
            h = torch.tanh(a + b)
            return a + c * h - wx, 1.0 + c * (1.0 - h * h)

        lo, hi = wx - c.abs(), wx + c.abs()
        a = wx.clone()
        # Steps taken one and two iterations ago; Newton is only trusted while it keeps halving them
        # (as in Numerical Recipes' rtsafe), else Newton can bounce between the bracket ends forever.
        last_step = before_last_step = hi - lo
        for _ in range(self.max_iter):
            g, slope = residual(a)
            if bool(_converged(g, slope, scale).all()):
                return a
            lo = torch.where(g < 0, a, lo)
            hi = torch.where(g > 0, a, hi)
            newton_step = g / slope
            newton = a - newton_step
            trusted = (newton > lo) & (newton < hi) & (2.0 * newton_step.abs() <= before_last_step.abs())
            new_a = torch.where(trusted, newton, 0.5 * (lo + hi))
            before_last_step, last_step = last_step, new_a - a
            a = new_a
        g, slope = residual(a)
        unsolved = ~_converged(g, slope, scale)
        if bool(unsolved.any()):
            warnings.warn(
                f"Planar.forward: root finding did not converge in max_iter={self.max_iter} iterations for "
                f"{int(unsolved.sum())} of {unsolved.numel()} rows (max residual "
                f"{g.abs()[unsolved].max().item():.3g}, tolerance {tol:g} relative); their latent points "
                "and log-densities are inaccurate. Increase max_iter or check the inputs and parameters.",
                RuntimeWarning,
            )
        return a


def _converged(g: Tensor, slope: Tensor, scale: Tensor) -> Tensor:
    """Rows whose residual ``g`` is within rounding of a root (False for NaN residuals)."""
    return g.abs() <= scale * slope.clamp_min(1.0)

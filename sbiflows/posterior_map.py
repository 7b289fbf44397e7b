"""The multi-start gradient ascent behind :meth:`sbiflows.Posterior.map`."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["ascend"]


def ascend(
    log_prob: Callable[[Tensor], Tensor],
    starts: Tensor,
    *,
    num_to_optimize: int,
    num_iter: int,
    learning_rate: float,
    project: Callable[[Tensor], Tensor] = lambda u: u,
    progress: bool = False,
) -> Tensor:
    """The highest-``log_prob`` point seen while running Adam from the best ``num_to_optimize`` of ``starts``.

    All starts move at once (one batched ``log_prob`` per step); ``project`` maps every iterate back into
    the valid set (the identity for an unconstrained space). The point after the last step counts too.

    Args:
        log_prob: Differentiable log-density of points ``(N, D)``, shape ``(N,)``.
        starts: Candidate starting points ``(M, D)``.
        num_to_optimize: How many of the best starts are refined.
        num_iter: Adam steps (0 returns the best start).
        learning_rate: Adam step size.
        project: Maps points into the valid set after each step.
        progress: Show a progress bar over the steps.

    Example:
        >>> best = ascend(lambda u: -(u - 1).pow(2).sum(-1), torch.zeros(5, 2), num_to_optimize=2,
        ...               num_iter=300, learning_rate=0.05)
        >>> bool(torch.allclose(best, torch.ones(2), atol=1e-2))
        True
    """
    with torch.no_grad():
        chosen = log_prob(starts).topk(min(num_to_optimize, len(starts))).indices
    u = starts[chosen].clone().requires_grad_(True)
    optimizer = torch.optim.Adam([u], lr=learning_rate)
    best_u, best_lp = u.detach().clone(), torch.full((len(u),), -torch.inf, device=u.device, dtype=u.dtype)
    steps = range(num_iter)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="MAP", unit="step", leave=False, disable=None)  # silent off a terminal
    for _ in steps:
        value = log_prob(u)
        with torch.no_grad():
            better = value > best_lp
            best_u[better], best_lp[better] = u[better], value[better]
        (grad,) = torch.autograd.grad(value.sum(), u)
        u.grad = -grad
        optimizer.step()
        with torch.no_grad():
            u.copy_(project(u))
    with torch.no_grad():
        final = log_prob(u)
        better = final > best_lp
        best_u[better], best_lp[better] = u[better], final[better]
        return best_u[best_lp.argmax()]

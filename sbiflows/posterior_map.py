"""The multi-start gradient ascent behind :meth:`sbiflows.Posterior.map` and :meth:`~sbiflows.Posterior.map_batched`."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from sbiflows.seeding import SeededNoise

__all__ = ["ascend", "map_estimates"]


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
    """The highest-``log_prob`` point seen while running Adam from the best ``num_to_optimize`` of ``starts``,
    for each column of a batch.

    All starts move at once (one batched ``log_prob`` per step); ``project`` maps every iterate back into
    the valid set (the identity for an unconstrained space). The point after the last step counts too.
    Columns (observations) are independent: each keeps its own best starts and its own best point, and
    Adam updates every element on its own.

    Args:
        log_prob: Differentiable log-density of points ``(N, *batch, D)``, shape ``(N, *batch)``.
        starts: Candidate starting points ``(M, *batch, D)``.
        num_to_optimize: How many of the best starts of each column are refined.
        num_iter: Adam steps (0 returns the best start).
        learning_rate: Adam step size.
        project: Maps points into the valid set after each step.
        progress: Show a progress bar over the steps.

    Returns:
        The best point of each column, ``(*batch, D)``.

    Example:
        >>> best = ascend(lambda u: -(u - 1).pow(2).sum(-1), torch.zeros(5, 2), num_to_optimize=2,
        ...               num_iter=300, learning_rate=0.05)
        >>> bool(torch.allclose(best, torch.ones(2), atol=1e-2))
        True
        >>> modes = torch.tensor([[1.0, 1.0], [-2.0, 0.0], [0.0, 3.0]])  # one mode per column
        >>> best = ascend(lambda u: -(u - modes).pow(2).sum(-1), torch.zeros(5, 3, 2), num_to_optimize=2,
        ...               num_iter=300, learning_rate=0.05)
        >>> best.shape, bool(torch.allclose(best, modes, atol=1e-2))
        (torch.Size([3, 2]), True)
    """
    with torch.no_grad():
        chosen = log_prob(starts).topk(min(num_to_optimize, len(starts)), dim=0).indices  # (K, *batch)
    u = starts.gather(0, chosen.unsqueeze(-1).expand(*chosen.shape, starts.shape[-1])).clone().requires_grad_(True)
    optimizer = torch.optim.Adam([u], lr=learning_rate)
    best_u, best_lp = u.detach().clone(), torch.full(u.shape[:-1], -torch.inf, device=u.device, dtype=u.dtype)
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
        winner = best_lp.argmax(0, keepdim=True)  # (1, *batch): the best of each column's K points
        return best_u.gather(0, winner.unsqueeze(-1).expand(1, *best_u.shape[1:])).squeeze(0)


def map_estimates(net: torch.nn.Module, space: object, xs: Tensor, *, noise: SeededNoise, num_init_samples: int,
                  num_to_optimize: int, num_iter: int, learning_rate: float, max_rows: int,
                  progress: bool = False) -> Tensor:
    """MAP estimates ``(B, D)`` in the unconstrained space of ``space`` for checked observations ``xs``.

    Per chunk of observations (at most ``max_rows`` starting points at once): ``num_init_samples`` draws
    from the flow, from the seeded per-observation blocks of ``noise`` (so the chunks decide only what is
    computed together, not the draws), projected into the valid set, then :func:`ascend` on
    ``log q(u | x) - log|det dT/du|``. ``space.to_constrained`` of the result is the MAP in ``theta``.
    """
    out = []
    step = max(1, max_rows // max(num_init_samples, num_to_optimize))
    for b in range(0, len(xs), step):
        context = net.context(xs[b : b + step]).detach()
        with torch.no_grad():
            eps = noise.rows(0, num_init_samples, range(b, b + len(context)))
            starts = space.project(net.sample_from_base(eps, context))  # (M, chunk, D)

        def log_prob(u: Tensor, context: Tensor = context) -> Tensor:
            return net.log_prob_given_context(u, context) - space.log_abs_det_jacobian(u)

        out.append(ascend(log_prob, starts, num_to_optimize=num_to_optimize, num_iter=num_iter,
                          learning_rate=learning_rate, project=space.project, progress=progress))
    return torch.cat(out)

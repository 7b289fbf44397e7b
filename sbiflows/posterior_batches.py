"""Chunked draws and densities of a posterior network: draws in the unconstrained space, optionally with
their log-densities from the same pass, and batched evaluation.

A flow's inverse pass already computes the log-determinant that ``log q`` of its draws needs, so a
single flow can return draws and densities for the cost of the draws alone; evaluating the draws
afterwards costs a second pass through every layer. HPD ranks (:func:`sbiflows.diagnostics.expected_coverage`,
:func:`sbiflows.ensemble.auto_check`) need both. :meth:`sbiflows.Posterior.sample_and_log_prob_batched`
is the public door; this module holds the chunked loops behind it, :meth:`sbiflows.Posterior.sample_batched`
and :meth:`sbiflows.Posterior.log_prob_batched`. Chunks hold at most ``max_rows`` rows. After each chunk of
observations the loops tell :func:`reporting_observations`' callback how many observations it finished (a
progress bar over one long call; it observes and never changes the draws).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar, Token

import torch
from torch import Tensor

from sbiflows.seeding import SeededNoise

__all__ = ["ACCELERATOR_CHUNK_ROWS", "CPU_CHUNK_ROWS", "SATURATED", "base_noise", "draw_unconstrained", "evaluate",
           "fuses_log_prob", "observations_done", "reporting_observations", "resolve_chunk_rows"]

#: How far ``T^{-1}(T(u))`` may round from ``u`` before a draw's density is evaluated again at the
#: returned ``theta`` (float32 sigmoids lose ``u`` only near saturation, ``|u|`` above about 9).
SATURATED = 1e-3

#: Rows per chunk when a posterior's ``max_batch_elements`` is None (:func:`resolve_chunk_rows`). On a CPU,
#: chunks of 2**14 rows keep a flow layer's intermediate tensors (a spline's knot table is 27 floats per feature) in
#: cache: 2**17-row chunks, the fixed default before, drew and evaluated 1.3-2.7 times slower on one core
#: (``docs/benchmarks.md``, "Chunks that fit the cache"). On an accelerator large chunks keep it busy.
CPU_CHUNK_ROWS = 2**14
ACCELERATOR_CHUNK_ROWS = 2**17


_REPORT: ContextVar[Callable[[int], None] | None] = ContextVar("sbiflows_observations_done", default=None)


@contextmanager
def reporting_observations(callback: Callable[[int], None]) -> Iterator[None]:
    """Within the block, the chunked loops call ``callback(k)`` after each chunk of ``k`` observations.

    Draws, densities and random streams are the same with or without it. A call that makes several passes
    (draws, then their densities) reports each pass, so a callback that counts towards a total clamps.

    Example:
        >>> from sbiflows import NPE
        >>> prior = torch.distributions.MultivariateNormal(torch.zeros(2), torch.eye(2))
        >>> theta = prior.sample((200,)); x = theta + 0.1 * torch.randn_like(theta)
        >>> posterior = NPE(prior, transforms=1, max_batch_elements=300).fit(theta, x, max_epochs=1, progress=False)
        >>> done = []
        >>> with reporting_observations(done.append):
        ...     _ = posterior.sample_batched(100, x[:7], seed=0)
        >>> done
        [3, 3, 1]
    """
    previous = _REPORT.set(callback).old_value
    try:
        yield
    finally:  # set, not reset(token): a generator holding the block may be closed from another context
        _REPORT.set(None if previous is Token.MISSING else previous)


def observations_done(count: int) -> None:
    """Report ``count`` finished observations to the callback of :func:`reporting_observations`, if one is set."""
    callback = _REPORT.get()
    if callback is not None:
        callback(count)


def resolve_chunk_rows(max_batch_elements: int | None, device: torch.device | str) -> int:
    """Rows per chunk of batched draws and evaluations: ``max_batch_elements``, or if None
    :data:`CPU_CHUNK_ROWS` on a CPU and :data:`ACCELERATOR_CHUNK_ROWS` elsewhere.

    Seeded draws do not depend on the chunk (see :class:`sbiflows.seeding.SeededNoise`); draws from a
    generator or torch's global one follow the chunks.

    Example:
        >>> resolve_chunk_rows(None, "cpu"), resolve_chunk_rows(None, "cuda:0"), resolve_chunk_rows(500, "cpu")
        (16384, 131072, 500)
    """
    if max_batch_elements is not None:
        return max_batch_elements
    return CPU_CHUNK_ROWS if torch.device(device).type == "cpu" else ACCELERATOR_CHUNK_ROWS


def fuses_log_prob(net: torch.nn.Module) -> bool:
    """Whether ``net`` returns draws and their log-densities in one pass (one flow; an ensemble's
    mixture density needs every member's, so it evaluates its draws afterwards)."""
    return callable(getattr(net, "sample_and_log_prob_from_base", None))


def base_noise(net: torch.nn.Module, noise: SeededNoise | None, generator: torch.Generator | None, start: int, m: int,
               observations: Sequence[int]) -> Tensor:
    """Base draws ``(m, len(observations), ...)`` for rows ``[start, start + m)`` of the given observations: from
    the seeded blocks of ``noise``, or else from ``generator`` (None: torch's global one) as
    ``net.sample_given_context`` draws them."""
    if noise is None:
        return net.flow.base.sample((m, len(observations)), generator=generator)
    return noise.rows(start, m, observations)


def draw_unconstrained(net: torch.nn.Module, space: object, n: int, xs: Tensor, *, dim: int, dtype: torch.dtype,
                       noise: SeededNoise | None, generator: torch.Generator | None, max_rows: int,
                       log_prob: bool = False) -> tuple[Tensor, Tensor | None]:
    """``(n, B, D)`` draws of ``T(u)``, ``u ~ q(u | x_b)``, and with ``log_prob`` their ``log q(theta | x_b)`` ``(n, B)``.

    Chunked so that at most ``max_rows`` rows pass through the flow at once. Draws come from ``noise``
    (the seeded blocks of :class:`~sbiflows.seeding.SeededNoise`) or else from ``generator`` (None: torch's
    global one), and do not depend on ``log_prob``: with it, ``net`` must fuse (:func:`fuses_log_prob`),
    and the densities are those of the inverse pass, ``log q(u | x) - log|det dT/du|``, except for draws
    whose ``T(u)`` rounded far from ``u`` (more than :data:`SATURATED` in ``u``), which are evaluated again.

    Example:
        >>> from sbiflows import NPE
        >>> from sbiflows.truncated_space import make_space
        >>> prior = torch.distributions.Independent(torch.distributions.Uniform(-torch.ones(2), torch.ones(2)), 1)
        >>> theta = prior.sample((200,)); x = theta + 0.1 * torch.randn_like(theta)
        >>> posterior = NPE(prior, transforms=1, space="unconstrained", ensemble=1).fit(theta, x, max_epochs=2, seed=0,
        ...                                                                          progress=False)
        >>> draws, log_q = draw_unconstrained(posterior.net, make_space(prior.support, "unconstrained"), 4, x[:3],
        ...                                   dim=2, dtype=torch.float32, noise=None, max_rows=2**17,
        ...                                   generator=torch.Generator().manual_seed(0), log_prob=True)
        >>> draws.shape, log_q.shape, bool(torch.allclose(log_q, posterior.log_prob_batched(draws, x[:3]), atol=1e-4))
        (torch.Size([4, 3, 2]), torch.Size([4, 3]), True)
    """
    if log_prob and not fuses_log_prob(net):
        raise TypeError(f"{type(net).__name__} does not return log-densities with its draws")
    device = xs.device
    out = torch.empty(n, len(xs), dim, device=device, dtype=dtype)
    densities = torch.empty(n, len(xs), device=device, dtype=dtype) if log_prob else None
    obs_step = max(1, max_rows // n)
    sample_step = min(n, max_rows)
    for b in range(0, len(xs), obs_step):
        context = net.context(xs[b : b + obs_step])
        for i in range(0, n, sample_step):
            m = min(sample_step, n - i)
            rows = slice(i, i + m), slice(b, b + obs_step)
            eps = base_noise(net, noise, generator, i, m, range(b, b + len(context)))
            if not log_prob:
                out[rows] = space.to_constrained(net.sample_from_base(eps, context))
                continue
            u, log_q = net.sample_and_log_prob_from_base(eps, context)
            theta = space.to_constrained(u)
            out[rows] = theta
            densities[rows] = _at_returned_draws(net, space, u, theta, log_q - space.log_abs_det_jacobian(u), context)
        observations_done(len(context))
    return out, densities


def _at_returned_draws(net: torch.nn.Module, space: object, u: Tensor, theta: Tensor, log_q: Tensor,
                       context: Tensor) -> Tensor:
    """``log_q`` of the draws ``theta = T(u)``, re-evaluated where ``T(u)`` rounded so far (a sigmoid saturated
    in float32 and the space clamped ``theta`` inside the bounds) that ``T^{-1}(theta)`` is not ``u``: the
    density is that of the returned ``theta``, as :meth:`sbiflows.Posterior.log_prob` gives it."""
    u_back = space.to_unconstrained(theta)
    moved = ~((u_back - u).abs() <= SATURATED).all(-1)
    if bool(moved.any()):
        i, j = moved.nonzero(as_tuple=True)
        log_q = log_q.clone()
        log_q[i, j] = net.log_prob_given_context(u_back[i, j], context[j]) - space.log_abs_det_jacobian(u_back[i, j])
    return log_q


def evaluate(log_prob: Callable[[Tensor, Tensor], Tensor], net: torch.nn.Module, theta: Tensor, xs: Tensor, *,
             max_rows: int, dtype: torch.dtype) -> Tensor:
    """``(n, B)`` values of ``log_prob(theta_chunk, context_chunk)`` for ``theta`` ``(n, B, D)`` and observations
    ``xs`` ``(B, *x_shape)``, their contexts computed once per chunk of observations (``net.context``)."""
    n = theta.shape[0]
    out = torch.empty(n, len(xs), device=xs.device, dtype=dtype)
    obs_step = max(1, max_rows // max(n, 1))
    sample_step = max(1, min(n, max_rows))
    for b in range(0, len(xs), obs_step):
        context = net.context(xs[b : b + obs_step])
        for i in range(0, n, sample_step):
            rows = slice(i, i + sample_step), slice(b, b + obs_step)
            out[rows] = log_prob(theta[rows], context)
        observations_done(len(context))
    return out

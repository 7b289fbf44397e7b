"""The test simulations that calibration checks share, and batched access to a posterior.

:func:`sbc`, :func:`expected_coverage` and :func:`tarp` all need pairs ``theta_i ~ prior``,
``x_i = simulator(theta_i)`` and posterior draws given every ``x_i``. :func:`simulate_datasets`
makes the pairs once so that several checks can reuse them (pass ``theta=..., x=...``); the private
helpers validate them, drop invalid simulations (with a warning giving the count) and talk to a
posterior through the duck-typed protocol::

    posterior.sample_batched(n, xs)            # xs (B, *x_shape) -> (n, B, D)
    posterior.sample_and_log_prob_batched(n, xs)  # both at once -> (n, B, D), (n, B); optional; the draws
                                                  # those sample_batched gives from the same generator state
    posterior.log_prob_batched(theta, xs)      # theta (n, B, D) -> (n, B); optional
    posterior.log_prob(theta, x=x_o)           # theta (N, D), x_o x_shape -> (N,)

The batched density methods may take a keyword ``normalized``: HPD ranks compare densities of one
observation, so :func:`~sbiflows.diagnostics.expected_coverage` passes ``normalized=False`` where every one it
calls takes it (:class:`sbiflows.Posterior` then skips the truncated space's Monte Carlo normalizer, a constant
per observation that cost most of the check; :func:`takes_normalized`).

``x_shape`` is ``(x_dim,)`` for flat simulations or any structured shape (a series, an image, a set of
trials). A posterior whose embedding masks NaN-padded trials (``posterior.net.padded_trials``) makes the
checks keep padded sets and drop only failed simulations (:func:`sbiflows.xshape.valid_rows`). Draws and densities
come back to the CPU, where the checks compute their statistics, whatever the posterior's device.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import Tensor
from torch.distributions import Distribution

from sbiflows.checks import check_int
from sbiflows.observation_range import observations_unchecked
from sbiflows.priors import as_vector_prior
from sbiflows.seeding import global_seed
from sbiflows.xshape import valid_rows

__all__ = ["simulate_datasets"]

#: Below these sizes the checks warn, as sbi does: their verdicts are unreliable.
MIN_DATASETS = 100
MIN_POSTERIOR_SAMPLES = 100

Simulator = Callable[[Tensor], Tensor]


@contextmanager
def seeded(seed: int | None) -> Iterator[None]:
    """Run the block on torch's global generators seeded with ``seed``, restoring them afterwards.

    They are the CPU's and those of initialized CUDA devices (:func:`sbiflows.seeding.global_seed`).
    ``None`` leaves the global generators alone (the block then advances them as usual).
    """
    if seed is None:
        yield
        return
    seed = check_int(seed, "seed", optional=True)
    with global_seed(seed):
        yield


def simulate_datasets(
    prior: Distribution, simulator: Simulator, num_datasets: int, *, seed: int | None = 0
) -> tuple[Tensor, Tensor]:
    """Draw ``theta_i ~ prior`` and simulate ``x_i = simulator(theta_i)``, all rows at once.

    Invalid simulations (rows with NaN or inf) are returned as they are; the checks that take
    the pairs exclude them and warn with the count.

    Args:
        prior: A torch distribution with event shape ``(D,)``.
        simulator: Maps ``theta`` of shape ``(N, D)`` to ``x`` of shape ``(N, *x_shape)``.
        num_datasets: Number of pairs ``N``.
        seed: Seeds torch's global generator for the prior and the simulator (restored
            afterwards); ``None`` uses and advances it.

    Returns:
        ``(theta, x)`` with shapes ``(N, D)`` and ``(N, *x_shape)``.

    Example:
        >>> prior = torch.distributions.MultivariateNormal(torch.zeros(2), torch.eye(2))
        >>> theta, x = simulate_datasets(prior, lambda t: t + torch.randn_like(t), 300)
        >>> theta.shape, x.shape
        (torch.Size([300, 2]), torch.Size([300, 2]))
    """
    if not isinstance(prior, Distribution):
        raise TypeError(f"prior must be a torch.distributions.Distribution, got {type(prior).__name__}")
    if not callable(simulator):
        raise TypeError(
            f"simulator must be callable (theta (N, D) -> x (N, x_dim)), got {type(simulator).__name__}"
        )
    check_int(num_datasets, "num_datasets", minimum=1)
    prior = as_vector_prior(prior)  # a scalar prior or a batch of them, as NPE takes them
    with seeded(seed):
        theta = prior.sample((num_datasets,))
        x = simulator(theta)
    if isinstance(x, np.ndarray) and x.dtype.kind in "biuf":  # as sbiflows.simulate takes it
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, Tensor):
        raise TypeError(f"simulator must return a torch.Tensor, got {type(x).__name__}")
    x = _counts_as_float(x, theta.dtype)
    if x.ndim < 2 or x.shape[0] != num_datasets:
        raise ValueError(
            f"simulator must return shape (N, x_dim) = ({num_datasets}, x_dim) or (N, *x_shape), got {tuple(x.shape)}"
        )
    return theta, x


def calibration_pairs(
    prior: Distribution | None,
    simulator: Simulator | None,
    *,
    theta: Tensor | None,
    x: Tensor | None,
    num_datasets: int,
    check: str,
    padded_trials: bool = False,
    theta_dim: int | None = None,
) -> tuple[Tensor, Tensor, int]:
    """The valid ``(theta, x)`` pairs for a check and the number of invalid ones excluded.

    Uses the given ``theta`` and ``x`` if both are passed, else simulates ``num_datasets`` pairs
    from torch's global generator (the checks call this inside :func:`seeded`, and then draw from
    the posterior on the same stream, so prior and posterior noise are never the same numbers).
    ``theta_dim`` (the posterior's, where it says) is compared with the prior's before anything is simulated.
    """
    if (theta is None) != (x is None):
        raise ValueError(f"{check}: pass both theta and x (precomputed pairs) or neither")
    if isinstance(prior, Distribution):
        prior = as_vector_prior(prior)  # a scalar prior or a batch of them, as NPE takes them
    if theta_dim is not None and isinstance(prior, Distribution) and tuple(prior.event_shape) != (theta_dim,):
        raise ValueError(f"{check}: the prior has event shape {tuple(prior.event_shape)} but the posterior has "
                         f"{theta_dim} parameters")
    if theta is None:
        if prior is None or simulator is None:
            raise ValueError(f"{check}: needs a prior and a simulator, or precomputed theta= and x=")
        theta, x = simulate_datasets(prior, simulator, num_datasets, seed=None)
    theta = _check_2d(theta, "theta", "(N, D)")
    if isinstance(x, Tensor):
        x = _counts_as_float(x, theta.dtype)
    x = _check_2d(x, "x", "(N, x_dim) or (N, *x_shape)", structured=True)
    if theta_dim is not None and theta.shape[1] != theta_dim:  # before the posterior draws, not after them
        raise ValueError(f"{check}: theta has {theta.shape[1]} parameters but the posterior has {theta_dim}")
    if theta.shape[0] != x.shape[0]:
        raise ValueError(
            f"theta and x must have the same number of rows, got {theta.shape[0]} and {x.shape[0]}"
        )
    if prior is not None and tuple(prior.event_shape) != (theta.shape[1],):
        raise ValueError(
            f"theta has {theta.shape[1]} parameters but the prior's event shape is "
            f"{tuple(prior.event_shape)}"
        )
    valid = valid_rows(x, padded_trials=padded_trials and x.ndim == 3) & torch.isfinite(theta).all(1)
    num_invalid = int((~valid).sum())
    excluded = f"excluded {num_invalid} of {len(valid)} simulations with NaN/inf values"
    if num_invalid:
        theta, x = theta[valid], x[valid]
    if theta.shape[0] == 0:
        raise ValueError(f"{check}: no valid simulations left (all {num_invalid} contain NaN/inf)")
    if theta.shape[0] < MIN_DATASETS:  # one warning that says why, if invalid rows are the reason
        warnings.warn(
            f"{check}: only {theta.shape[0]} datasets" + (f" ({excluded})" if num_invalid else "")
            + f"; use at least {MIN_DATASETS} for a reliable verdict",
            UserWarning,
            stacklevel=3,
        )
    elif num_invalid:
        warnings.warn(f"{check}: {excluded}", UserWarning, stacklevel=3)
    return theta, x, num_invalid


def check_num_posterior_samples(num_posterior_samples: int, check: str) -> None:
    """Validate ``num_posterior_samples`` and warn below :data:`MIN_POSTERIOR_SAMPLES`."""
    check_int(num_posterior_samples, "num_posterior_samples", minimum=1)
    if num_posterior_samples < MIN_POSTERIOR_SAMPLES:
        warnings.warn(
            f"{check}: only {num_posterior_samples} posterior samples per dataset; use at least "
            f"{MIN_POSTERIOR_SAMPLES} for a reliable verdict",
            UserWarning,
            stacklevel=3,
        )


def check_posterior(posterior: object, *methods: str) -> None:
    """Raise ``TypeError`` if ``posterior`` lacks one of the protocol ``methods``."""
    missing = [m for m in methods if not callable(getattr(posterior, m, None))]
    if missing:
        raise TypeError(
            f"posterior must implement {', '.join(methods)} (the sbiflows posterior protocol); "
            f"{type(posterior).__name__} lacks {', '.join(missing)}"
        )


def _chunks(num: int, batch_size: int | None, progress: str | None) -> Iterator[slice]:
    """The dataset chunks as slices (``batch_size`` datasets each, or one chunk); with a progress label, a bar
    over the datasets. The chunks never depend on ``progress``: draws from torch's global generator follow them, so a
    bar that split the calls would change the seeded results of a check (``--quiet`` changed the verdicts).
    Instead, while the caller works on a chunk the bar follows the posterior's own chunks of observations
    (:func:`sbiflows.posterior_batches.reporting_observations`, which changes nothing either); a posterior
    that does not report moves the bar once per chunk."""
    step = max(num if batch_size is None else batch_size, 1)
    chunks = [slice(start, min(start + step, num)) for start in range(0, num, step)]
    if not progress:
        yield from chunks
        return
    from tqdm.auto import tqdm

    from sbiflows.posterior_batches import reporting_observations

    bar = tqdm(total=num, desc=progress, unit="dataset", leave=False, disable=None)  # silent off a terminal
    try:
        for part in chunks:
            # a call may pass over the chunk's observations more than once (draws, then densities): clamp
            with reporting_observations(lambda k, end=part.stop: bar.update(max(0, min(k, end - bar.n)))):
                yield part
            bar.update(part.stop - bar.n)
    finally:
        bar.close()


def posterior_draws(
    posterior: object, num_samples: int, xs: Tensor, *, batch_size: int | None, progress: str | None = None
) -> Tensor:
    """``posterior.sample_batched(num_samples, xs)`` -> ``(num_samples, B, D)``, chunked over ``xs``.

    ``batch_size=None`` makes one call for all datasets; otherwise at most ``batch_size`` datasets
    go into each call (to bound memory). ``progress``: the label of a progress bar over the datasets (it
    does not change the calls, nor the draws).
    """
    check_int(batch_size, "batch_size", minimum=1, optional=True)
    chunks = []
    for part in _chunks(xs.shape[0], batch_size, progress):
        with observations_unchecked():  # simulated x may lie in the tails: no out-of-range warning
            draws = posterior.sample_batched(num_samples, xs[part])  # type: ignore[attr-defined]
        chunks.append(_checked_draws(draws, num_samples, xs[part], "sample_batched"))
    return _finite(torch.cat(chunks, dim=1), "sample_batched")


def takes_normalized(method: object) -> bool:
    """Whether ``method`` takes a keyword ``normalized`` (the batched density methods of :class:`sbiflows.Posterior`).

    Example:
        >>> takes_normalized(lambda theta, xs, *, normalized=True: theta), takes_normalized(lambda theta, xs: theta)
        (True, False)
    """
    try:
        parameter = inspect.signature(method).parameters.get("normalized")
    except (TypeError, ValueError):  # no signature to read: a builtin, not a callable
        return False
    return parameter is not None and parameter.kind in (parameter.KEYWORD_ONLY, parameter.POSITIONAL_OR_KEYWORD)


def _density_options(normalized: bool) -> dict[str, bool]:
    return {} if normalized else {"normalized": False}  # the protocol's plain call unless asked


def draws_and_log_prob(
    posterior: object, num_samples: int, xs: Tensor, *, batch_size: int | None, progress: str | None = None,
    normalized: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """:func:`posterior_draws`, with their densities ``(num_samples, B)`` where the posterior gives them in the same call.

    A posterior with ``sample_and_log_prob_batched`` (:class:`sbiflows.Posterior`) returns both, chunk by chunk:
    one pass through a single flow instead of two. For others the densities are None: evaluate the draws
    with :func:`batched_log_prob`. ``normalized=False`` passes it on (the caller checked
    :func:`takes_normalized`): densities up to a constant per observation.
    """
    fused = getattr(posterior, "sample_and_log_prob_batched", None)
    if not callable(fused):
        return posterior_draws(posterior, num_samples, xs, batch_size=batch_size, progress=progress), None
    check_int(batch_size, "batch_size", minimum=1, optional=True)
    draws, log_q = [], []
    for part in _chunks(xs.shape[0], batch_size, progress):
        with observations_unchecked():
            chunk_draws, chunk_log_q = fused(num_samples, xs[part], **_density_options(normalized))
        draws.append(_checked_draws(chunk_draws, num_samples, xs[part], "sample_and_log_prob_batched"))
        if not isinstance(chunk_log_q, Tensor) or chunk_log_q.shape != draws[-1].shape[:2]:
            got = tuple(chunk_log_q.shape) if isinstance(chunk_log_q, Tensor) else type(chunk_log_q).__name__
            raise ValueError(f"posterior.sample_and_log_prob_batched({num_samples}, xs) must return log-probabilities "
                             f"of shape {tuple(draws[-1].shape[:2])}, got {got}")
        log_q.append(chunk_log_q.detach().cpu())
    return (_finite(torch.cat(draws, dim=1), "sample_and_log_prob_batched"),
            _no_nan(torch.cat(log_q, dim=1), "sample_and_log_prob_batched"))


def _checked_draws(draws: object, num_samples: int, chunk: Tensor, method: str) -> Tensor:
    if not isinstance(draws, Tensor) or draws.ndim != 3 or draws.shape[:2] != (num_samples, len(chunk)):
        got = tuple(draws.shape) if isinstance(draws, Tensor) else type(draws).__name__
        raise ValueError(
            f"posterior.{method}({num_samples}, xs) with xs of shape {tuple(chunk.shape)} "
            f"must return shape ({num_samples}, {len(chunk)}, D), got {got}"
        )
    return draws.detach().cpu()  # the statistics run on the CPU, whatever the posterior's device


def _finite(draws: Tensor, method: str) -> Tensor:
    if not torch.isfinite(draws).all():
        raise ValueError(f"posterior.{method} returned NaN/inf samples")
    return draws


def _no_nan(log_q: Tensor, method: str) -> Tensor:
    """``log_q`` if it has no NaN (``-inf``, a point outside the support, is a valid density; a NaN would compare
    False with everything and rank silently)."""
    if torch.isnan(log_q).any():
        raise ValueError(f"posterior.{method} returned NaN log-probabilities for {int(torch.isnan(log_q).sum())} of "
                         f"{log_q.numel()} points")
    return log_q


def batched_log_prob(
    posterior: object, theta: Tensor, xs: Tensor, *, batch_size: int | None, progress: str | None = None,
    normalized: bool = True,
) -> Tensor:
    """``log q(theta[:, b] | xs[b])`` for ``theta`` of shape ``(n, B, D)`` -> ``(n, B)``.

    Uses ``posterior.log_prob_batched`` if present (chunked like :func:`posterior_draws`; ``normalized=False``
    passed on, as in :func:`draws_and_log_prob`), else falls back to one ``posterior.log_prob`` call per dataset.
    """
    n, num = theta.shape[:2]
    with observations_unchecked():
        if callable(getattr(posterior, "log_prob_batched", None)):
            parts = []
            for part in _chunks(num, batch_size, progress):  # a loop, not a comprehension: an error closes the bar
                parts.append(posterior.log_prob_batched(  # type: ignore[attr-defined]
                    theta[:, part], xs[part], **_density_options(normalized)).detach().cpu())
            out, method = torch.cat(parts, dim=1), "log_prob_batched"
        else:
            log_prob = posterior.log_prob  # type: ignore[attr-defined]
            out = torch.stack([log_prob(theta[:, b], x=xs[b]).detach().cpu() for b in range(num)], dim=1)
            method = "log_prob"
    if out.shape != (n, num):
        raise ValueError(f"posterior log-probabilities must have shape ({n}, {num}), got {tuple(out.shape)}")
    return _no_nan(out, method)


def _counts_as_float(x: Tensor, dtype: torch.dtype) -> Tensor:
    """Integer or boolean simulations (counts) in ``dtype``, as ``sbiflows.simulate`` and ``NPE.fit`` take them."""
    return x if x.is_floating_point() or x.is_complex() else x.to(dtype)


def padded_trials(posterior: object) -> bool:
    """Whether ``posterior``'s embedding masks NaN-padded trials (then padded sets are valid simulations)."""
    return bool(getattr(getattr(posterior, "net", None), "padded_trials", False))


def _check_2d(value: object, name: str, expected: str, *, structured: bool = False) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {expected}, got {type(value).__name__}")
    if value.ndim != 2 and not (structured and value.ndim > 2):
        raise ValueError(f"{name} must have shape {expected}, got {tuple(value.shape)}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must have a floating-point dtype, got {value.dtype}")
    return value.detach()

"""The trained posterior ``p(theta | x)`` returned by :meth:`sbiflows.NPE.fit`.

The flow models the parameters in the prior's unconstrained space, ``u = T^{-1}(theta)`` with
``T = torch.distributions.biject_to(prior.support)``. Hence:

* samples are ``T(u)``: always inside the support, with no rejection loop that could stall;
* ``log_prob(theta) = log q(u | x) - log|det dT/du|``, a density normalized on the support, and
  ``-inf`` for ``theta`` outside it (or on its boundary, where ``u`` is infinite).

With ``NPE(..., space="truncated")`` the flow models theta itself and the posterior is its restriction
to the support: samples by rejection, ``log_prob`` normalized by a Monte Carlo estimate of the mass
inside (see :mod:`sbiflows.truncated_space`).

Device rule: inputs (tensors on any device, or numpy arrays) are moved to the posterior's device
(:attr:`Posterior.device`) and cast to its dtype; results are returned on that device.
Memory: batched sampling and evaluation are chunked so that at most ``max_batch_elements`` rows pass
through the flow at once (None: a size that suits the device, :func:`sbiflows.posterior_batches.resolve_chunk_rows`).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.distributions import Distribution

from sbiflows import serialization
from sbiflows.checks import as_float_tensor, check_int, check_positive_number
from sbiflows.conditioned import ConditionedPosterior
from sbiflows.estimator import PosteriorNet
from sbiflows.observation_range import (
    OUTSIDE_Z,  # noqa: F401 - public here
    observations_unchecked,  # noqa: F401 - public here (sbiflows.posterior.observations_unchecked)
    warn_if_fewer_trials,
    warn_if_outside,
)
from sbiflows.posterior_file import load
from sbiflows.posterior_batches import draw_unconstrained, evaluate, fuses_log_prob, resolve_chunk_rows
from sbiflows.posterior_map import map_estimates
from sbiflows.prior_specs import move_prior
from sbiflows.priors import check_prior, draws_float64
from sbiflows.seeding import SeededNoise, derive_seed
from sbiflows.threads import torch_threads
from sbiflows.training import TrainingHistory
from sbiflows.truncated_space import LogNormalizer, draw_posterior, make_space
from sbiflows.xshape import check_observations, valid_rows

__all__ = ["Posterior", "as_float_tensor", "load"]


def _x_dtype(x: Any, default: torch.dtype) -> torch.dtype:
    """float64 simulations and observations stay float64 until standardized; anything else gets ``default``."""
    return torch.float64 if getattr(x, "dtype", None) in (torch.float64, np.float64) else default


class Posterior:
    """An amortized posterior: sample and evaluate ``p(theta | x)`` for any observation ``x``.

    Args:
        net: The trained :class:`~sbiflows.estimator.PosteriorNet` (owned by the posterior).
        prior: The prior (``torch.distributions.Distribution``) the network was trained under.
        config: Architecture description (used by :meth:`save`).
        history: The training history.
        max_batch_elements: Rows per chunk in batched sampling and evaluation (bounds memory); None (default):
            2**14 on a CPU, where smaller chunks stay in cache, and 2**17 on an accelerator
            (:func:`~sbiflows.posterior_batches.resolve_chunk_rows`, resolved on the device of each call).
        default_x: An observation that :meth:`sample`, :meth:`log_prob`, :meth:`map` and :meth:`condition`
            use when called without ``x`` (e.g. the ``x_o`` of a sequential run, :class:`~sbiflows.TSNPE`);
            None (default): ``x`` is required. Saved and loaded with the posterior. A sequential posterior
            is trained for its ``default_x``: for another ``x`` it is only valid inside the last round's
            truncated region.

    Attributes:
        history: The :class:`~sbiflows.training.TrainingHistory` of the fit (None after :func:`load`
            of a file without one).
        default_x: The default observation ``(x_dim,)`` or None (see the argument; set it with
            :meth:`set_default_x`).

    Example:
        >>> import torch
        >>> from torch.distributions import MultivariateNormal
        >>> from sbiflows import NPE
        >>> prior = MultivariateNormal(torch.zeros(2), torch.eye(2))
        >>> theta = prior.sample((300,)); x = theta + 0.1 * torch.randn_like(theta)
        >>> posterior = NPE(prior, transforms=1, hidden_features=(16, 16)).fit(theta, x, max_epochs=3, progress=False)
        >>> posterior.sample(100, x=torch.zeros(2)).shape
        torch.Size([100, 2])
        >>> posterior.log_prob(torch.zeros(5, 2), x=torch.zeros(2)).shape
        torch.Size([5])
    """

    def __init__(
        self,
        net: PosteriorNet,
        prior: Distribution,
        *,
        config: dict,
        history: TrainingHistory | None = None,
        max_batch_elements: int | None = None,
        default_x: Any = None,
    ):
        check_int(max_batch_elements, "max_batch_elements", minimum=1, optional="the device's size")
        self.net = net.eval()
        self.prior = prior
        self._prior, self.theta_dim = check_prior(prior)
        self._space_name = config.get("space", "unconstrained")  # files saved before the option: unconstrained
        self._space = make_space(self._prior.support, self._space_name)
        self._normalizer = LogNormalizer()  # truncated space: log Z per observation, cached
        self.x_dim = net.x_dim
        self.x_shape: tuple[int, ...] = tuple(net.x_shape)
        self.config = config
        self.history = history
        self.max_batch_elements = max_batch_elements
        self.default_x: Tensor | None = None
        if default_x is not None:
            self.set_default_x(default_x)

    def set_default_x(self, x: Any) -> Posterior:
        """Make ``x`` (one observation, checked as in :meth:`sample`) the default observation; None clears it.

        Returns ``self``.

        Example:
            >>> from sbiflows import NPE
            >>> prior = torch.distributions.Normal(torch.zeros(2), torch.ones(2))
            >>> theta = prior.sample((200,))
            >>> post = NPE(prior, transforms=1).fit(theta, theta, max_epochs=2, progress=False)
            >>> post.set_default_x(torch.zeros(2)).sample(5).shape
            torch.Size([5, 2])
        """
        self.default_x = None if x is None else self._single_observation(x)[0].clone()
        return self

    # ---------------------------------------------------------------------------------- basics
    @property
    def device(self) -> torch.device:
        """The device of the network (and of every result)."""
        return self.net.u_shift.device

    @property
    def chunk_rows(self) -> int:
        """Rows per chunk of batched draws and evaluations on the posterior's device (``max_batch_elements``
        or the device's default, :func:`~sbiflows.posterior_batches.resolve_chunk_rows`)."""
        return resolve_chunk_rows(self.max_batch_elements, self.device)

    @property
    def dtype(self) -> torch.dtype:
        """The floating dtype of the network."""
        return self.net.u_shift.dtype

    def to(self, device: torch.device | str) -> Posterior:
        """Move the network and the prior's tensors to ``device`` (in place); returns ``self``.

        Raises:
            ValueError: If the prior cannot be rebuilt on ``device`` (see
                :func:`sbiflows.prior_specs.move_prior`); the posterior is then left unchanged.
        """
        prior = move_prior(self.prior, device)  # first: it may raise, and then nothing has moved
        checked = check_prior(prior)[0]
        self.net.to(device)
        self.prior, self._prior = prior, checked
        self._space = make_space(checked.support, self._space_name)
        if self.default_x is not None:
            self.default_x = self.default_x.to(device)
        return self

    def save(self, path: str | Path, *, allow_unsaved_prior: bool = False) -> None:
        """Save to ``path`` without pickle (see :func:`sbiflows.serialization.save`); read it with :func:`load`.

        Raises:
            ValueError: If the file cannot describe the prior, unless ``allow_unsaved_prior=True`` (then
                :func:`sbiflows.load` needs ``prior=...``).
        """
        serialization.save(self, path, allow_unsaved_prior=allow_unsaved_prior)

    def __repr__(self) -> str:
        return (
            f"Posterior(estimator={self.config.get('estimator')!r}, theta_dim={self.theta_dim}, "
            f"x_shape={self.x_shape}, device={self.device})"
        )

    # -------------------------------------------------------------------------------- sampling
    @torch.no_grad()
    @torch_threads()
    def sample(
        self, n: int, x: Any = None, *, seed: int | None = None, generator: torch.Generator | None = None
    ) -> Tensor:
        """``n`` posterior samples for one observation: shape ``(n, D)``.

        Args:
            n: Number of samples, a positive int (numpy integers are accepted).
            x: One observation, shape ``x_shape`` or ``(1, *x_shape)`` (sets with fewer trials are NaN-padded);
                None: :attr:`default_x`.
            seed: Seeds a fresh generator (reproducible samples); exclusive with ``generator``.
            generator: A ``torch.Generator`` on the posterior's device.

        Raises:
            TypeError: If ``n`` is not an integer.
            ValueError: For ``n < 1``, a batch of observations (use :meth:`sample_batched`), a wrong
                shape or NaN/inf in ``x``.
        """
        n = check_int(n, "n", minimum=1)
        x = self._single_observation(x)
        return self._draw(n, x, self._generator(seed, generator))[:, 0]

    @torch.no_grad()
    @torch_threads()
    def sample_batched(
        self, n: int, xs: Any, *, seed: int | None = None, generator: torch.Generator | None = None
    ) -> Tensor:
        """``n`` samples for each of ``B`` observations ``xs`` (``(B, *x_shape)``): shape ``(n, B, D)``.

        Chunked over observations (and samples) so that at most :attr:`chunk_rows` rows are in
        flight at once. ``n``, ``seed`` and ``generator`` are as in :meth:`sample`.
        """
        n = check_int(n, "n", minimum=1)
        xs = self._observations(xs, "xs")
        return self._draw(n, xs, self._generator(seed, generator))

    @torch.no_grad()
    @torch_threads()
    def sample_and_log_prob_batched(
        self, n: int, xs: Any, *, seed: int | None = None, generator: torch.Generator | None = None,
        normalized: bool = True,
    ) -> tuple[Tensor, Tensor]:
        """:meth:`sample_batched`'s draws ``(n, B, D)`` (the same for the same ``seed`` or generator state) and
        their :meth:`log_prob_batched` ``(n, B)`` (``normalized`` as there).

        One flow returns the densities its inverse pass computed with the draws (equal up to float rounding),
        at about half the cost of evaluating them afterwards; an ensemble evaluates them afterwards.

        Example:
            >>> from sbiflows import NPE
            >>> prior = torch.distributions.MultivariateNormal(torch.zeros(2), torch.eye(2))
            >>> theta = prior.sample((200,)); x = theta + 0.1 * torch.randn_like(theta)
            >>> posterior = NPE(prior, transforms=1).fit(theta, x, max_epochs=2, seed=0, progress=False)
            >>> draws, log_q = posterior.sample_and_log_prob_batched(5, x[:3], seed=1)
            >>> bool(torch.allclose(log_q, posterior.log_prob_batched(draws, x[:3]), atol=1e-4))
            True
        """
        n = check_int(n, "n", minimum=1)
        xs = self._observations(xs, "xs")
        generator = self._generator(seed, generator)
        if not fuses_log_prob(self.net):
            draws = self._draw(n, xs, generator)
            return draws, self._evaluate(draws, xs, normalized=normalized)
        draws, log_q = self._draw(n, xs, generator, log_prob=True)
        if self._space.truncated and normalized:  # log Z per observation, as log_prob subtracts it
            rows = self.chunk_rows
            step = max(1, rows // n)  # observations per chunk, as the draws were chunked
            log_q = log_q - torch.cat([self._normalizer(self.net, self._space, self.net.context(xs[b : b + step]), rows)
                                       for b in range(0, len(xs), step)])
        return draws, log_q

    def _draw(self, n: int, xs: Tensor, generator: torch.Generator | None, *, log_prob: bool = False) -> Any:
        """``(n, B, D)`` draws for checked observations ``xs`` ``(B, *x_shape)`` (the work of sample and
        sample_batched); with ``log_prob`` (one flow) also their unnormalized log-densities."""
        noise = None if generator is None else SeededNoise(generator, n, self.net.flow.base, self.device)
        if self._space.truncated:
            return draw_posterior(self.net, self._space, n, xs, noise=noise, generator=generator,
                                  max_rows=self.chunk_rows, prior=self._prior, log_prob=log_prob)
        draws, log_q = draw_unconstrained(self.net, self._space, n, xs, dim=self.theta_dim, dtype=self.dtype,
                                          noise=noise, generator=generator, max_rows=self.chunk_rows,
                                          log_prob=log_prob)
        return (draws, log_q) if log_prob else draws

    def support_mass(self, x: Any = None) -> Tensor:
        """The share of the flow's mass inside the prior's support for one observation (a scalar).

        1 in the unconstrained space. In the truncated space it is the Monte Carlo estimate that normalizes
        :meth:`log_prob` (see :mod:`sbiflows.truncated_space`), and the expected acceptance of sampling.
        """
        x = self._single_observation(x)
        if not self._space.truncated:
            return torch.ones((), device=self.device, dtype=self.dtype)
        with torch.no_grad():
            return self._normalizer(self.net, self._space, self.net.context(x), self.chunk_rows)[0].exp()

    def condition(self, x: Any = None, *, validate_args: bool | None = None) -> ConditionedPosterior:
        """``p(theta | x)`` for one observation as a distribution over theta (a new object; ``self`` is unchanged).

        A ``pyro.distributions.TorchDistribution`` with ``sample``, a reparameterized ``rsample`` and a
        ``log_prob`` differentiable in the value, usable in ``pyro.sample``, NUTS/HMC/SVI or as the prior of
        a new :class:`~sbiflows.NPE`; see :class:`~sbiflows.conditioned.ConditionedPosterior`.

        Args:
            x: One observation, shape ``x_shape`` or ``(1, *x_shape)``, checked (and a small set padded) as in
                :meth:`sample`.
            validate_args: As for ``torch.distributions`` (``None``: torch's global default).
        """
        return ConditionedPosterior(self, x, validate_args=validate_args)

    # ------------------------------------------------------------------------------ densities
    @torch.no_grad()
    @torch_threads()
    def log_prob(self, theta: Any, x: Any = None) -> Tensor:
        """``log p(theta | x)`` for parameters of shape ``(..., D)`` and one observation.

        Args:
            theta: Parameters ``(..., D)`` with any leading batch shape, e.g. ``(N, D)``, ``(D,)``,
                ``(n, B, D)``.
            x: One observation, shape ``x_shape`` or ``(1, *x_shape)`` (sets with fewer trials are NaN-padded);
                None: :attr:`default_x`.

        Returns:
            Shape ``theta.shape[:-1]`` (``(N,)``, a scalar for one ``(D,)`` theta); ``-inf`` outside
            the support.
        """
        x = self._single_observation(x)
        theta = self._theta(theta)
        flat = theta.reshape(-1, self.theta_dim)
        return self._evaluate(flat[:, None, :], x)[:, 0].reshape(theta.shape[:-1])

    @torch.no_grad()
    @torch_threads()
    def log_prob_batched(self, theta: Any, xs: Any, *, normalized: bool = True) -> Tensor:
        """``log p(theta[i, b] | xs[b])`` for ``theta`` ``(n, B, D)`` and ``xs`` ``(B, *x_shape)``: ``(n, B)``.

        ``normalized=False`` skips the truncated space's Monte Carlo normalizer (8,192 flow draws per
        observation): the log-densities are then off by a constant per observation, which is all that
        ranking parameters needs (HPD regions, :func:`sbiflows.ensemble.auto_check`).
        """
        xs = self._observations(xs, "xs")
        theta = self._theta(theta)
        if theta.ndim != 3 or theta.shape[1] != len(xs):
            raise ValueError(
                f"theta must have shape (n, B, {self.theta_dim}) with B = {len(xs)} observations, "
                f"got {tuple(theta.shape)}"
            )
        return self._evaluate(theta, xs, normalized=normalized)

    def _evaluate(self, theta: Tensor, xs: Tensor, *, normalized: bool = True) -> Tensor:
        """``(n, B)`` log-densities of checked ``theta`` ``(n, B, D)`` given checked ``xs`` (log_prob's work)."""
        return evaluate(lambda t, context: self._log_prob(t, context, normalized=normalized), self.net, theta, xs,
                        max_rows=self.chunk_rows, dtype=self.dtype)

    def _log_prob(self, theta: Tensor, context: Tensor, *, normalized: bool = True) -> Tensor:
        inside = self._space.inside(theta, boundary=False)
        u = self._space.to_unconstrained(torch.where(inside[..., None], theta, self._interior(theta)))
        ok = inside & torch.isfinite(u).all(-1)
        u = torch.where(ok[..., None], u, torch.zeros_like(u))
        log_prob = self.net.log_prob_given_context(u, context) - self._space.log_abs_det_jacobian(u)
        if self._space.truncated and normalized:
            log_prob = log_prob - self._normalizer(self.net, self._space, context, self.chunk_rows)
        return torch.where(ok, log_prob, torch.full_like(log_prob, -torch.inf))

    def _interior(self, like: Tensor) -> Tensor:
        return self._space.to_constrained(torch.zeros(self.theta_dim, device=like.device, dtype=like.dtype))

    # ------------------------------------------------------------------------------------ MAP
    @torch_threads()
    def map(
        self,
        x: Any = None,
        *,
        num_init_samples: int = 1_000,
        num_to_optimize: int = 100,
        num_iter: int = 500,
        learning_rate: float = 0.01,
        seed: int | None = 0,
        progress: bool = False,
    ) -> Tensor:
        """A maximum-a-posteriori estimate of ``theta`` for one observation: shape ``(D,)``.

        Draws ``num_init_samples`` posterior samples, keeps the ``num_to_optimize`` with the highest
        ``log_prob`` and runs Adam on all of them at once, in the unconstrained space, on
        ``log p(theta | x) = log q(u | x) - log|det dT/du|``; returns the best point seen. The cost is
        bounded by the options: ``num_init_samples`` density evaluations, then ``num_iter`` batched
        gradient steps on ``num_to_optimize`` points. :meth:`map_batched` does this for many observations
        at once.

        Args:
            x: One observation; None: :attr:`default_x`.
            num_init_samples: Posterior samples to start from (``>= 1``).
            num_to_optimize: How many of the best samples are refined (``>= 1``).
            num_iter: Adam steps (``>= 0``; 0 returns the best sample).
            learning_rate: Adam step size in the unconstrained space (``> 0``).
            seed: Seeds the initial samples; None: they come from torch's global generator.
            progress: Show a progress bar over the Adam steps.
        """
        return self._map(self._single_observation(x), num_init_samples=num_init_samples,
                         num_to_optimize=num_to_optimize, num_iter=num_iter, learning_rate=learning_rate, seed=seed,
                         progress=progress)[0]

    @torch_threads()
    def map_batched(
        self,
        xs: Any,
        *,
        num_init_samples: int = 1_000,
        num_to_optimize: int = 100,
        num_iter: int = 500,
        learning_rate: float = 0.01,
        seed: int | None = 0,
        progress: bool = False,
    ) -> Tensor:
        """:meth:`map` for each of ``B`` observations ``xs`` (``(B, *x_shape)``) at once: shape ``(B, D)``.

        Every step of the ascent moves the points of all observations of a chunk together (as many observations
        per chunk as :attr:`chunk_rows` holds starting points for, at least one), so many observations cost
        about what one does: the fixed cost of a step is paid once. Observation ``b`` starts from the ``b``-th seeded stream of draws
        (:class:`~sbiflows.seeding.SeededNoise`; :meth:`map` uses the first), which does not depend on the
        chunks; the options are :meth:`map`'s.

        Example:
            >>> from sbiflows import NPE
            >>> prior = torch.distributions.MultivariateNormal(torch.zeros(2), torch.eye(2))
            >>> theta = prior.sample((300,)); x = theta + 0.1 * torch.randn_like(theta)
            >>> posterior = NPE(prior, transforms=1).fit(theta, x, max_epochs=3, seed=0, progress=False)
            >>> posterior.map_batched(x[:4], num_iter=20).shape
            torch.Size([4, 2])
        """
        return self._map(self._observations(xs, "xs"), num_init_samples=num_init_samples,
                         num_to_optimize=num_to_optimize, num_iter=num_iter, learning_rate=learning_rate, seed=seed,
                         progress=progress)

    def _map(self, xs: Tensor, *, num_init_samples: Any, num_to_optimize: Any, num_iter: Any, learning_rate: Any,
             seed: Any, progress: bool) -> Tensor:
        num_init_samples = check_int(num_init_samples, "num_init_samples", minimum=1)
        num_to_optimize = check_int(num_to_optimize, "num_to_optimize", minimum=1)
        num_iter = check_int(num_iter, "num_iter", minimum=0)
        learning_rate = check_positive_number(learning_rate, "learning_rate")
        seed = check_int(seed, "seed", optional=True)
        if seed is None:  # the starts' root seed from torch's global generator, as map drew them before
            seed = int(torch.randint(2**62, (1,)))
        noise = SeededNoise(self._generator(seed, None), num_init_samples, self.net.flow.base, self.device)
        best = map_estimates(self.net, self._space, xs, noise=noise, num_init_samples=num_init_samples,
                             num_to_optimize=num_to_optimize, num_iter=num_iter, learning_rate=learning_rate,
                             max_rows=self.chunk_rows, progress=progress)
        return self._space.to_constrained(best)

    # ------------------------------------------------------------------------------- checking
    def _generator(self, seed: int | None, generator: torch.Generator | None) -> torch.Generator | None:
        if seed is not None and generator is not None:
            raise ValueError("pass either seed or generator, not both")
        if seed is not None:  # its own stream: never the same draws as, e.g., a reference sampler's seed
            return torch.Generator(device=self.device).manual_seed(derive_seed(check_int(seed, "seed"), "posterior"))
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator (or use seed=), got {type(generator).__name__}")
        return generator

    def _theta(self, theta: Any) -> Tensor:
        theta = as_float_tensor(theta, "theta", dtype=self.dtype, device=self.device,
                                warn_narrowing=lambda: not draws_float64(self.prior))
        if theta.ndim == 0 or theta.shape[-1] != self.theta_dim:
            raise ValueError(f"theta must have shape (..., {self.theta_dim}), got {tuple(theta.shape)}")
        if torch.isnan(theta).any():
            raise ValueError("theta contains NaN")
        return theta

    def _observations(self, xs: Any, name: str, *, single: bool = False) -> Tensor:
        """Checked observations ``(B, *x_shape)`` (sets with fewer trials NaN-padded; see :mod:`sbiflows.xshape`)."""
        xs = as_float_tensor(xs, name, dtype=_x_dtype(xs, self.dtype), device=self.device)
        xs = check_observations(xs, self.x_shape, name, padded_trials=self.net.padded_trials, single=single)
        bad = ~valid_rows(xs, padded_trials=self.net.padded_trials)
        if bad.any():
            rows = torch.nonzero(bad).flatten().tolist()
            what = "NaN or inf" if not self.net.padded_trials else "no finite trial, inf, or NaN inside a trial"
            raise ValueError(f"{name} contains {what} (rows {rows[:10]}); the posterior is undefined there")
        warn_if_outside(xs, name, x_shift=self.net.x_shift, x_scale=self.net.x_scale)
        if self.net.padded_trials:
            warn_if_fewer_trials(xs, name, fewest=self.net.fewest_trials)
        return xs

    def _single_observation(self, x: Any) -> Tensor:
        if x is None:
            if self.default_x is not None:
                return self.default_x[None]
            raise ValueError(f"x is required: one observation of shape {self.x_shape} (this posterior has no "
                             "default_x)")
        return self._observations(x, "x", single=True)

    def copy(self) -> Posterior:
        """An independent deep copy."""
        return copy.deepcopy(self)

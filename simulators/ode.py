"""A batched explicit Runge-Kutta solver: many independent ODE initial-value problems at once.

The SIR and Lotka-Volterra tasks need the same small autonomous ODE solved for thousands of parameter
vectors (simulation) or for every MCMC chain at every step (reference posteriors). Looping over
``scipy.integrate.solve_ivp`` costs about a millisecond of Python overhead per solve; stacking all
problems into one ``solve_ivp`` system forces every problem onto the smallest step size of the batch and,
worse, measures the error with an RMS over *all* components, so one badly resolved trajectory can
hide behind thousands of easy ones.

:func:`solve_batched` instead integrates every row with its own step size and its own error control
(Dormand-Prince 5(4), the method of ``solve_ivp(method="RK45")``), as NumPy operations over all rows
at once. Each row lands exactly on the requested output times, so no interpolation error is added.
A row whose step size underflows, whose state becomes non-finite, or which exceeds ``max_steps`` is
marked as failed and returned as NaN.

:class:`ODETask` is the shared base of those two tasks: solving (in log coordinates), counting failed
solves, the exact likelihood given the solution and the reference-posterior MCMC.

Example:
    >>> import numpy as np
    >>> decay = lambda y, p: -p * y                      # dy/dt = -k y, one k per row
    >>> sol = solve_batched(decay, np.ones((3, 1)), np.array([[0.5], [1.0], [2.0]]), np.array([0.0, 1.0]))
    >>> np.allclose(sol.values[:, -1, 0], np.exp([-0.5, -1.0, -2.0]))
    True
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from simulators.base import Task

#: Right-hand side of an autonomous system: ``rhs(y (n, d), params (n, p)) -> dy/dt (n, d)``.
RHS = Callable[[np.ndarray, np.ndarray], np.ndarray]

# Dormand-Prince 5(4) tableau (Dormand & Prince 1980; Hairer, Norsett & Wanner, Table II.5.2).
# Row i holds the weights of stages 0..i-1 for stage i; row 6 is the 5th-order solution (FSAL).
_A = np.zeros((7, 7))
_A[1, :1] = [1 / 5]
_A[2, :2] = [3 / 40, 9 / 40]
_A[3, :3] = [44 / 45, -56 / 15, 32 / 9]
_A[4, :4] = [19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729]
_A[5, :5] = [9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656]
_A[6, :6] = [35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84]
# Difference between the 5th-order weights and the embedded 4th-order ones: the local error estimate.
_E = np.array([71 / 57600, 0.0, -71 / 16695, 71 / 1920, -17253 / 339200, 22 / 525, -1 / 40])
_SAFETY, _MIN_FACTOR, _MAX_FACTOR = 0.9, 0.2, 10.0


@dataclass
class BatchedSolution:
    """The result of :func:`solve_batched`.

    Attributes:
        values: Solution at the output times, shape ``(N, T, d)``; NaN for failed rows.
        failed: Boolean mask of shape ``(N,)``, True where the solver gave up on a row.
        steps: Accepted steps per row, shape ``(N,)`` (useful to judge cost and stiffness).
    """

    values: np.ndarray
    failed: np.ndarray
    steps: np.ndarray


def solve_batched(
    rhs: RHS,
    y0: np.ndarray,
    params: np.ndarray,
    times: np.ndarray,
    *,
    rtol: float = 1e-8,
    atol: float = 1e-8,
    max_steps: int = 20_000,
) -> BatchedSolution:
    """Integrate ``dy/dt = rhs(y, params)`` for every row of ``y0``/``params`` with adaptive steps.

    Args:
        rhs: Vectorized right-hand side, see :data:`RHS`. Rows are independent problems.
        y0: Initial states at ``times[0]``, shape ``(N, d)``.
        params: Parameters, shape ``(N, p)``, passed row-aligned to ``rhs``.
        times: Strictly increasing output times, shape ``(T,)``; integration starts at ``times[0]``
            (so ``values[:, 0] == y0``).
        rtol: Relative tolerance of the per-row, per-step local error.
        atol: Absolute tolerance of the per-row, per-step local error.
        max_steps: Attempted steps (accepted or rejected) after which a row counts as failed.

    Returns:
        A :class:`BatchedSolution`.

    Example:
        >>> sol = solve_batched(lambda y, p: p * y, np.ones((1, 1)), np.ones((1, 1)), np.linspace(0, 1, 3))
        >>> round(float(sol.values[0, -1, 0]), 6)
        2.718282
    """
    y0 = np.asarray(y0, dtype=np.float64)
    params = np.asarray(params, dtype=np.float64)
    times = np.asarray(times, dtype=np.float64)
    if y0.ndim != 2 or params.ndim != 2 or params.shape[0] != y0.shape[0]:
        raise ValueError(
            f"y0 must have shape (N, d) and params (N, p) with the same N, got {y0.shape} and {params.shape}"
        )
    if times.ndim != 1 or times.size < 2 or np.any(np.diff(times) <= 0):
        raise ValueError(f"times must be a strictly increasing 1-D array of length >= 2, got {times!r}")

    num_rows, dim = y0.shape
    values = np.full((num_rows, times.size, dim), np.nan)
    values[:, 0] = y0
    failed = np.zeros(num_rows, dtype=bool)
    steps = np.zeros(num_rows, dtype=np.int64)

    # State of the rows still being integrated ("live" rows), compacted whenever rows finish.
    rows = np.arange(num_rows)
    y, p = y0.copy(), params.copy()
    t = np.full(num_rows, times[0])
    nxt = np.ones(num_rows, dtype=np.int64)  # index of the next output time
    # Overflow/NaN in trial stages is expected for hard rows: it rejects the step, no warning needed.
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        f = rhs(y, p)
        h = _initial_step(rhs, y, p, f, rtol, atol, times[-1] - times[0])
        attempts = np.zeros(num_rows, dtype=np.int64)

        while rows.size:  # one iteration = one attempted step of every live row
            target = times[nxt]
            h_try = np.minimum(h, target - t)
            lands = h_try >= (target - t) * (1 - 1e-12)
            y_new, f_new, err = _dopri_step(rhs, y, p, f, h_try)

            scale = atol + rtol * np.maximum(np.abs(y), np.abs(y_new))
            err_norm = _rms(err / scale)
            ok = np.isfinite(err_norm) & np.all(np.isfinite(y_new), axis=1)
            accept = ok & (err_norm <= 1.0)

            # Step-size control (standard elementary controller, Hairer et al. II.4).
            factor = _SAFETY * np.maximum(err_norm, 1e-10) ** -0.2
            factor = np.clip(np.where(ok, factor, _MIN_FACTOR), _MIN_FACTOR, _MAX_FACTOR)
            factor = np.where(accept, factor, np.minimum(factor, 1.0))
            h = h_try * factor

            t = np.where(accept, np.where(lands, target, t + h_try), t)
            y = np.where(accept[:, None], y_new, y)
            f = np.where(accept[:, None], f_new, f)
            steps[rows] += accept
            attempts += 1

            landed = accept & lands
            if landed.any():
                values[rows[landed], nxt[landed]] = y[landed]
                nxt = nxt + landed
            done = nxt >= times.size
            dead = ~done & ((attempts >= max_steps) | (h <= 1e-14 * np.maximum(1.0, np.abs(t))))
            if dead.any():
                failed[rows[dead]] = True
                values[rows[dead]] = np.nan
            if (done | dead).any():
                keep = ~(done | dead)
                rows, y, p, f, t, h, nxt, attempts = (a[keep] for a in (rows, y, p, f, t, h, nxt, attempts))
    return BatchedSolution(values=values, failed=failed, steps=steps)


def _dopri_step(
    rhs: RHS, y: np.ndarray, p: np.ndarray, f0: np.ndarray, h: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One Dormand-Prince step of size ``h`` (per row); returns ``(y_new, f(y_new), error estimate)``."""
    n, d = y.shape
    hc = h[:, None]
    stages = np.empty((7, n * d))  # flattened stage derivatives, so each combination is one matmul
    stages[0] = f0.reshape(-1)
    for i in range(1, 7):
        y_stage = y + hc * (_A[i, :i] @ stages[:i]).reshape(n, d)
        stages[i] = rhs(y_stage, p).reshape(-1)
    err = hc * (_E @ stages).reshape(n, d)
    return y_stage, stages[6].reshape(n, d), err  # the last stage point is the new solution (FSAL)


def _rms(a: np.ndarray) -> np.ndarray:
    """Root-mean-square of each row (the error norm of ``solve_ivp``); einsum avoids ``np.mean``'s overhead."""
    return np.sqrt(np.einsum("ij,ij->i", a, a) / a.shape[1])


def _initial_step(
    rhs: RHS, y: np.ndarray, p: np.ndarray, f0: np.ndarray, rtol: float, atol: float, span: float
) -> np.ndarray:
    """Per-row first step size (Hairer, Norsett & Wanner, Sec. II.4, as in ``solve_ivp``)."""
    scale = atol + rtol * np.abs(y)
    d0, d1 = _rms(y / scale), _rms(f0 / scale)
    h0 = np.where((d0 < 1e-5) | (d1 < 1e-5), 1e-6, 0.01 * d0 / np.maximum(d1, 1e-300))
    h0 = np.minimum(h0, span)
    f1 = rhs(y + h0[:, None] * f0, p)
    d2 = _rms((f1 - f0) / scale) / h0
    d2 = np.where(np.isfinite(d2), d2, np.inf)
    big = np.maximum(d1, d2)
    h1 = np.where(big <= 1e-15, np.maximum(1e-6, h0 * 1e-3), (0.01 / np.maximum(big, 1e-300)) ** 0.2)
    return np.minimum(100 * h0, np.minimum(h1, span))


class SimulationFailureWarning(UserWarning):
    """Some simulations failed (the ODE solver gave up); their rows are NaN."""


class ODETask(Task):
    """Shared machinery of the ODE tasks: batched solves, failure accounting, likelihood, reference MCMC.

    A subclass defines the ODE in log coordinates (``_log_rhs``, ``_log_initial_state``; solving for the
    logarithm of positive populations keeps them positive and gives relative accuracy even when a
    population is tiny), the observed noise-free quantity (``_mean``) and the observation noise
    (``_sample_noise``, ``_noise_log_prob``). The ODE is solved once per row, up to the last observation
    time only, with :func:`solve_batched`.

    Failures: a row whose solve fails is NaN in :meth:`simulate`, which then emits one
    :class:`SimulationFailureWarning` saying ``"k of N simulations failed ..."``; :meth:`log_likelihood`
    is ``-inf`` for such rows and for ``theta`` outside the positive orthant.
    """

    #: Observation times; ``times[0] = 0`` is the initial condition.
    times: np.ndarray = np.zeros(0)
    rtol: float = 1e-8
    atol: float = 1e-8
    #: Attempted steps per row before a solve counts as failed (an instance may lower it, e.g. in tests).
    ode_max_steps: int = 20_000
    #: Reference-posterior MCMC: ``num_chains``, ``warmup`` sweeps and ``thin`` (required), and optionally
    #: ``max_thin``, ``max_rhat``, ``ess_fraction``, ``min_ess`` (see :func:`simulators.mcmc.run_chains`)
    #: and ``on_failure`` ("raise"/"warn"). Part of the cache key, except ``on_failure``. For 10,000
    #: samples of observations 1-3 (200 chains x 50 draws, no extension needed): max R-hat 1.012 and
    #: min ESS of the returned samples 9,100 (sir), 1.009 and 10,000 (lotka_volterra).
    mcmc_options: dict = {"num_chains": 200, "warmup": 100, "thin": 1}

    # ----------------------------------------------------------------------- model hooks
    def _rhs_params(self, theta: np.ndarray) -> np.ndarray:
        """Per-row constants of ``_log_rhs``, computed once per solve from ``theta`` (N, theta_dim)."""
        return theta

    def _log_rhs(self, log_y: np.ndarray, params: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _log_initial_state(self) -> np.ndarray:
        raise NotImplementedError

    def _mean(self, log_y: np.ndarray) -> Tensor:
        """Noise-free observation from the solution ``(N, T, d)`` in log coordinates -> ``(N, x_dim)``."""
        raise NotImplementedError

    def _sample_noise(self, mean: Tensor, generator: torch.Generator) -> Tensor:
        raise NotImplementedError

    def _noise_log_prob(self, mean: Tensor, x: Tensor) -> Tensor:
        raise NotImplementedError

    # -------------------------------------------------------------------------- public
    def noise_free(self, theta: Tensor) -> Tensor:
        """The ODE solution at the observation times, as observed without noise, float64.

        Args:
            theta: Parameters, shape (N, theta_dim) or (theta_dim,), positive.

        Returns:
            Shape (N, x_dim); NaN rows where the solver failed.
        """
        theta = self._check_theta(theta)
        self._check_positive(theta)
        mean, _ = self._solve(theta.to(torch.float64).numpy())
        return mean

    def log_likelihood(self, theta: Tensor, x: Tensor) -> Tensor:
        """Exact ``log p(x | theta)`` given the (numerically accurate) ODE solution.

        Not differentiable in ``theta`` (the ODE is solved in NumPy).

        Args:
            theta: Shape (N, theta_dim) or (theta_dim,). Rows with a non-positive or non-finite entry,
                or whose ODE solve fails, get ``-inf``.
            x: Shape (x_dim,) or (N, x_dim).

        Returns:
            Shape (N,), in ``theta``'s dtype.
        """
        theta, x = self._check_likelihood_args(theta, x)
        theta64 = theta.detach().to("cpu", torch.float64)
        x = x.detach().to("cpu", torch.float64).expand(len(theta64), -1)
        out = torch.full((len(theta64),), -math.inf, dtype=torch.float64)
        valid = torch.isfinite(theta64).all(1) & (theta64 > 0).all(1)
        if valid.any():
            mean, failed = self._solve(theta64[valid].numpy())
            ll = self._noise_log_prob(mean, x[valid])
            out[valid] = torch.where(torch.from_numpy(failed), -math.inf, ll)
        return out.to(theta.dtype)

    # ------------------------------------------------------------------------ internals
    def _solve(self, theta: np.ndarray) -> tuple[Tensor, np.ndarray]:
        log_y0 = np.broadcast_to(self._log_initial_state(), (len(theta), self._log_initial_state().size))
        params = self._rhs_params(theta)
        sol = solve_batched(
            self._log_rhs, log_y0, params, self.times, rtol=self.rtol, atol=self.atol, max_steps=self.ode_max_steps
        )
        return self._mean(sol.values), sol.failed

    def _simulate(self, theta: Tensor, generator: torch.Generator) -> Tensor:
        self._check_positive(theta)
        mean, failed = self._solve(theta.to(torch.float64).numpy())
        x = torch.full(mean.shape, math.nan, dtype=torch.float64)
        good = torch.from_numpy(~failed)
        x[good] = self._sample_noise(mean[good], generator)
        if failed.any():
            warnings.warn(
                f"{int(failed.sum())} of {len(failed)} simulations failed (ODE solver did not reach the last "
                f"observation time within {self.ode_max_steps} steps or became non-finite); their rows are NaN",
                SimulationFailureWarning,
                stacklevel=3,
            )
        return x

    def _check_positive(self, theta: Tensor) -> None:
        bad = ~(torch.isfinite(theta).all(1) & (theta > 0).all(1))
        if bad.any():
            row = int(bad.nonzero()[0])
            raise ValueError(
                f"theta must be finite and positive (rates) for task {self.name!r}; {int(bad.sum())} of "
                f"{len(theta)} rows are not, e.g. row {row}: {theta[row].tolist()}"
            )

    def _reference_posterior(self, i: int, num_samples: int, generator: torch.Generator) -> Tensor:
        """Slice-sampling MCMC in ``z = log theta``, chains started next to the true parameters.

        Starting at prior draws (even likelihood-resampled ones) does not work here: the posterior is
        10-100 times narrower than the prior and the likelihood has ridges and local optima, so chains
        started apart get stuck apart (measured for lotka_volterra: R-hat 1.5 after 400 sweeps). As in
        sbibm, which starts its slice sampler at the true parameters, the chains start at
        ``log theta_true + 0.02 N(0, I)``; R-hat then checks mixing within that mode only and cannot
        detect a distant second mode.

        The checks are those of :func:`simulators.mcmc.run_chains`: R-hat <= ``max_rhat`` and an ESS of
        the returned samples of at least ``ess_fraction * num_samples`` (defaults 1.05 and 0.5), with
        the chains extended up to ``max_thin``; the result is in :attr:`last_diagnostics`.
        """
        from simulators.mcmc import (
            ESS_FRACTION,
            ConvergenceError,
            ConvergenceWarning,
            convergence_message,
            run_chains,
        )

        observation, prior = self.observation(i), self.prior
        options = self.mcmc_options
        num_chains = options["num_chains"]
        max_rhat = options.get("max_rhat", 1.05)
        min_ess = options.get("min_ess")
        min_ess = options.get("ess_fraction", ESS_FRACTION) * num_samples if min_ess is None else min_ess

        def log_prob_z(z: Tensor, index: Tensor) -> Tensor:  # density of z = log theta: p(theta) |d theta / d z|
            theta = z.exp()
            log_prior = prior.log_prob(theta.clamp_min(1e-300)).to(torch.float64)
            return self.log_likelihood(theta, observation) + log_prior + z.sum(-1)

        start = self.true_parameters(i).to(torch.float64).log()
        jitter = torch.randn(num_chains, self.theta_dim, generator=generator, dtype=torch.float64)
        samples, diag = run_chains(
            log_prob_z,
            start + 0.02 * jitter,
            num_samples,
            warmup=options["warmup"],
            thin=options["thin"],
            max_thin=options.get("max_thin"),
            scale_tril=0.02 * torch.eye(self.theta_dim, dtype=torch.float64),
            transform=torch.exp,
            max_rhat=max_rhat,
            min_ess=min_ess,
            generator=generator,
        )
        self.last_diagnostics = diag.select(0)
        if not diag.converged:
            message = (
                f"reference MCMC for {self.name} observation {i} did not converge: "
                f"{convergence_message(self.last_diagnostics, max_rhat, min_ess)}"
            )
            if options.get("on_failure", "raise") == "raise":
                raise ConvergenceError(message)
            warnings.warn(message, ConvergenceWarning, stacklevel=3)
        return samples[0]

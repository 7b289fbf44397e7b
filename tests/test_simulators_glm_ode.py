"""Tests of the bernoulli_glm(_raw), sir and lotka_volterra tasks and the batched ODE solver."""

from __future__ import annotations

import csv
import math
from importlib import resources

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp
from torch.distributions import Bernoulli, Binomial, LogNormal, MultivariateNormal

import simulators
from simulators.bernoulli_glm import BernoulliGLM, BernoulliGLMRaw, design_matrix, prior_precision
from simulators.lotka_volterra import LotkaVolterra
from simulators.ode import SimulationFailureWarning, solve_batched
from simulators.sir import SIR

NAMES = ["bernoulli_glm", "bernoulli_glm_raw", "sir", "lotka_volterra"]
ODE_NAMES = ["sir", "lotka_volterra"]
CLASSES = {"bernoulli_glm": BernoulliGLM, "bernoulli_glm_raw": BernoulliGLMRaw, "sir": SIR, "lotka_volterra": LotkaVolterra}
DIMS = {"bernoulli_glm": (10, 10), "bernoulli_glm_raw": (10, 100), "sir": (2, 10), "lotka_volterra": (4, 20)}


def csv_row(*parts: str) -> list[float]:
    """The data row of a packaged CSV file, read independently of ``simulators.base``."""
    text = resources.files("simulators").joinpath("data", *parts).read_text()
    return [float(v) for v in list(csv.reader(text.splitlines()))[1]]


def scipy_reference(task: simulators.Task, theta: torch.Tensor) -> np.ndarray:
    """Noise-free observation from a tight-tolerance ``solve_ivp`` in the original coordinates."""
    out = []
    for row in theta.double().tolist():
        if isinstance(task, SIR):
            beta, gamma = row
            n = 1e6

            def rhs(_, u, beta=beta, gamma=gamma, n=n):
                return [-beta * u[0] * u[1] / n, beta * u[0] * u[1] / n - gamma * u[1]]

            y0, pick = [n - 1, 1.0], lambda y: np.clip(y[1] / n, 0, 1)
        else:
            a, b, c, d = row

            def rhs(_, u, a=a, b=b, c=c, d=d):
                return [a * u[0] - b * u[0] * u[1], -c * u[1] + d * u[0] * u[1]]

            y0, pick = [30.0, 1.0], lambda y: np.clip(y.reshape(-1), 1e-10, 1e4)
        sol = solve_ivp(rhs, (0, task.times[-1]), y0, t_eval=task.times, method="DOP853", rtol=1e-12, atol=1e-30)
        out.append(pick(sol.y))
    return np.array(out)


# ----------------------------------------------------------------------------- basics
@pytest.mark.parametrize("name", NAMES)
def test_registry_dimensions_and_labels(name):
    task = simulators.get(name)
    assert type(task) is CLASSES[name] and task.name == name
    assert (task.theta_dim, task.x_dim) == DIMS[name]
    assert len(task.parameter_names) == task.theta_dim and all(n.startswith("$") for n in task.parameter_names)


@pytest.mark.parametrize("name", NAMES)
def test_prior_shape_and_support(name):
    task = simulators.get(name)
    theta = task.prior.sample((2000,))
    assert theta.shape == (2000, task.theta_dim) and theta.dtype == torch.float32
    assert task.prior.support.check(theta).all()
    assert torch.isfinite(task.prior.log_prob(theta)).all()
    if name in ODE_NAMES:
        assert (theta > 0).all()


def test_glm_prior_matches_sbibm_definition():
    precision = prior_precision()
    assert precision[0, 0] == 0.5 and (precision[0, 1:] == 0).all()
    m = 9
    d = torch.eye(m, dtype=torch.float64) - torch.diag(torch.ones(m - 1, dtype=torch.float64), -1)
    f = d @ d + torch.diag(torch.sqrt(torch.arange(m, dtype=torch.float64) / m))
    torch.testing.assert_close(precision[1:, 1:], f.T @ f)
    theta = BernoulliGLM().prior.sample((200_000,))
    assert abs(float(theta[:, 0].var()) - 2.0) < 0.05  # beta_0 ~ N(0, 2)
    torch.testing.assert_close(torch.cov(theta.T.double()), torch.linalg.inv(precision), atol=0.05, rtol=0.03)


@pytest.mark.parametrize("name", NAMES)
def test_simulate_shapes_values_and_seed(name):
    task = simulators.get(name)
    theta = task.prior.sample((300,))
    x = task.simulate(theta, seed=1)
    assert x.shape == (300, task.x_dim) and x.dtype == torch.float32 and torch.isfinite(x).all()
    torch.testing.assert_close(task.simulate(theta, seed=1), x, rtol=0, atol=0)
    assert not torch.equal(task.simulate(theta, seed=2), x)
    assert task.simulate(theta[0], seed=1).shape == (1, task.x_dim)
    if name == "bernoulli_glm_raw":
        assert set(x.unique().tolist()) <= {0.0, 1.0}
    if name == "bernoulli_glm":
        assert (x[:, 0] == x[:, 0].round()).all() and x[:, 0].min() >= 0 and x[:, 0].max() <= 100
    if name == "sir":
        assert (x == x.round()).all() and x.min() >= 0 and x.max() <= 1000
    if name == "lotka_volterra":
        assert (x > 0).all()


@pytest.mark.parametrize("name", NAMES)
def test_observations_and_true_parameters_equal_csv(name):
    task = simulators.get(name)
    folder = {"bernoulli_glm_raw": "bernoulli_glm"}.get(name, name)
    obs_file = "observation_raw.csv" if name == "bernoulli_glm_raw" else "observation.csv"
    for i in range(1, 11):
        assert task.observation(i).tolist() == pytest.approx(csv_row(folder, str(i), obs_file), rel=1e-6)
        assert task.true_parameters(i).tolist() == pytest.approx(csv_row(folder, str(i), "true_parameters.csv"))
        assert task.observation(i).shape == (task.x_dim,) and task.true_parameters(i).shape == (task.theta_dim,)


# ---------------------------------------------------------------------------- bernoulli glm
def test_glm_design_matrix_is_intercept_plus_lagged_stimulus():
    v = design_matrix()
    assert v.shape == (100, 10) and (v[:, 0] == 1).all()
    stimulus = v[:, 1]
    for j in range(9):
        assert (v[:j, 1 + j] == 0).all() and torch.equal(v[j:, 1 + j], stimulus[: 100 - j])


def test_glm_observation_is_sufficient_statistic_of_raw_observation():
    for i in range(1, 11):
        raw = BernoulliGLMRaw().observation(i).double()
        torch.testing.assert_close(design_matrix().T @ raw, BernoulliGLM().observation(i).double(), atol=1e-4, rtol=0)


def test_glm_tasks_share_the_spike_stream():
    theta = BernoulliGLM().prior.sample((50,))
    y = BernoulliGLMRaw().simulate(theta, seed=3).double()
    torch.testing.assert_close(BernoulliGLM().simulate(theta, seed=3).double(), y @ design_matrix(), atol=1e-4, rtol=0)


def test_glm_spike_probabilities_follow_sigmoid():
    task = BernoulliGLMRaw()
    theta = task.true_parameters(2)
    y = task.simulate(theta.expand(20_000, -1), seed=0).double()
    p = torch.sigmoid(design_matrix() @ theta.double())
    se = torch.sqrt(p * (1 - p) / 20_000)
    assert ((y.mean(0) - p).abs() <= 5 * se + 1e-4).all()


def test_glm_raw_log_likelihood_is_bernoulli_formula():
    task = BernoulliGLMRaw()
    theta = task.prior.sample((40,)).double()
    y = task.simulate(theta, seed=5).double()
    expected = Bernoulli(logits=theta @ design_matrix().T).log_prob(y).sum(-1)
    torch.testing.assert_close(task.log_likelihood(theta, y), expected)
    # A single observation broadcasts over all rows of theta.
    torch.testing.assert_close(task.log_likelihood(theta, y[0]), Bernoulli(logits=theta @ design_matrix().T).log_prob(y[0]).sum(-1))


def test_glm_sufficient_likelihood_differences_equal_raw_ones():
    raw, suff = BernoulliGLMRaw(), BernoulliGLM()
    theta = suff.prior.sample((2, 30)).double()
    y = raw.simulate(theta[0], seed=7).double()
    x = y @ design_matrix()
    raw_diff = raw.log_likelihood(theta[0], y) - raw.log_likelihood(theta[1], y)
    suff_diff = suff.log_likelihood(theta[0], x) - suff.log_likelihood(theta[1], x)
    torch.testing.assert_close(suff_diff, raw_diff, atol=1e-8, rtol=1e-10)


def test_glm_log_likelihood_keeps_gradients():
    theta = BernoulliGLM().true_parameters(1).double().requires_grad_()
    BernoulliGLM().log_likelihood(theta, BernoulliGLM().observation(1)).sum().backward()
    assert theta.grad is not None and torch.isfinite(theta.grad).all()


def _glm_importance_moments(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean/std by importance sampling from a widened Laplace approximation (Newton MAP)."""
    task = BernoulliGLM()
    x = task.observation(i).double()
    precision, v = prior_precision(), design_matrix()
    theta = torch.zeros(10, dtype=torch.float64)
    for _ in range(50):  # the log posterior is strictly concave: Newton converges
        p = torch.sigmoid(v @ theta)
        grad = x - v.T @ p - precision @ theta
        hess = -(v.T * (p * (1 - p))) @ v - precision
        theta = theta - torch.linalg.solve(hess, grad)
    proposal = MultivariateNormal(theta, covariance_matrix=1.3**2 * torch.linalg.inv(-hess))
    draws = proposal.sample((200_000,))
    prior = MultivariateNormal(torch.zeros(10, dtype=torch.float64), precision_matrix=precision)
    log_w = task.log_likelihood(draws, x) + prior.log_prob(draws) - proposal.log_prob(draws)
    w = torch.softmax(log_w, 0)
    assert 1 / (w**2).sum() > 20_000  # the importance weights are well behaved
    mean = (w[:, None] * draws).sum(0)
    return mean, ((w[:, None] * (draws - mean) ** 2).sum(0)).sqrt()


@pytest.mark.slow
def test_glm_short_mcmc_agrees_with_importance_sampling(tmp_path, monkeypatch):
    monkeypatch.setenv("SBIFLOWS_CACHE", str(tmp_path))
    task = BernoulliGLM()
    task.mcmc_options = {"num_chains": 64, "warmup": 40, "thin": 1}
    samples = task.reference_posterior(3, 64 * 20, seed=0).double()
    assert samples.shape == (1280, 10) and torch.isfinite(samples).all()
    mean, std = _glm_importance_moments(3)
    assert ((samples.mean(0) - mean).abs() / std).max() < 0.2
    assert ((samples.std(0) / std) - 1).abs().max() < 0.2
    assert task.last_diagnostics.converged and (task.last_diagnostics.sample_ess >= 640).all()
    assert list(tmp_path.glob("bernoulli_glm_obs3_*.pt"))  # cached on disk ...

    def fail(*args, **kwargs):
        raise AssertionError("the cache was not used")

    monkeypatch.setattr(BernoulliGLM, "_reference_posterior", fail)
    raw = BernoulliGLMRaw()
    raw.mcmc_options = task.mcmc_options  # ... and shared with the raw task (same settings)
    assert torch.equal(raw.reference_posterior(3, 64 * 20, seed=0), samples.float())
    assert torch.equal(raw.last_diagnostics.sample_ess, task.last_diagnostics.sample_ess)


# ------------------------------------------------------------------------------------ ODE
def test_solve_batched_matches_closed_form_and_flags_failures():
    rates = np.array([[0.5], [1.0], [2.0]])
    times = np.linspace(0, 3, 7)
    sol = solve_batched(lambda y, p: -p * y, np.ones((3, 1)), rates, times)
    np.testing.assert_allclose(sol.values[..., 0], np.exp(-rates * times), rtol=1e-6, atol=1e-8)
    assert not sol.failed.any() and (sol.steps > 0).all()
    # dy/dt = y^2 blows up at t = 1 for y0 = 1: that row fails (NaN), the other one does not.
    blowup = solve_batched(lambda y, p: p * y**2, np.ones((2, 1)), np.array([[1.0], [0.1]]), np.array([0.0, 2.0]))
    assert blowup.failed.tolist() == [True, False] and np.isnan(blowup.values[0]).all()
    np.testing.assert_allclose(blowup.values[1, -1, 0], 1 / (1 - 0.2), rtol=1e-7)


@pytest.mark.parametrize("name", ODE_NAMES)
def test_ode_solution_matches_tight_scipy_solve(name):
    task = simulators.get(name)
    theta = torch.cat([task.prior.sample((30,)), torch.stack([task.true_parameters(i) for i in range(1, 11)])])
    ours = task.noise_free(theta).numpy()
    reference = scipy_reference(task, theta)
    assert np.abs(ours / reference - 1).max() < 1e-4  # measured: about 5e-6 (LV), 3e-7 (SIR)


def test_sir_mean_of_simulations_is_binomial_mean():
    task = SIR()
    theta = task.true_parameters(4)
    p = task.noise_free(theta)[0]
    x = task.simulate(theta.expand(20_000, -1), seed=0).double()
    se = torch.sqrt(1000 * p * (1 - p) / 20_000)
    assert ((x.mean(0) - 1000 * p).abs() <= 5 * se + 1e-3).all()
    assert x[:, 0].max() <= 3  # day 0: one infected in a million


def test_lotka_volterra_log_simulations_centre_on_solution():
    task = LotkaVolterra()
    theta = task.true_parameters(2)
    log_x = task.simulate(theta.expand(20_000, -1), seed=0).double().log()
    log_mean = task.noise_free(theta)[0].log()
    assert ((log_x.mean(0) - log_mean).abs() < 5 * 0.1 / math.sqrt(20_000)).all()
    assert ((log_x.std(0) - 0.1).abs() < 0.005).all()


@pytest.mark.parametrize("name", ODE_NAMES)
def test_ode_log_likelihood_is_noise_density(name):
    task = simulators.get(name)
    theta = task.prior.sample((25,))
    x = task.simulate(theta, seed=4).double()
    mean = task.noise_free(theta)
    noise = Binomial(1000, probs=mean) if name == "sir" else LogNormal(mean.log(), 0.1)
    torch.testing.assert_close(task.log_likelihood(theta.double(), x), noise.log_prob(x).sum(-1))


@pytest.mark.parametrize("name", ["bernoulli_glm_raw", "sir", "lotka_volterra"])
def test_observations_are_plausible_at_true_parameters(name):
    """Observed log-likelihoods vs. those of fresh simulations; a wrong time grid gives |z| > 30."""
    task = simulators.get(name)
    observed, mean, var = 0.0, 0.0, 0.0
    for i in range(1, 11):
        theta = task.true_parameters(i).expand(1000, -1)
        ll = task.log_likelihood(theta, task.simulate(theta, seed=i)).double()
        observed += float(task.log_likelihood(theta[:1], task.observation(i)))
        mean, var = mean + float(ll.mean()), var + float(ll.var())
    assert abs(observed - mean) / math.sqrt(var) < 4


def test_noise_free_solution_is_close_to_observations():
    """Direct residual checks of the time grid: sbibm's days 0, 17, ..., 153 and times 0, 2.1, ..., 18.9."""
    lv, sir = LotkaVolterra(), SIR()
    z = torch.stack([(lv.observation(i) / lv.noise_free(lv.true_parameters(i))[0]).log() / 0.1 for i in range(1, 11)])
    assert 0.7 < float((z**2).mean()) < 1.4 and float(z.abs().max()) < 4.5
    for i in range(1, 11):
        expected = 1000 * sir.noise_free(sir.true_parameters(i))[0]
        sd = torch.sqrt(expected * (1 - expected / 1000))
        assert ((sir.observation(i) - expected).abs() <= 5 * sd + 3).all()


def test_failed_solves_are_nan_counted_and_warned():
    task = LotkaVolterra()
    task.ode_max_steps = 400  # the true parameters need ~110 steps, fast oscillations thousands
    theta = torch.tensor([[0.69, 0.11, 0.89, 0.12], [5.0, 0.5, 5.0, 0.5], [20.0, 1.0, 20.0, 1.0]])
    with pytest.warns(SimulationFailureWarning, match="2 of 3 simulations failed"):
        x = task.simulate(theta, seed=0)
    assert torch.isfinite(x[0]).all() and torch.isnan(x[1:]).all()
    ll = task.log_likelihood(theta, task.observation(1))
    assert torch.isfinite(ll[0]) and (ll[1:] == -math.inf).all()


def _sir_grid_moments(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean/std of sir by quadrature on a 201 x 201 grid in log space (one batched ODE solve)."""
    task = SIR()
    offsets = torch.linspace(-0.5, 0.5, 201, dtype=torch.float64)
    centre = task.true_parameters(i).double().log()
    grid = torch.stack(torch.meshgrid(centre[0] + offsets, centre[1] + offsets, indexing="ij"), -1).reshape(-1, 2)
    theta = grid.exp()
    log_post = task.log_likelihood(theta, task.observation(i)) + task.prior.log_prob(theta) + grid.sum(-1)
    w = torch.softmax(log_post, 0)
    assert float(w.reshape(201, 201)[[0, -1]].sum() + w.reshape(201, 201)[:, [0, -1]].sum()) < 1e-4
    mean = (w[:, None] * theta).sum(0)
    return mean, ((w[:, None] * (theta - mean) ** 2).sum(0)).sqrt()


@pytest.mark.slow
def test_sir_reference_mcmc_agrees_with_grid_quadrature(tmp_path, monkeypatch):
    monkeypatch.setenv("SBIFLOWS_CACHE", str(tmp_path))
    task = SIR()
    task.mcmc_options = {"num_chains": 20, "warmup": 20, "thin": 1}
    samples = task.reference_posterior(1, 1000, seed=0).double()
    assert samples.shape == (1000, 2) and (samples > 0).all()
    assert (task.last_diagnostics.rhat < 1.05).all()
    assert task.last_diagnostics.converged and (task.last_diagnostics.sample_ess >= 500).all()
    mean, std = _sir_grid_moments(1)
    assert ((samples.mean(0) - mean).abs() / std).max() < 0.2
    assert ((samples.std(0) / std) - 1).abs().max() < 0.2


@pytest.mark.slow
def test_lotka_volterra_reference_posterior_small(tmp_path, monkeypatch):
    monkeypatch.setenv("SBIFLOWS_CACHE", str(tmp_path))
    task = LotkaVolterra()
    task.mcmc_options = {"num_chains": 10, "warmup": 10, "thin": 1}
    samples = task.reference_posterior(1, 500, seed=0)
    assert samples.shape == (500, 4) and (samples > 0).all()
    assert (task.last_diagnostics.rhat < 1.1).all()
    # Much narrower than the prior, and the true parameters are plausible under it.
    mean, sd = samples.mean(0), samples.std(0)
    assert (sd < 0.5 * task.prior.sample((5000,)).std(0)).all()
    assert ((mean - task.true_parameters(1)).abs() < 5 * sd).all()


def test_unconverged_reference_mcmc_raises_or_warns(monkeypatch):
    from simulators.mcmc import ConvergenceError, ConvergenceWarning

    monkeypatch.setattr("simulators.mcmc.run.rhat", lambda chains: torch.full(chains.shape[-1:], 1.5))
    task = SIR()
    centre = task.true_parameters(1).double().log()
    # the reporting is under test, not the ODE: a cheap stand-in likelihood around the true parameters
    monkeypatch.setattr(task, "log_likelihood", lambda theta, x: -50.0 * ((theta.log() - centre) ** 2).sum(-1))
    task.mcmc_options = {"num_chains": 2, "warmup": 0, "thin": 1}
    expected = r"sir observation 1 did not converge: max R-hat 1.500 > 1.05; R-hat \[1.5 1.5\]"
    with pytest.raises(ConvergenceError, match=expected):
        task._reference_posterior(1, 8, torch.Generator().manual_seed(0))
    assert task.last_diagnostics.thin == 8  # the chains were extended (8 x thin) before failing
    task.mcmc_options = {**task.mcmc_options, "on_failure": "warn", "max_thin": 1}
    with pytest.warns(ConvergenceWarning, match="did not converge"):
        assert task._reference_posterior(1, 8, torch.Generator().manual_seed(0)).shape == (8, 2)
    assert not task.last_diagnostics.converged and task.last_diagnostics.thin == 1


def test_ode_reference_needs_near_independent_draws(monkeypatch):
    """Chains that mix slowly (a correlated stand-in posterior, and no warm-up to adapt to it) are
    extended and thinned until the returned samples' ESS is at least half their number; without
    extension (max_thin = thin) the same chains fail (measured: ESS 80 of 500 samples, R-hat 1.10)."""
    from simulators.mcmc import ConvergenceError

    task = SIR()
    centre = task.true_parameters(1).double().log()

    def correlated(theta, x):  # in log theta: sd 0.1 along (1, 1), 0.02 along (1, -1)
        d = theta.log() - centre
        return -0.5 * (((d[:, 0] + d[:, 1]) / 0.1) ** 2 + ((d[:, 0] - d[:, 1]) / 0.02) ** 2) / 2

    monkeypatch.setattr(task, "log_likelihood", correlated)
    task.mcmc_options = {"num_chains": 10, "warmup": 0, "thin": 1, "max_thin": 1}
    with pytest.raises(ConvergenceError, match="ESS of the 500 returned samples"):
        task._reference_posterior(1, 500, torch.Generator().manual_seed(0))
    task.mcmc_options = {"num_chains": 10, "warmup": 0, "thin": 1, "max_thin": 64}
    samples = task._reference_posterior(1, 500, torch.Generator().manual_seed(0))
    diagnostics = task.last_diagnostics
    assert samples.shape == (500, 2) and diagnostics.converged and diagnostics.thin > 1
    assert (diagnostics.sample_ess >= 250).all() and (diagnostics.rhat <= 1.05).all()


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("name", NAMES)
def test_bad_inputs_name_argument_and_shape(name):
    task = simulators.get(name)
    d = task.theta_dim
    with pytest.raises(TypeError, match="theta must be a torch.Tensor, got list"):
        task.simulate([0.1] * d)
    with pytest.raises(ValueError, match=rf"theta must have shape \(N, {d}\).*got \(3, {d + 1}\)"):
        task.simulate(torch.ones(3, d + 1))
    with pytest.raises(TypeError, match="theta must have a floating dtype"):
        task.log_likelihood(torch.ones(2, d, dtype=torch.int64), task.observation(1))
    with pytest.raises(ValueError, match=rf"x must have shape \({task.x_dim},\) or \(N, {task.x_dim}\).*got \(2, 3\)"):
        task.log_likelihood(task.true_parameters(1), torch.ones(2, 3))
    with pytest.raises(ValueError, match="observation number"):
        task.observation(11)


def test_bad_values_rejected_or_zero_likelihood():
    with pytest.raises(ValueError, match="theta must be finite and positive"):
        SIR().simulate(torch.tensor([[0.4, -0.1]]))
    assert SIR().log_likelihood(torch.tensor([[0.4, -0.1]]), SIR().observation(1)).item() == -math.inf
    assert SIR().log_likelihood(SIR().true_parameters(1), SIR().observation(1) + 0.5).item() == -math.inf
    assert LotkaVolterra().log_likelihood(LotkaVolterra().true_parameters(1), -torch.ones(20)).item() == -math.inf
    with pytest.raises(ValueError, match="zeros and ones"):
        BernoulliGLMRaw().log_likelihood(BernoulliGLMRaw().true_parameters(1), torch.full((100,), 0.5))

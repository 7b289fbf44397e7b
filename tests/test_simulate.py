"""Batched simulation: reproducibility, invalid outputs counted, exceptions localised, partial results kept."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.distributions import Independent, Normal

from sbiflows.simulate import SimulationError, simulate, simulate_from_prior

PRIOR = Independent(Normal(torch.zeros(2), torch.ones(2)), 1)


def noisy(theta):
    return theta + torch.randn_like(theta)


def numpy_simulator(theta):
    theta = np.asarray(theta)
    return theta**2 + np.random.normal(size=theta.shape)


def seeded(theta, seed=None):
    g = torch.Generator().manual_seed(seed)
    return theta + torch.randn(theta.shape, generator=g)


@pytest.mark.parametrize("simulator", [noisy, numpy_simulator, seeded])
def test_reproducible_and_batch_size_independent_shapes(simulator):
    a = simulate_from_prior(simulator, PRIOR, 50, seed=3, batch_size=8)
    b = simulate_from_prior(simulator, PRIOR, 50, seed=3, batch_size=8)
    assert a.x.shape == (50, 2) and a.x.dtype == torch.float32
    assert torch.equal(a.theta, b.theta) and torch.equal(a.x, b.x)
    c = simulate_from_prior(simulator, PRIOR, 50, seed=4, batch_size=8)
    assert not torch.equal(a.x, c.x)


def test_nan_outputs_are_counted_not_dropped():
    def sim(theta):
        x = theta.clone()
        x[theta[:, 0] > 1.0] = float("nan")
        return x

    result = simulate_from_prior(sim, PRIOR, 400, seed=0)
    expected = int((result.theta[:, 0] > 1.0).sum())
    assert expected > 0 and result.num_invalid == expected and len(result.x) == 400
    assert f"{expected} invalid" in result.summary()


def failing(theta):
    if (theta[:, 0] > 1.5).any():
        raise ArithmeticError("blew up")
    return theta * 2


def test_raising_rows_become_nan_with_a_summary_warning():
    with pytest.warns(UserWarning, match=r"raised \(first at theta index \d+: ArithmeticError: blew up\)"):
        result = simulate_from_prior(failing, PRIOR, 300, seed=0, batch_size=50)
    bad = result.theta[:, 0] > 1.5
    assert len(result.failures) == int(bad.sum()) > 0
    assert torch.isnan(result.x[bad]).all() and torch.isfinite(result.x[~bad]).all()
    torch.testing.assert_close(result.x[~bad], 2 * result.theta[~bad])


def test_whole_failed_batch_becomes_nan():
    theta = torch.zeros(30, 2)
    theta[:10, 0] = 2.0  # the whole first batch fails
    with pytest.warns(UserWarning, match="10 invalid"):
        result = simulate(failing, theta, batch_size=10)
    assert torch.isnan(result.x[:10]).all() and torch.isfinite(result.x[10:]).all()


def test_raise_mode_keeps_finished_simulations():
    theta = torch.zeros(100, 2)
    theta[60, 0] = 2.0
    with pytest.raises(SimulationError, match="theta index 60 raised ArithmeticError") as info:
        simulate(failing, theta, batch_size=20, on_error="raise")
    assert info.value.index == 60 and info.value.partial.x.shape == (60, 2)
    assert isinstance(info.value.__cause__, ArithmeticError)


def test_bad_outputs_and_arguments():
    with pytest.raises(ValueError, match=r"returned shape \(3, 2\) for batch 0 of 5 parameter sets"):
        simulate(lambda t: torch.zeros(3, 2), torch.zeros(5, 2))
    with pytest.raises(ValueError, match="on_error"):
        simulate(noisy, torch.zeros(5, 2), on_error="ignore")
    with pytest.raises(ValueError, match="theta must be a non-empty tensor"):
        simulate(noisy, np.zeros((5, 2)))
    with pytest.raises(ValueError, match="num_simulations must be a positive int"):
        simulate_from_prior(noisy, PRIOR, 0)
    with pytest.raises(SimulationError, match="all 2 simulations raised"):
        simulate(lambda t: 1 / 0, torch.zeros(2, 2))
    with pytest.raises(ValueError, match="batch 1"):
        simulate(lambda t: torch.zeros(len(t), 2 if t[0, 0] == 0 else 3), torch.tensor([[0.0], [1.0]]), batch_size=1)


@pytest.mark.parametrize("simulator", [noisy, seeded])
def test_simulator_noise_is_independent_of_the_prior_draws(simulator):
    """One seed drives the prior and the simulator; their streams must not coincide (they did: x = 2 theta)."""
    result = simulate_from_prior(simulator, PRIOR, 2000, seed=0, batch_size=500)
    noise = result.x - result.theta
    for j in range(2):
        corr = torch.corrcoef(torch.stack([noise[:, j], result.theta[:, j]]))[0, 1]
        assert abs(float(corr)) < 0.1, (j, float(corr))  # null sd ~0.022; the bug gave 1.0


def test_task_simulate_does_not_reuse_a_same_seeded_prior_stream():
    import simulators

    task = simulators.get("gaussian_linear")
    torch.manual_seed(3)
    theta = task.prior.sample((2000,))
    noise = task.simulate(theta, seed=3) - theta
    corr = torch.corrcoef(torch.stack([noise[:, 0], theta[:, 0]]))[0, 1]
    assert abs(float(corr)) < 0.1, float(corr)

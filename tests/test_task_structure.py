"""Benchmark tasks lay out their x for embedding nets without changing its information."""

import pytest
import torch
from torch.nn.functional import softplus

import simulators
from simulators.bernoulli_glm import design_matrix


@pytest.mark.parametrize(("name", "shape", "embedding"), [
    ("sir", (1, 10), "cnn1d"), ("lotka_volterra", (2, 10), "cnn1d"), ("bernoulli_glm_raw", (100, 10), "set"),
    ("slcp_distractors", (100,), "mlp"), ("two_moons", (2,), "none"),
])
def test_every_task_declares_its_structure_and_embedding(name, shape, embedding):
    task = simulators.get(name)
    assert task.x_shape == shape and task.default_embedding == embedding
    x = task.observation(1)
    assert task.structured(x).shape == shape
    assert task.structured(x[None].expand(3, -1)).shape == (3, *shape)


def test_series_are_the_same_values_as_channels():
    lv = simulators.get("lotka_volterra")
    x = lv.observation(1)
    structured = lv.structured(x)
    assert torch.equal(structured[0], x[:10]) and torch.equal(structured[1], x[10:])  # prey, then predator
    sir = simulators.get("sir")
    assert torch.equal(sir.structured(sir.observation(2)).reshape(-1), sir.observation(2))


def test_simulate_structured_is_simulate_laid_out():
    task = simulators.get("lotka_volterra")
    theta = task.prior.sample((4,))
    assert torch.equal(task.simulate_structured(theta, seed=3), task.structured(task.simulate(theta, seed=3)),)


def test_bernoulli_pairs_hold_the_likelihood_whatever_their_order():
    """log p(y | theta) from the unordered (stimulus row, spike) pairs equals the task's likelihood of y."""
    task = simulators.get("bernoulli_glm_raw")
    theta = task.prior.sample((5,)).double()
    y = task.observation(3)
    pairs = task.structured(y.double())[torch.randperm(100)]
    psi = theta[:, 0][None] + pairs[:, :9] @ theta[:, 1:].T  # (100, 5): intercept + filter . stimulus row
    from_pairs = (pairs[:, 9:] * psi - softplus(psi)).sum(0)
    torch.testing.assert_close(from_pairs, task.log_likelihood(theta, y.double()))
    assert torch.equal(task.structured(y)[:, :9], design_matrix()[:, 1:].float())


def test_a_failed_bernoulli_simulation_stays_a_failed_set():
    task = simulators.get("bernoulli_glm_raw")
    y = task.simulate(task.prior.sample((3,)), seed=0)
    y[1] = float("nan")
    pairs = task.structured(y)
    assert torch.isnan(pairs[1]).all() and torch.isfinite(pairs[[0, 2]]).all()
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., 100\), got \(3, 99\)"):
        task.structured(y[:, :99])

"""Uniform and variational dequantization: noise range, the noise density, the Jensen bound, learning."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sbiflows.dequantization import UniformDequantization, VariationalDequantization
from sbiflows.flows import Flow, maf
from sbiflows.training import train
from sbiflows.transforms import ElementwiseAffine


def _perturb(module: torch.nn.Module, scale: float = 0.2) -> torch.nn.Module:
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


def discrete_data(n: int, seed: int) -> torch.Tensor:
    """Correlated 2-D counts: a rounded-down Gaussian with few levels, where edges of cells matter."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 2, generator=g)
    z = torch.stack([z[:, 0], 0.8 * z[:, 0] + 0.6 * z[:, 1]], dim=-1)
    return torch.floor(1.2 * z + 4.0).clamp(0, 8)


@pytest.mark.parametrize("cls", [UniformDequantization, VariationalDequantization])
def test_noise_in_unit_cell_and_reproducible(cls):
    torch.manual_seed(0)
    deq = _perturb(cls(maf(2, transforms=2, hidden_features=(16, 16))))
    x = discrete_data(2000, 0)
    v, log_q = deq.dequantize(x, generator=torch.Generator().manual_seed(1))
    u = v - x
    assert (u >= 0).all() and (u < 1).all()
    assert log_q.shape == (2000,) and torch.isfinite(log_q).all()
    v2, _ = deq.dequantize(x, generator=torch.Generator().manual_seed(1))
    assert torch.equal(v, v2)


def _edge_heavy(cls: type[UniformDequantization], dtype: torch.dtype) -> UniformDequantization:
    """A dequantizer whose variational noise ``sigmoid(y)``, ``y ~ N(12, 8^2)``, mostly lies near 1."""
    flow = maf(2, transforms=1, hidden_features=(8, 8))
    if cls is UniformDequantization:
        return cls(flow).to(dtype)
    noise = Flow(ElementwiseAffine(2, 2, shift=12.0, log_scale=math.log(8.0)))
    return cls(flow, noise_flow=noise).to(dtype)


@pytest.mark.parametrize("cls", [UniformDequantization, VariationalDequantization])
@pytest.mark.parametrize(
    "value,dtype",
    [(1000.0, torch.float32), (-1000.0, torch.float32), (1e5, torch.float32), (2.0**24, torch.float32),
     (1e15, torch.float64)],
)
def test_large_counts_stay_in_their_unit_cell(cls, value, dtype):
    """Regression: ``x + u`` rounded up to ``x + 1`` for large ``x`` (u near 1), leaving the cell of ``x``."""
    deq = _edge_heavy(cls, dtype)
    x = torch.full((4000, 2), value, dtype=dtype)
    with torch.no_grad():
        v, log_q = deq.dequantize(x, generator=torch.Generator().manual_seed(0))
    assert v.dtype == dtype
    assert torch.equal(torch.floor(v), x)
    assert (v >= x).all() and (v.double() < x.double() + 1).all()  # x + 1 is exact in float64
    assert torch.isfinite(log_q).all()
    if cls is VariationalDequantization:
        # log q stays the density of the noise actually drawn, rounded or not.
        with torch.no_grad():
            y, log_qy = deq.noise_flow.sample_and_log_prob(1, x, generator=torch.Generator().manual_seed(0))
            y, log_qy = y[0], log_qy[0]
        assert (torch.sigmoid(y) > 1 - 1e-4).float().mean() > 0.3  # many rows really were at the edge
        expected = log_qy - (F.logsigmoid(y) + F.logsigmoid(-y)).sum(-1)
        torch.testing.assert_close(log_q, expected)


def test_gradients_flow_through_rows_rounded_into_the_cell():
    deq = _edge_heavy(VariationalDequantization, torch.float32)
    x = torch.full((256, 2), 1000.0)
    v, log_q = deq.dequantize(x, generator=torch.Generator().manual_seed(0))
    shift = deq.noise_flow.transform.shift
    (grad,) = torch.autograd.grad(v.sum(), shift)
    assert torch.isfinite(grad).all()
    # dv/dshift = sum over rows of sigmoid'(y): rounded rows contribute as if unrounded.
    y = deq.noise_flow.sample_and_log_prob(1, x, generator=torch.Generator().manual_seed(0))[0][0].detach()
    torch.testing.assert_close(grad, (torch.sigmoid(y) * torch.sigmoid(-y)).sum(0))


def test_variational_noise_density_is_normalised_and_matches_its_samples():
    torch.manual_seed(0)
    deq = _perturb(VariationalDequantization(maf(2, transforms=1, hidden_features=(8, 8))).double())
    x = torch.tensor([3.0, 5.0], dtype=torch.float64)

    def log_q(u):  # density of u = sigmoid(y) on the unit square
        y = torch.logit(u)
        return deq.noise_flow.log_prob(y, x) - (torch.log(u) + torch.log1p(-u)).sum(-1)

    with torch.no_grad():
        grid = (torch.arange(600, dtype=torch.float64) + 0.5) / 600
        u = torch.stack(torch.meshgrid(grid, grid, indexing="ij"), dim=-1).reshape(-1, 2)
        assert abs(log_q(u).exp().mean().item() - 1.0) < 1e-2  # midpoint rule on [0, 1)^2
        v, lq = deq.dequantize(x.expand(50, 2))
        torch.testing.assert_close(lq, log_q(v - x), atol=1e-8, rtol=0)


@pytest.mark.parametrize("cls", [UniformDequantization, VariationalDequantization])
def test_bound_is_below_the_discrete_log_mass(cls):
    torch.manual_seed(0)
    deq = _perturb(cls(maf(2, transforms=2, hidden_features=(16, 16))).double())
    x = torch.tensor([[3.0, 4.0], [5.0, 2.0], [4.0, 4.0]], dtype=torch.float64)
    with torch.no_grad():
        grid = (torch.arange(300, dtype=torch.float64) + 0.5) / 300
        u = torch.stack(torch.meshgrid(grid, grid, indexing="ij"), dim=-1).reshape(-1, 2)
        log_mass = torch.stack([deq.flow.log_prob(xi + u).exp().mean().log() for xi in x])
        bound = deq.bound(x, num_samples=2000)
    assert (bound <= log_mass + 1e-3).all(), (bound, log_mass)


def test_discrete_input_validation():
    deq = UniformDequantization(maf(2, transforms=1, hidden_features=(8, 8)))
    with pytest.raises(ValueError, match="integer values"):
        deq.log_prob(torch.tensor([[0.5, 1.0]]))
    with pytest.raises(ValueError, match=r"shape \(\*batch, 2\), got \(1, 3\)"):
        deq.log_prob(torch.zeros(1, 3))
    with pytest.raises(TypeError, match="torch.Tensor"):
        deq.log_prob([[0.0, 1.0]])
    assert deq.log_prob(torch.tensor([[1, 2]])).shape == (1,)  # integer dtypes are accepted
    with pytest.raises(ValueError, match="noise_flow must model 2 features given 2 context"):
        VariationalDequantization(maf(2), noise_flow=maf(2))


@pytest.mark.slow
def test_variational_beats_uniform_on_held_out_data():
    data, held_out = discrete_data(10_000, 0), discrete_data(5_000, 1)
    bounds = {}
    for cls in (UniformDequantization, VariationalDequantization):
        torch.manual_seed(0)
        deq = cls(maf(2, transforms=4, hidden_features=(32, 32)))
        train(deq, data, max_epochs=60, batch_size=256, learning_rate=2e-3, patience=10, seed=0)
        bounds[cls.__name__] = deq.bound(held_out, num_samples=8).mean().item()
    assert bounds["VariationalDequantization"] > bounds["UniformDequantization"] + 0.05, bounds

"""Transformers: the rational-quadratic spline at its edges and tails, its safety in float32, the
identity at initialisation, option errors, and the affine path pinned to the formulas before the seam."""

from __future__ import annotations

import pytest
import torch
from gpu_device import GPU

from sbiflows.flows import iaf, maf, nsf, realnvp
from sbiflows.nn import soft_clamp
from sbiflows.transforms import transformers
from sbiflows.transforms import (
    AffineCoupling,
    Coupling,
    InverseAutoregressive,
    MaskedAutoregressive,
    RationalQuadraticSpline,
    make_transformer,
)

BOUND = 3.0
SPLINE = RationalQuadraticSpline(bins=6, bound=BOUND)


def spline_params(n: int, *, scale: float = 1.0, dtype=torch.float64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(n, SPLINE.num_params, generator=g, dtype=dtype)


def special_points(params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``params``: every knot in x and in y, +-bound, points just inside/outside, tails."""
    knots_x, knots_y, _ = SPLINE._knots(params).unbind(-2)
    n = len(params)
    fixed = torch.tensor([-50.0, -10.0, -BOUND - 1e-9, -BOUND, -BOUND + 1e-9, 0.0, BOUND - 1e-9, BOUND,
                          BOUND + 1e-9, 10.0, 50.0], dtype=params.dtype).expand(n, -1)
    return torch.cat([knots_x, fixed], dim=-1), torch.cat([knots_y, fixed], dim=-1)


def test_num_params_and_identity_at_zero_params():
    assert SPLINE.num_params == 3 * 6 - 1
    x = torch.linspace(-6, 6, 101, dtype=torch.float64)
    for direction in (SPLINE.forward, SPLINE.inverse):
        y, logdet = direction(x, torch.zeros(101, SPLINE.num_params, dtype=torch.float64))
        torch.testing.assert_close(y, x, atol=1e-12, rtol=0)
        torch.testing.assert_close(logdet, torch.zeros_like(x), atol=1e-12, rtol=0)


def test_round_trip_on_knots_edges_and_tails_float64():
    params = spline_params(200)
    on_x, on_y = special_points(params)
    params = params[:, None].expand(-1, on_x.shape[1], -1)
    y, logdet = SPLINE.forward(on_x, params)
    x, ilogdet = SPLINE.inverse(y, params)
    torch.testing.assert_close(x, on_x, atol=1e-6, rtol=0)
    torch.testing.assert_close(ilogdet, -logdet, atol=1e-6, rtol=0)
    x, ilogdet = SPLINE.inverse(on_y, params)
    y, logdet = SPLINE.forward(x, params)
    torch.testing.assert_close(y, on_y, atol=1e-6, rtol=0)
    torch.testing.assert_close(ilogdet, -logdet, atol=1e-6, rtol=0)
    tails = on_x.abs() > BOUND
    assert torch.equal(SPLINE.forward(on_x, params)[0][tails], on_x[tails])  # identity outside
    assert (SPLINE.forward(on_x, params)[1][tails] == 0).all()


def test_knots_map_to_knots_and_the_map_is_continuous_at_the_bound():
    params = spline_params(50)
    knots_x, knots_y, _ = SPLINE._knots(params).unbind(-2)
    y, _ = SPLINE.forward(knots_x, params[:, None].expand(-1, knots_x.shape[1], -1))
    torch.testing.assert_close(y, knots_y, atol=1e-12, rtol=0)
    assert (knots_x[:, 0] == -BOUND).all() and (knots_x[:, -1] == BOUND).all()
    for edge in (-BOUND, BOUND):
        for eps in (1e-10, -1e-10):
            x = torch.full((50,), edge + eps, dtype=torch.float64)
            y, logdet = SPLINE.forward(x, params)
            assert (y - x).abs().max() < 1e-9  # no jump into the tails
            assert logdet.abs().max() < 1e-6  # slope 1 at the edges, as in the tails


def test_logdet_matches_autograd_derivative_in_both_directions():
    params = spline_params(1)
    x = torch.linspace(-5, 5, 401, dtype=torch.float64, requires_grad=True)
    full = params.expand(401, -1)
    for direction in (SPLINE.forward, SPLINE.inverse):
        y, logdet = direction(x, full)
        (grad,) = torch.autograd.grad(y.sum(), x)
        torch.testing.assert_close(logdet, grad.log(), atol=1e-9, rtol=0)


def test_monotonic_and_onto_the_interval():
    params = spline_params(1, scale=3.0).expand(2001, -1)
    x = torch.linspace(-BOUND, BOUND, 2001, dtype=torch.float64)
    y, _ = SPLINE.forward(x, params)
    assert (y.diff() > 0).all() and y[0] == -BOUND and y[-1] == BOUND


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale", [1.0, 30.0, 1e4])
def test_finite_with_gradients_at_edges_and_for_extreme_parameters(dtype, scale):
    """Saturated parameters (bins at the minimum width, derivatives at the minimum) stay finite."""
    params = spline_params(64, scale=scale, dtype=dtype).requires_grad_()
    on_x, on_y = special_points(params.detach())
    full = params[:, None].expand(-1, on_x.shape[1], -1)
    for direction, points in ((SPLINE.forward, on_x), (SPLINE.inverse, on_y)):
        v = points.clone().requires_grad_()
        out, logdet = direction(v, full)
        assert torch.isfinite(out).all() and torch.isfinite(logdet).all()
        grads = torch.autograd.grad(out.sum() + logdet.sum(), (v, params))
        assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale", [1.0, 1e4])
def test_bin_softmax_written_out_matches_torch_in_value_and_gradient(dtype, scale):
    """Both forms of the bins' softmax (torch's below 512 rows, written out from there) are torch's softmax."""
    raw = scale * torch.randn(700, 2, 8, generator=torch.Generator().manual_seed(0), dtype=dtype)
    weights = torch.randn(700, 2, 8, generator=torch.Generator().manual_seed(1), dtype=dtype)
    tol = {"atol": 1e-6, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-12, "rtol": 1e-10}
    for rows in (100, 700):  # 200 and 1,400 rows of 8 bins: one on each side of the switch
        mine = raw[:rows].clone().requires_grad_()
        theirs = raw[:rows].clone().requires_grad_()
        out, expected = transformers._softmax_rows(mine), torch.softmax(theirs, dim=-1)
        torch.testing.assert_close(out, expected, **tol)
        (grad,), (expected_grad,) = (torch.autograd.grad((o * weights[:rows]).sum(), t)
                                     for o, t in ((out, mine), (expected, theirs)))
        assert torch.isfinite(grad).all()
        torch.testing.assert_close(grad, expected_grad, **tol)


def test_spline_values_do_not_depend_on_the_batch_size():
    """600 rows at once (written-out softmax) give the values of 100-row chunks (torch's softmax).

    To rounding: the inverse's log-determinant at these saturated parameters (scale 3) differs by up to
    2e-12 (float64), the softmax's last-bit differences amplified by bins near the minimum size."""
    params = spline_params(600, scale=3.0)
    x = 2 * BOUND * torch.rand(600, generator=torch.Generator().manual_seed(2), dtype=torch.float64) - BOUND
    rows = 600 * 2 >= transformers.SOFTMAX_ROWS_WRITTEN_OUT > 100 * 2  # widths and heights: 2 rows each
    assert rows
    for direction in (SPLINE.forward, SPLINE.inverse):
        whole = direction(x, params)
        chunks = [direction(xs, ps) for xs, ps in zip(x.split(100), params.split(100))]
        for got, parts in zip(whole, zip(*chunks)):
            torch.testing.assert_close(got, torch.cat(parts), atol=1e-11, rtol=0)


SPLINE_LAYERS = {
    "coupling": lambda c: Coupling(4, c, transformer=SPLINE),
    "maf": lambda c: MaskedAutoregressive(4, c, hidden_features=(16, 16), transformer=SPLINE),
    "iaf": lambda c: InverseAutoregressive(4, c, hidden_features=(16, 16), transformer=SPLINE),
}


@pytest.mark.parametrize("name", list(SPLINE_LAYERS))
def test_fresh_spline_layer_is_the_identity(name):
    torch.manual_seed(0)
    layer = SPLINE_LAYERS[name](3).double()
    x, c = 3 * torch.randn(32, 4, dtype=torch.float64), torch.randn(32, 3, dtype=torch.float64)
    for direction in (layer.forward, layer.inverse):
        y, logdet = direction(x, c)
        torch.testing.assert_close(y, x, atol=1e-12, rtol=0)
        torch.testing.assert_close(logdet, torch.zeros(32, dtype=torch.float64), atol=1e-12, rtol=0)


@pytest.mark.parametrize("name", list(SPLINE_LAYERS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("value", [0.1, 1e4, -1e4])
def test_spline_layers_finite_for_inputs_up_to_50(name, dtype, value):
    """Inputs with +-50 attained; the last conditioner layer perturbed (0.1) or saturated (+-1e4)."""
    torch.manual_seed(0)
    layer = SPLINE_LAYERS[name](3).to(dtype)
    with torch.no_grad():
        last = [m for m in layer.modules() if isinstance(m, torch.nn.Linear)][-1]
        if abs(value) > 1:
            last.weight.fill_(value), last.bias.fill_(value)
        else:
            last.weight.normal_(0, value), last.bias.normal_(0, value)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 4, generator=g, dtype=dtype)
    x = 50 * x / x.abs().max()
    c = torch.randn(64, 3, generator=g, dtype=dtype)
    for direction in (layer.forward, layer.inverse):
        layer.zero_grad()
        y, logdet = direction(x, c)
        assert torch.isfinite(y).all() and torch.isfinite(logdet).all()
        (y.sum() + logdet.sum()).backward()
        assert all(torch.isfinite(p.grad).all() for p in layer.parameters())


def test_perturbed_registry_splines_are_far_from_the_identity():
    """tests/test_transforms.py perturbs spline layers by 0.1: check that they still move points."""
    from test_transforms import inputs, make

    for name in ("spline_coupling", "spline_maf_layer"):
        layer, _, _ = make(name, 3)
        x, c = inputs((64,), 3)
        z, logdet = layer(x, c)
        assert (z - x).abs().max() > 0.3 and logdet.abs().max() > 0.3


def test_one_feature_coupling_conditions_on_the_context_alone():
    torch.manual_seed(0)
    layer = Coupling(1, 2, transformer=SPLINE).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x, c = torch.linspace(-4, 4, 9, dtype=torch.float64)[:, None], torch.randn(9, 2, dtype=torch.float64)
    z, logdet = layer(x, c)
    x_back, logdet_back = layer.inverse(z, c)
    torch.testing.assert_close(x_back, x, atol=1e-9, rtol=0)
    torch.testing.assert_close(logdet_back, -logdet, atol=1e-9, rtol=0)
    assert not torch.allclose(layer(x, c + 1)[0], z)
    with pytest.raises(ValueError, match="1 feature with context_features >= 1"):
        Coupling(1, 0, transformer=SPLINE)
    with pytest.raises(ValueError, match="features >= 2"):
        realnvp(1, 2)  # affine couplings of one feature: refused as before
    assert nsf(1, 2).features == 1


# ------------------------------------------------------------------------------ option errors
@pytest.mark.parametrize("factory", [maf, iaf, realnvp])
@pytest.mark.parametrize(
    "options,error,message",
    [
        ({"transformer": "cubic"}, ValueError, r"transformer must be one of \('affine', 'spline'\), got 'cubic'"),
        ({"transformer": None}, TypeError, r"transformer must be one of .*got NoneType None"),
        ({"transformer": "spline", "bins": 0}, ValueError, "bins must be an int >= 1, got 0"),
        ({"transformer": "spline", "bins": 2.5}, TypeError, "bins must be an int >= 1, got float 2.5"),
        ({"transformer": "spline", "bound": -1.0}, ValueError, "bound must be a positive number, got -1.0"),
        ({"bound": float("inf")}, ValueError, "bound must be a positive number, got inf"),
        ({"bound": "3"}, TypeError, "bound must be a positive number, got str '3'"),
    ],
)
def test_factories_reject_bad_transformer_options(factory, options, error, message):
    with pytest.raises(error, match=message):
        factory(2, 1, **options)


def test_nsf_rejects_bad_options():
    with pytest.raises(ValueError, match="bins must be an int >= 1, got -3"):
        nsf(2, bins=-3)
    with pytest.raises(ValueError, match="features >= 2.*or features == 1 with transformer='spline' and context"):
        nsf(1)  # one feature needs a context
    assert make_transformer("affine", log_scale_bound=3.0).num_params == 2


# ---------------------------------------------------------------------------- affine pinned
def _old_maf_layer(layer: MaskedAutoregressive, x, c):
    """MaskedAutoregressive.forward/inverse as written before the transformer seam (commit 5496c2a)."""
    def params(v):
        out = layer.made(v, c)
        return out[..., 0], soft_clamp(out[..., 1], 5.0)

    m, s = params(x)
    neg_s = -s
    forward = ((x - m) * torch.exp(neg_s), neg_s.sum(-1))
    v = torch.zeros_like(x)
    for _ in range(layer.features):
        m, s = params(v)
        v = x * torch.exp(s) + m
    return forward, (v, s.sum(-1))


def _old_affine_coupling(layer: AffineCoupling, x, c):
    """AffineCoupling as written before the seam: ``m, s = conditioner(x1, c).chunk(2)``, s clamped to 3."""
    results = []
    for inverse in (False, True):
        x1, x2 = x[..., layer.identity_idx], x[..., layer.transform_idx]
        m, s = layer.conditioner(torch.cat([x1, c], dim=-1)).chunk(2, dim=-1)
        s = soft_clamp(s, 3.0)
        y2, logdet = ((x2 - m) * torch.exp(-s), -s.sum(-1)) if inverse else (x2 * torch.exp(s) + m, s.sum(-1))
        y = x.clone()
        y[..., layer.transform_idx] = y2
        results.append((y, logdet))
    return results


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_affine_layers_are_bit_identical_to_the_formulas_before_the_seam(dtype):
    torch.manual_seed(0)
    made = MaskedAutoregressive(5, 3, hidden_features=(16, 16)).to(dtype)
    coupling = AffineCoupling(5, 3, hidden_features=(16, 16)).to(dtype)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in [*made.parameters(), *coupling.parameters()]:
            p.add_(0.5 * torch.randn(p.shape, generator=g).to(dtype))
    x, c = 2 * torch.randn(50, 5, generator=g).to(dtype), torch.randn(50, 3, generator=g).to(dtype)
    with torch.no_grad():
        for new, old in zip((made(x, c), made.inverse(x, c)), _old_maf_layer(made, x, c)):
            assert all(torch.equal(a, b) for a, b in zip(new, old))
        for new, old in zip((coupling(x, c), coupling.inverse(x, c)), _old_affine_coupling(coupling, x, c)):
            assert all(torch.equal(a, b) for a, b in zip(new, old))


@pytest.mark.gpu
@pytest.mark.parametrize("factory", [nsf, lambda f, c: maf(f, c, transformer="spline")])
def test_spline_flows_on_cuda_match_the_cpu(factory):
    torch.manual_seed(0)
    flow = factory(3, 2).double()
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x, c = 2 * torch.randn(256, 3, dtype=torch.float64), torch.randn(256, 2, dtype=torch.float64)
    expected = flow.log_prob(x, c)
    gpu = flow.to(GPU)
    torch.testing.assert_close(gpu.log_prob(x.to(GPU), c.to(GPU)).cpu(), expected, atol=1e-9, rtol=0)
    samples = gpu.sample(10, c[:4].to(GPU))
    assert samples.device.type == GPU and torch.isfinite(samples).all()

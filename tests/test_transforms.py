"""Property tests every flow layer must pass, run over one registry of named layer constructors."""

from __future__ import annotations

import math
import pickle
import warnings

import pytest
import torch
from torch.autograd.functional import jacobian
from gpu_device import GPU

from sbiflows.transforms import (
    AdditiveCoupling,
    AffineCoupling,
    BatchNorm,
    Compose,
    Coupling,
    ElementwiseAffine,
    Inverse,
    InverseAutoregressive,
    LULinear,
    MaskedAutoregressive,
    Permutation,
    Planar,
    RationalQuadraticSpline,
    alternating_mask,
)

D, C = 4, 3
SPLINE = RationalQuadraticSpline(bins=5, bound=3.0)  # inputs are 2 * N(0, 1): many lie in the tails


def _perturb(layer: torch.nn.Module, scale: float = 0.3) -> torch.nn.Module:
    """Move every parameter away from its (often identity) initialisation, reproducibly."""
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
        for name, buf in layer.named_buffers():
            if name.endswith("running_mean"):
                buf.copy_(torch.randn(buf.shape, generator=g))
            elif name.endswith("running_var"):
                buf.copy_(0.5 + torch.rand(buf.shape, generator=g))
    return layer


# name -> (constructor(context_features), exact inverse?, structure)
REGISTRY = {
    "elementwise_affine": (lambda c: ElementwiseAffine(D, c), True, "diagonal"),
    "planar": (lambda c: Planar(D, c), False, None),
    "additive_coupling": (lambda c: AdditiveCoupling(D, c), True, "coupling"),
    "additive_coupling_odd": (lambda c: AdditiveCoupling(D, c, mask=alternating_mask(D, parity=1)), True, "coupling"),
    "affine_coupling": (lambda c: AffineCoupling(D, c), True, "coupling"),
    "maf_layer": (lambda c: MaskedAutoregressive(D, c, hidden_features=(16, 16)), True, "autoregressive"),
    "maf_layer_random_order": (
        lambda c: MaskedAutoregressive(D, c, hidden_features=(16, 16), ordering="random", seed=3),
        True,
        "autoregressive",
    ),
    "iaf_layer": (lambda c: InverseAutoregressive(D, c, hidden_features=(16, 16)), True, "inverse_autoregressive"),
    "spline_coupling": (lambda c: Coupling(D, c, transformer=SPLINE), True, "coupling"),
    "spline_coupling_odd": (
        lambda c: Coupling(D, c, transformer=SPLINE, mask=alternating_mask(D, parity=1)), True, "coupling"
    ),
    "spline_coupling_blocks": (  # not alternating: the halves are put back in place by the gather
        lambda c: Coupling(D, c, transformer=SPLINE, mask=torch.tensor([True, False, False, True])), True, "coupling"
    ),
    "spline_maf_layer": (
        lambda c: MaskedAutoregressive(D, c, hidden_features=(16, 16), transformer=SPLINE), True, "autoregressive"
    ),
    "spline_iaf_layer": (
        lambda c: InverseAutoregressive(D, c, hidden_features=(16, 16), transformer=SPLINE),
        True,
        "inverse_autoregressive",
    ),
    "permutation_reverse": (lambda c: Permutation(D, order="reverse"), True, None),
    "permutation_random": (lambda c: Permutation(D, order="random", seed=1), True, None),
    "batchnorm_eval": (lambda c: BatchNorm(D).eval(), True, "diagonal"),
    "lu_linear": (lambda c: LULinear(D), True, None),
    "inverse_affine_coupling": (lambda c: Inverse(AffineCoupling(D, c)), True, None),
    "compose": (
        lambda c: Compose(MaskedAutoregressive(D, c, hidden_features=(16, 16)), Permutation(D), AffineCoupling(D, c)),
        True,
        None,
    ),
}
CONDITIONAL = [n for n in REGISTRY if not n.startswith(("permutation", "batchnorm", "lu_"))]
CASES = [(n, 0) for n in REGISTRY] + [(n, C) for n in CONDITIONAL]


def make(name: str, c: int, dtype=torch.float64):
    ctor, exact, structure = REGISTRY[name]
    torch.manual_seed(0)
    # Splines get a smaller perturbation: at 0.3 their bin logits have sd ~2.5 and some bins a slope
    # near e^-9, whose float32 inverse no algorithm can resolve (an input error of 1e-7 moves x by
    # 1e-3); at 0.1 the maps are still far from the identity (checked in tests/test_splines.py).
    layer = _perturb(ctor(c).to(dtype), scale=0.1 if name.startswith("spline") else 0.3)
    return layer, exact, structure


def inputs(batch=(16,), c=0, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = 2 * torch.randn(*batch, D, generator=g, dtype=dtype)
    ctx = torch.randn(*batch, c, generator=g, dtype=dtype) if c else None
    return x, ctx


@pytest.mark.parametrize("name,c", CASES)
@pytest.mark.parametrize("batch", [(), (1,), (7,), (2, 3)])
def test_shapes_and_batch_consistency(name, c, batch):
    layer, _, _ = make(name, c)
    x, ctx = inputs(batch, c)
    z, logdet = layer(x, ctx)
    assert z.shape == x.shape and logdet.shape == batch
    xr, ilogdet = layer.inverse(z, ctx)
    assert xr.shape == x.shape and ilogdet.shape == batch
    if batch == (7,):  # each row alone gives the same as the batch
        for i in range(7):
            zi, li = layer(x[i : i + 1], None if ctx is None else ctx[i : i + 1])
            torch.testing.assert_close(zi[0], z[i], atol=1e-12, rtol=0)
            torch.testing.assert_close(li[0], logdet[i], atol=1e-12, rtol=0)


@pytest.mark.parametrize("name,c", CASES)
def test_round_trip_both_directions(name, c):
    layer, exact, _ = make(name, c)
    x, ctx = inputs((64,), c)
    atol = 1e-9 if exact else 1e-6
    z, logdet = layer(x, ctx)
    xr, ilogdet = layer.inverse(z, ctx)
    torch.testing.assert_close(xr, x, atol=atol, rtol=0)
    torch.testing.assert_close(ilogdet, -logdet, atol=atol, rtol=0)
    zr, _ = layer(layer.inverse(x, ctx)[0], ctx)
    torch.testing.assert_close(zr, x, atol=atol, rtol=0)


@pytest.mark.parametrize("name,c", CASES)
def test_logdet_matches_autograd_jacobian(name, c):
    layer, exact, _ = make(name, c)
    x, ctx = inputs((5,), c)
    for i in range(5):
        ci = None if ctx is None else ctx[i]
        for direction in (layer.forward, layer.inverse):
            J = jacobian(lambda v: direction(v, ci)[0], x[i])
            _, expected = torch.linalg.slogdet(J)
            torch.testing.assert_close(direction(x[i], ci)[1], expected, atol=1e-8 if exact else 1e-6, rtol=0)


def _ordering(layer) -> torch.Tensor:
    inner = layer.transform if isinstance(layer, Inverse) else layer
    return inner.made.ordering


@pytest.mark.parametrize("name,c", [case for case in CASES if REGISTRY[case[0]][2]])
def test_jacobian_structure(name, c):
    """Autoregressive: triangular in the layer's order. Coupling: identity on the kept half."""
    layer, _, structure = make(name, c)
    x, ctx = inputs((3,), c)
    for i in range(3):
        ci = None if ctx is None else ctx[i]
        J = jacobian(lambda v: layer(v, ci)[0], x[i])
        if structure == "diagonal":
            assert torch.count_nonzero(J - torch.diag(torch.diagonal(J))) == 0
        elif structure in ("autoregressive", "inverse_autoregressive"):
            order = _ordering(layer)
            Jo = J[order][:, order]
            assert torch.count_nonzero(torch.triu(Jo, diagonal=1)) == 0
            assert torch.count_nonzero(torch.tril(Jo, diagonal=-1)) > 0  # it does use earlier inputs
        elif structure == "coupling":
            kept, moved = layer.identity_idx, layer.transform_idx
            torch.testing.assert_close(J[kept][:, kept], torch.eye(len(kept), dtype=J.dtype))
            assert torch.count_nonzero(J[kept][:, moved]) == 0
            block = J[moved][:, moved]
            assert torch.count_nonzero(block - torch.diag(torch.diagonal(block))) == 0
            assert torch.count_nonzero(J[moved][:, kept]) > 0


@pytest.mark.parametrize("name", CONDITIONAL)
def test_every_output_responds_to_context(name):
    layer, _, _ = make(name, C)
    x, ctx = inputs((8,), C)
    for direction in (layer.forward, layer.inverse):
        out = direction(x, ctx)[0]
        for j in range(C):
            moved = ctx.clone()
            moved[:, j] += 0.5
            changed = ((direction(x, moved)[0] - out).abs() > 1e-9).any(0)
            coupling = layer.transform if isinstance(layer, Inverse) else layer
            if hasattr(coupling, "identity_idx"):  # the kept half is the identity by design
                assert not changed[coupling.identity_idx].any()
                changed = changed[coupling.transform_idx]
            assert changed.all(), f"{name}: some outputs ignore context dimension {j}"


@pytest.mark.parametrize("name,c", CASES)
def test_gradients_reach_every_parameter(name, c):
    layer, _, _ = make(name, c)
    if not list(layer.parameters()):
        pytest.fail(f"{name} has no parameters") if not name.startswith("permutation") else None
        return
    x, ctx = inputs((32,), c)
    z, logdet = layer(x, ctx)
    loss = (0.5 * z.pow(2).sum(-1) - logdet).mean()
    loss.backward()
    for pname, p in layer.named_parameters():
        assert p.grad is not None, f"{name}.{pname} got no gradient"
        assert torch.isfinite(p.grad).all()
        assert p.grad.abs().sum() > 0, f"{name}.{pname} got an all-zero gradient"


@pytest.mark.parametrize("name,c", CASES)
def test_state_dict_round_trip(name, c):
    layer, _, _ = make(name, c)
    ctor = REGISTRY[name][0]
    torch.manual_seed(99)
    fresh = ctor(c).to(torch.float64)
    fresh.load_state_dict(layer.state_dict())
    fresh.train(layer.training)
    x, ctx = inputs((10,), c)
    for a, b in zip(layer(x, ctx), fresh(x, ctx)):
        assert torch.equal(a, b)
    for a, b in zip(layer.inverse(x, ctx), fresh.inverse(x, ctx)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name,c", CASES)
def test_float32(name, c):
    layer, exact, _ = make(name, c, dtype=torch.float32)
    x, ctx = inputs((64,), c, dtype=torch.float32)
    z, logdet = layer(x, ctx)
    assert z.dtype == torch.float32 and logdet.dtype == torch.float32
    xr, ilogdet = layer.inverse(z, ctx)
    tol = 1e-4 if exact else 1e-3
    torch.testing.assert_close(xr, x, atol=tol, rtol=tol)
    torch.testing.assert_close(ilogdet, -logdet, atol=tol, rtol=tol)


@pytest.mark.parametrize("name,c", CASES)
def test_finite_for_large_inputs(name, c):
    layer, _, _ = make(name, c)
    x, ctx = inputs((64,), c)
    x = 10 * x / x.abs().max()
    for direction in (layer.forward, layer.inverse):
        y, logdet = direction(x, ctx)
        assert torch.isfinite(y).all() and torch.isfinite(logdet).all()


#: Where the device tests run: ``meta`` everywhere, CUDA where there is a GPU (``pytest -m gpu``).
DEVICES = ["meta", pytest.param(GPU, marks=pytest.mark.gpu)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,c", CASES)
def test_runs_on_the_device_of_its_inputs(name, c, device):
    """Every tensor a layer makes follows its inputs' device. The ``meta`` device (shapes without values) stands in
    for a GPU: a CPU tensor mixed into elementwise arithmetic, ``cat`` or ``where`` with meta tensors raises as on
    CUDA (matrix products and ``searchsorted`` do not check devices there); on CUDA the results must also equal the
    CPU's. The layer runs on the CPU first, so values it keeps from that run (a spline's constants) must not leak to
    the other device. Planar's forward (data to latent) finds its root from values, which meta tensors do not have:
    only its inverse runs there."""
    layer, _, _ = make(name, c)
    x, ctx = inputs((16,), c)
    on_cpu = {"forward": layer(x, ctx), "inverse": layer.inverse(x, ctx)}
    layer = layer.to(device)
    x, ctx = x.to(device), None if ctx is None else ctx.to(device)
    for direction in ("inverse",) if name == "planar" and device == "meta" else ("forward", "inverse"):
        y, logdet = getattr(layer, direction)(x, ctx)
        assert (y.device.type, logdet.device.type) == (device, device)
        assert y.shape == x.shape and logdet.shape == (16,)
        if device != "meta":
            torch.testing.assert_close((y.cpu(), logdet.cpu()), on_cpu[direction])


# Layers whose log-scales are soft-clamped, with the largest |logdet| the clamp allows.
SOFT_CLAMPED = {
    "affine_coupling": (lambda: AffineCoupling(D, C), 3.0 * (D // 2)),  # D // 2 dimensions move
    "maf_layer": (lambda: MaskedAutoregressive(D, C, hidden_features=(8, 8)), 5.0 * D),
    "iaf_layer": (lambda: InverseAutoregressive(D, C, hidden_features=(8, 8)), 5.0 * D),
    "elementwise_affine": (lambda: ElementwiseAffine(D, C), 5.0 * D),  # base log_scale starts at 0
}


def _assert_finite_with_gradients(layer, direction, x, ctx) -> torch.Tensor:
    """Run one direction; outputs, logdet and every parameter's gradient must be finite. Returns logdet."""
    layer.zero_grad()
    y, logdet = direction(x, ctx)
    assert torch.isfinite(y).all() and torch.isfinite(logdet).all()
    (y.sum() + logdet.sum()).backward()
    for pname, p in layer.named_parameters():
        assert p.grad is not None, f"{pname} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{pname} got a non-finite gradient"
    return logdet


@pytest.mark.parametrize("name", list(SOFT_CLAMPED))
@pytest.mark.parametrize("value", [1e4, -1e4])
@pytest.mark.parametrize("direction", ["forward", "inverse"])
def test_log_scales_bounded_for_huge_preactivations(name, value, direction):
    """A last conditioner layer saturated at +-1e4 drives the log-scales into the soft clamp."""
    ctor, bound = SOFT_CLAMPED[name]
    layer = ctor().double()
    with torch.no_grad():
        last = [m for m in layer.modules() if isinstance(m, torch.nn.Linear)][-1]
        last.weight.fill_(value)
        last.bias.fill_(value)
    x, ctx = inputs((16,), C)
    logdet = _assert_finite_with_gradients(layer, getattr(layer, direction), x, ctx)
    assert (logdet.abs() <= bound).all()
    assert (logdet.abs() > 0.5 * bound).all()  # the pre-activations really reached the clamp


@pytest.mark.parametrize("name", list(SOFT_CLAMPED))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_soft_clamped_layers_finite_for_inputs_up_to_50(name, dtype):
    ctor, _ = SOFT_CLAMPED[name]
    torch.manual_seed(0)
    layer = _perturb(ctor().to(dtype))
    x, ctx = inputs((64,), C, dtype=dtype)
    x = 50 * x / x.abs().max()  # |x| <= 50, with +-50 attained
    for direction in (layer.forward, layer.inverse):
        _assert_finite_with_gradients(layer, direction, x, ctx)


# ---------------------------------------------------------------------------- layer specifics
def test_additive_coupling_logdet_exactly_zero():
    layer, _, _ = make("additive_coupling", C)
    x, ctx = inputs((32,), C)
    assert torch.equal(layer(x, ctx)[1], torch.zeros(32, dtype=torch.float64))
    assert torch.equal(layer.inverse(x, ctx)[1], torch.zeros(32, dtype=torch.float64))


def test_permutation_logdet_zero_and_validation():
    layer = Permutation(D, order="random", seed=2)
    x = torch.randn(5, D)
    z, logdet = layer(x)
    assert torch.equal(logdet, torch.zeros(5))
    assert torch.equal(torch.sort(z, dim=-1).values, torch.sort(x, dim=-1).values)
    with pytest.raises(ValueError, match="permutation of 0..3"):
        Permutation(D, order=[0, 0, 1, 2])
    with pytest.raises(ValueError, match="order must be"):
        Permutation(D, order="sideways")


def test_planar_constraint_keeps_layer_invertible_when_wtu_very_negative():
    layer = Planar(D).double()
    with torch.no_grad():
        layer.w.copy_(torch.tensor([1.0, 0.5, -0.2, 0.3]))
        layer.u.copy_(-50.0 * layer.w)  # w^T u << -1 without the reparameterisation
    x, _ = inputs((64,), 0)
    u_hat, w, _ = layer._params(x, None)
    assert ((w * u_hat).sum(-1) > -1).all()
    z, logdet = layer(x)
    assert torch.isfinite(logdet).all()
    torch.testing.assert_close(layer.inverse(z)[0], x, atol=1e-6, rtol=0)


def _planar_1d(c: float, b: float) -> Planar:
    """A 1-D float64 planar layer with ``w = 1``, ``w^T u_hat = c`` and bias ``b``."""
    layer = Planar(1).double()
    with torch.no_grad():
        layer.w.fill_(1.0)
        layer.b.fill_(b)
        layer.u.fill_(math.log(math.expm1(c + 0.999)))  # softplus(u) - 0.999 = c
    return layer


def test_planar_root_finder_does_not_oscillate_between_bracket_ends():
    """Regression: here plain bracketed Newton jumps between both ends of the bracket for 100 steps."""
    layer = _planar_1d(c=9.52, b=0.93)
    x = torch.tensor([[7.18]], dtype=torch.float64)
    z, logdet = layer(x)  # filterwarnings=error: it must converge without a warning
    xr, ilogdet = layer.inverse(z)
    torch.testing.assert_close(xr, x, atol=1e-10, rtol=0)
    torch.testing.assert_close(ilogdet, -logdet, atol=1e-10, rtol=0)


def test_planar_warns_when_root_finding_does_not_converge():
    layer = _planar_1d(c=9.52, b=0.93)
    layer.max_iter = 2
    x = torch.linspace(-20.0, 20.0, 64, dtype=torch.float64).unsqueeze(-1)
    with pytest.warns(RuntimeWarning, match=r"max_iter=2 iterations for \d+ of 64 rows \(max residual \d"):
        z, logdet = layer(x)
    assert torch.isfinite(z).all() and torch.isfinite(logdet).all()
    layer.max_iter = 100
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        z, _ = layer(x)  # the same rows converge with the default cap
    torch.testing.assert_close(layer.inverse(z)[0], x, atol=1e-10, rtol=0)


@pytest.mark.parametrize("max_iter,error", [(0, ValueError), (-3, ValueError), (2.5, TypeError), (True, TypeError)])
def test_planar_rejects_bad_max_iter(max_iter, error):
    with pytest.raises(error, match=f"max_iter must be an int >= 1, got .*{max_iter!r}"):
        Planar(D, max_iter=max_iter)


def test_batchnorm_uses_batch_statistics_in_training_and_running_averages_in_eval():
    layer = BatchNorm(D).double()
    x = 3.0 + 2.0 * torch.randn(500, D, dtype=torch.float64)
    z, logdet = layer.train()(x)
    torch.testing.assert_close(z.mean(0), torch.zeros(D, dtype=torch.float64), atol=1e-8, rtol=0)
    torch.testing.assert_close(z.var(0), torch.ones(D, dtype=torch.float64), atol=1e-3, rtol=0)
    expected = (-0.5 * torch.log(x.var(0) + layer.eps)).sum()
    torch.testing.assert_close(logdet, expected.expand(500))
    torch.testing.assert_close(layer.running_mean, 0.1 * x.mean(0))
    layer.eval()
    running = layer.running_mean.clone()
    z_eval, logdet_eval = layer(x)
    assert torch.equal(layer.running_mean, running)  # eval does not update
    expected_eval = (-0.5 * torch.log(layer.running_var + layer.eps)).sum()
    torch.testing.assert_close(logdet_eval, expected_eval.expand(500))
    torch.testing.assert_close(layer.inverse(z_eval)[0], x)


def test_conditional_layer_needs_context():
    layer = AffineCoupling(D, C)
    with pytest.raises(ValueError, match=r"context of shape \(\*batch, 3\) is required"):
        layer(torch.randn(2, D))
    with pytest.raises(ValueError, match=r"context must have shape \(\*batch, 3\), got \(2, 2\)"):
        layer(torch.randn(2, D), torch.randn(2, 2))


def test_coupling_rejects_one_feature_and_bad_masks():
    with pytest.raises(ValueError, match="features >= 2"):
        AffineCoupling(1)
    with pytest.raises(ValueError, match="both True"):
        AdditiveCoupling(D, mask=torch.ones(D, dtype=torch.bool))


def test_coupling_follows_a_loaded_mask_and_pickles():
    """A coupling layer splits and merges by its index buffers, so a loaded mask is followed throughout."""
    source = _perturb(Coupling(D, C, transformer=SPLINE, mask=torch.tensor([True, True, False, False])))
    target = Coupling(D, C, transformer=SPLINE, mask=torch.tensor([False, True, False, True]))
    target.load_state_dict(source.state_dict())
    x, ctx = torch.randn(6, D), torch.randn(6, C)
    for a, b in zip(source(x, ctx), target(x, ctx)):
        assert torch.equal(a, b)
    y = source(x, ctx)[0]
    assert torch.equal(y[:, :2], x[:, :2]) and not torch.equal(y[:, 2:], x[:, 2:])
    copied = pickle.loads(pickle.dumps(target))  # whole layers still pickle (torch.save of a module)
    assert torch.equal(copied(x, ctx)[0], y)


def test_compose_validates_features():
    with pytest.raises(ValueError, match="same number of features"):
        Compose(ElementwiseAffine(2), ElementwiseAffine(3))
    with pytest.raises(ValueError, match="at least one"):
        Compose()


# ------------------------------------------------------------------------------------ LU-linear
def test_lu_linear_starts_at_the_identity_and_its_matrix_mixes_every_dimension():
    layer = LULinear(D).to(torch.float64)
    x, _ = inputs((5,))
    z, logdet = layer(x)
    assert torch.allclose(z, x, atol=1e-6, rtol=0) and torch.allclose(logdet, torch.zeros_like(logdet), atol=1e-6)  # float32 init
    _perturb(layer)
    J = jacobian(lambda v: layer(v)[0], x[0])
    assert torch.count_nonzero(J) == D * D  # a dense matrix, unlike a coupling's block structure
    lower, upper, diagonal = layer._factors()
    torch.testing.assert_close(J, lower @ upper)
    assert (diagonal > 0).all() and torch.equal(torch.diagonal(lower), torch.ones(D, dtype=J.dtype))


def test_lu_linear_is_finite_in_float32_far_out_and_refuses_bad_sizes():
    layer = _perturb(LULinear(D))
    x = torch.tensor([[50.0, -50.0, 50.0, -50.0], [-50.0] * D])
    z, logdet = layer(x)
    xr, _ = layer.inverse(z)
    assert torch.isfinite(z).all() and torch.isfinite(logdet).all()
    torch.testing.assert_close(xr, x, atol=1e-3, rtol=1e-4)
    for bad in (0, 2.0, True):
        with pytest.raises(ValueError, match=r"features must be an int >= 1, got"):
            LULinear(bad)

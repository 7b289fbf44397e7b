"""Property tests every flow layer must pass, run over one registry of named layer constructors."""

from __future__ import annotations

import pytest
import torch
from torch.autograd.functional import jacobian

from sbiflows.transforms import (
    AdditiveCoupling,
    AffineCoupling,
    BatchNorm,
    Compose,
    ElementwiseAffine,
    Inverse,
    InverseAutoregressive,
    MaskedAutoregressive,
    Permutation,
    Planar,
    alternating_mask,
)

D, C = 4, 3


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
    "permutation_reverse": (lambda c: Permutation(D, order="reverse"), True, None),
    "permutation_random": (lambda c: Permutation(D, order="random", seed=1), True, None),
    "batchnorm_eval": (lambda c: BatchNorm(D).eval(), True, "diagonal"),
    "inverse_affine_coupling": (lambda c: Inverse(AffineCoupling(D, c)), True, None),
    "compose": (
        lambda c: Compose(MaskedAutoregressive(D, c, hidden_features=(16, 16)), Permutation(D), AffineCoupling(D, c)),
        True,
        None,
    ),
}
CONDITIONAL = [n for n in REGISTRY if not n.startswith(("permutation", "batchnorm"))]
CASES = [(n, 0) for n in REGISTRY] + [(n, C) for n in CONDITIONAL]


def make(name: str, c: int, dtype=torch.float64):
    ctor, exact, structure = REGISTRY[name]
    torch.manual_seed(0)
    layer = _perturb(ctor(c).to(dtype))
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


def test_made_first_output_sees_context():
    """The bug in a well-known library: the first output of a conditional MADE ignores the context."""
    for ordering in ("natural", "reverse", "random"):
        layer = _perturb(MaskedAutoregressive(D, C, hidden_features=(32, 32), ordering=ordering).double())
        first = layer.made.ordering[0]
        x, ctx = inputs((16,), C)
        z = layer(x, ctx)[0]
        z2 = layer(x, ctx + 1.0)[0]
        assert ((z2 - z)[:, first].abs() > 1e-9).any(), ordering


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


@pytest.mark.parametrize(
    "ctor",
    [
        lambda: AffineCoupling(D, C),
        lambda: MaskedAutoregressive(D, C, hidden_features=(8, 8)),
        lambda: ElementwiseAffine(D, C),
    ],
)
def test_log_scales_bounded_for_huge_preactivations(ctor):
    layer = ctor().double()
    with torch.no_grad():
        last = [m for m in layer.modules() if isinstance(m, torch.nn.Linear)][-1]
        last.weight.fill_(1e4)
        last.bias.fill_(1e4)
    x, ctx = inputs((16,), C)
    z, logdet = layer(x, ctx)
    assert torch.isfinite(z).all() and torch.isfinite(logdet).all()
    (z.sum() + logdet.sum()).backward()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters() if p.grad is not None)


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


def test_compose_validates_features():
    with pytest.raises(ValueError, match="same number of features"):
        Compose(ElementwiseAffine(2), ElementwiseAffine(3))
    with pytest.raises(ValueError, match="at least one"):
        Compose()

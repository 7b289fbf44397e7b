"""Flows: shapes, normalisation, sample/density consistency, errors, the lecture example and learning."""

from __future__ import annotations

import functools
import math
import warnings

import pytest
import torch
from torch.distributions import Categorical, MixtureSameFamily, MultivariateNormal
from gpu_device import GPU

from sbiflows.distributions import BoxUniform, StandardNormal
from sbiflows.flows import (
    ONE_FEATURE_WARNING,
    Flow,
    iaf,
    maf,
    nice,
    nsf,
    planar_flow,
    realnvp,
)
from sbiflows.training import train
from sbiflows.transforms import ElementwiseAffine

FACTORIES = {
    "maf": maf, "realnvp": realnvp, "nice": nice, "iaf": iaf, "planar_flow": planar_flow, "nsf": nsf,
    "spline_maf": functools.partial(maf, transformer="spline", bins=8),
    "spline_iaf": functools.partial(iaf, transformer="spline", bins=8),
    "nsf_lu": functools.partial(nsf, mixing="lu"),
    "nsf_masks": functools.partial(nsf, mixing="masks"),  # differs from alternating masks from 3 features on
}
ONE_D = ["maf", "iaf", "planar_flow", "spline_maf", "spline_iaf"]  # couplings need 2 dimensions (or a context)


@functools.lru_cache(maxsize=None)
def fitted(name: str, features: int, context_features: int = 0) -> Flow:
    """A float64 flow after 60 Adam steps on a bimodal target: far from the identity, yet well behaved."""
    torch.manual_seed(0)
    options = {"transforms": 6} if name == "planar_flow" else {}
    with warnings.catch_warnings():  # maf(1) and iaf(1) warn that they are Gaussian; tested below
        warnings.filterwarnings("ignore", message=ONE_FEATURE_WARNING)
        flow = FACTORIES[name](features, context_features, **options).double()
    g = torch.Generator().manual_seed(7)
    n = 512
    centres = torch.tensor([[-1.5, 1.0, 0.5], [1.5, -0.5, -1.0]], dtype=torch.float64)[:, :features]
    data = centres[torch.randint(0, 2, (n,), generator=g)] + 0.5 * torch.randn(n, features, generator=g, dtype=torch.float64)
    context = torch.randn(n, context_features, generator=g, dtype=torch.float64) if context_features else None
    if context is not None:
        data = data + 0.3 * context[:, :1]
    optimizer = torch.optim.Adam(flow.parameters(), lr=2e-2)
    for _ in range(60):
        loss = -flow.log_prob(data, context).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return flow.eval()


def perturbed(name: str, features: int, context_features: int = 0) -> Flow:
    return fitted(name, features, context_features)


def _box(samples: torch.Tensor) -> list[tuple[float, float]]:
    lo, hi = samples.min(0).values, samples.max(0).values
    width = hi - lo
    return [(float(a - 0.5 * w), float(b + 0.5 * w)) for a, b, w in zip(lo, hi, width)]


@pytest.mark.parametrize("name", ONE_D)
@pytest.mark.parametrize("context_features", [0, 2])
def test_density_integrates_to_one_in_1d(name, context_features):
    flow = perturbed(name, 1, context_features)
    context = torch.tensor([0.3, -1.0], dtype=torch.float64)[:context_features] if context_features else None
    with torch.no_grad():
        (lo, hi), = _box(flow.sample(20_000, context))
        grid = torch.linspace(lo, hi, 2000, dtype=torch.float64).unsqueeze(-1)
        density = flow.log_prob(grid, context).exp()
    assert abs(torch.trapezoid(density, grid.squeeze(-1)).item() - 1.0) < 1e-2


def test_one_feature_nsf_density_integrates_to_one():
    """With one feature an NSF's conditioner sees the context alone (which it then needs)."""
    flow = perturbed("nsf", 1, 2)
    context = torch.tensor([0.3, -1.0], dtype=torch.float64)
    with torch.no_grad():
        (lo, hi), = _box(flow.sample(20_000, context))
        grid = torch.linspace(lo, hi, 2000, dtype=torch.float64).unsqueeze(-1)
        density = flow.log_prob(grid, context).exp()
    assert abs(torch.trapezoid(density, grid.squeeze(-1)).item() - 1.0) < 1e-2
    other = flow.log_prob(grid, torch.tensor([-1.0, 1.0], dtype=torch.float64)).exp()
    assert (other - density).abs().max() > 0.05  # the context matters


@pytest.mark.parametrize("name", list(FACTORIES))
@pytest.mark.parametrize("context_features", [0, 2])
def test_density_integrates_to_one_in_2d(name, context_features):
    flow = perturbed(name, 2, context_features)
    context = torch.tensor([0.3, -1.0], dtype=torch.float64) if context_features else None
    with torch.no_grad():
        (x0, x1), (y0, y1) = _box(flow.sample(20_000, context))
        gx = torch.linspace(x0, x1, 400, dtype=torch.float64)
        gy = torch.linspace(y0, y1, 400, dtype=torch.float64)
        points = torch.stack(torch.meshgrid(gx, gy, indexing="ij"), dim=-1)
        density = flow.log_prob(points.reshape(-1, 2), context).exp().reshape(400, 400)
    integral = torch.trapezoid(torch.trapezoid(density, gy, dim=1), gx).item()
    assert abs(integral - 1.0) < 1e-2


@pytest.mark.parametrize("name", list(FACTORIES))
def test_sample_and_log_prob_agrees_with_log_prob(name):
    flow = perturbed(name, 3, 2)
    context = torch.randn(4, 2, dtype=torch.float64)
    with torch.no_grad():
        x, lp = flow.sample_and_log_prob(50, context)
        assert x.shape == (50, 4, 3) and lp.shape == (50, 4)
        torch.testing.assert_close(flow.log_prob(x, context), lp, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", list(FACTORIES))
def test_sample_shapes_and_context_broadcasting(name):
    flow = perturbed(name, 2, 3)
    c = torch.randn(3, dtype=torch.float64)
    with torch.no_grad():
        assert flow.sample(7, c).shape == (7, 2)
        assert flow.sample(7, torch.randn(5, 3, dtype=torch.float64)).shape == (7, 5, 2)
        x = torch.randn(6, 2, dtype=torch.float64)
        lp = flow.log_prob(x, c)
        assert lp.shape == (6,)
        torch.testing.assert_close(lp, flow.log_prob(x, c.expand(6, 3)))
        looped = torch.stack([flow.log_prob(x[i : i + 1], c)[0] for i in range(6)])
        torch.testing.assert_close(lp, looped, atol=1e-10, rtol=0)
    unconditional = perturbed(name, 2)
    assert unconditional.sample(4).shape == (4, 2)


@pytest.mark.parametrize("name", list(FACTORIES))
def test_gradients_reach_every_parameter_through_sampling(name):
    """The sampling direction (``inverse`` of every layer) is differentiable in every parameter.

    No parameter is excluded: every layer's inverse uses all of its parameters (the context networks
    included, as the context has 3 features), and the fitted flow is far from its zero initialisation.
    """
    flow = perturbed(name, 2, 3)
    # its own generator: the global one is in another state when fitted() ran in this test (not cached)
    context = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    samples, log_prob = flow.sample_and_log_prob(16, context, generator=torch.Generator().manual_seed(0))
    names, params = zip(*flow.named_parameters())
    # autograd.grad leaves .grad of the cached flow untouched; None marks a parameter the graph never reached.
    grads = torch.autograd.grad(samples.sum() + log_prob.sum(), params, allow_unused=True)
    for pname, grad in zip(names, grads):
        assert grad is not None, f"{name}.{pname} got no gradient through sampling"
        assert torch.isfinite(grad).all(), f"{name}.{pname} got a non-finite gradient"
        assert grad.abs().sum() > 0, f"{name}.{pname} got an all-zero gradient"


@pytest.mark.parametrize("name", list(FACTORIES))
def test_log_prob_and_sampling_identical_in_train_and_eval_mode(name):
    """No factory uses batch statistics or dropout by default, so the mode must not matter."""
    torch.manual_seed(0)
    flow = FACTORIES[name](2, 3, **({"transforms": 4} if name == "planar_flow" else {})).double()
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():  # move every parameter off its (often identity) initialisation
        for p in flow.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    x = torch.randn(64, 2, generator=g, dtype=torch.float64)
    context = torch.randn(64, 3, generator=g, dtype=torch.float64)
    with torch.no_grad():
        train_lp = flow.train().log_prob(x, context)
        train_x = flow.sample(8, context[:4], generator=torch.Generator().manual_seed(1))
        eval_lp = flow.eval().log_prob(x, context)
        eval_x = flow.sample(8, context[:4], generator=torch.Generator().manual_seed(1))
    assert torch.isfinite(train_lp).all()
    torch.testing.assert_close(train_lp, eval_lp, atol=1e-6, rtol=0)
    torch.testing.assert_close(train_x, eval_x, atol=1e-6, rtol=0)


@pytest.mark.parametrize("factory", [maf, iaf])
def test_one_feature_autoregressive_flow_warns_that_it_is_gaussian(factory):
    with pytest.warns(UserWarning, match=f"{ONE_FEATURE_WARNING}.*{factory.__name__}\\(1\\)"):
        factory(1, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        factory(2, 2)


@pytest.mark.parametrize("device", ["meta", pytest.param(GPU, marks=pytest.mark.gpu)])
@pytest.mark.parametrize("name", list(FACTORIES))
def test_runs_on_the_device_of_its_context(name, device):
    """Densities and draws on the device of the flow and its inputs (``meta`` stands in for a GPU, with the limits
    that tests/test_transforms.py names; on CUDA the density must equal the CPU's); planar flows' density inverts by
    root finding on values, so only they skip it on meta."""
    flow = FACTORIES[name](2, 3).double()
    theta, context = torch.randn(5, 2, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    on_cpu = flow.log_prob(theta, context)  # a CPU run first: nothing it keeps may leak to the device
    flow = flow.to(device)
    theta, context = theta.to(device), context.to(device)
    draws, log_prob = flow.sample_and_log_prob(4, context)
    assert draws.device.type == log_prob.device.type == device and draws.shape == (4, 5, 2)
    assert flow.sample(4, context).device.type == device
    if name != "planar_flow" or device != "meta":
        assert flow.log_prob(theta, context).shape == (5,)
    if device != "meta":
        torch.testing.assert_close(flow.log_prob(theta, context).cpu(), on_cpu)


def test_seeded_sampling_is_reproducible():
    flow = perturbed("maf", 2, 1)
    c = torch.zeros(1, dtype=torch.float64)
    a = flow.sample(10, c, generator=torch.Generator().manual_seed(3))
    b = flow.sample(10, c, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_flow_input_errors():
    flow = maf(2, 3)
    with pytest.raises(ValueError, match="conditional"):
        flow.log_prob(torch.zeros(1, 2))
    with pytest.raises(ValueError, match=r"context must have shape \(3,\) or \(\*batch, 3\), got \(2,\)"):
        flow.sample(2, torch.zeros(2))
    with pytest.raises(ValueError, match=r"x must have shape \(\*batch, 2\), got \(4, 5\)"):
        flow.log_prob(torch.zeros(4, 5), torch.zeros(3))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        flow.log_prob([[0.0, 0.0]], torch.zeros(3))
    with pytest.raises(TypeError, match="dtype"):
        flow.log_prob(torch.zeros(1, 2, dtype=torch.float64), torch.zeros(3))
    with pytest.raises(ValueError, match="unconditional"):
        maf(2).log_prob(torch.zeros(1, 2), torch.zeros(3))
    with pytest.raises(ValueError, match="positive int"):
        flow.sample(0, torch.zeros(3))
    with pytest.raises(ValueError, match="features >= 2"):
        realnvp(1)


@pytest.mark.parametrize("name", list(FACTORIES))
def test_context_batch_must_broadcast_with_x(name):
    flow = FACTORIES[name](2, 3)
    message = r"context of shape \(5, 3\) does not broadcast with x of shape \(4, 2\).*\(5,\) and \(4,\)"
    with pytest.raises(ValueError, match=message):
        flow.log_prob(torch.zeros(4, 2), torch.zeros(5, 3))
    assert flow.log_prob(torch.zeros(4, 1, 2), torch.zeros(5, 3)).shape == (4, 5)  # broadcasting still works


def test_lecture_affine_shift_of_uniform():
    """U[0, 1] pushed through f(z) = 2z + 1 has density 1/2 on [1, 3] and 0 elsewhere."""
    flow = Flow(ElementwiseAffine(1, shift=1.0, log_scale=math.log(2.0)), base=BoxUniform(0.0, 1.0, features=1))
    with torch.no_grad():
        inside = flow.log_prob(torch.tensor([[1.0], [1.7], [2.99]])).exp()
        outside = flow.log_prob(torch.tensor([[0.99], [3.01], [-5.0]])).exp()
        samples = flow.sample(10_000)
    torch.testing.assert_close(inside, torch.full((3,), 0.5))
    assert torch.equal(outside, torch.zeros(3))
    assert samples.min() >= 1.0 and samples.max() < 3.0


def test_base_distributions():
    normal = StandardNormal(3)
    torch.testing.assert_close(normal.log_prob(torch.zeros(3)), torch.tensor(-1.5 * math.log(2 * math.pi)))
    with pytest.raises(ValueError, match="high must exceed low"):
        BoxUniform(1.0, 0.0, features=2)
    with pytest.raises(ValueError, match="base has 3 features"):
        Flow(ElementwiseAffine(2), base=StandardNormal(3))


# ------------------------------------------------------------------------------------ learning
def mixture() -> MixtureSameFamily:
    means = torch.tensor([[-1.5, 0.0], [1.5, 0.5], [0.0, 1.8]])
    covs = torch.stack(
        [torch.tensor([[0.4, 0.2], [0.2, 0.5]]), torch.tensor([[0.5, -0.25], [-0.25, 0.4]]), torch.eye(2) * 0.3]
    )
    return MixtureSameFamily(Categorical(torch.tensor([0.4, 0.35, 0.25])), MultivariateNormal(means, covs))


@pytest.mark.slow
@pytest.mark.parametrize("name,margin", [("maf", 0.05), ("realnvp", 0.05), ("nice", 0.05), ("iaf", 0.05), ("planar_flow", 0.15),
                                         ("nsf", 0.05), ("spline_maf", 0.05)])
def test_learns_a_mixture_of_gaussians(name, margin):
    torch.manual_seed(0)
    target = mixture()
    data, held_out = target.sample((20_000,)), target.sample((10_000,))
    torch.manual_seed(1)
    flow = FACTORIES[name](2)
    train(flow, data, max_epochs=60, batch_size=512, learning_rate=3e-3, patience=10, seed=0)
    with torch.no_grad():
        gap = -flow.log_prob(held_out).mean() + target.log_prob(held_out).mean()
    assert gap < margin, f"{name}: held-out NLL {gap:.4f} nats above the true density's"


@pytest.mark.parametrize("features", range(2, 18))
def test_bit_masks_split_every_pair_of_dimensions(features):
    """mixing="masks": every mask keeps and transforms something, and each pair of dimensions is split by some layer."""
    from sbiflows.flows import bit_mask

    layers = 2 * max(1, math.ceil(math.log2(features)))
    masks = [bit_mask(features, layer=i) for i in range(layers)]
    assert all(mask.any() and not mask.all() for mask in masks)
    assert torch.equal(masks[0], ~masks[1])  # the two layers of a digit transform complementary halves
    split = torch.zeros(features, features, dtype=torch.bool)
    for mask in masks:
        split |= mask[:, None] != mask[None, :]
    assert split.sum() == features * (features - 1)
    if features == 2:  # two features: the alternating masks
        assert all(torch.equal(mask, torch.tensor([i % 2 == 0, i % 2 == 1])) for i, mask in enumerate(masks))

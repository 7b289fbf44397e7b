"""Prior helpers (box_uniform, IndependentPrior), cat supports, the support-vs-samples check, and saving priors."""

import math
from typing import ClassVar

import numpy as np
import pytest
import torch
from torch.distributions import (
    Dirichlet,
    Distribution,
    Exponential,
    LogNormal,
    MultivariateNormal,
    Normal,
    TransformedDistribution,
    Uniform,
    constraints,
)
from torch.distributions.transforms import AffineTransform

from sbiflows import NPE, IndependentPrior, box_uniform, load
from sbiflows.prior_specs import move_prior, prior_spec
from sbiflows.priors import Unconstrained, check_prior, flat_support

SMALL = {"transforms": 2, "hidden_features": (16, 16)}


def _fit(prior, n=600, epochs=15):
    theta = prior.sample((n,))
    x = theta + 0.2 * torch.randn(theta.shape)
    return NPE(prior, **SMALL).fit(theta, x, max_epochs=epochs, progress=False), theta, x


def mixed():
    return IndependentPrior(Uniform(0.0, 1.0), Normal(0.0, 1.0), LogNormal(0.0, 0.5))


# -------------------------------------------------------------------------------- box_uniform
def test_box_uniform_support_log_prob_and_samples():
    prior = box_uniform([0.0, -1.0], [1.0, 3.0])
    assert prior.event_shape == (2,) and prior.batch_shape == ()
    assert prior.support.check(torch.tensor([[0.5, 2.9], [0.5, 3.1]])).tolist() == [True, False]
    torch.testing.assert_close(prior.log_prob(torch.tensor([0.2, 0.0])), torch.tensor(-math.log(4.0)))
    samples = prior.sample((2, 500))
    assert samples.shape == (2, 500, 2)
    assert (samples[..., 0] >= 0).all() and (samples[..., 1] <= 3).all() and samples[..., 1].min() < -0.9


def test_box_uniform_dtypes_and_broadcasting():
    assert box_uniform(0, 1).event_shape == (1,)
    assert box_uniform(np.zeros(3), 1.0).base_dist.low.dtype == torch.float64  # NumPy bounds keep float64
    assert box_uniform([0, 0], [1, 2], dtype=torch.float64).sample((1,)).dtype == torch.float64
    assert box_uniform(torch.zeros(3), torch.ones(3)).event_shape == (3,)
    # Python numbers go straight into the requested dtype (through float32, 0.1 became 0.10000000149)
    exact = box_uniform([0.1, 1e6], [0.3, 1e6 + 0.1], dtype=torch.float64)
    assert exact.base_dist.low.tolist() == [0.1, 1e6] and exact.base_dist.high.tolist() == [0.3, 1e6 + 0.1]


@pytest.mark.parametrize(
    ("low", "high", "match"),
    [
        ([0.0, 1.0], [1.0, 1.0], r"column\(s\) \[1\] have low \[1.0\] and high \[1.0\]"),
        (torch.zeros(2, 2), 1.0, r"low must be a number or have shape \(D,\), got shape \(2, 2\)"),
        ([0.0, -math.inf], 1.0, "low must be finite"),
        (torch.zeros(2), torch.ones(3), "do not broadcast"),
    ],
)
def test_box_uniform_refuses_bad_bounds(low, high, match):
    with pytest.raises(ValueError, match=match):
        box_uniform(low, high)


# ---------------------------------------------------------------------------- IndependentPrior
def test_independent_prior_concatenates_marginals():
    prior = IndependentPrior(Uniform(0.0, 1.0), Normal(torch.zeros(2), torch.ones(2)),
                             MultivariateNormal(torch.zeros(2), torch.eye(2)), LogNormal(0.0, 1.0))
    assert prior.sizes == (1, 2, 2, 1) and prior.event_shape == (6,) and prior.batch_shape == ()
    for shape in [(), (5,), (2, 3)]:
        assert prior.sample(shape).shape == (*shape, 6)
    assert IndependentPrior([Uniform(0.0, 1.0), Normal(0.0, 1.0)]).event_shape == (2,)  # a list works too
    torch.testing.assert_close(prior.mean[:3], torch.tensor([0.5, 0.0, 0.0]))


def test_independent_prior_log_prob_is_the_sum_of_the_marginals():
    prior = mixed()
    value = torch.tensor([[0.25, -1.0, 2.0], [0.9, 0.3, 0.5]])
    expected = (Uniform(0.0, 1.0).log_prob(value[:, 0]) + Normal(0.0, 1.0).log_prob(value[:, 1])
                + LogNormal(0.0, 0.5).log_prob(value[:, 2]))
    torch.testing.assert_close(prior.log_prob(value), expected)
    assert prior.log_prob(value[None]).shape == (1, 2)
    unvalidated = IndependentPrior(Uniform(0.0, 1.0), LogNormal(0.0, 0.5), validate_args=False)
    out = unvalidated.log_prob(torch.tensor([[1.5, 1.0], [0.5, -1.0], [math.nan, 1.0]]))
    assert out[:2].tolist() == [-math.inf, -math.inf] and math.isnan(out[2])
    with pytest.raises(ValueError, match="support"):  # torch's own validation, when on
        IndependentPrior(Uniform(0.0, 1.0), LogNormal(0.0, 0.5), validate_args=True).log_prob(torch.tensor([0.5, -1.0]))


def test_independent_prior_is_normalized():
    prior = IndependentPrior(Uniform(-1.0, 2.0), Exponential(2.0))
    a, b = torch.linspace(-1, 2, 601)[1:-1], torch.linspace(0, 12, 2401)[1:]
    grid = torch.stack(torch.meshgrid(a, b, indexing="ij"), -1)
    mass = prior.log_prob(grid).exp().sum() * (a[1] - a[0]) * (b[1] - b[0])
    assert abs(float(mass) - 1) < 0.01


class NoRsample(Normal):
    has_rsample = False


def test_independent_prior_rsample_carries_gradients():
    loc = torch.tensor(0.5, requires_grad=True)
    prior = IndependentPrior(Normal(loc, 1.0), LogNormal(loc, 0.5))
    assert prior.has_rsample
    prior.rsample((100,)).sum().backward()
    assert loc.grad is not None and loc.grad > 0
    with pytest.raises(NotImplementedError, match=r"rsample needs every marginal to have it; \['NoRsample'\]"):
        IndependentPrior(Normal(0.0, 1.0), NoRsample(0.0, 1.0)).rsample()


@pytest.mark.parametrize(
    ("marginals", "error", "match"),
    [
        (lambda: (), ValueError, "at least one marginal"),
        (lambda: (Normal(0.0, 1.0), "uniform"), TypeError, "marginal 1 must be a torch.distributions.Distribution, got str"),
        (lambda: (Normal(0.0, 1.0), Dirichlet(torch.ones(3))), ValueError, r"marginal 1 \(Dirichlet\)"),
        (lambda: (Normal(0.0, 1.0), Normal(torch.zeros(1, device="meta"), 1.0, validate_args=False)), ValueError,
         "different devices"),
    ],
)
def test_independent_prior_refuses_bad_marginals(marginals, error, match):
    with pytest.raises(error, match=match):
        IndependentPrior(*marginals())


# ------------------------------------------------------------------------------- cat supports
class CatSupportPrior(Distribution):
    """A hand-written prior whose support is a cat of independent constraints (issue 14.9)."""

    arg_constraints: ClassVar[dict] = {}
    support = constraints.cat(
        [constraints.independent(constraints.interval(0.0, 1.0), 1), constraints.independent(constraints.real, 1)],
        dim=-1, lengths=[1, 1],
    )

    def __init__(self):
        super().__init__(torch.Size(), torch.Size((2,)), validate_args=False)

    def sample(self, sample_shape=()):
        shape = (*sample_shape, 1)
        return torch.cat([torch.rand(shape), torch.randn(shape)], -1)

    def log_prob(self, value):
        return Normal(0.0, 1.0).log_prob(value[..., 1]) + torch.where(
            (value[..., 0] >= 0) & (value[..., 0] <= 1), 0.0, -math.inf
        )


def test_a_cat_of_independent_constraints_works_through_the_unconstrained_space():
    assert CatSupportPrior.support.check(torch.zeros(3, 2)).shape == (6,)  # torch's own check: 6 verdicts, 3 rows
    prior, _ = check_prior(CatSupportPrior())
    space = Unconstrained(prior.support)
    u = torch.tensor([[-50.0, 3.0], [0.0, -2.0], [50.0, 0.0]])
    theta = space.to_constrained(u)
    assert space.inside(theta, boundary=False).all() and theta[0, 0] > 0 and theta[2, 0] < 1
    torch.testing.assert_close(space.to_unconstrained(theta[1]), u[1])
    assert space.inside(torch.tensor([[1.5, 0.0], [0.5, -1e9]])).tolist() == [False, True]
    assert space.log_abs_det_jacobian(u).shape == (3,)


def test_flat_support_refuses_unsupported_cats():
    c = constraints
    with pytest.raises(ValueError, match=r"along dim=-1 \(or 0\), got dim=1"):
        flat_support(c.cat([c.real, c.positive], dim=1))
    default_dim = flat_support(c.cat([c.real, c.positive]), 2)  # torch's default dim=0: the parameter axis
    assert default_dim.check(torch.tensor([[5.0, 1.0], [5.0, -1.0], [-5.0, 1.0]])).tolist() == [True, False, True]
    with pytest.raises(ValueError, match=r"lengths \[1, 1\] do not add up to the 3 parameters"):
        flat_support(c.cat([c.real, c.positive], dim=-1), 3)
    with pytest.raises(ValueError, match="vector-valued"):
        flat_support(c.cat([c.real, c.simplex], dim=-1, lengths=[1, 2]), 3)


@pytest.mark.parametrize("make_prior", [CatSupportPrior, mixed], ids=["hand-written", "IndependentPrior"])
def test_npe_with_a_cat_support_samples_inside_and_is_normalized(make_prior):
    posterior, _, x = _fit(make_prior())
    x_o = x[0]
    draws = posterior.sample(3000, x_o, seed=0)
    assert ((draws[:, 0] > 0) & (draws[:, 0] < 1)).all()
    if draws.shape[1] == 3:
        assert (draws[:, 2] > 0).all()
        return
    a, b = torch.linspace(0, 1, 401)[1:-1], torch.linspace(-7, 7, 1401)
    grid = torch.stack(torch.meshgrid(a, b, indexing="ij"), -1)
    mass = posterior.log_prob(grid.reshape(-1, 2), x_o).exp().sum() * (a[1] - a[0]) * (b[1] - b[0])
    assert abs(float(mass) - 1) < 0.03
    assert posterior.log_prob(torch.tensor([1.2, 0.0]), x_o) == -math.inf


# --------------------------------------------------------------------- support vs. its samples
class WrongSupport(Distribution):
    """Claims theta_1 in [0, 1] but samples it from N(0.5, 0.2^2): about 1.2% of samples fall outside."""

    arg_constraints: ClassVar[dict] = {}
    support = constraints.independent(constraints.interval(torch.zeros(2), torch.ones(2)), 1)

    def __init__(self):
        super().__init__(torch.Size(), torch.Size((2,)), validate_args=False)

    def sample(self, sample_shape=()):
        shape = (*sample_shape, 1)
        return torch.cat([torch.rand(shape), 0.5 + 0.2 * torch.randn(shape)], -1)

    def log_prob(self, value):
        return torch.zeros(value.shape[:-1])


def test_a_support_that_the_samples_violate_is_a_clear_error():
    with pytest.raises(ValueError, match=r"prior WrongSupport declares the support .* of 1000 of its own samples lie "
                                         r"outside it \(column 1: \d+ values, e\.g\. \[") as info:
        NPE(WrongSupport())
    assert "column 0" not in str(info.value)
    state = torch.random.get_rng_state()
    with pytest.raises(ValueError):
        check_prior(WrongSupport())
    assert torch.equal(torch.random.get_rng_state(), state)  # the check leaves the global RNG alone


# ------------------------------------------------------------------------------- save / load
@pytest.mark.parametrize("make_prior", [mixed, lambda: box_uniform([0.0, -1.0], [1.0, 1.0])], ids=["independent", "box"])
def test_helpers_round_trip_through_save_and_load(tmp_path, make_prior):
    prior = make_prior()
    posterior, theta, x = _fit(prior, epochs=3)
    posterior.save(tmp_path / "p.pt")
    loaded = load(tmp_path / "p.pt")
    assert type(loaded.prior) is type(prior)
    assert torch.equal(loaded.log_prob(theta[:50], x[0]), posterior.log_prob(theta[:50], x[0]))
    assert torch.equal(loaded.sample(20, x[0], seed=1), posterior.sample(20, x[0], seed=1))
    probe = prior.sample((10,))
    torch.testing.assert_close(loaded.prior.log_prob(probe), prior.log_prob(probe))


def test_independent_prior_moves_device_through_its_spec():
    moved = move_prior(mixed(), "meta")
    assert type(moved) is IndependentPrior and moved.marginals[2].loc.device.type == "meta"
    posterior, _, _ = _fit(mixed(), epochs=1)
    on_meta = posterior.copy().to("meta")  # per-column bounds follow the prior's device
    assert on_meta._space.to_constrained(torch.zeros(4, 3, device="meta")).device.type == "meta"


def test_an_unsaveable_marginal_is_refused_at_save(tmp_path):
    shifted = TransformedDistribution(Normal(0.0, 1.0), AffineTransform(1.0, 2.0))
    prior = IndependentPrior(Uniform(0.0, 1.0), shifted)
    assert prior_spec(prior) is None
    posterior, theta, x = _fit(prior, epochs=2)
    with pytest.raises(ValueError, match=r"cannot save the IndependentPrior prior.*allow_unsaved_prior=True"):
        posterior.save(tmp_path / "p.pt")
    assert not (tmp_path / "p.pt").exists()
    posterior.save(tmp_path / "p.pt", allow_unsaved_prior=True)
    with pytest.raises(ValueError, match=r"load\(path, prior=...\)"):
        load(tmp_path / "p.pt")
    assert torch.equal(load(tmp_path / "p.pt", prior=prior).log_prob(theta[:5], x[0]), posterior.log_prob(theta[:5], x[0]))


def test_old_imports_of_the_spec_functions_still_work():
    from sbiflows.priors import PRIOR_CLASSES, build_prior  # noqa: F401 - moved to sbiflows.prior_specs

    assert "Uniform" in PRIOR_CLASSES

"""Posterior: support and normalization under a bounded prior, batching, chunking, MAP, input checks, devices."""

import copy

import numpy as np
import pytest
import torch
from torch.distributions import Independent, MultivariateNormal, Normal, TransformedDistribution, Uniform
from torch.distributions.transforms import AffineTransform

from sbiflows import NPE, Posterior
from sbiflows.seeding import derive_seed

NOISE = 0.5


def box_posterior_rows(n: int):
    """theta from the uniform prior on [-1, 1]^2 and x = theta + N(0, 0.3^2)."""
    g = torch.Generator().manual_seed(0)
    theta = 2 * torch.rand(n, 2, generator=g) - 1
    return theta, theta + 0.3 * torch.randn(n, 2, generator=g)


@pytest.fixture(scope="module")
def box_posterior():
    """A posterior (the default flow and space) under the uniform prior on [-1, 1]^2 with x = theta + N(0, 0.3^2)."""
    prior = Independent(Uniform(-torch.ones(2), torch.ones(2)), 1)
    return NPE(prior, transforms=3).fit(*box_posterior_rows(2000), max_epochs=40, progress=False)


@pytest.fixture(scope="module")
def gaussian_posterior():
    """A MAF posterior for theta ~ N(0, I_2), x = theta + N(0, 0.5^2 I)."""
    g = torch.Generator().manual_seed(1)
    theta = torch.randn(3000, 2, generator=g)
    x = theta + NOISE * torch.randn(3000, 2, generator=g)
    prior = MultivariateNormal(torch.zeros(2), torch.eye(2))
    return NPE(prior, transforms=3).fit(theta, x, max_epochs=60, progress=False)


# ------------------------------------------------------------------------------ bounded prior
def test_samples_never_leave_the_box_even_far_from_the_data(box_posterior):
    far = torch.tensor([[0.99, -0.99], [5.0, 5.0], [-30.0, 2.0]])  # the last two lie far outside the data
    with pytest.warns(UserWarning, match="2 of 3 xs row"):  # and the posterior says so
        samples = box_posterior.sample_batched(20_000, far, seed=0)
    assert samples.shape == (20_000, 3, 2)
    assert bool((samples.abs() < 1).all())


def test_log_prob_integrates_to_one_on_the_box(box_posterior):
    k = 400
    grid = (torch.arange(k) + 0.5) / k * 2 - 1  # midpoints
    theta = torch.cartesian_prod(grid, grid)
    for x_o in (torch.tensor([0.2, -0.5]), torch.tensor([0.95, 0.95])):
        mass = box_posterior.log_prob(theta, x=x_o).exp().sum() * (2 / k) ** 2
        assert abs(mass.item() - 1) < 0.02


@pytest.mark.parametrize("space", ["auto", "unconstrained"])
def test_log_prob_is_minus_inf_outside_the_support(box_posterior, space):
    """Outside: -inf in both spaces. On the boundary (measure zero): -inf where the sigmoid maps it to
    infinity (unconstrained), the flow's density in the truncated space (the closed box)."""
    posterior = box_posterior if space == "auto" else NPE(box_posterior.prior, transforms=1, space=space).fit(
        *box_posterior_rows(200), max_epochs=1, progress=False)
    theta = torch.tensor([[1.5, 0.0], [0.0, -1.01], [1.0, 0.0], [-1.0, -1.0], [0.0, 0.0]])
    lp = posterior.log_prob(theta, x=torch.zeros(2))
    assert torch.isneginf(lp[:2]).all() and torch.isfinite(lp[4])
    on_boundary = lp[2:4]
    assert bool((torch.isneginf(on_boundary) if space == "unconstrained" else torch.isfinite(on_boundary)).all())


def test_log_prob_of_one_theta_is_a_scalar(box_posterior):
    assert box_posterior.log_prob(torch.zeros(2), x=torch.zeros(2)).shape == ()


def test_log_prob_keeps_any_leading_batch_shape(box_posterior):
    theta = box_posterior.sample(24, x=torch.zeros(2), seed=0)
    flat = box_posterior.log_prob(theta, x=torch.zeros(2))
    for shape in [(2, 3, 4), (4, 6), (24,)]:
        lp = box_posterior.log_prob(theta.reshape(*shape, 2), x=torch.zeros(2))
        assert lp.shape == shape
        torch.testing.assert_close(lp.reshape(-1), flat)
    assert box_posterior.log_prob(torch.zeros(0, 2), x=torch.zeros(2)).shape == (0,)


# ------------------------------------------------------------------------ batching and chunking
def test_batched_log_prob_matches_looped(box_posterior):
    xs = torch.tensor([[0.1, 0.2], [-0.7, 0.4], [0.9, -0.9]])
    theta = box_posterior.sample_batched(50, xs, seed=1)
    batched = box_posterior.log_prob_batched(theta, xs)
    looped = torch.stack([box_posterior.log_prob(theta[:, b], x=xs[b]) for b in range(3)], dim=1)
    assert batched.shape == (50, 3)
    torch.testing.assert_close(batched, looped, atol=1e-5, rtol=1e-5)


def test_chunking_bounds_rows_without_changing_results(box_posterior):
    xs = torch.randn(40, 2) * 0.5
    theta = box_posterior.sample_batched(30, xs, seed=2)
    full = box_posterior.log_prob_batched(theta, xs)
    small = box_posterior.copy()
    small.max_batch_elements = 64  # fewer rows than one observation's samples: chunks over samples too
    torch.testing.assert_close(small.log_prob_batched(theta, xs), full, atol=1e-5, rtol=1e-5)
    samples = small.sample_batched(100, xs, seed=3)
    assert samples.shape == (100, 40, 2) and bool((samples.abs() < 1).all())


def test_sampling_many_observations_in_bounded_memory(box_posterior):
    small = box_posterior.copy()
    small.max_batch_elements = 10_000
    samples = small.sample_batched(500, torch.zeros(1000, 2), seed=0)  # 500k rows, 50 chunks
    assert samples.shape == (500, 1000, 2)


def test_seeded_samples_are_reproducible(box_posterior):
    x_o = torch.zeros(2)
    a = box_posterior.sample(100, x=x_o, seed=5)
    assert torch.equal(a, box_posterior.sample(100, x=x_o, seed=5))
    # seed=5 is its own stream (derive_seed), not Generator().manual_seed(5), which a reference sampler may use
    derived = torch.Generator().manual_seed(derive_seed(5, "posterior"))
    assert torch.equal(a, box_posterior.sample(100, x=x_o, generator=derived))
    assert not torch.equal(a, box_posterior.sample(100, x=x_o, generator=torch.Generator().manual_seed(5)))
    assert not torch.equal(a, box_posterior.sample(100, x=x_o, seed=6))
    with pytest.raises(ValueError, match="either seed or generator"):
        box_posterior.sample(10, x=x_o, seed=1, generator=torch.Generator())


# ------------------------------------------------------------------------------------------ MAP
def test_map_finds_the_gaussian_posterior_mode(gaussian_posterior):
    x_o = torch.tensor([0.8, -0.4])
    mode = gaussian_posterior.map(x=x_o, num_iter=200)
    assert mode.shape == (2,)
    exact = x_o / (1 + NOISE**2)
    assert (mode - exact).abs().max() < 0.1


def test_map_stays_inside_a_bounded_support(box_posterior):
    mode = box_posterior.map(x=torch.tensor([2.0, -2.0]), num_iter=100)
    assert bool((mode.abs() < 1).all())
    assert mode[0] > 0.5 and mode[1] < -0.5


def test_map_batched_finds_every_observations_mode_at_once(gaussian_posterior):
    """map_batched: one ascent for many observations, each at its own exact mode, each at what map finds alone."""
    xs = torch.tensor([[0.8, -0.4], [-1.2, 0.3], [0.0, 1.0], [1.0, 1.0], [-0.7, -0.9]])
    modes = gaussian_posterior.map_batched(xs, num_iter=200)
    assert modes.shape == (5, 2)
    assert (modes - xs / (1 + NOISE**2)).abs().max() < 0.15  # the flow's mode, 60 epochs from the exact one
    alone = torch.stack([gaussian_posterior.map(x, num_iter=200) for x in xs])
    assert (modes - alone).abs().max() < 0.02  # other seeded starts (stream b, not 0), the same mode
    # observation 0 starts from map's own draws: the same best start
    starts = gaussian_posterior.map_batched(xs, num_iter=0)
    assert torch.allclose(starts[0], gaussian_posterior.map(xs[0], num_iter=0), atol=1e-6)
    assert not torch.allclose(starts[1], gaussian_posterior.map(xs[1], num_iter=0), atol=1e-6)  # stream 1, not 0


def test_map_batched_does_not_depend_on_the_chunks(box_posterior):
    """At most chunk_rows starting points per chunk; the seeded starts of each observation do not move with them,
    and every MAP stays inside the box."""
    xs = torch.tensor([[2.0, -2.0], [0.3, 0.1], [-0.5, 0.9], [1.2, 1.2]])
    whole = box_posterior.map_batched(xs, num_init_samples=300, num_to_optimize=20, num_iter=50, seed=4)
    small = box_posterior.copy()
    small.max_batch_elements = 600  # two observations' 300 starts per chunk
    chunked = small.map_batched(xs, num_init_samples=300, num_to_optimize=20, num_iter=50, seed=4)
    assert torch.allclose(whole, chunked, atol=1e-4)
    assert bool((whole.abs() < 1).all()) and whole[0, 0] > 0.5 and whole[0, 1] < -0.5
    other = box_posterior.map_batched(xs, num_init_samples=300, num_to_optimize=20, num_iter=0, seed=5)
    assert not torch.equal(other, box_posterior.map_batched(xs, num_init_samples=300, num_to_optimize=20, num_iter=0,
                                                             seed=4))  # the seed picks the starts


def test_map_without_a_seed_draws_its_starts_from_torchs_generator(gaussian_posterior):
    x = torch.tensor([0.5, -0.5])
    torch.manual_seed(3)
    first = gaussian_posterior.map(x, num_iter=0, seed=None)
    torch.manual_seed(3)
    assert torch.equal(gaussian_posterior.map(x, num_iter=0, seed=None), first)
    assert not torch.equal(gaussian_posterior.map(x, num_iter=0, seed=None), first)  # the generator moved on


def test_map_batched_checks_its_observations_and_options(gaussian_posterior):
    with pytest.raises(ValueError, match=r"xs must have shape \(B, 2\)"):
        gaussian_posterior.map_batched(torch.zeros(3, 5))
    with pytest.raises(ValueError, match=r"xs contains NaN or inf \(rows \[1\]\)"):
        gaussian_posterior.map_batched(torch.tensor([[0.0, 0.0], [float("nan"), 0.0]]))
    with pytest.raises(ValueError, match="num_init_samples must be an int >= 1, got 0"):
        gaussian_posterior.map_batched(torch.zeros(2, 2), num_init_samples=0)


# ---------------------------------------------------------------------------------- input checks
def test_batch_of_observations_points_to_batched_methods(box_posterior):
    with pytest.raises(ValueError, match=r"shape \(3, 2\): a batch of 3 observations.*sample_batched"):
        box_posterior.sample(10, x=torch.zeros(3, 2))
    with pytest.raises(ValueError, match="log_prob_batched"):
        box_posterior.log_prob(torch.zeros(4, 2), x=torch.zeros(3, 2))


def test_wrong_observation_shape_shows_both_shapes(box_posterior):
    with pytest.raises(ValueError, match=r"x must have shape \(2,\) or \(1, 2\).*got \(3,\)"):
        box_posterior.sample(10, x=torch.zeros(3))
    with pytest.raises(ValueError, match=r"xs must have shape \(B, 2\).*got \(4, 3\)"):
        box_posterior.sample_batched(10, torch.zeros(4, 3))
    with pytest.raises(ValueError, match=r"theta must have shape \(n, B, 2\) with B = 2"):
        box_posterior.log_prob_batched(torch.zeros(5, 3, 2), torch.zeros(2, 2))
    with pytest.raises(ValueError, match=r"theta must have shape \(\.\.\., 2\)"):
        box_posterior.log_prob(torch.zeros(5, 3), x=torch.zeros(2))


def test_nan_observation_and_nan_theta_are_rejected(box_posterior):
    with pytest.raises(ValueError, match="x contains NaN or inf"):
        box_posterior.sample(10, x=torch.tensor([0.0, torch.nan]))
    with pytest.raises(ValueError, match=r"xs contains NaN or inf \(rows \[1\]\)"):
        box_posterior.sample_batched(10, torch.tensor([[0.0, 0.0], [torch.inf, 0.0]]))
    with pytest.raises(ValueError, match="theta contains NaN"):
        box_posterior.log_prob(torch.tensor([[torch.nan, 0.0]]), x=torch.zeros(2))
    with pytest.raises(ValueError, match="x is required"):
        box_posterior.sample(10, x=None)
    with pytest.raises(ValueError, match="n must be an int >= 1, got 0"):
        box_posterior.sample(0, x=torch.zeros(2))


def test_sample_size_accepts_numpy_integers_and_rejects_non_integers(box_posterior):
    x_o = torch.zeros(2)
    assert torch.equal(box_posterior.sample(np.int64(5), x=x_o, seed=0), box_posterior.sample(5, x=x_o, seed=0))
    assert box_posterior.sample_batched(np.int32(3), torch.zeros(2, 2), seed=0).shape == (3, 2, 2)
    with pytest.raises(TypeError, match="n must be an int >= 1, got float 5.0"):
        box_posterior.sample(5.0, x=x_o)
    with pytest.raises(TypeError, match="n must be an int >= 1, got bool True"):
        box_posterior.sample(True, x=x_o)
    with pytest.raises(ValueError, match="n must be an int >= 1, got -3"):
        box_posterior.sample(np.int64(-3), x=x_o)


def test_numpy_and_float64_inputs_are_converted(box_posterior):
    """float64 theta is cast to the flow's float32 with a warning once per process (the prior is float32);
    float64 x needs none: it is standardized in float64 first."""
    with pytest.warns(UserWarning, match=r"^theta is float64 and was cast to torch.float32") as caught:
        lp = box_posterior.log_prob(np.zeros((3, 2)), x=np.zeros(2))
    assert len(caught) == 1 and caught[0].filename == __file__  # points at the caller's line
    assert lp.dtype == torch.float32
    torch.testing.assert_close(lp, box_posterior.log_prob(torch.zeros(3, 2, dtype=torch.float64), x=torch.zeros(1, 2)))
    with pytest.raises(TypeError, match="x must have a floating dtype, got torch.int64"):
        box_posterior.sample(2, x=torch.zeros(2, dtype=torch.long))
    with pytest.raises(TypeError, match="x must be a torch.Tensor or a numpy array, got list"):
        box_posterior.sample(2, x=[0.0, 0.0])


# ---------------------------------------------------------------------------------------- devices
def test_to_cpu_device_object_keeps_results(box_posterior):
    moved = box_posterior.copy().to(torch.device("cpu"))
    assert moved.device == torch.device("cpu")
    theta = torch.zeros(3, 2)
    assert torch.equal(moved.log_prob(theta, x=torch.zeros(2)), box_posterior.log_prob(theta, x=torch.zeros(2)))


def test_to_meta_moves_network_and_prior_tensors(box_posterior):
    moved = box_posterior.copy().to("meta")
    assert moved.device.type == "meta"
    assert moved.prior.base_dist.low.device.type == "meta"
    assert all(p.device.type == "meta" for p in moved.net.parameters())


class BoxUniform(Independent):
    """Like sbi's ``BoxUniform``: a subclass of ``Independent`` with its own constructor."""

    def __init__(self, low, high):
        super().__init__(Uniform(low, high), 1)


def test_to_device_rebuilds_a_subclassed_prior(box_posterior):
    posterior = Posterior(
        copy.deepcopy(box_posterior.net), BoxUniform(-torch.ones(2), torch.ones(2)), config=box_posterior.config
    )
    theta = torch.tensor([[0.3, -0.2], [0.9, 0.9]])
    before = posterior.log_prob(theta, x=torch.zeros(2))
    torch.testing.assert_close(before, box_posterior.log_prob(theta, x=torch.zeros(2)))
    moved = posterior.copy().to("meta")
    assert type(moved.prior) is Independent and moved.prior.base_dist.low.device.type == "meta"
    assert moved.device.type == "meta"
    assert torch.equal(posterior.copy().to("cpu").log_prob(theta, x=torch.zeros(2)), before)


def test_failed_move_leaves_the_posterior_unchanged(box_posterior):
    prior = TransformedDistribution(Independent(Normal(torch.zeros(2), torch.ones(2)), 1), AffineTransform(0.0, 2.0))
    posterior = Posterior(copy.deepcopy(box_posterior.net), prior, config=box_posterior.config)
    with pytest.raises(ValueError, match="cannot move a TransformedDistribution prior to meta"):
        posterior.to("meta")
    assert posterior.device.type == "cpu" and posterior.prior is prior
    assert all(p.device.type == "cpu" for p in posterior.net.parameters())
    assert torch.isfinite(posterior.log_prob(torch.zeros(3, 2), x=torch.zeros(2))).all()


def test_a_non_integer_seed_is_refused_naming_the_argument():
    """Issue 14.9: sample(seed=1.5) said "'float' object cannot be interpreted as an integer"."""
    prior = torch.distributions.Independent(torch.distributions.Normal(torch.zeros(2), torch.ones(2)), 1)
    theta = prior.sample((200,))
    posterior = NPE(prior, transforms=1, hidden_features=(8,)).fit(theta, theta, max_epochs=1, progress=False)
    with pytest.raises(TypeError, match="seed must be an int, got float 1.5"):
        posterior.sample(3, x=torch.zeros(2), seed=1.5)
    assert posterior.sample(3, x=torch.zeros(2), seed=np.int64(2)).shape == (3, 2)


def test_an_observation_far_outside_the_simulations_warns_once_naming_the_feature():
    """Issue 14.4: a misspecified simulator or wrong units gave no word at all."""
    from sbiflows.posterior import observations_unchecked

    prior = Independent(Normal(torch.zeros(2), torch.ones(2)), 1)
    theta = prior.sample((300,))
    x = torch.cat([theta, theta.sum(-1, keepdim=True)], dim=1) + 0.1 * torch.randn(300, 3)
    posterior = NPE(prior, transforms=1, hidden_features=(8,)).fit(theta, x, max_epochs=1, progress=False)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        posterior.sample(5, x=x[0])  # a typical observation: no warning
    with pytest.warns(UserWarning, match=r"1 of 1 x row\(s\) lie far outside .*feature\(s\) 2 \(\|z\| ") as record:
        posterior.sample(5, x=torch.tensor([0.0, 0.0, 100.0]))
    assert len(record) == 1
    with pytest.warns(UserWarning, match="2 of 3 xs row") as record:
        posterior.sample_batched(5, torch.tensor([[0.0, 0.0, 100.0], [0.0, 0.0, 0.0], [50.0, 0.0, 0.0]]))
    assert len(record) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with observations_unchecked():
            posterior.log_prob(torch.zeros(4, 2), x=torch.tensor([0.0, 0.0, 100.0]))


def test_map_checks_its_options_and_counts_the_last_step(gaussian_posterior):
    posterior, x = gaussian_posterior, torch.tensor([0.5, -0.5])
    with pytest.raises(TypeError, match="num_iter must be an int >= 0, got float 1.5"):
        posterior.map(x, num_iter=1.5)
    with pytest.raises(ValueError, match="num_to_optimize must be an int >= 1, got 0"):
        posterior.map(x, num_to_optimize=0)
    with pytest.raises(ValueError, match="learning_rate must be a positive number"):
        posterior.map(x, learning_rate=-1.0)
    best_sample = posterior.map(x, num_init_samples=200, num_iter=0)
    refined = posterior.map(x, num_init_samples=200, num_iter=50, progress=True)
    assert posterior.log_prob(refined, x) >= posterior.log_prob(best_sample, x)


def test_seeded_samples_do_not_depend_on_chunking_or_batch_neighbours(box_posterior):
    """Issue 14.9: seeded draws used to change with max_batch_elements."""
    xs = torch.linspace(-1, 1, 6).reshape(3, 2)
    whole = box_posterior.sample_batched(2500, xs, seed=3)
    small = box_posterior.copy()
    for elements in (1000, 700, 2500):  # chunks that split observations and the 1024-row noise blocks
        small.max_batch_elements = elements
        # the same noise; the flow's arithmetic on batches of other sizes may round differently
        torch.testing.assert_close(small.sample_batched(2500, xs, seed=3), whole)
    torch.testing.assert_close(box_posterior.sample(2500, xs[0], seed=3), whole[:, 0])  # observation 0 of a batch
    torch.testing.assert_close(box_posterior.sample(1000, xs[0], seed=3), whole[:1000, 0])  # fewer rows: a prefix
    generator = torch.Generator().manual_seed(derive_seed(3, "posterior"))
    assert torch.equal(box_posterior.sample_batched(2500, xs, generator=generator), whole)

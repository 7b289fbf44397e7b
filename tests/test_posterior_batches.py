"""Posterior.sample_and_log_prob_batched (sbiflows.posterior_batches): sample_batched's draws with log_prob_batched's densities, one pass per flow."""

import json

import pytest
import torch
from torch.distributions import Independent, MultivariateNormal, Uniform

from sbiflows import NPE, load
from sbiflows.diagnostics import expected_coverage
from sbiflows.ensemble import auto_check
from sbiflows.posterior_batches import CPU_CHUNK_ROWS


def rows(n: int, seed: int = 0):
    """theta uniform on [-1, 1]^2 and x = theta + N(0, 0.3^2)."""
    g = torch.Generator().manual_seed(seed)
    theta = 2 * torch.rand(n, 2, generator=g) - 1
    return theta, theta + 0.3 * torch.randn(n, 2, generator=g)


BOX = Independent(Uniform(-torch.ones(2), torch.ones(2)), 1)
GAUSSIAN = MultivariateNormal(torch.zeros(2), torch.eye(2))


def fit(prior, **options):
    options = {"ensemble": 1, **options}  # one flow unless the test asks for an ensemble
    return NPE(prior, transforms=2, hidden_features=(16, 16), **options).fit(*rows(600), max_epochs=8, seed=0,
                                                                             progress=False)


@pytest.fixture(scope="module")
def posteriors():
    """One flow in the unconstrained space (sigmoid box, Gaussian prior), the truncated space, and an ensemble."""
    return {
        "box": fit(BOX, space="unconstrained"),
        "gaussian": fit(GAUSSIAN),
        "truncated": fit(BOX, space="truncated"),
        "ensemble": fit(BOX, space="unconstrained", ensemble=2),
    }


XS = torch.tensor([[0.2, -0.4], [0.9, 0.9], [-0.5, 0.0]])


@pytest.mark.parametrize("name", ["box", "gaussian", "truncated", "ensemble"])
def test_the_draws_are_sample_batched_s_and_the_densities_log_prob_batched_s(posteriors, name):
    posterior = posteriors[name]
    draws, log_q = posterior.sample_and_log_prob_batched(300, XS, seed=4)
    assert draws.shape == (300, 3, 2) and log_q.shape == (300, 3)
    assert torch.equal(draws, posterior.sample_batched(300, XS, seed=4))
    # one flow: the inverse pass's densities, equal up to float32 rounding; an ensemble's evaluated afterwards
    atol = 0.0 if name == "ensemble" else 1e-4
    torch.testing.assert_close(log_q, posterior.log_prob_batched(draws, XS), atol=atol, rtol=1e-4)
    unnormalized = posterior.sample_and_log_prob_batched(300, XS, seed=4, normalized=False)[1]
    torch.testing.assert_close(unnormalized, posterior.log_prob_batched(draws, XS, normalized=False), atol=atol,
                               rtol=1e-4)
    if name == "truncated":  # the normalizer is a constant per observation
        shift = log_q - unnormalized
        assert bool((shift < 0).all()) or bool((shift > 0).all())
        torch.testing.assert_close(shift, shift[:1].expand_as(shift))


@pytest.mark.parametrize("name", ["box", "gaussian", "truncated"])
def test_generators_the_global_stream_and_chunking_give_sample_batched_s_draws(posteriors, name):
    posterior = posteriors[name].copy()
    for make in (lambda: {"generator": torch.Generator().manual_seed(7)}, lambda: {}):
        torch.manual_seed(1)
        draws, log_q = posterior.sample_and_log_prob_batched(50, XS, **make())
        torch.manual_seed(1)
        assert torch.equal(draws, posterior.sample_batched(50, XS, **make()))
        torch.testing.assert_close(log_q, posterior.log_prob_batched(draws, XS), atol=1e-4, rtol=1e-5)
    whole = posterior.sample_and_log_prob_batched(2500, XS, seed=3)
    posterior.max_batch_elements = 700  # chunks that split observations and the 1024-row noise blocks
    chunked = posterior.sample_and_log_prob_batched(2500, XS, seed=3)
    torch.testing.assert_close(chunked, whole)


def test_draws_a_saturated_sigmoid_rounded_get_the_density_of_the_returned_theta(posteriors):
    posterior = posteriors["box"].copy()
    posterior.net.u_shift[0] = 30.0  # T(u) near u = 30 rounds to 1 - 2e-7 in float32: T^{-1} of it is about 15
    draws, log_q = posterior.sample_and_log_prob_batched(200, XS, seed=0)
    assert bool((draws[..., 0] > 1 - 1e-6).all()) and bool((draws[..., 0] < 1).all())  # T(u) rounded, still inside
    torch.testing.assert_close(log_q, posterior.log_prob_batched(draws, XS), atol=1e-4, rtol=1e-5)
    assert bool(torch.isfinite(log_q).all())


def test_a_leaking_observation_s_sir_draws_get_their_evaluated_densities(posteriors):
    """The truncated space's fallback for a flow whose mass left the box: its draws are evaluated."""
    posterior = posteriors["truncated"].copy()
    posterior.net.u_shift += 2.5
    posterior.net.u_scale *= 2.0
    with pytest.warns(UserWarning, match="sampling-importance-resampling"):
        draws, log_q = posterior.sample_and_log_prob_batched(500, XS[:1], seed=5)
    with pytest.warns(UserWarning, match="sampling-importance-resampling"):
        assert torch.equal(draws, posterior.sample_batched(500, XS[:1], seed=5))
    torch.testing.assert_close(log_q, posterior.log_prob_batched(draws, XS[:1]), atol=1e-4, rtol=1e-4)


def test_bad_sizes_and_observations_are_refused_naming_the_argument(posteriors):
    posterior = posteriors["box"]
    with pytest.raises(ValueError, match="n must be"):
        posterior.sample_and_log_prob_batched(0, XS)
    with pytest.raises(TypeError, match="n must be"):
        posterior.sample_and_log_prob_batched(2.5, XS)
    with pytest.raises(ValueError, match="shape"):
        posterior.sample_and_log_prob_batched(5, torch.zeros(3, 4))
    with pytest.raises(ValueError, match="seed or generator"):
        posterior.sample_and_log_prob_batched(5, XS, seed=1, generator=torch.Generator())


class TwoPasses:
    """A posterior without sample_and_log_prob_batched: the checks sample, then evaluate."""

    def __init__(self, posterior):
        self.posterior = posterior

    def sample_batched(self, n, xs, **kwargs):
        return self.posterior.sample_batched(n, xs, **kwargs)

    def log_prob_batched(self, theta, xs, **kwargs):
        return self.posterior.log_prob_batched(theta, xs, **kwargs)

    def log_prob(self, theta, x=None):
        return self.posterior.log_prob(theta, x)


@pytest.mark.parametrize("name", ["box", "truncated"])
def test_coverage_and_the_auto_check_rank_as_with_two_passes(posteriors, name):
    """The fused densities change HPD ranks only where a draw and the truth tie to float32 rounding."""
    posterior = posteriors[name]
    theta, x = rows(300, seed=5)
    fused = expected_coverage(posterior, theta=theta, x=x, num_posterior_samples=200, seed=2)
    two = expected_coverage(TwoPasses(posterior), theta=theta, x=x, num_posterior_samples=200, seed=2)
    assert (fused.hpd_ranks - two.hpd_ranks).abs().max() <= 1 / 200 + 1e-12
    torch.testing.assert_close(fused.empirical, two.empirical, atol=1 / 300 + 1e-12, rtol=0)
    check, check_two = auto_check(posterior, theta, x, seed=3), auto_check(TwoPasses(posterior), theta, x, seed=3)
    assert (check.hpd_ranks - check_two.hpd_ranks).abs().max() <= 1 / 101 + 1e-12
    assert check.passed == check_two.passed


def test_the_truncated_normalizer_embeds_observations_in_chunks_of_max_batch_elements(posteriors):
    posterior = posteriors["truncated"].copy()
    posterior.max_batch_elements = 1000  # 100 draws: 10 observations per chunk
    sizes = []
    context = posterior.net.context
    posterior.net.context = lambda x: sizes.append(len(x)) or context(x)
    xs = rows(45, seed=6)[1]
    draws, log_q = posterior.sample_and_log_prob_batched(100, xs, seed=0)
    assert max(sizes) <= 10
    torch.testing.assert_close(log_q, posterior.log_prob_batched(draws, xs), atol=1e-4, rtol=1e-4)


def test_coverage_refuses_fused_densities_of_the_wrong_shape():
    class Wrong(TwoPasses):
        def sample_and_log_prob_batched(self, n, xs):
            draws = self.posterior.sample_batched(n, xs)
            return draws, torch.zeros(n)  # (n,) instead of (n, B)

    theta, x = rows(120, seed=7)
    with pytest.raises(ValueError, match=r"log-probabilities of shape \(100, 120\), got \(100,\)"):
        expected_coverage(Wrong(fit(BOX, space="unconstrained")), theta=theta, x=x, num_posterior_samples=100)


# ------------------------------------------------------------------------------------ chunk size
@pytest.mark.parametrize("name", ["box", "truncated"])
def test_the_default_chunk_suits_the_device_and_seeded_results_do_not_depend_on_it(posteriors, name, tmp_path):
    posterior = posteriors[name].copy()
    assert posterior.max_batch_elements is None and posterior.chunk_rows == CPU_CHUNK_ROWS
    draws, log_q = posterior.sample_and_log_prob_batched(3000, XS, seed=2)  # 9,000 rows: one chunk
    posterior.max_batch_elements = 700
    assert posterior.chunk_rows == 700
    small_draws, small_log_q = posterior.sample_and_log_prob_batched(3000, XS, seed=2)  # 13 chunks
    torch.testing.assert_close(small_draws, draws)
    torch.testing.assert_close(small_log_q, log_q)
    # None is saved as the old fixed default (2**17, what every earlier save recorded and earlier versions can
    # load), and that value loads with the device's size; any value the user chose is kept, 2**17 too (it loaded
    # as None, the device's size, before the file said it was chosen)
    for chosen, loaded in ((None, None), (2**17, 2**17), (700, 700)):
        posterior.max_batch_elements = chosen
        posterior.save(tmp_path / "post.pt")
        config = json.loads(torch.load(tmp_path / "post.pt", weights_only=True)["config"])
        assert config["max_batch_elements"] == (chosen or 2**17)
        assert load(tmp_path / "post.pt").max_batch_elements == loaded


def test_the_default_fits_check_chunks_as_the_user_asked(monkeypatch):
    import sbiflows.npe as npe_module

    seen = []

    def check(posterior, theta, x, *, seed):
        seen.append(posterior.chunk_rows)
        return auto_check(posterior, theta, x, seed=seed)

    monkeypatch.setattr(npe_module, "auto_check", check)
    posterior = NPE(BOX, transforms=1, hidden_features=(8,), max_batch_elements=100).fit(
        *rows(300), max_epochs=2, seed=0, progress=False)
    assert seen == [100] and posterior.chunk_rows == 100


def test_bad_chunk_sizes_are_refused_before_training():
    for bad, error in ((0, ValueError), (2.5, TypeError)):
        with pytest.raises(error, match="max_batch_elements"):
            NPE(BOX, max_batch_elements=bad)

"""Structured x (series, images, sets of trials) through NPE, the posterior, saved files and the diagnostics."""

import warnings

import pytest
import torch
from torch import nn
from torch.distributions import Independent, Normal, Uniform

from sbiflows import NPE, load, load_simulations, simulate
from sbiflows.diagnostics import expected_coverage, posterior_predictive, sbc, tarp
from sbiflows.embeddings import from_name
from sbiflows.unconstrained import Unconstrained

NAN = float("nan")
PRIOR = Independent(Uniform(-torch.ones(2), torch.ones(2)), 1)


def series(theta: torch.Tensor, length: int = 20) -> torch.Tensor:
    """(N, 2, length): a sine of amplitude theta0 and a ramp of slope theta1, with noise."""
    t = torch.linspace(0, 1, length)
    first = theta[:, :1] * torch.sin(6 * t)
    second = theta[:, 1:] * t
    return torch.stack([first, second], 1) + 0.05 * torch.randn(len(theta), 2, length)


def image(theta: torch.Tensor) -> torch.Tensor:
    """(N, 8, 8): a gradient image whose directions are scaled by theta."""
    grid = torch.linspace(-1, 1, 8)
    return theta[:, 0, None, None] * grid[None, :, None] + theta[:, 1, None, None] * grid[None, None, :] \
        + 0.05 * torch.randn(len(theta), 8, 8)


def trials(theta: torch.Tensor, n: int = 12) -> torch.Tensor:
    """(N, n, 2): iid trials theta + noise; a random number (3 to n) of them, the rest NaN padding."""
    x = theta[:, None, :] + 0.3 * torch.randn(len(theta), n, 2)
    counts = torch.randint(3, n + 1, (len(theta),))
    x[torch.arange(n)[None, :] >= counts[:, None]] = NAN
    return x


# name, simulator, x_shape
STRUCTURES = [
    ("mlp", series, (2, 20)),
    ("cnn1d", series, (2, 20)),
    ("cnn2d", image, (8, 8)),
    ("set", trials, (12, 2)),
]


def fitted(name, simulator, x_shape, n=300, **options):
    torch.manual_seed(0)
    theta = PRIOR.sample((n,))
    x = simulator(theta)
    npe = NPE(PRIOR, transforms=1, hidden_features=(16,), embedding_net=from_name(name, x_shape, out_features=4),
              **options)
    posterior = npe.fit(theta, x, max_epochs=2, progress=False)
    return npe, posterior, theta, x


@pytest.fixture(scope="module", params=STRUCTURES, ids=[s[0] for s in STRUCTURES])
def trained(request):
    name, simulator, x_shape = request.param
    return (name, x_shape, *fitted(name, simulator, x_shape))


def test_every_method_takes_one_observation_or_a_batch(trained):
    _, x_shape, npe, posterior, theta, x = trained
    assert posterior.x_shape == x_shape and npe.x.shape[1:] == x_shape
    x_o, xs = x[0], x[:3]
    assert posterior.sample(7, x=x_o, seed=1).shape == (7, 2)
    assert torch.equal(posterior.sample(7, x=x_o[None], seed=1), posterior.sample(7, x=x_o, seed=1))
    assert posterior.sample_batched(7, xs).shape == (7, 3, 2)
    assert posterior.sample_batched(7, x_o).shape == (7, 1, 2)
    lp = posterior.log_prob(theta[:5], x=x_o)
    assert lp.shape == (5,) and torch.isfinite(lp).all()
    batched = posterior.log_prob_batched(theta[:15].reshape(5, 3, 2), xs)
    assert batched.shape == (5, 3)
    torch.testing.assert_close(batched[:, 0], posterior.log_prob(theta[:15].reshape(5, 3, 2)[:, 0], x=xs[0]))
    assert posterior.map(x_o, num_init_samples=20, num_to_optimize=2, num_iter=3).shape == (2,)
    conditioned = posterior.condition(x_o)
    assert conditioned.sample((4,)).shape == (4, 2)
    torch.testing.assert_close(conditioned.log_prob(theta[:5]), lp)


def test_bad_observation_shapes_name_expected_and_received(trained):
    _, x_shape, npe, posterior, theta, x = trained
    dims = ", ".join(map(str, x_shape))
    wrong = torch.zeros(*x_shape[:-1], x_shape[-1] + 1)
    with pytest.raises(ValueError, match=rf"x must have shape \({dims}\) or \(1, {dims}\).*got \({', '.join(map(str, wrong.shape))}\)"):
        posterior.sample(3, x=wrong)
    with pytest.raises(ValueError, match=r"a batch of 3 observations.*sample_batched"):
        posterior.sample(3, x=x[:3])
    with pytest.raises(ValueError, match=rf"xs must have shape \(B, {dims}\).*got \(2, 3\)"):
        posterior.sample_batched(3, torch.zeros(2, 3))
    with pytest.raises(ValueError, match=rf"x must have shape \(N, {dims}\) like the data of the first fit"):
        npe.fit(theta, torch.zeros(len(theta), 4), max_epochs=1, progress=False)


def test_a_gradient_reaches_every_embedding_parameter(trained):
    npe, theta, x = trained[2], trained[4], trained[5]
    net = npe.net
    net.zero_grad()
    u = Unconstrained(PRIOR.support).to_unconstrained(theta[:64])
    loss = -net.log_prob(u, x[:64]).mean()
    loss.backward()
    assert torch.isfinite(loss)
    for param_name, param in net.embedding.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, param_name


def test_zscoring_fits_the_embedding(trained):
    name, posterior = trained[0], trained[3]
    expected = {"mlp": (2, 20), "cnn1d": (2, 1), "cnn2d": (1, 1), "set": (1, 2)}[name]
    assert tuple(posterior.net.x_shift.shape) == expected
    assert torch.isfinite(posterior.net.x_shift).all() and (posterior.net.x_scale > 0).all()


def test_a_built_in_embedding_is_saved_with_the_posterior(trained, tmp_path):
    name, x_shape, _, posterior, theta, x = trained
    posterior.save(tmp_path / "p.pt")
    loaded = load(tmp_path / "p.pt")
    assert loaded.x_shape == x_shape and loaded.config["embedding"] == name
    torch.testing.assert_close(loaded.log_prob(theta[:20], x=x[1]), posterior.log_prob(theta[:20], x=x[1]),
                               rtol=0, atol=0)
    torch.testing.assert_close(loaded.sample(10, x=x[1], seed=3), posterior.sample(10, x=x[1], seed=3), rtol=0, atol=0)
    with pytest.raises(ValueError, match=f"built-in embedding '{name}'.*without embedding_net"):
        load(tmp_path / "p.pt", embedding_net=from_name(name, x_shape, out_features=4))


class Conv(nn.Module):
    """A user's own embedding for (2, 20) series."""

    def __init__(self, width: int = 3):
        super().__init__()
        self.conv = nn.Conv1d(2, width, 3)
        self.out = nn.Linear(width * 18, 4)

    def forward(self, x):
        return self.out(torch.relu(self.conv(x)).flatten(1))


def test_a_users_embedding_loads_when_passed_back(tmp_path):
    torch.manual_seed(0)
    theta = PRIOR.sample((200,))
    x = series(theta)
    posterior = NPE(PRIOR, transforms=1, hidden_features=(16,), embedding_net=Conv()).fit(
        theta, x, max_epochs=2, progress=False)
    posterior.save(tmp_path / "p.pt")
    with pytest.raises(ValueError, match=r"embedding_net of your own.*load\(path, embedding_net=...\)"):
        load(tmp_path / "p.pt")
    with pytest.raises(ValueError, match=r"does not match.*x_shape \(2, 20\).*embedding.conv.weight: \[3, 2, 3\] in the file, \[5, 2, 3\]"):
        load(tmp_path / "p.pt", embedding_net=Conv(width=5))
    mine = Conv()
    before = mine.conv.weight.clone()
    loaded = load(tmp_path / "p.pt", embedding_net=mine)
    torch.testing.assert_close(loaded.log_prob(theta[:10], x=x[0]), posterior.log_prob(theta[:10], x=x[0]),
                               rtol=0, atol=0)
    # the posterior holds a copy: the module passed stays as it was, and a second load with it changes nothing
    # here (the first posterior held the module itself, whose weights the next load overwrote)
    other = NPE(PRIOR, transforms=1, hidden_features=(16,), embedding_net=Conv()).fit(theta, x, max_epochs=1,
                                                                                      progress=False)
    other.save(tmp_path / "other.pt")
    load(tmp_path / "other.pt", embedding_net=mine)
    assert torch.equal(mine.conv.weight, before) and loaded.net.embedding is not mine
    torch.testing.assert_close(loaded.log_prob(theta[:10], x=x[0]), posterior.log_prob(theta[:10], x=x[0]),
                               rtol=0, atol=0)


class PaddedSets(nn.Module):
    """A user's set network that masks NaN padding but does not pool z-scoring over the trials."""

    nan_padded_trials = True

    def __init__(self):
        super().__init__()
        self.out = nn.Linear(2, 4)

    def forward(self, x):
        finite = torch.isfinite(x).all(-1, keepdim=True)
        return self.out(torch.where(finite, x, 0.0).sum(-2))


def test_a_padded_set_network_without_pooled_statistics_is_refused_when_no_set_is_complete():
    """Per-position statistics come from the sets without padding; with none, they were NaN and the posterior
    ignored x (it returned the prior), with a misleading 'constant dimensions' warning."""
    torch.manual_seed(0)
    theta = PRIOR.sample((200,))
    x = trials(theta, n=10)
    x[:, -1] = NAN  # every set has a padding trial
    with pytest.raises(ValueError, match=r"only 0 of the simulations have no padding trial .* zscore_axes = \(-2,\)"):
        NPE(PRIOR, transforms=1, hidden_features=(16,), embedding_net=PaddedSets()).fit(theta, x, max_epochs=1,
                                                                                        progress=False)


def test_no_embedding_flattens_structured_x_and_still_saves(tmp_path):
    torch.manual_seed(0)
    theta = PRIOR.sample((200,))
    x = series(theta, length=5)
    posterior = NPE(PRIOR, transforms=1, hidden_features=(16,), embedding_net=None).fit(theta, x, max_epochs=2,
                                                                                       progress=False)
    assert posterior.x_shape == (2, 5) and posterior.net.flow.context_features == 10
    posterior.save(tmp_path / "p.pt")
    torch.testing.assert_close(load(tmp_path / "p.pt").log_prob(theta[:5], x=x[0]), posterior.log_prob(theta[:5], x=x[0]))


def test_padded_sets_train_and_only_failed_sets_are_dropped():
    torch.manual_seed(0)
    theta = PRIOR.sample((300,))
    x = trials(theta)
    x[:4] = NAN  # four failed simulations (every trial NaN)
    x[4, 0, 1] = NAN  # NaN inside a trial: failed too
    npe = NPE(PRIOR, transforms=1, hidden_features=(16,), embedding_net=from_name("set", (12, 2), out_features=4))
    with pytest.warns(UserWarning, match="excluded 5 of 300 simulations"):
        posterior = npe.fit(theta, x, max_epochs=1, progress=False)
    assert len(npe.x) == 295
    # an observation with fewer trials is padded automatically, to the same result as explicit padding
    few = theta[10] + 0.3 * torch.randn(4, 2)
    explicit = torch.cat([few, torch.full((8, 2), NAN)])
    torch.testing.assert_close(posterior.log_prob(theta[:5], x=few), posterior.log_prob(theta[:5], x=explicit),
                               rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"sets of 13 trials, more than the 12"):
        posterior.sample(3, x=torch.zeros(13, 2))
    with pytest.raises(ValueError, match="no finite trial"):
        posterior.sample(3, x=torch.full((12, 2), NAN))


def test_sets_with_fewer_trials_than_any_training_set_are_named(tmp_path):
    """Trained on full sets only, a set network gave an observation of 3 of its 10 trials a posterior 3 prior sds
    off, in silence: padding made any smaller set look like one it was trained for."""
    torch.manual_seed(0)
    theta = PRIOR.sample((300,))
    full = theta[:, None, :] + 0.3 * torch.randn(300, 10, 2)
    for x, fewest in ((full, 10), (trials(theta, n=10), None)):
        posterior = NPE(PRIOR, transforms=1, hidden_features=(16,),
                        embedding_net=from_name("set", (10, 2), out_features=4)).fit(theta, x, max_epochs=1,
                                                                                      progress=False)
        if fewest is None:  # sets of 3 to 10 trials
            fewest = int(torch.isfinite(x).all(-1).sum(-1).min())
            assert fewest == 3
        posterior.save(tmp_path / "p.pt")
        for post in (posterior, load(tmp_path / "p.pt")):
            assert post.net.fewest_trials == fewest
            with pytest.warns(UserWarning, match=rf"1 of 1 x set\(s\) hold 2 trial\(s\), fewer than the {fewest} of "
                                                 "every training simulation"):
                post.sample(5, x=full[0, :2])
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                post.sample(5, x=full[0, :fewest])


def test_more_trials_narrow_the_posterior():
    """One set network for 1 to 40 trials: the posterior of theta given the trials' mean narrows with the count."""
    prior = Independent(Normal(torch.zeros(1), torch.ones(1)), 1)
    torch.manual_seed(0)
    theta = prior.sample((3000,))
    x = theta[:, None, :] + torch.randn(3000, 40, 1)
    counts = torch.randint(1, 41, (3000,))
    x[torch.arange(40)[None, :] >= counts[:, None]] = NAN
    embedding = from_name("set", (40, 1), out_features=8, hidden_features=(32, 32), trial_out_features=16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # 1-D MAF of affine layers
        posterior = NPE(prior, transforms=2, hidden_features=(32, 32), embedding_net=embedding).fit(
            theta, x, max_epochs=40, progress=False, seed=0)
    stds = [float(posterior.sample(2000, x=torch.full((n, 1), 0.5), seed=0).std()) for n in (1, 40)]
    exact = [(1 / (1 + n)) ** 0.5 for n in (1, 40)]  # 0.71 and 0.16
    assert 0.55 < stds[0] < 0.85 and 0.12 < stds[1] < 0.22, (stds, exact)  # measured 0.77 and 0.18 (sum pooling; mean: 0.68, 0.16)


def test_diagnostics_take_structured_batches():
    posterior = fitted("cnn1d", series, (2, 20), n=200)[1]
    test_theta = PRIOR.sample((100,))
    test_x = series(test_theta)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # few datasets / samples
        assert sbc(posterior, theta=test_theta, x=test_x, num_posterior_samples=20).ranks.shape == (100, 2)
        assert tarp(posterior, theta=test_theta, x=test_x, num_posterior_samples=20).ecp.ndim == 1
        result = expected_coverage(posterior, theta=test_theta, x=test_x, num_posterior_samples=20)
        assert result is not None
        sbc(posterior, PRIOR, series, num_datasets=50, num_posterior_samples=20)  # simulating structured x
    predictive = posterior_predictive(posterior, series, test_x[0], num_samples=200, metric="standardized")
    assert predictive.predictive.shape == (200, 2, 20)


def test_diagnostics_keep_padded_sets():
    posterior = fitted("set", trials, (12, 2), n=200)[1]
    test_theta = PRIOR.sample((110,))
    test_x = trials(test_theta)
    test_x[:3] = NAN
    with pytest.warns(UserWarning, match="sbc: excluded 3 of 110 simulations"):
        result = sbc(posterior, theta=test_theta, x=test_x, num_posterior_samples=100)
    assert result.ranks.shape == (107, 2)


def test_the_simulation_store_round_trips_structured_x(tmp_path):
    theta = PRIOR.sample((30,))
    result = simulate(lambda t: series(t), theta, batch_size=10, store=tmp_path / "sims.zarr", seed=1)
    assert result.x.shape == (30, 2, 20)
    loaded = load_simulations(tmp_path / "sims.zarr")
    assert loaded.x.shape == (30, 2, 20) and torch.equal(loaded.x, result.x) and torch.equal(loaded.theta, theta)
    padded = simulate(lambda t: trials(t), theta, batch_size=10, store=tmp_path / "sets.zarr", seed=1)
    again = load_simulations(tmp_path / "sets.zarr")
    assert again.x.shape == (30, 12, 2) and torch.equal(again.x.isnan(), padded.x.isnan())
    assert padded.num_invalid > 0  # strict by default: NaN anywhere
    padded.padded_trials = True  # the caller knows these are NaN-padded sets
    assert padded.num_invalid == 0 and padded.valid.all()


def test_a_format_3_file_without_x_shape_still_loads(tmp_path):
    """Files written before structured x (format <= 3) hold flat x and no x_shape: they load as before."""
    import json

    from sbiflows.serialization import _digest

    torch.manual_seed(0)
    theta = PRIOR.sample((200,))
    x = theta + 0.1 * torch.randn_like(theta)
    posterior = NPE(PRIOR, transforms=1, hidden_features=(8,)).fit(theta, x, max_epochs=1, progress=False)
    posterior.save(tmp_path / "p.pt")
    blob = torch.load(tmp_path / "p.pt", weights_only=True)
    config = json.loads(blob["config"])
    for key in ("x_shape", "x_stats_shape"):
        del config["posterior"][key]
    blob["config"] = json.dumps(config, sort_keys=True)
    blob["format_version"] = 3
    blob["sha256"] = _digest(blob["config"], blob["state_dict"], blob["prior_tensors"])
    torch.save(blob, tmp_path / "old.pt")
    old = load(tmp_path / "old.pt")
    assert old.x_shape == (2,)
    torch.testing.assert_close(old.log_prob(theta[:5], x=x[0]), posterior.log_prob(theta[:5], x=x[0]), rtol=0, atol=0)


def test_training_x_that_does_not_fit_the_embedding_is_refused_before_training():
    theta = PRIOR.sample((50,))
    npe = NPE(PRIOR, embedding_net=from_name("cnn1d", (2, 20)))
    with pytest.raises(ValueError, match=r"training x of shape \(N, 3, 20\).*CNN1d expects input of shape "
                                         r"\(B, 2, 20\), got \(2, 3, 20\)"):
        npe.fit(theta, torch.randn(50, 3, 20), max_epochs=1, progress=False)
    npe = NPE(PRIOR, embedding_net=from_name("set", (12, 2)))
    with pytest.raises(ValueError, match=r"\(N, trials, features\) for a set embedding.*got \(50, 24\)"):
        npe.fit(theta, torch.randn(50, 24), max_epochs=1, progress=False)
    assert npe.net is None  # nothing was trained


class _Locked(nn.Linear):
    """A module holding a lock: copy.deepcopy cannot copy it."""

    def __init__(self):
        super().__init__(20, 4)
        import threading
        self.lock = threading.Lock()

    def forward(self, x):
        return super().forward(x.flatten(1)[:, :20])


class _ExtraState(nn.Linear):
    def __init__(self):
        super().__init__(40, 4)

    def forward(self, x):
        return super().forward(x.flatten(1))

    def get_extra_state(self):
        return {"version": 1}

    def set_extra_state(self, state):
        pass


class _TwoArguments(nn.Module):
    def forward(self, x, y):
        return x


def test_an_embedding_the_fit_cannot_take_is_named_before_training():
    """Raw errors from deepcopy, from the first epoch's snapshot of a non-tensor extra state, and a TypeError of
    forward, none naming embedding_net."""
    theta = PRIOR.sample((50,))
    x = series(theta)
    for module, error, match in ((_Locked(), TypeError, "embedding_net must be a module that copy.deepcopy can copy"),
                                 (_ExtraState(), TypeError, r"state_dict must hold tensors only .* \['_extra_state'\]"),
                                 (_TwoArguments(), ValueError, "embedding_net failed on training x of shape")):
        with pytest.raises(error, match=match):
            NPE(PRIOR, embedding_net=module).fit(theta, x, max_epochs=1, progress=False)


def test_a_built_in_embedding_by_name_trains_as_the_module_would_and_members_start_apart():
    """Ensemble members deep-copied the one module they were given, so every member's embedding started from the
    same weights (the command line's --embedding with --ensemble 3). By name, each member's network is drawn from
    its own seed, and a single flow trains as it did from the module drawn from the fit's seed."""
    from sbiflows.embeddings import from_choice
    from sbiflows.ensemble import member_seed, members_of
    from sbiflows.seeding import global_seed

    torch.manual_seed(0)
    theta = PRIOR.sample((200,))
    x = trials(theta)
    options = dict(transforms=1, hidden_features=(16,), ensemble=1)
    by_module = NPE(PRIOR, embedding_net=from_choice("set", (12, 2), seed=3), **options).fit(
        theta, x, seed=3, max_epochs=2, progress=False)
    by_name = NPE(PRIOR, embedding_net="set", **options).fit(theta, x, seed=3, max_epochs=2, progress=False)
    for a, b in zip(by_module.net.state_dict().values(), by_name.net.state_dict().values()):
        assert torch.equal(a, b)
    assert by_name.config["embedding"] == "set"
    with pytest.warns(UserWarning, match="fewer"):  # 2 trials: fewer than any training set (3 to 12): padded sets
        by_name.sample(5, x=theta[0] + torch.zeros(2, 2))

    import sbiflows.npe_network as network

    built = []
    real = network.from_name

    def recording(name, x_shape, **kwargs):
        built.append(real(name, x_shape, **kwargs))
        return built[-1]

    network.from_name = recording
    try:
        two = NPE(PRIOR, embedding_net="mlp", transforms=1, hidden_features=(16,), ensemble=2).fit(
            theta, torch.nan_to_num(x), seed=5, max_epochs=1, progress=False)
    finally:
        network.from_name = real
    assert len(members_of(two.net)) == 2 and len(built) == 2
    first, second = (dict(net.named_parameters()) for net in built)
    assert not any(torch.equal(first[k], second[k]) for k in first if k.endswith("weight"))
    with global_seed(member_seed(5, 1)):
        expected = real("mlp", (12, 2))
    assert all(torch.equal(p, q) for p, q in zip(expected.parameters(), built[1].parameters()))
    with pytest.raises(ValueError, match=r"embedding_net must be an nn.Module, None or one of .*'set'.*got 'sets'"):
        NPE(PRIOR, embedding_net="sets")

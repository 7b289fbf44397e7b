"""Save/load: pickle-free, bit-identical round trips, priors, and every way a file can be wrong."""

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.distributions import (
    Independent,
    LogNormal,
    MultivariateNormal,
    Normal,
    TransformedDistribution,
    Uniform,
)
from torch.distributions.transforms import AffineTransform

import sbiflows
from sbiflows import NPE, load
from sbiflows.flows import maf
from sbiflows.serialization import FORMAT_VERSION, _digest

DATA = Path(__file__).parent / "data"
FIXTURE = DATA / "npe_posterior_format1.pt"
FAST = {"max_epochs": 3, "progress": False}


def fitted(prior, estimator="maf", **options):
    theta = prior.sample((300,)).reshape(300, -1)
    x = theta + 0.1 * torch.randn_like(theta)
    depth = {"transforms": 2} if isinstance(estimator, str) else {}  # a callable sets its own
    return NPE(prior, estimator, hidden_features=(16, 16), **depth, **options).fit(theta, x, **FAST), theta, x


@pytest.fixture
def box():
    return fitted(Independent(Uniform(-torch.ones(2), torch.ones(2)), 1))


def rewrite(path, **changes):
    """Load the raw blob, apply ``changes`` (a config dict replaces the JSON), keep the digest valid."""
    blob = torch.load(path, weights_only=True)
    if "config" in changes:
        changes["config"] = json.dumps(changes["config"], sort_keys=True)
    blob.update(changes)
    blob["sha256"] = _digest(blob["config"], blob["state_dict"], blob["prior_tensors"])
    torch.save(blob, path)


# ----------------------------------------------------------------------------------- round trips
ESTIMATOR_OPTIONS = [
    ("maf", {}), ("maf", {"transformer": "spline", "bins": 6}), ("realnvp", {}),
    ("realnvp", {"transformer": "spline", "bound": 4.0}), ("nsf", {}), ("nsf", {"bins": 5, "bound": 2.5}),
    ("nsf", {"mixing": "lu"}), ("realnvp", {"mixing": "lu"}),
]


def test_round_trip_keeps_the_bit_masks(tmp_path):
    """mixing="masks" with 4 parameters and 4 couplings: layers 3-4 differ from alternating masks, and load rebuilds them."""
    prior = Independent(Uniform(-torch.ones(4), torch.ones(4)), 1)
    theta = prior.sample((300,))
    x = theta + 0.1 * torch.randn_like(theta)
    posterior = NPE(prior, "nsf", mixing="masks", transforms=4, hidden_features=(16, 16)).fit(theta, x, **FAST)
    posterior.save(tmp_path / "post.pt")
    loaded = load(tmp_path / "post.pt")
    kept = [layer.identity_idx.tolist() for layer in loaded.net.flow.transform.transforms]
    assert kept == [layer.identity_idx.tolist() for layer in posterior.net.flow.transform.transforms]
    assert kept == [[0, 2], [1, 3], [0, 1], [2, 3]] and loaded.config["mixing"] == "masks"
    assert torch.equal(loaded.log_prob(theta, x=x[0]), posterior.log_prob(theta, x=x[0]))


@pytest.mark.parametrize("estimator,options", ESTIMATOR_OPTIONS)
def test_round_trip_is_bit_identical(tmp_path, estimator, options):
    posterior, theta, x = fitted(Independent(Uniform(-torch.ones(2), torch.ones(2)), 1), estimator, **options)
    path = tmp_path / "post.pt"
    before = {k: v.clone() for k, v in posterior.net.state_dict().items()}
    posterior.save(path)
    assert all(torch.equal(before[k], v) for k, v in posterior.net.state_dict().items())  # not mutated
    loaded = load(path)
    assert torch.equal(loaded.log_prob(theta, x=x[0]), posterior.log_prob(theta, x=x[0]))
    assert torch.equal(loaded.sample(100, x=x[1], seed=7), posterior.sample(100, x=x[1], seed=7))
    assert loaded.history.epochs == posterior.history.epochs == 3
    assert loaded.config == posterior.config
    assert type(loaded.net.flow.transform.transforms[0].transformer) is type(
        posterior.net.flow.transform.transforms[0].transformer
    )


@pytest.mark.parametrize("estimator,options", [("nsf", {}), ("maf", {"transformer": "spline"})])
def test_one_parameter_spline_posterior_round_trip(tmp_path, estimator, options):
    posterior, theta, x = fitted(Normal(torch.zeros(1), torch.ones(1)), estimator, **options)
    posterior.save(tmp_path / "post.pt")
    loaded = load(tmp_path / "post.pt")
    assert torch.equal(loaded.log_prob(theta, x=x[0]), posterior.log_prob(theta, x=x[0]))
    assert torch.equal(loaded.sample(20, x=x[1], seed=7), posterior.sample(20, x=x[1], seed=7))


def test_format_1_config_without_transformer_keys_loads_as_affine(tmp_path, box):
    """Files written before the transformer seam (format 1) have no transformer, bins or bound keys."""
    posterior, theta, x = box
    posterior.save(tmp_path / "p.pt")
    config = json.loads(torch.load(tmp_path / "p.pt", weights_only=True)["config"])
    for key in ("transformer", "bins", "bound"):
        del config["posterior"][key]
    rewrite(tmp_path / "p.pt", config=config, format_version=1)
    loaded = load(tmp_path / "p.pt")
    assert torch.equal(loaded.log_prob(theta, x=x[0]), posterior.log_prob(theta, x=x[0]))
    assert "transformer" not in loaded.config


def test_file_is_plain_tensors_and_json(tmp_path, box):
    posterior = box[0]
    posterior.save(tmp_path / "post.pt")
    blob = torch.load(tmp_path / "post.pt", weights_only=True, map_location="cpu")
    # the oldest layout that describes it (FORMAT_VERSION only for mixture weights), so older releases read it
    assert blob["format_version"] == 4 < FORMAT_VERSION and blob["sbiflows_version"] == sbiflows.__version__
    config = json.loads(blob["config"])
    assert config["prior"]["class"] == "Independent" and config["prior"]["base"]["class"] == "Uniform"
    assert config["dtype"] == "float32" and config["posterior"]["theta_dim"] == 2
    assert set(blob["state_dict"]) >= {"u_shift", "u_scale", "x_shift", "x_scale"}


@pytest.mark.parametrize(
    "prior",
    [MultivariateNormal(torch.zeros(2), torch.eye(2)), LogNormal(torch.zeros(2), torch.ones(2)), Normal(0.0, 1.0)],
    ids=["mvn", "lognormal", "scalar-normal"],
)
def test_standard_priors_are_rebuilt(tmp_path, prior):
    if prior.event_shape == () and prior.batch_shape == ():
        with pytest.warns(UserWarning, match="1-D theta"):
            posterior, theta, x = fitted(prior)
    else:
        posterior, theta, x = fitted(prior)
    posterior.save(tmp_path / "p.pt")
    loaded = load(tmp_path / "p.pt", map_location=torch.device("cpu"))
    assert type(loaded.prior) is type(prior)
    assert torch.equal(loaded.log_prob(theta, x=x[0]), posterior.log_prob(theta, x=x[0]))


class BoxUniform(Independent):
    """Like sbi's ``BoxUniform``: a subclass of ``Independent`` with its own constructor."""

    def __init__(self, low, high):
        super().__init__(Uniform(low, high), 1)


class ShiftedNormal(Normal):
    """A subclass that changes the distribution: it must not be saved as a plain ``Normal``."""

    def log_prob(self, value):
        return super().log_prob(value - 1.0)


def test_subclass_of_a_standard_prior_is_saved_as_its_base_class(tmp_path):
    posterior, theta, x = fitted(BoxUniform(-torch.ones(2), torch.ones(2)))
    posterior.save(tmp_path / "p.pt")
    config = json.loads(torch.load(tmp_path / "p.pt", weights_only=True)["config"])
    assert config["prior"]["class"] == "Independent" and config["prior"]["base"]["class"] == "Uniform"
    loaded = load(tmp_path / "p.pt")
    assert type(loaded.prior) is Independent and torch.equal(loaded.prior.base_dist.high, torch.ones(2))
    assert torch.equal(loaded.log_prob(theta, x=x[0]), posterior.log_prob(theta, x=x[0]))


def test_subclass_that_changes_the_distribution_must_be_passed_to_load(tmp_path):
    prior = ShiftedNormal(torch.zeros(2), torch.ones(2))
    posterior, theta, x = fitted(prior)
    with pytest.raises(ValueError, match=r"cannot save the ShiftedNormal prior.*allow_unsaved_prior=True"):
        posterior.save(tmp_path / "p.pt")  # refused, not dropped silently (issue 15.6)
    assert not (tmp_path / "p.pt").exists()
    posterior.save(tmp_path / "p.pt", allow_unsaved_prior=True)
    with pytest.raises(ValueError, match=r"ShiftedNormal prior.*load\(path, prior=...\)"):
        load(tmp_path / "p.pt")
    loaded = load(tmp_path / "p.pt", prior=prior)
    assert torch.equal(loaded.log_prob(theta, x=x[0]), posterior.log_prob(theta, x=x[0]))


def test_custom_prior_must_be_passed_to_load(tmp_path):
    prior = TransformedDistribution(Independent(Normal(torch.zeros(2), torch.ones(2)), 1), AffineTransform(1.0, 2.0))
    posterior, theta, x = fitted(prior)
    with pytest.raises(ValueError, match="cannot save the TransformedDistribution prior"):
        posterior.save(tmp_path / "p.pt")
    with pytest.raises(TypeError, match="allow_unsaved_prior must be True or False, got str 'yes'"):
        posterior.save(tmp_path / "p.pt", allow_unsaved_prior="yes")
    posterior.save(tmp_path / "p.pt", allow_unsaved_prior=True)
    with pytest.raises(ValueError, match="TransformedDistribution prior.*load\\(path, prior=...\\)"):
        load(tmp_path / "p.pt")
    loaded = load(tmp_path / "p.pt", prior=prior)
    assert torch.equal(loaded.log_prob(theta, x=x[0]), posterior.log_prob(theta, x=x[0]))
    with pytest.raises(ValueError, match="prior has 3 dimensions but the saved posterior has 2"):
        load(tmp_path / "p.pt", prior=MultivariateNormal(torch.zeros(3), torch.eye(3)))


def test_a_prior_passed_to_load_must_be_the_saved_one(tmp_path, box):
    posterior, theta, x = box
    posterior.save(tmp_path / "p.pt")
    same = load(tmp_path / "p.pt", prior=Independent(Uniform(-torch.ones(2), torch.ones(2)), 1))
    assert torch.equal(same.log_prob(theta, x=x[0]), posterior.log_prob(theta, x=x[0]))
    wider = Independent(Uniform(-5 * torch.ones(2), 5 * torch.ones(2)), 1)  # would move every draw and density
    with pytest.raises(ValueError, match=r"not the one .* was trained with .*\[-1\.0, -1\.0\].*leave prior out"):
        load(tmp_path / "p.pt", prior=wider)


def test_embedding_net_and_callable_estimator_must_be_passed(tmp_path):
    prior = Independent(Uniform(-torch.ones(2), torch.ones(2)), 1)
    factory = lambda f, c: maf(f, c, transforms=1, hidden_features=(8, 8))  # noqa: E731
    posterior, theta, x = fitted(prior, factory, embedding_net=nn.Linear(2, 3))
    posterior.save(tmp_path / "p.pt")
    with pytest.raises(ValueError, match="callable estimator.*load\\(path, estimator=...\\)"):
        load(tmp_path / "p.pt", embedding_net=nn.Linear(2, 3))
    with pytest.raises(ValueError, match="embedding_net.*load\\(path, embedding_net=...\\)"):
        load(tmp_path / "p.pt", estimator=factory)
    loaded = load(tmp_path / "p.pt", estimator=factory, embedding_net=nn.Linear(2, 3))
    assert torch.equal(loaded.log_prob(theta, x=x[0]), posterior.log_prob(theta, x=x[0]))
    with pytest.raises(ValueError, match="do(es)? not (match|fit)"):
        load(tmp_path / "p.pt", estimator=factory, embedding_net=nn.Linear(2, 4))


# ---------------------------------------------------------------------------------- bad files
@pytest.mark.parametrize(
    ("version", "got"),
    [(0, "int 0"), (-1, "int -1"), (True, "bool True"), (1.0, "float 1.0"), ("1", "str '1'"), (None, "NoneType None")],
)
def test_format_version_outside_the_supported_ints_is_refused(tmp_path, box, version, got):
    box[0].save(tmp_path / "p.pt")
    rewrite(tmp_path / "p.pt", format_version=version)
    with pytest.raises(ValueError, match=rf"format_version must be an int from 1 to {FORMAT_VERSION}, got {got}"):
        load(tmp_path / "p.pt")


def test_newer_format_is_refused(tmp_path, box):
    box[0].save(tmp_path / "p.pt")
    rewrite(tmp_path / "p.pt", format_version=FORMAT_VERSION + 1)
    with pytest.raises(ValueError, match=f"saved with format {FORMAT_VERSION + 1}.*reads <= {FORMAT_VERSION}"):
        load(tmp_path / "p.pt")


def test_missing_and_extra_keys_are_refused(tmp_path, box):
    box[0].save(tmp_path / "p.pt")
    blob = torch.load(tmp_path / "p.pt", weights_only=True)
    blob["extra"] = torch.zeros(1)
    del blob["prior_tensors"]
    torch.save(blob, tmp_path / "p.pt")
    with pytest.raises(ValueError, match=r"missing keys \['prior_tensors'\] and extra keys \['extra'\]"):
        load(tmp_path / "p.pt")


def test_digest_mismatch_is_refused(tmp_path, box):
    box[0].save(tmp_path / "p.pt")
    blob = torch.load(tmp_path / "p.pt", weights_only=True)
    blob["state_dict"]["x_shift"] += 1.0
    torch.save(blob, tmp_path / "p.pt")
    with pytest.raises(ValueError, match="SHA-256"):
        load(tmp_path / "p.pt")


def test_unknown_class_names_are_refused(tmp_path, box):
    path = tmp_path / "p.pt"
    box[0].save(path)
    config = json.loads(torch.load(path, weights_only=True)["config"])
    config["posterior"]["estimator"] = "os.system"
    rewrite(path, config=config)
    with pytest.raises(ValueError, match="unknown estimator 'os.system'"):
        load(path)
    config["posterior"]["estimator"] = "maf"
    config["prior"]["base"]["class"] = "builtins.eval"
    rewrite(path, config=config)
    with pytest.raises(ValueError, match="unknown prior class 'builtins.eval'"):
        load(path)


@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_activation_is_saved_and_rebuilt(tmp_path, activation):
    posterior, theta, x = fitted(Independent(Uniform(-torch.ones(2), torch.ones(2)), 1), activation=activation)
    assert posterior.config["activation"] == activation
    posterior.save(tmp_path / "post.pt")
    loaded = load(tmp_path / "post.pt")
    assert torch.equal(loaded.log_prob(theta, x=x[0]), posterior.log_prob(theta, x=x[0]))
    expected = nn.Tanh if activation == "tanh" else nn.ReLU
    assert any(isinstance(m, expected) for m in loaded.net.modules())


def test_history_fields_of_a_newer_version_are_ignored_with_a_warning(tmp_path, box):
    path = tmp_path / "p.pt"
    box[0].save(path)
    config = json.loads(torch.load(path, weights_only=True)["config"])
    config["history"]["warmup_epochs"] = 5
    rewrite(path, config=config)
    with pytest.warns(UserWarning, match=r"ignored the training-history fields \['warmup_epochs'\].*upgrade sbiflows"):
        loaded = load(path)
    assert loaded.history.epochs == box[0].history.epochs and not hasattr(loaded.history, "warmup_epochs")
    theta, x = box[1], box[2]
    assert torch.equal(loaded.log_prob(theta, x=x[0]), box[0].log_prob(theta, x=x[0]))


def test_history_of_an_older_version_without_ema_epochs_loads_as_unaveraged(tmp_path, box, recwarn):
    path = tmp_path / "p.pt"
    box[0].save(path)
    config = json.loads(torch.load(path, weights_only=True)["config"])
    assert config["history"].pop("ema_epochs") == 1.0
    rewrite(path, config=config)
    loaded = load(path)
    assert loaded.history.ema_epochs == 0.0 and loaded.history.epochs == box[0].history.epochs
    assert not [w for w in recwarn if "history" in str(w.message)]


def test_the_epochs_of_step_drops_are_saved_and_older_files_load_without_them(tmp_path, box):
    theta, x = box[1], box[2]
    posterior = NPE(box[0].prior, transforms=1, hidden_features=(8,)).fit(
        theta, x, max_epochs=30, learning_rate=0.05, patience=1, step_drops=2, progress=False)
    assert len(posterior.history.step_drop_epochs) == 2  # a large step and patience 1 plateau quickly
    posterior.save(tmp_path / "p.pt")
    assert load(tmp_path / "p.pt").history.step_drop_epochs == posterior.history.step_drop_epochs
    config = json.loads(torch.load(tmp_path / "p.pt", weights_only=True)["config"])
    config["history"].pop("step_drop_epochs")
    rewrite(tmp_path / "p.pt", config=config)
    assert load(tmp_path / "p.pt").history.step_drop_epochs == []


def test_pickled_objects_are_never_unpickled(tmp_path):
    torch.save({"format_version": 1, "payload": object()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="not a readable sbiflows posterior file"):
        load(tmp_path / "evil.pt")


# ------------------------------------------------------------------------- forward compatibility
def test_fixture_from_format_1_still_loads():
    """``tests/data/npe_posterior_format1.pt`` was saved by sbiflows 0.1.0; future versions must read it."""
    expected = json.loads((DATA / "npe_posterior_format1.json").read_text())
    assert torch.load(FIXTURE, weights_only=True)["format_version"] == 1 < FORMAT_VERSION
    posterior = load(FIXTURE)
    assert "transformer" not in posterior.config  # written before the seam: an affine MAF
    assert type(posterior.net.flow.transform.transforms[0].transformer).__name__ == "Affine"
    theta, x = torch.tensor(expected["theta"]), torch.tensor(expected["x"])
    torch.testing.assert_close(posterior.log_prob(theta, x=x), torch.tensor(expected["log_prob"]), atol=1e-5, rtol=1e-5)
    assert posterior.sample(3, x=x, seed=0).shape == (3, 2)


def make_fixture() -> None:  # pragma: no cover - run by hand: python tests/test_serialization.py
    torch.manual_seed(0)
    posterior, theta, x = fitted(Independent(Uniform(-torch.ones(2), torch.ones(2)), 1))
    DATA.mkdir(exist_ok=True)
    posterior.save(FIXTURE)
    probe = theta[:5]
    expected = {"theta": probe.tolist(), "x": x[0].tolist(), "log_prob": posterior.log_prob(probe, x=x[0]).tolist()}
    (DATA / "npe_posterior_format1.json").write_text(json.dumps(expected, indent=1))


if __name__ == "__main__":  # pragma: no cover
    make_fixture()


def test_an_interrupted_save_leaves_the_previous_file_intact(tmp_path, monkeypatch, box):
    """Issue 14.6: save() wrote in place, so a Ctrl-C during it destroyed the previous good file."""
    posterior = box[0]
    path = tmp_path / "post.pt"
    posterior.save(path)
    before = path.read_bytes()

    def interrupted(blob, target):
        Path(target).write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        posterior.save(path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["post.pt"]
    monkeypatch.undo()
    assert load(path).sample(3, x=torch.zeros(2)).shape == (3, 2)


def test_default_x_round_trip_and_use(box, tmp_path):
    post, theta, x = box
    x_o = torch.tensor([0.3, -0.2])
    post.set_default_x(x_o)
    assert torch.equal(post.sample(50, seed=1), post.sample(50, x_o, seed=1))
    assert torch.equal(post.log_prob(theta[:4]), post.log_prob(theta[:4], x_o))
    post.save(tmp_path / "p.pt")
    loaded = load(tmp_path / "p.pt")
    assert torch.equal(loaded.default_x, x_o)
    assert torch.equal(loaded.sample(50, seed=1), post.sample(50, seed=1))
    assert torch.equal(loaded.map(num_iter=2), post.map(x_o, num_iter=2))
    post.set_default_x(None)  # cleared: x is required again, and the file has no default
    with pytest.raises(ValueError, match="x is required.*no default_x"):
        post.sample(5)
    post.save(tmp_path / "q.pt")
    assert load(tmp_path / "q.pt").default_x is None
    assert "default_x" not in json.loads(torch.load(tmp_path / "q.pt", weights_only=True)["config"])


def test_default_x_is_checked(box):
    post, _, _ = box
    with pytest.raises(ValueError, match=r"shape \(2,\) or \(1, 2\)"):
        post.set_default_x(torch.zeros(3))
    with pytest.raises(ValueError, match="NaN"):
        post.set_default_x(torch.tensor([float("nan"), 0.0]))

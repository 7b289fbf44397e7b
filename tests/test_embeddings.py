"""The built-in embedding networks on their own: shapes, errors, permutation invariance, masking, registry."""

import pytest
import torch
from torch import nn

from sbiflows.embeddings import (
    AUTO_VALUES_PER_PARAMETER,
    EMBEDDINGS,
    MLP,
    CNN1d,
    CNN2d,
    Linear,
    PermutationInvariant,
    auto_embedding,
    auto_features,
    build,
    embedding_config,
    from_choice,
    from_name,
)
from sbiflows.xshape import check_observations, valid_rows, zscore_shaped

NAN = float("nan")

# (name, x_shape, input batch shape) for every accepted input form
CASES = [
    ("mlp", (7,), (5, 7)),
    ("mlp", (3, 4), (5, 3, 4)),
    ("linear", (7,), (5, 7)),
    ("linear", (3, 4), (5, 3, 4)),
    ("cnn1d", (2, 30), (5, 2, 30)),
    ("cnn1d", (30,), (5, 30)),
    ("cnn2d", (3, 12, 10), (5, 3, 12, 10)),
    ("cnn2d", (12, 10), (5, 12, 10)),
    ("set", (20, 3), (5, 20, 3)),
]


@pytest.mark.parametrize(("name", "x_shape", "batch"), CASES)
def test_every_embedding_maps_a_batch_to_out_features(name, x_shape, batch):
    torch.manual_seed(0)
    net = from_name(name, x_shape, out_features=6)
    out = net(torch.randn(batch))
    assert out.shape == (batch[0], 6)
    assert torch.isfinite(out).all()
    assert type(net) is EMBEDDINGS[name]


@pytest.mark.parametrize(
    ("net", "bad", "expected"),
    [
        (MLP(7), (5, 8), r"\(B, 7\).*got \(5, 8\)"),
        (Linear(7, out_features=2), (5, 8), r"Linear expects .*\(B, 7\).*got \(5, 8\)"),
        (CNN1d(2, 30), (5, 3, 30), r"\(B, 2, 30\).*got \(5, 3, 30\)"),
        (CNN1d(2, 30), (5, 30), r"\(B, 2, 30\).*got \(5, 30\)"),
        (CNN2d(1, 8, 8), (5, 8, 9), r"\(B, 1, 8, 8\) or \(B, 8, 8\).*got \(5, 8, 9\)"),
        (PermutationInvariant(3), (5, 20, 2), r"\(B, trials, 3\).*got \(5, 20, 2\)"),
    ],
)
def test_a_wrong_input_shape_names_expected_and_received(net, bad, expected):
    with pytest.raises(ValueError, match=expected):
        net(torch.zeros(bad))


def test_from_name_refuses_shapes_the_embedding_does_not_take():
    with pytest.raises(ValueError, match=r"'set' takes x of shape \(trials, features\).*got x_shape \(10,\)"):
        from_name("set", (10,))
    with pytest.raises(ValueError, match=r"'cnn2d' takes .*got x_shape \(10,\)"):
        from_name("cnn2d", (10,))
    with pytest.raises(ValueError, match="embedding must be one of"):
        from_name("transformer", (10,))


@pytest.mark.parametrize("pooling", ["mean", "sum"])
def test_permutation_invariant_ignores_the_order_of_trials(pooling):
    torch.manual_seed(1)
    net = PermutationInvariant(3, out_features=5, pooling=pooling).double()
    x = torch.randn(8, 25, 3, dtype=torch.float64)
    out = net(x)
    for _ in range(3):
        shuffled = x[:, torch.randperm(25)]
        torch.testing.assert_close(net(shuffled), out, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(net(x[:, :24]), out)  # dropping a trial does change it


@pytest.mark.parametrize("pooling", ["mean", "sum"])
def test_nan_padded_trials_have_no_effect_wherever_they_are(pooling):
    torch.manual_seed(2)
    net = PermutationInvariant(2, out_features=4, pooling=pooling).double()
    x = torch.randn(6, 7, 2, dtype=torch.float64)
    padded = torch.full((6, 30, 2), NAN, dtype=torch.float64)
    positions = torch.stack([torch.randperm(30)[:7] for _ in range(6)])  # real trials at random positions
    padded[torch.arange(6)[:, None], positions] = x
    torch.testing.assert_close(net(padded), net(x), rtol=1e-12, atol=1e-12)
    # the padding's size is irrelevant, and the gradient w.r.t. the real trials is finite
    x.requires_grad_(True)
    net(torch.cat([x, torch.full((6, 3, 2), NAN, dtype=torch.float64)], 1)).sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("pooling", ["mean", "sum"])
def test_pooling_sees_the_number_of_trials(pooling):
    torch.manual_seed(3)
    net = PermutationInvariant(1, out_features=3, pooling=pooling).double()
    x = torch.randn(4, 5, 1, dtype=torch.float64)
    doubled = torch.cat([x, x], 1)  # same trial mean, twice the trials
    assert not torch.allclose(net(doubled), net(x))


@pytest.mark.parametrize(("name", "x_shape", "batch"), CASES)
def test_a_built_in_rebuilds_from_its_name_and_config(name, x_shape, batch):
    torch.manual_seed(4)
    net = from_name(name, x_shape, out_features=3)
    described = embedding_config(net)
    assert described["embedding"] == name
    rebuilt = build(described["embedding"], described["embedding_config"])
    rebuilt.load_state_dict(net.state_dict())
    x = torch.randn(batch)
    torch.testing.assert_close(rebuilt(x), net(x))


def test_embedding_config_of_other_modules():
    class Mine(MLP):
        pass

    assert embedding_config(None) == {"embedding": "none"}
    assert embedding_config(nn.Identity()) == embedding_config(nn.Flatten()) == {"embedding": "none"}
    assert embedding_config(nn.Flatten(start_dim=2)) == {"embedding": "custom"}
    assert embedding_config(nn.Linear(2, 3)) == {"embedding": "custom"}
    assert embedding_config(Mine(3)) == {"embedding": "custom"}  # a subclass may have other code
    with pytest.raises(ValueError, match="unknown embedding 'lstm'"):
        build("lstm", {})
    with pytest.raises(ValueError, match="cannot rebuild embedding 'mlp'"):
        build("mlp", {"out_features": 3})


def test_sum_pooling_is_the_default():
    assert PermutationInvariant(2).config["pooling"] == "sum"


def test_constructor_arguments_are_checked():
    with pytest.raises(ValueError, match="out_features must be an int >= 1, got 0"):
        MLP(3, out_features=0)
    with pytest.raises(TypeError, match="in_channels"):
        CNN1d(1.5, 10)
    with pytest.raises(ValueError, match="pooling must be one of 'mean', 'sum', got 'max'"):
        PermutationInvariant(2, pooling="max")


def test_valid_rows_keeps_padded_sets_and_drops_failed_ones():
    x = torch.randn(5, 4, 2)
    x[1, 2:] = NAN  # padded: valid
    x[2] = NAN  # every trial NaN: failed
    x[3, 0, 0] = NAN  # NaN inside a trial: failed
    x[4, 1, 1] = torch.inf  # inf: failed
    assert valid_rows(x, padded_trials=True).tolist() == [True, True, False, False, False]
    assert valid_rows(x).tolist() == [True, False, False, False, False]


def test_zscore_per_channel_and_per_trial_feature():
    x = torch.randn(200, 2, 50, dtype=torch.float64) * torch.tensor([[1.0], [100.0]], dtype=torch.float64)
    mean, std, _ = zscore_shaped(x, axes=(-1,))
    assert mean.shape == std.shape == (2, 1)
    assert 0.9 < std[0, 0] < 1.1 and 90 < std[1, 0] < 110
    sets = torch.randn(300, 10, 2, dtype=torch.float64) + torch.tensor([5.0, -5.0], dtype=torch.float64)
    sets[:, 5:] = NAN  # padding is left out of the statistics
    mean, std, _ = zscore_shaped(sets, axes=(-2,), padded_trials=True)
    assert mean.shape == (1, 2) and torch.isfinite(mean).all() and (mean - torch.tensor([5.0, -5.0])).abs().max() < 0.1


def test_check_observations_pads_small_sets_and_refuses_large_ones():
    out = check_observations(torch.ones(2, 3, 2), (5, 2), "xs", padded_trials=True)
    assert out.shape == (2, 5, 2) and torch.isnan(out[:, 3:]).all() and (out[:, :3] == 1).all()
    with pytest.raises(ValueError, match="sets of 6 trials, more than the 5"):
        check_observations(torch.ones(6, 2), (5, 2), "x", padded_trials=True, single=True)
    with pytest.raises(ValueError, match=r"xs must have shape \(B, 2, 30\).*got \(4, 3, 30\)"):
        check_observations(torch.ones(4, 3, 30), (2, 30), "xs")


def test_auto_embedding_is_a_linear_summary_of_two_values_per_parameter_for_long_x():
    limit = AUTO_VALUES_PER_PARAMETER
    assert auto_embedding((limit * 3,), 3) is None  # at the limit: x goes to the flow as it is
    assert auto_features((limit * 3,), 3) is None and auto_features((limit * 3 + 1,), 3) == 6
    net = auto_embedding((limit * 3 + 1,), 3)
    assert type(net) is Linear and net.config == {"in_features": limit * 3 + 1, "out_features": 6}
    structured = auto_embedding((4, 5), 2)  # 20 values for 2 parameters, counted flattened
    assert structured.config == {"in_features": 20, "out_features": 4}
    assert structured(torch.randn(6, 4, 5)).shape == (6, 4)
    assert auto_embedding((2,), 2) is None


def test_from_choice_maps_command_line_names_and_draws_a_named_embedding_from_the_seed():
    assert from_choice("none", (30,), seed=0) is None
    assert from_choice("auto", (30,), seed=0) == "auto"
    assert type(from_choice("linear", (30,), seed=0)) is Linear
    assert from_choice("linear", (30,), seed=0).out_features == 20
    state = torch.get_rng_state()
    first, again, other = (from_choice("cnn1d", (2, 16), seed=seed) for seed in (3, 3, 4))
    assert torch.equal(torch.get_rng_state(), state)  # the global generator is left as it was
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values()))
    assert not all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), other.state_dict().values()))

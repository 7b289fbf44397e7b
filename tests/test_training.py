"""train(): option validation, batch-size lowering, weight averaging, and a history extended over several calls."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from sbiflows.training import (
    TrainingHistory,
    check_training_options,
    default_batch_size,
    default_learning_rate,
    negative_log_likelihood,
    split_sizes,
    train,
)


class Gaussian(nn.Module):
    """``N(loc, I)`` with a learnable ``loc``; counts its ``log_prob`` calls in training mode."""

    def __init__(self, features: int = 2):
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(features))
        self.training_calls = 0

    def log_prob(self, inputs, context=None):
        self.training_calls += self.training
        return torch.distributions.Normal(self.loc, 1.0).log_prob(inputs).sum(-1)


class Constant(nn.Module):
    """A model whose loss does not depend on its parameter: the validation loss never improves."""

    def __init__(self):
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(()))

    def log_prob(self, inputs, context=None):
        return -(inputs**2).sum(-1) + 0.0 * self.unused


def data(n: int = 200) -> torch.Tensor:
    return 3.0 + torch.randn(n, 2, generator=torch.Generator().manual_seed(0))


# ------------------------------------------------------------------------------------ options
@pytest.mark.parametrize(
    ("option", "value", "match"),
    [
        ("batch_size", 0, r"batch_size must be an int >= 1, got 0"),
        ("batch_size", -5, r"batch_size must be an int >= 1, got -5"),
        ("max_epochs", 0, r"max_epochs must be an int >= 1, got 0"),
        ("patience", 0, r"patience must be an int >= 1, got 0"),
        ("learning_rate", 0.0, r"learning_rate must be finite and > 0, got 0.0"),
        ("learning_rate", -1e-3, r"learning_rate must be finite and > 0, got -0.001"),
        ("learning_rate", math.nan, r"learning_rate must be finite and > 0, got nan"),
        ("clip_grad_norm", 0.0, r"clip_grad_norm must be > 0, got 0.0"),
        ("clip_grad_norm", -1.0, r"clip_grad_norm must be > 0, got -1.0"),
        ("validation_fraction", 1.0, r"validation_fraction must be in \(0, 1\), got 1.0"),
        ("validation_fraction", 0, r"validation_fraction must be in \(0, 1\), got 0"),
        ("weight_decay", -0.1, r"weight_decay must be finite and >= 0, got -0.1"),
        ("ema_epochs", -1.0, r"ema_epochs must be finite and >= 0, got -1.0"),
        ("ema_epochs", math.inf, r"ema_epochs must be finite and >= 0, got inf"),
        ("step_drops", -1, r"step_drops must be an int >= 0, got -1"),
        ("step_drop_factor", 1.0, r"step_drop_factor must be in \(0, 1\), got 1.0"),
        ("step_drop_factor", 0.0, r"step_drop_factor must be in \(0, 1\), got 0.0"),
        ("drop_patience", 0, r"drop_patience must be None \(patience\) or an int >= 1, got 0"),
        ("drop_batch_factor", 0.5, r"drop_batch_factor must be finite and >= 1, got 0.5"),
        ("drop_batch_factor", math.inf, r"drop_batch_factor must be finite and >= 1, got inf"),
    ],
)
def test_options_out_of_range_raise_value_error_naming_them(option, value, match):
    model = Gaussian()
    before = model.loc.detach().clone()
    with pytest.raises(ValueError, match=match):
        train(model, data(), **{option: value})
    assert torch.equal(model.loc.detach(), before)  # rejected before any training step


@pytest.mark.parametrize(
    ("option", "value", "match"),
    [
        ("batch_size", 2.5, r"batch_size must be an int >= 1, got float 2.5"),
        ("batch_size", True, r"batch_size must be an int >= 1, got bool True"),
        ("max_epochs", "10", r"max_epochs must be an int >= 1, got str '10'"),
        ("learning_rate", "0.1", r"learning_rate must be a real number finite and > 0, got str '0.1'"),
        ("clip_grad_norm", None, r"clip_grad_norm must be a real number > 0, got NoneType None"),
        ("ema_epochs", True, r"ema_epochs must be a real number finite and >= 0, got bool True"),
        ("ema_epochs", "1", r"ema_epochs must be a real number finite and >= 0, got str '1'"),
        ("step_drops", 1.5, r"step_drops must be an int >= 0, got float 1.5"),
        ("step_drop_factor", "0.5", r"step_drop_factor must be a real number in \(0, 1\), got str '0.5'"),
        ("drop_patience", 2.0, r"drop_patience must be None \(patience\) or an int >= 1, got float 2.0"),
    ],
)
def test_options_of_the_wrong_type_raise_type_error(option, value, match):
    with pytest.raises(TypeError, match=match):
        train(Gaussian(), data(), **{option: value})


def test_numpy_integers_are_accepted_and_converted():
    options = check_training_options(
        max_epochs=np.int64(3), batch_size=np.int32(16), learning_rate=np.float32(1e-2),
        validation_fraction=0.2, patience=np.int64(2), clip_grad_norm=math.inf,
    )
    assert options == (3, 16, 2) and all(type(v) is int for v in options)
    assert train(Gaussian(), data(), max_epochs=np.int64(2), batch_size=np.int64(50)).epochs == 2


def test_optional_options_accept_none_and_say_so_in_their_errors():
    common = {"max_epochs": 3, "validation_fraction": 0.2, "patience": 2, "clip_grad_norm": 5.0}
    optional = ("batch_size", "learning_rate")
    assert check_training_options(batch_size=None, learning_rate=None, optional=optional, **common) == (3, None, 2)
    with pytest.raises(TypeError, match=r"batch_size must be an int >= 1, got NoneType None"):
        check_training_options(batch_size=None, learning_rate=1e-3, **common)
    with pytest.raises(ValueError, match=r"learning_rate must be None \(the default rule\) or finite and > 0, got 0.0"):
        check_training_options(batch_size=8, learning_rate=0.0, optional=optional, **common)
    with pytest.raises(TypeError, match=r"learning_rate must be None \(the default rule\) or a real number finite"):
        check_training_options(batch_size=8, learning_rate="fast", optional=optional, **common)


def test_batch_size_larger_than_the_training_rows_is_lowered_to_one_full_batch():
    model = Gaussian()
    history = train(model, data(20), max_epochs=3, batch_size=1000, validation_fraction=0.1)
    assert history.epochs == 3
    assert model.training_calls == 3  # one batch of all 18 training rows per epoch
    model = Gaussian()
    train(model, data(20), max_epochs=3, batch_size=5, validation_fraction=0.1)
    assert model.training_calls == 3 * 4  # 18 rows in batches of 5: 4 per epoch


def test_history_records_the_batch_size_used_and_the_learning_rate():
    history = train(Gaussian(), data(20), max_epochs=1, batch_size=1000, learning_rate=2e-3)
    assert (history.batch_size, history.learning_rate, history.ema_epochs) == (18, 2e-3, 1.0)
    assert train(Gaussian(), data(20), max_epochs=1, ema_epochs=0).ema_epochs == 0.0


@pytest.mark.parametrize(
    ("n_train", "batch"), [(1, 32), (256, 32), (900, 60), (9000, 190), (16_384, 256), (10**6, 256)]
)
def test_default_batch_size_grows_as_the_square_root_within_bounds(n_train, batch):
    assert default_batch_size(n_train) == batch


def test_default_learning_rate_is_2e_3_over_the_default_batch_range():
    rates = [default_learning_rate(default_batch_size(n)) for n in (10, 900, 9000, 100_000)]
    assert rates == pytest.approx([2e-3] * 4)


def test_split_sizes_match_the_split_train_makes():
    assert split_sizes(1000, 0.1) == (900, 100)
    assert split_sizes(2, 0.01) == (1, 1)
    model = Gaussian()
    train(model, data(20), max_epochs=1, batch_size=1, validation_fraction=0.1)
    assert model.training_calls == split_sizes(20, 0.1)[0]  # one call per training row


# ------------------------------------------------------------------------------------ history
def test_best_epoch_counts_over_all_calls_and_matches_the_validation_losses():
    history = train(Constant(), data(), max_epochs=50, patience=2)
    # epoch 0 is the best; epochs 1 and 2 do not improve on it
    assert (history.epochs, history.best_epoch, history.stopped_early) == (3, 0, True)
    history = train(Constant(), data(), max_epochs=2, patience=10, history=history)
    assert history.epochs == 5 and len(history.validation_loss) == len(history.train_loss) == 5
    assert history.best_epoch == 3  # the first epoch of the second call, numbered from the first call
    assert history.validation_loss[history.best_epoch] == history.best_validation_loss
    assert history.stopped_early is False  # reset: the second call ran all its epochs


def test_improving_model_best_epoch_is_the_last_global_epoch():
    model = Gaussian()
    history = train(model, data(), max_epochs=4, learning_rate=0.1)
    history = train(model, data(), max_epochs=3, learning_rate=0.1, history=history, seed=1)
    assert history.epochs == 7 and history.best_epoch == 6
    assert history.validation_loss[6] == history.best_validation_loss


def test_per_call_flags_are_reset_at_the_start_of_each_call():
    stale = TrainingHistory(stopped_early=True, diverged=True)
    history = train(Gaussian(), data(), max_epochs=2, history=stale)
    assert history is stale  # extended in place
    assert history.stopped_early is False and history.diverged is False
    assert history.epochs == 2 and history.best_epoch in (0, 1)


def test_adam_is_fused_where_torch_has_the_kernel_and_falls_back_to_foreach(monkeypatch):
    from sbiflows import training

    params = [nn.Parameter(torch.zeros(3))]
    assert training._adam(params, learning_rate=1e-3, weight_decay=0.0).defaults["fused"] is True

    real_adam = torch.optim.Adam

    def adam_without_fused_kernel(params, **options):
        if options.get("fused"):
            raise RuntimeError("`fused=True` requires all the params to be on a supported device")
        return real_adam(params, **options)

    monkeypatch.setattr(torch.optim, "Adam", adam_without_fused_kernel)
    optimizer = training._adam(params, learning_rate=1e-3, weight_decay=0.0)
    assert optimizer.defaults["foreach"] is True and not optimizer.defaults["fused"]
    model = Gaussian()
    train(model, torch.randn(200, 2) + 3.0, max_epochs=30, batch_size=50, learning_rate=0.1)
    assert torch.allclose(model.loc, torch.full((2,), 3.0), atol=0.5), "training with the fallback optimizer learns"


# ------------------------------------------------------------------------------------ weight averaging
def test_weight_average_starts_with_a_copy_and_grows_its_window_to_the_time_constant():
    from sbiflows.training import WeightAverage

    model = Gaussian(1)
    average = WeightAverage(model, steps=4.0)  # decay 1 - 1/4
    expected = None
    for n in range(40):
        value = float((-1) ** n * n)
        model.loc.data.fill_(value)
        average.update()
        decay = min(0.75, (1 + n) / (10 + n))  # before update n (from 0), n updates were averaged
        expected = value if n == 0 else decay * expected + (1 - decay) * value
        assert average.module.loc.item() == pytest.approx(expected, rel=1e-6)
    assert (1 + 39) / (10 + 39) > 0.75  # the last updates used the full time constant
    assert torch.equal(model.loc.detach(), torch.tensor([-39.0]))  # the model itself is untouched


def test_weight_average_refuses_bad_input_naming_it():
    from sbiflows.training import WeightAverage

    with pytest.raises(TypeError, match=r"model must be a torch.nn.Module, got list"):
        WeightAverage([], steps=4)
    with pytest.raises(TypeError, match=r"steps must be a real number finite and > 0, got str '4'"):
        WeightAverage(Gaussian(), steps="4")
    for steps in (0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match=r"steps must be finite and > 0, got"):
            WeightAverage(Gaussian(), steps=steps)


def validation_rows(x: torch.Tensor, seed: int, fraction: float = 0.1) -> torch.Tensor:
    """The validation split train() makes for ``seed``."""
    n_train = split_sizes(len(x), fraction)[0]
    return x[torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[n_train:]]


def test_train_keeps_the_averaged_weights_it_validated_and_they_are_closer_to_the_optimum():
    x = data(2000)
    optimum = x.mean(0)  # the maximum-likelihood loc
    errors = {1.0: [], 0.0: []}
    for seed in range(5):
        for ema_epochs in (1.0, 0.0):
            model = Gaussian()
            # a step size this large makes the Adam iterates jump around the optimum
            history = train(model, x, max_epochs=10, batch_size=10, learning_rate=0.3, patience=100,
                            validation_fraction=0.5, ema_epochs=ema_epochs, seed=seed)
            with torch.no_grad():
                kept = -model.log_prob(validation_rows(x, seed, 0.5)).mean().item()
            assert kept == pytest.approx(history.best_validation_loss, rel=1e-6)
            assert history.validation_loss[history.best_epoch] == history.best_validation_loss
            errors[ema_epochs].append((model.loc.detach() - optimum).norm().item())
    # measured: 0.006-0.033 averaged against 0.06-0.16 raw (seeds 0-4; sums 0.094 and 0.578)
    assert all(a < r for a, r in zip(errors[1.0], errors[0.0])), errors
    assert sum(errors[1.0]) < 0.4 * sum(errors[0.0]), errors


# ------------------------------------------------------------------------------------ step drops
def noisy_fit(x, seed, **options):
    """A Gaussian fitted with a step so large that Adam's raw iterates jump around the optimum."""
    model = Gaussian()
    history = train(model, x, max_epochs=200, batch_size=10, learning_rate=0.3, validation_fraction=0.5,
                    ema_epochs=0.0, seed=seed, **options)
    return model, history


def test_a_plateau_drops_the_step_and_training_goes_on_from_the_best_weights():
    x = data(1000)
    _, plain = noisy_fit(x, 0, patience=3)
    _, dropped = noisy_fit(x, 0, patience=3, step_drops=1, step_drop_factor=1e-9)
    (drop,) = dropped.step_drop_epochs
    # up to the plateau both runs are the same run; the plain one stops there
    assert drop == plain.epochs - 1 and plain.step_drop_epochs == [] and plain.stopped_early
    assert dropped.validation_loss[: drop + 1] == plain.validation_loss
    # a step of 3e-10 leaves the restored best weights where they are: every later epoch scores as the best did
    best_before = min(plain.validation_loss)
    assert dropped.validation_loss[drop + 1:] == pytest.approx([best_before] * (dropped.epochs - drop - 1), rel=1e-6)
    assert dropped.epochs == drop + 1 + 3 and dropped.stopped_early  # patience counts afresh after the drop
    # a drop that finds nothing better within drop_patience epochs ends training: the same run up to the drop,
    # then 1 epoch
    _, short = noisy_fit(x, 0, patience=3, step_drops=1, step_drop_factor=1e-9, drop_patience=1)
    assert short.step_drop_epochs == [drop] and short.validation_loss == dropped.validation_loss[: drop + 2]
    assert short.stopped_early


@pytest.mark.parametrize("ema_epochs", [0.0, 1.0])
def test_a_drop_with_a_batch_factor_goes_on_from_the_best_weights_with_larger_batches(ema_epochs):
    """``drop_batch_factor``: the same run up to the drop, then batches 2.5 times as large (rounded, capped at the
    training rows), fewer steps per epoch; 1 (the default) leaves the batch as it is."""
    x = data(1000)
    sizes = []

    def recorded(model, inputs, context, rows):  # the rows of each training step (validation runs in eval mode)
        if model.training:
            sizes.append(len(rows))
        return negative_log_likelihood(model, inputs, context, rows)

    options = dict(max_epochs=200, batch_size=10, learning_rate=0.3, validation_fraction=0.5, ema_epochs=ema_epochs,
                   patience=3, step_drops=2, step_drop_factor=0.5, objective=recorded)
    plain = train(Gaussian(), x, **options)
    plain_sizes, sizes[:] = sizes[:], []
    grown = train(Gaussian(), x, drop_batch_factor=2.5, **options)
    first, second = grown.step_drop_epochs
    assert first == plain.step_drop_epochs[0]
    assert grown.validation_loss[: first + 1] == plain.validation_loss[: first + 1]
    batches = [10] * (first + 1) + [25] * (second - first) + [62] * (grown.epochs - second - 1)  # round(62.5): 62
    assert sizes == [size for b in batches for size in [b] * (500 // b) + [500 % b] * (500 % b > 0)]  # 500 rows
    assert set(plain_sizes) == {10} and grown.batch_size == 10  # history keeps the first batch size
    capped = train(Gaussian(), x, drop_batch_factor=100.0, **options)  # one batch of all 500 training rows after it
    assert capped.step_drop_epochs and sizes[-1] == 500

def test_a_drop_that_improves_within_drop_patience_keeps_the_full_patience():
    x = data(1000)
    outcomes = []
    for seed in range(4):
        _, full = noisy_fit(x, seed, patience=3, step_drops=1, step_drop_factor=0.1)
        _, trial = noisy_fit(x, seed, patience=3, step_drops=1, step_drop_factor=0.1, drop_patience=1)
        (drop,) = full.step_drop_epochs
        improved = full.validation_loss[drop + 1] < min(full.validation_loss[: drop + 1])
        # improved in its first epoch: patience 3 applies again and the runs are the same run; otherwise the
        # trial run stops one epoch after the drop
        expected = full.validation_loss if improved else full.validation_loss[: drop + 2]
        assert trial.validation_loss == expected, seed
        outcomes.append(improved)
    assert True in outcomes and False in outcomes  # both branches ran (seeds 1-3 improved, seed 0 did not)


def test_step_drops_bring_noisy_iterates_closer_to_the_optimum():
    x = data(2000)
    optimum = x.mean(0)
    errors = {0: [], 2: []}
    for seed in range(5):
        for drops in errors:
            model, history = noisy_fit(x, seed, patience=5, step_drops=drops, step_drop_factor=0.1)
            assert len(history.step_drop_epochs) == drops
            errors[drops].append((model.loc.detach() - optimum).norm().item())
    assert all(d < p for d, p in zip(errors[2], errors[0])), errors
    assert sum(errors[2]) < 0.3 * sum(errors[0]), errors

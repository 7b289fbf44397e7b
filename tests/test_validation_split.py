"""The validation split: the mask a seed gives, a caller's mask, masks extended by refits (NPE, TSNPE resume)."""

import pytest
import torch
from torch import nn

from sbiflows import NPE, box_uniform, ensemble_training, training
from sbiflows import npe_fit
from sbiflows.ensemble import member_seed
from sbiflows.training import train
from sbiflows.training_data import duplicate_groups
from sbiflows.training_options import extend_validation_mask, validation_mask


class Recorder(nn.Module):
    """``N(loc, I)`` on the columns after the first; the first column is a row id, recorded per mode."""

    def __init__(self):
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(1))
        self.trained, self.validated = set(), set()

    def log_prob(self, inputs, context=None):
        (self.trained if self.training else self.validated).update(inputs[:, 0].long().tolist())
        return torch.distributions.Normal(self.loc, 1.0).log_prob(inputs[:, 1:]).sum(-1)


def rows(n: int, seed: int = 0) -> torch.Tensor:
    return torch.cat([torch.arange(n, dtype=torch.float32)[:, None],
                      torch.randn(n, 1, generator=torch.Generator().manual_seed(seed))], 1)


def ids(mask: torch.Tensor) -> set[int]:
    return set(torch.nonzero(mask).flatten().tolist())


@pytest.mark.parametrize("grouped", [False, True])
def test_validation_mask_is_the_split_train_draws(grouped):
    n, seed = 200, 7
    groups = torch.arange(n) // 3 if grouped else None  # groups of three rows stay together
    model = Recorder()
    train(model, rows(n), max_epochs=1, batch_size=50, seed=seed, groups=groups, ema_epochs=0)
    mask = validation_mask(n, 0.1, seed=seed, groups=groups)
    assert model.validated == ids(mask) and model.trained == ids(~mask)
    if grouped:
        assert all(len(set(mask[3 * g:3 * g + 3].tolist())) == 1 for g in range(n // 3))


def test_train_validates_on_a_given_mask_only():
    n = 100
    mask = torch.zeros(n, dtype=torch.bool)
    mask[[3, 50, 99]] = True
    model = Recorder()
    train(model, rows(n), max_epochs=2, batch_size=10, validation=mask, groups=torch.zeros(n, dtype=torch.long),
          ema_epochs=0)
    assert model.validated == {3, 50, 99} and model.trained == set(range(n)) - {3, 50, 99}


@pytest.mark.parametrize(("mask", "message"), [
    (torch.zeros(10, dtype=torch.bool), "both sides.*got 0 of 10"),
    (torch.ones(10, dtype=torch.bool), "both sides.*got 10 of 10"),
    (torch.zeros(9, dtype=torch.bool), r"boolean tensor of shape \(10,\).*got torch.bool of shape \(9,\)"),
    (torch.zeros(10), r"boolean tensor of shape \(10,\).*got torch.float32"),
    ([True] * 10, "got list"),
])
def test_bad_masks_are_refused_before_training(mask, message):
    model = Recorder()
    with pytest.raises(ValueError, match="validation must be a|validation must leave") as caught:
        train(model, rows(10), max_epochs=1, validation=mask)
    assert caught.match(message) and not model.trained


def test_extended_masks_keep_earlier_sides_and_copies_together():
    old = validation_mask(500, 0.2, seed=0)
    new = extend_validation_mask(old, 300, 0.2, seed=1)
    assert torch.equal(new[:500], old) and int(new[500:].sum()) == 60
    assert not torch.equal(new[500:], extend_validation_mask(old, 300, 0.2, seed=2)[500:])
    # rows 500 and 501 copy rows 0 and 1 (one validates, one trains); rows 502-504 copy each other
    first_val, first_train = int(torch.nonzero(old)[0]), int(torch.nonzero(~old)[0])
    groups = torch.arange(800)
    groups[500], groups[501], groups[502:505] = first_val, first_train, 502
    copies = extend_validation_mask(old, 300, 0.2, seed=1, groups=groups)
    assert bool(copies[500]) and not bool(copies[501]) and len(set(copies[502:505].tolist())) == 1
    assert torch.equal(copies[:500], old)


# ------------------------------------------------------------------------------------- NPE refits
PRIOR = box_uniform([-2.0, -2.0], [2.0, 2.0])
FAST = {"max_epochs": 2, "progress": False}


def simulate(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    theta = 4 * torch.rand(n, 2, generator=g) - 2
    return theta, theta + 0.3 * torch.randn(n, 2, generator=g)


def record_validation_rows(monkeypatch) -> list[set[int]]:
    """The row indices scored for validation, one set per ensemble member ``NPE.fit`` trains (in order):
    ``training._evaluate``'s for a member trained alone, ``ensemble_training._validate``'s, slot by slot,
    for members trained together."""
    calls, evaluate, validate = [], training._evaluate, ensemble_training._validate
    train_checked, stacked, first = ensemble_training.train_checked, ensemble_training._train_stacked, [0]

    def recording_train(*args, **kwargs):
        calls.append(set())
        return train_checked(*args, **kwargs)

    def recording_evaluate(model, inputs, context, idx, objective):
        calls[-1].update(idx.tolist())
        return evaluate(model, inputs, context, idx, objective)

    def recording_stacked(stack, members, *args, **kwargs):
        first[0] = len(calls)
        calls.extend(set() for _ in members)
        return stacked(stack, members, *args, **kwargs)

    def recording_validate(stack, params, inputs, context, rows):
        for slot, member in enumerate(stack.active):
            calls[first[0] + member].update(rows[slot].tolist())
        return validate(stack, params, inputs, context, rows)

    monkeypatch.setattr(ensemble_training, "train_checked", recording_train)
    monkeypatch.setattr(training, "_evaluate", recording_evaluate)
    monkeypatch.setattr(ensemble_training, "_train_stacked", recording_stacked)
    monkeypatch.setattr(ensemble_training, "_validate", recording_validate)
    return calls


def test_a_refit_never_validates_on_rows_trained_before(monkeypatch):
    calls = record_validation_rows(monkeypatch)
    npe = NPE(PRIOR, ensemble=1, transforms=1, hidden_features=(8, 8))  # one flow: its training records the split
    theta, x = simulate(300, 0)
    npe.fit(theta, x, seed=3, **FAST)
    first = npe.validation
    assert torch.equal(first, validation_mask(300, 0.1, seed=member_seed(3, 0), groups=duplicate_groups(theta, x)))
    assert calls[-1] == ids(first)
    more_theta, more_x = simulate(200, 1)
    npe.fit(more_theta, more_x, seed=4, **FAST)
    second = npe.validation
    assert torch.equal(second[:300], first) and int(second[300:].sum()) == 20
    assert calls[-1] == ids(second)  # the refit scored exactly these rows, none trained on in the first fit
    # a refit whose training fails leaves the split as it was
    def broken(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(npe_fit, "train_members", broken)
    with pytest.raises(KeyboardInterrupt):
        npe.fit(*simulate(100, 2), seed=5, **FAST)
    assert torch.equal(npe.validation, second) and len(npe.theta) == 500


def test_ensemble_members_keep_their_own_splits(monkeypatch):
    calls = record_validation_rows(monkeypatch)
    npe = NPE(PRIOR, ensemble=2, transforms=1, hidden_features=(8, 8))
    npe.fit(*simulate(300, 0), seed=0, **FAST)
    firsts = [mask.clone() for mask in npe._validation]
    assert not torch.equal(firsts[0], firsts[1])
    assert calls[:2] == [ids(mask) for mask in firsts]  # each member's recorded split is the one it trained with
    npe.fit(*simulate(100, 1), seed=1, **FAST)
    for first, mask in zip(firsts, npe._validation):
        assert torch.equal(mask[:300], first)
    assert calls[-2:] == [ids(mask) for mask in npe._validation]


def test_restore_takes_the_split_and_refuses_a_bad_one(monkeypatch):
    theta, x = simulate(300, 0)
    options = {"ensemble": 1, "transforms": 1, "hidden_features": (8, 8)}
    posterior = NPE(PRIOR, **options).fit(theta, x, **FAST)
    mask = torch.zeros(300, dtype=torch.bool)
    mask[:30] = True
    restored = NPE(PRIOR, **options).restore(posterior, theta, x, validation=mask)
    assert torch.equal(restored.validation, mask)
    calls = record_validation_rows(monkeypatch)
    restored.fit(*simulate(100, 1), **FAST)
    assert set(range(30)) <= calls[-1] and not calls[-1] & set(range(30, 300))
    # without a mask: a seeded random split of the restored rows
    assert int(NPE(PRIOR, **options).restore(posterior, theta, x).validation.sum()) == 30
    fresh = NPE(PRIOR, **options)
    with pytest.raises(ValueError, match=r"validation must be a boolean tensor of shape \(300,\)"):
        fresh.restore(posterior, theta, x, validation=mask[:10])
    assert fresh.net is None and fresh.theta is None and fresh.validation is None  # nothing half-restored


def test_train_takes_a_mask_where_a_random_split_would_not_fit():
    model = Recorder()
    train(model, rows(2), max_epochs=1, validation_fraction=0.9, validation=torch.tensor([False, True]), ema_epochs=0)
    assert model.trained == {0} and model.validated == {1}

"""Ensemble members trained together in one vectorized pass (sbiflows.ensemble_training)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from sbiflows.balance import BalancedObjective
from sbiflows.ensemble_training import train_members
from sbiflows.flows import maf, nsf
from sbiflows.training import TrainingHistory, train_checked

OPTIONS = dict(max_epochs=40, batch_size=50, learning_rate=3e-3, validation_fraction=0.1, patience=3,
               clip_grad_norm=5.0, weight_decay=0.0, ema_epochs=1.0, step_drops=1, step_drop_factor=0.2,
               drop_patience=2)
SEEDS = [10, 11, 12]


def data(n=600, seed=0):
    generator = torch.Generator().manual_seed(seed)
    theta = torch.randn(n, 2, generator=generator)
    return theta, theta + 0.3 * torch.randn(n, 2, generator=generator)


def flows(factory, count=3):
    out = []
    for k in range(count):
        torch.manual_seed(k)
        out.append(factory(2, 2, transforms=2, hidden_features=(16,)))
    return out


def histories(count=3):
    return [TrainingHistory() for _ in range(count)]


def max_difference(a: nn.Module, b: nn.Module) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("factory", [maf, nsf])
def test_members_trained_together_equal_members_trained_one_by_one(factory):
    theta, x = data()
    together, alone = flows(factory), flows(factory)
    joint = histories()
    assert train_members(together, theta, x, seeds=SEEDS, histories=joint, validations=[None] * 3,
                         **OPTIONS) == "vectorized"
    separate = histories()
    for member, history, seed in zip(alone, separate, SEEDS):
        train_checked(member, theta, x, seed=seed, history=history, **OPTIONS)
    # members stop at different epochs and drop their step size at different epochs; each follows
    # its own rule as it would alone
    assert len({h.epochs for h in joint}) > 1
    for a, b, ha, hb in zip(together, alone, joint, separate):
        assert (ha.epochs, ha.best_epoch, ha.step_drop_epochs, ha.stopped_early) == (
            hb.epochs, hb.best_epoch, hb.step_drop_epochs, hb.stopped_early)
        # the same computation batched: equal to rounding at first; rounding differences (vmapped and plain
        # kernels accumulate in other orders, which depends on the CPU: AVX-512 here) then grow over epochs
        assert ha.validation_loss[:2] == pytest.approx(hb.validation_loss[:2], abs=1e-5)
        assert ha.train_loss[:2] == pytest.approx(hb.train_loss[:2], abs=1e-5)
        assert ha.validation_loss == pytest.approx(hb.validation_loss, abs=0.02)
        assert ha.train_loss == pytest.approx(hb.train_loss, abs=0.02)
        assert max_difference(a, b) < 0.05


def test_given_splits_and_refits_continue_each_members_history():
    theta, x = data()
    masks = [torch.arange(600) % 10 == k for k in range(2)]
    together, alone = flows(maf, 2), flows(maf, 2)
    joint, separate = histories(2), histories(2)
    options = dict(OPTIONS, max_epochs=3)
    for _ in range(2):  # the second call continues the histories (a refit)
        train_members(together, theta, x, seeds=SEEDS[:2], histories=joint, validations=masks, **options)
        for member, history, seed, mask in zip(alone, separate, SEEDS, masks):
            train_checked(member, theta, x, seed=seed, history=history, validation=mask, **options)
    for a, b, ha, hb in zip(together, alone, joint, separate):
        assert ha.epochs == hb.epochs == 6 and ha.best_epoch == hb.best_epoch
        assert max_difference(a, b) < 1e-5


def test_members_that_cannot_be_vectorized_train_one_by_one():
    theta, x = data()
    objective = BalancedObjective(torch.zeros(600), weight=1.0)
    assert train_members(flows(maf, 2), theta, x, seeds=SEEDS[:2], histories=histories(2), validations=[None] * 2,
                         objective=objective, **dict(OPTIONS, max_epochs=2)) == "sequential"
    # duplicate groups can give the members splits of different sizes
    groups = torch.arange(600) // 7
    result = train_members(flows(maf, 2), theta, x, seeds=[0, 5], histories=histories(2), validations=[None] * 2,
                           groups=groups, **dict(OPTIONS, max_epochs=2, validation_fraction=0.13))
    assert result in ("vectorized", "sequential")  # whichever the split sizes allow, trained either way

    class Branching(nn.Module):  # Python control flow on a tensor's value: vmap refuses it
        def __init__(self):
            super().__init__()
            self.flow = maf(2, 2, transforms=1, hidden_features=(8,))

        def log_prob(self, inputs, context):
            return self.flow.log_prob(inputs, context if context.abs().max().item() < 1e6 else context / 1e6)

    members, trained = [Branching(), Branching()], histories(2)
    assert train_members(members, theta, x, seeds=SEEDS[:2], histories=trained, validations=[None] * 2,
                         **dict(OPTIONS, max_epochs=2)) == "sequential"
    assert [h.epochs for h in trained] == [2, 2]


def test_members_whose_batch_grows_at_their_drops_train_one_by_one_as_train_checked_trains_each():
    """One vectorized pass shares one batch size; with ``drop_batch_factor`` each member's grows at its own drop."""
    theta, x = data()
    together, trained = flows(maf, 2), histories(2)
    assert train_members(together, theta, x, seeds=SEEDS[:2], histories=trained, validations=[None] * 2,
                         drop_batch_factor=2.0, **OPTIONS) == "sequential"
    for member, seed, history in zip(flows(maf, 2), SEEDS, trained):
        alone = train_checked(member, theta, x, seed=seed, history=TrainingHistory(), drop_batch_factor=2.0, **OPTIONS)
        assert alone.validation_loss == history.validation_loss and alone.step_drop_epochs == history.step_drop_epochs
    assert any(h.step_drop_epochs for h in trained)  # a drop, hence a grown batch, happened

class Fragile(nn.Module):
    """A Gaussian whose log-density turns NaN once its mean passes 1 (training pulls it towards 3)."""

    def __init__(self, mean: float):
        super().__init__()
        self.mean = nn.Parameter(torch.tensor([mean]))

    def log_prob(self, inputs, context):
        return -0.5 * (inputs[:, 0] - self.mean).square() + torch.log(1.0 - self.mean).sum() * 0.0


def test_a_diverging_member_keeps_its_best_weights_and_the_others_train_on():
    inputs = 3.0 + torch.randn(400, 1, generator=torch.Generator().manual_seed(0))
    members, trained = [Fragile(-2.0), Fragile(-20.0)], histories(2)
    options = dict(OPTIONS, max_epochs=8, learning_rate=0.2, patience=30, step_drops=0, clip_grad_norm=float("inf"))
    with pytest.warns(RuntimeWarning, match="diverged"):
        result = train_members(members, inputs, None, seeds=SEEDS[:2], histories=trained, validations=[None] * 2,
                               **options)
    assert result == "vectorized"
    first, second = trained
    assert first.diverged and not second.diverged and first.epochs < second.epochs
    assert torch.isfinite(members[0].mean).all() and members[0].mean.item() < 1.0  # its best weights
    alone = Fragile(-20.0)
    history = train_checked(alone, inputs, None, seed=SEEDS[1], **options)
    assert history.epochs == second.epochs and max_difference(alone, members[1]) < 1e-5


def test_restore_best_restarts_a_diverging_member_once_in_the_vectorized_pass():
    inputs = 3.0 + torch.randn(400, 1, generator=torch.Generator().manual_seed(0))
    members, trained = [Fragile(-2.0), Fragile(-20.0)], histories(2)
    options = dict(OPTIONS, max_epochs=8, learning_rate=0.2, patience=30, step_drops=0, clip_grad_norm=float("inf"),
                   on_nonfinite="restore_best")
    with pytest.warns(RuntimeWarning) as caught:  # the restart, then the second divergence's stop
        assert train_members(members, inputs, None, seeds=SEEDS[:2], histories=trained, validations=[None] * 2,
                             **options) == "vectorized"
    assert [("goes on from the best weights" in str(w.message), "diverged" in str(w.message)) for w in caught] == [
        (True, False), (False, True)]
    first, second = trained
    assert len(first.restart_epochs) == 1 and first.diverged and not second.restart_epochs
    assert first.restart_epochs[0] < first.epochs  # it trained on after the restart
    assert torch.isfinite(members[0].mean).all() and members[0].mean.item() < 1.0  # its best weights
    alone = Fragile(-2.0)  # the same member alone: the same restart and the same weights
    with pytest.warns(RuntimeWarning):
        history = train_checked(alone, inputs, None, seed=SEEDS[0], **options)
    assert history.restart_epochs == first.restart_epochs and history.epochs == first.epochs
    assert max_difference(alone, members[0]) < 1e-5


def test_a_member_non_finite_from_the_start_raises():
    inputs = 3.0 + torch.randn(100, 1, generator=torch.Generator().manual_seed(0))
    members = [Fragile(-2.0), Fragile(2.0)]  # the second is NaN before any validation
    with pytest.raises(FloatingPointError, match="before any finite validation loss"):
        train_members(members, inputs, None, seeds=SEEDS[:2], histories=histories(2), validations=[None] * 2,
                      **dict(OPTIONS, max_epochs=3))
    assert copy.deepcopy(members[0].mean).isfinite().all()


def test_spline_members_train_together_without_torch_warnings():
    """Under vmap the spline's bin search got a non-contiguous value tensor, and torch warned about the copy
    (once per program, in the middle of a user's fit); the values are made contiguous first."""
    generator = torch.Generator().manual_seed(0)
    theta = torch.randn(300, 5, generator=generator)
    x = theta + 0.3 * torch.randn(300, 5, generator=generator)
    members = []
    for k in range(3):
        torch.manual_seed(k)
        members.append(nsf(5, 5, transforms=2, hidden_features=(16,)))
    always = torch._C._get_warnAlways()
    torch._C._set_warnAlways(True)  # torch's once-per-program warnings fire on every call
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            path = train_members(members, theta, x, seeds=SEEDS, histories=histories(), validations=[None] * 3,
                                 **dict(OPTIONS, max_epochs=2))
    finally:
        torch._C._set_warnAlways(always)
    assert path == "vectorized"
    assert [str(w.message) for w in caught] == []

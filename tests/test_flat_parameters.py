"""Flat parameter buffers (sbiflows.flat_parameters): the same training steps, checkpoints in one layout."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from sbiflows.flat_parameters import FlatParameters, PerParameterState
from sbiflows.training import train


def _model(dtype=torch.float64) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).to(dtype)


def _steps(model: nn.Module, optimizer: torch.optim.Optimizer, params: list, *, flat: bool, n: int = 5) -> None:
    generator = torch.Generator().manual_seed(1)
    dtype = next(model.parameters()).dtype
    for _ in range(n):
        inputs = torch.randn(16, 3, generator=generator, dtype=torch.float64).to(dtype)
        loss = model(inputs).pow(2).sum()
        optimizer.zero_grad(set_to_none=not flat)
        loss.backward()
        nn.utils.clip_grad_norm_(params, 0.5)  # small: the clipping acts
        optimizer.step()


@pytest.mark.parametrize("options", [{"fused": True}, {"foreach": True}])
def test_steps_match_those_over_the_separate_parameters(options):
    separate, flattened = _model(), _model()
    params = list(separate.parameters())
    _steps(separate, torch.optim.Adam(params, lr=0.05, **options), params, flat=False)
    flat = FlatParameters(list(flattened.parameters()))
    _steps(flattened, torch.optim.Adam(flat.flat, lr=0.05, **options), flat.flat, flat=True)
    for a, b in zip(separate.parameters(), flattened.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_parameters_and_gradients_are_views_of_the_flat_buffers():
    model = _model()
    inputs = torch.randn(4, 3, dtype=torch.float64)
    before = model(inputs).detach()
    flat = FlatParameters(list(model.parameters()))
    assert torch.equal(model(inputs), before)  # the values were copied in
    (buffer,) = flat.flat
    assert buffer.shape == (sum(p.numel() for p in model.parameters()),)
    base = buffer.untyped_storage().data_ptr()
    assert all(p.untyped_storage().data_ptr() == base for p in model.parameters())
    model(inputs).sum().backward()
    expected = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    assert expected.abs().sum() > 0 and torch.equal(buffer.grad, expected)
    with torch.no_grad():
        buffer.add_(1.0)  # an update of the buffer is an update of the model
    assert not torch.equal(model(inputs), before)


def test_parameters_of_two_dtypes_get_one_buffer_each():
    model = _model()
    model[2].to(torch.float32)
    flat = FlatParameters(list(model.parameters()))
    assert [(t.dtype, t.numel()) for t in flat.flat] == [(torch.float64, 3 * 8 + 8), (torch.float32, 8 * 2 + 2)]
    torch.optim.SGD(flat.flat, lr=0.1)  # an optimizer takes both


def test_optimizer_state_has_the_layout_of_the_separate_parameters_both_ways():
    separate, flattened = _model(), _model()
    params = list(separate.parameters())
    reference = torch.optim.Adam(params, lr=0.05)
    _steps(separate, reference, params, flat=False)
    flat = FlatParameters(list(flattened.parameters()))
    optimizer = torch.optim.Adam(flat.flat, lr=0.05)
    _steps(flattened, optimizer, flat.flat, flat=True)
    ours, theirs = PerParameterState(flat, optimizer).state_dict(), reference.state_dict()
    assert ours["param_groups"] == theirs["param_groups"]
    assert sorted(ours["state"]) == sorted(theirs["state"]) == list(range(4))
    for i, entry in theirs["state"].items():
        assert set(ours["state"][i]) == set(entry)
        for name, value in entry.items():
            torch.testing.assert_close(ours["state"][i][name], value, rtol=0, atol=1e-12)
    # the separate optimizer's state loaded into a fresh flat one: the next steps are the same
    resumed = copy.deepcopy(separate)
    flat2 = FlatParameters(list(resumed.parameters()))
    optimizer2 = torch.optim.Adam(flat2.flat, lr=0.05)
    PerParameterState(flat2, optimizer2).load_state_dict(reference.state_dict())
    _steps(separate, reference, params, flat=False, n=3)
    _steps(resumed, optimizer2, flat2.flat, flat=True, n=3)
    for a, b in zip(separate.parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_a_state_of_other_parameters_is_refused():
    flat = FlatParameters(list(_model().parameters()))
    optimizer = torch.optim.Adam(flat.flat, lr=0.05)
    other = torch.optim.Adam(list(nn.Linear(2, 2).parameters()), lr=0.05).state_dict()
    with pytest.raises(ValueError, match="one group of the 4 parameters, got groups of \\[2\\]"):
        PerParameterState(flat, optimizer).load_state_dict(other)


def test_a_repeated_parameter_is_refused():
    layer = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="must not repeat a parameter"):
        FlatParameters([layer.weight, layer.weight])


def test_release_gives_each_parameter_its_own_storage():
    model = _model()
    values = [p.detach().clone() for p in model.parameters()]
    flat = FlatParameters(list(model.parameters()))
    flat.release()
    for p, value in zip(model.parameters(), values):
        assert torch.equal(p, value) and p.grad is None
        assert p.untyped_storage().nbytes() == p.numel() * p.element_size()


def test_training_leaves_parameters_with_their_own_storage():
    torch.manual_seed(0)
    model = nn.Linear(2, 2)

    class Gaussian(nn.Module):  # log_prob(inputs, context) of a unit Gaussian around a linear map of the context
        def __init__(self):
            super().__init__()
            self.map = model

        def log_prob(self, inputs, context):
            return -0.5 * (inputs - self.map(context)).pow(2).sum(-1)

    net = Gaussian()
    context = torch.randn(200, 2)
    inputs = context @ torch.tensor([[1.0, 0.5], [0.0, 2.0]]) + 0.1 * torch.randn(200, 2)
    history = train(net, inputs, context, max_epochs=30, batch_size=20, learning_rate=0.05)
    assert history.validation_loss[-1] < history.validation_loss[0]
    for p in net.parameters():
        assert p.grad is None and p.untyped_storage().nbytes() == p.numel() * p.element_size()


def test_a_parameter_without_state_gets_zero_moments_and_the_groups_step_count():
    """An optimizer over the separate parameters keeps no state for a parameter that never had a gradient."""
    model = _model()
    params = list(model.parameters())
    separate = torch.optim.Adam(params, lr=0.05)
    model(torch.randn(4, 3, dtype=torch.float64)).sum().backward()
    params[1].grad = None  # the first layer's bias "got no gradient"
    separate.step()
    state = separate.state_dict()
    assert sorted(state["state"]) == [0, 2, 3]
    flat = FlatParameters(params)
    optimizer = torch.optim.Adam(flat.flat, lr=0.05)
    PerParameterState(flat, optimizer).load_state_dict(state)
    loaded = PerParameterState(flat, optimizer).state_dict()["state"]
    assert float(loaded[1]["step"]) == 1.0 and not loaded[1]["exp_avg"].any() and not loaded[1]["exp_avg_sq"].any()
    for i in (0, 2, 3):
        assert torch.equal(loaded[i]["exp_avg"], state["state"][i]["exp_avg"])


def test_parameters_that_lose_their_views_are_reattached():
    model = _model()
    flat = FlatParameters(list(model.parameters()))
    optimizer = torch.optim.Adam(flat.flat, lr=0.05)
    weight = model[0].weight
    weight.data = weight.data.clone() + 1.0  # new storage, as load_state_dict with swapped parameters gives
    model.zero_grad()  # set_to_none: new gradient tensors at the next backward
    assert flat.reattach() == 4 and flat.reattach() == 0
    assert torch.equal(flat.flat[0][: weight.numel()].view_as(weight), weight)  # the new values are in the buffer
    before = weight.detach().clone()
    model(torch.randn(4, 3, dtype=torch.float64)).sum().backward()
    optimizer.step()
    assert not torch.equal(weight, before)  # the gradient reached the optimizer, the update the model


def test_training_is_the_same_when_loading_swaps_the_parameters(monkeypatch):
    """Under torch's swap-on-conversion mode ``load_state_dict`` (the step drops' return to the best weights)
    gives the parameters new storage; training reattaches them instead of silently stopping."""
    def run() -> list[float]:
        torch.manual_seed(0)
        net = _Regression()
        context = torch.randn(300, 2, generator=torch.Generator().manual_seed(0))
        inputs = context @ torch.tensor([[1.0, 0.5], [0.0, 2.0]])
        history = train(net, inputs + 0.3 * torch.randn(300, 2, generator=torch.Generator().manual_seed(1)), context,
                        max_epochs=30, batch_size=30, learning_rate=0.3, patience=1, step_drops=3, drop_patience=2)
        assert history.step_drop_epochs[0] < history.epochs - 5  # epochs trained after a return to the best weights
        return history.validation_loss

    plain = run()  # (without the reattachment the swapped run stalls after the first drop: 0.351 against 0.106)
    monkeypatch.setattr(torch.__future__, "_swap_module_params_on_conversion", True)
    assert torch.__future__.get_swap_module_params_on_conversion()
    assert run() == plain


def test_a_failure_before_the_loop_leaves_the_parameters_as_they_were(tmp_path):
    from sbiflows.checkpoint import Checkpoint

    net = _Regression()
    with pytest.raises(ValueError):
        train(net, torch.randn(50, 2), torch.randn(50, 2), max_epochs=2, checkpoint=Checkpoint(tmp_path))  # a folder
    for p in net.parameters():
        assert p.grad is None and p.untyped_storage().nbytes() == p.numel() * p.element_size()


class _Regression(nn.Module):
    """``log_prob(inputs, context)`` of a unit Gaussian around a linear map of the context."""

    def __init__(self):
        super().__init__()
        self.map = nn.Linear(2, 2)

    def log_prob(self, inputs, context):
        return -0.5 * (inputs - self.map(context)).pow(2).sum(-1)

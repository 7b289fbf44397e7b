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

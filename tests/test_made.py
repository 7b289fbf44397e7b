"""MADE connectivity: autoregressive in the ordering, every output sees the context, no dead units.

Checked from the mask buffers themselves and through the network's Jacobian, after construction and
after order- and connectivity-agnostic resampling (Germain et al. 2015).
"""

from __future__ import annotations

import pytest
import torch
from torch.autograd.functional import jacobian

from sbiflows.transforms import MADE, MaskedAutoregressive
from test_transforms import C, D, _perturb, inputs


def test_made_first_output_sees_context():
    """The bug in a well-known library: the first output of a conditional MADE ignores the context."""
    for ordering in ("natural", "reverse", "random"):
        layer = _perturb(MaskedAutoregressive(D, C, hidden_features=(32, 32), ordering=ordering).double())
        first = layer.made.ordering[0]
        x, ctx = inputs((16,), C)
        z = layer(x, ctx)[0]
        z2 = layer(x, ctx + 1.0)[0]
        assert ((z2 - z)[:, first].abs() > 1e-9).any(), ordering


def _check_made_masks(made: MADE) -> None:
    """Connectivity of a MADE read from its mask buffers: autoregressive, fully conditioned, no dead units."""
    masks = [layer.mask for layer in made.layers]  # (out_units, in_units); first layer: [x | context]
    d, c, p = made.features, made.context_features, made.params_per_feature
    into = [masks[0]]  # into[h][u, j]: number of paths from input j to unit u of hidden layer h
    for mask in masks[1:-1]:
        into.append(mask @ into[-1])
    out_of = [masks[-1]]  # out_of[h][o, u]: number of paths from unit u of hidden layer h to output o
    for mask in reversed(masks[1:-1]):
        out_of.insert(0, out_of[0] @ mask)
    for h, (fed, feeding) in enumerate(zip(into, out_of)):
        assert (fed.sum(1) > 0).all(), f"hidden layer {h} has a unit without inputs"
        assert (feeding.sum(0) > 0).all(), f"hidden layer {h} has a unit with no path to an output"
    paths = (masks[-1] @ into[-1]).reshape(d, p, d + c)  # output units are ordered (feature, parameter)
    rank = torch.argsort(made.ordering)  # position of each feature in the autoregressive order
    allowed = rank[None, :] < rank[:, None]  # output i may see input j iff j comes before i
    for k in range(p):
        block = paths[:, k, :d] > 0
        assert not block[~allowed].any(), f"parameter block {k} sees a later or its own input"
        assert torch.equal(block, allowed), f"parameter block {k} misses some earlier inputs"
        assert (paths[:, k, d:] > 0).all(), f"parameter block {k}: an output misses a context input"


@pytest.mark.parametrize(
    "features,context,hidden,params",
    [(4, 0, (8, 8), 2), (5, 3, (5, 7, 9), 2), (3, 2, (16, 16), 3), (2, 1, (2, 2), 1), (6, 0, (5, 5), 1)],
)
@pytest.mark.parametrize("random_degrees", [True, False])
def test_made_masks_are_autoregressive_and_connected(features, context, hidden, params, random_degrees):
    for seed in range(3):
        made = MADE(
            features, params, context, hidden_features=hidden, ordering="random",
            random_degrees=random_degrees, seed=seed,
        )
        _check_made_masks(made)
        for _ in range(2):  # order- and connectivity-agnostic training between minibatches
            made.resample(ordering="random")
            _check_made_masks(made)
            made.resample(connectivity=True)
            _check_made_masks(made)
        made.resample(ordering="reverse", connectivity=True)
        _check_made_masks(made)


def test_made_forward_uses_the_resampled_masks():
    """After resample, the network's Jacobian vanishes wherever the mask buffers forbid a path."""
    made = _perturb(MADE(D, 2, C, hidden_features=(16, 16), ordering="random", seed=4).double(), scale=1.0)
    x, ctx = inputs((1,), C)
    for resample in ({"ordering": "random"}, {"connectivity": True}):
        made.resample(**resample)
        rank = torch.argsort(made.ordering)
        forbidden = ~(rank[None, :] < rank[:, None])  # (output feature, input feature)
        J = jacobian(lambda v: made(v, ctx[0]), x[0])  # (D, 2, D)
        assert torch.count_nonzero(J.permute(0, 2, 1)[forbidden]) == 0
        assert torch.count_nonzero(J.permute(0, 2, 1)[~forbidden]) > 0

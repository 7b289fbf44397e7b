"""MADE (Germain et al. 2015): masked MLPs whose i-th output sees only the inputs before i in an ordering.

Mask construction is a set of pure functions of *degrees* (the paper's connectivity integers): an input
has the degree of its position in the ordering (1..D); a hidden unit gets an integer ``m`` and may see
inputs of degree <= ``m``; an output of degree ``d`` may see hidden units of degree < ``d``.

Context inputs connect to **every** unit of the first hidden layer, and hidden units may take the
degree 0 (they then see the context only), so every output, including the first in the ordering,
depends on the context. (A conditional MADE that keeps degrees >= 1 silently drops the context for the
first output.)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def input_degrees(ordering: Sequence[int] | Tensor) -> Tensor:
    """Degrees of the inputs: feature ``ordering[k]`` gets degree ``k + 1``.

    Example:
        >>> input_degrees([2, 0, 1])
        tensor([2, 3, 1])
    """
    ordering = torch.as_tensor(ordering, dtype=torch.long)
    degrees = torch.empty_like(ordering)
    degrees[ordering] = torch.arange(1, len(ordering) + 1)
    return degrees


def hidden_degrees(
    size: int, features: int, *, context: bool, random: bool, generator: torch.Generator | None = None
) -> Tensor:
    """Connectivity integers of one hidden layer, in ``[lowest, D - 1]`` with ``lowest = 0`` if there is a context.

    Every value of the range occurs at least once (so no unit is left without inputs or outputs);
    ``random=True`` draws the rest uniformly (connectivity-agnostic training resamples them), otherwise
    they cycle through the range.

    Raises:
        ValueError: If ``size`` is smaller than the range of degrees.

    Example:
        >>> hidden_degrees(5, 3, context=False, random=False)
        tensor([1, 2, 1, 2, 1])
    """
    lowest = 0 if context or features == 1 else 1
    values = torch.arange(lowest, features)
    if size < len(values):
        raise ValueError(
            f"a MADE hidden layer needs at least {len(values)} units for {features} features"
            f"{' with context' if context else ''}, got {size}"
        )
    if not random:
        return values.repeat(size // len(values) + 1)[:size]
    rest = torch.randint(lowest, features, (size - len(values),), generator=generator)
    degrees = torch.cat([values, rest])
    return degrees[torch.randperm(size, generator=generator)]


def made_masks(in_degrees: Tensor, layer_degrees: Sequence[Tensor], params_per_feature: int) -> list[Tensor]:
    """Masks ``(out_units, in_units)`` of every layer (inputs only; context columns are added by MADE).

    The output layer has ``D * params_per_feature`` units ordered as ``(D, params_per_feature)``.
    """
    masks, previous = [], in_degrees
    for degrees in layer_degrees:
        masks.append((degrees[:, None] >= previous[None, :]).to(torch.get_default_dtype()))
        previous = degrees
    out_degrees = in_degrees.repeat_interleave(params_per_feature)
    masks.append((out_degrees[:, None] > previous[None, :]).to(torch.get_default_dtype()))
    return masks


class MaskedLinear(nn.Linear):
    """A linear layer whose weight is multiplied by a fixed 0/1 mask buffer."""

    def __init__(self, in_features: int, out_features: int, mask: Tensor):
        super().__init__(in_features, out_features)
        self.register_buffer("mask", mask.clone())

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight * self.mask, self.bias)


class MADE(nn.Module):
    """Masked autoencoder for distribution estimation, optionally conditioned on a context.

    Output ``(*batch, D, P)``: ``P = params_per_feature`` values per feature, where the values of
    feature ``i`` depend only on the features before ``i`` in the ordering (and on the context).

    Args:
        features: Dimension D of the autoregressive inputs.
        params_per_feature: Outputs per feature (2 for an affine MAF layer: shift and log-scale).
        context_features: Context dimension C; the context feeds every first-layer hidden unit.
        hidden_features: Hidden layer sizes.
        ordering: ``None`` (natural ``0..D-1``), ``"reverse"``, ``"random"`` or an explicit permutation
            listing the features in autoregressive order.
        random_degrees: Draw hidden connectivity integers at random (True) or cyclically (False).
        seed: Seed for random orderings and degrees.
        activation: Activation module class.
        zero_last: Start with a zero output layer (a flow layer then starts as the identity).

    Example:
        >>> made = MADE(3, params_per_feature=2, context_features=1)
        >>> made(torch.randn(4, 3), torch.randn(4, 1)).shape
        torch.Size([4, 3, 2])
    """

    def __init__(
        self,
        features: int,
        params_per_feature: int = 1,
        context_features: int = 0,
        *,
        hidden_features: Sequence[int] = (64, 64),
        ordering: str | Sequence[int] | None = None,
        random_degrees: bool = True,
        seed: int = 0,
        activation: type[nn.Module] = nn.ReLU,
        zero_last: bool = False,
    ):
        super().__init__()
        if not hidden_features:
            raise ValueError("hidden_features must name at least one hidden layer")
        self.features = features
        self.params_per_feature = params_per_feature
        self.context_features = context_features
        self.hidden_features = tuple(hidden_features)
        self.random_degrees = random_degrees
        self._generator = torch.Generator().manual_seed(seed)
        sizes = [features + context_features, *self.hidden_features, features * params_per_feature]
        self.layers = nn.ModuleList(
            MaskedLinear(a, b, torch.ones(b, a)) for a, b in zip(sizes[:-1], sizes[1:])
        )
        self.activation = activation()
        self.register_buffer("ordering", torch.arange(features))
        self.register_buffer("degrees_in", torch.arange(1, features + 1))
        self.resample(ordering=ordering if ordering is not None else "natural", connectivity=True)
        if zero_last:
            nn.init.zeros_(self.layers[-1].weight)
            nn.init.zeros_(self.layers[-1].bias)

    def resample(self, *, ordering: str | Sequence[int] | None = None, connectivity: bool = False) -> None:
        """Draw a new ordering and/or new hidden connectivity integers and rebuild the masks in place.

        Order-agnostic training calls ``resample(ordering="random")`` and connectivity-agnostic training
        ``resample(connectivity=True)`` between minibatches (Germain et al. 2015, section 4).

        Args:
            ordering: ``"natural"``, ``"reverse"``, ``"random"``, an explicit permutation, or None to keep.
            connectivity: Redraw the hidden layers' connectivity integers.
        """
        if ordering is not None:
            self.ordering.copy_(self._make_ordering(ordering))
            self.degrees_in.copy_(input_degrees(self.ordering))
        if connectivity or ordering is not None:
            if connectivity or not hasattr(self, "_layer_degrees"):
                self._layer_degrees = [
                    hidden_degrees(
                        size, self.features, context=self.context_features > 0,
                        random=self.random_degrees, generator=self._generator,
                    )
                    for size in self.hidden_features
                ]
            masks = made_masks(self.degrees_in.cpu(), self._layer_degrees, self.params_per_feature)
            context_cols = torch.ones(masks[0].shape[0], self.context_features)
            masks[0] = torch.cat([masks[0], context_cols], dim=1)
            for layer, mask in zip(self.layers, masks):
                layer.mask.copy_(mask)

    def _make_ordering(self, ordering: str | Sequence[int]) -> Tensor:
        d = self.features
        if isinstance(ordering, str):
            options = {
                "natural": lambda: torch.arange(d),
                "reverse": lambda: torch.arange(d - 1, -1, -1),
                "random": lambda: torch.randperm(d, generator=self._generator),
            }
            if ordering not in options:
                raise ValueError(f"ordering must be one of {list(options)} or a permutation, got {ordering!r}")
            return options[ordering]()
        perm = torch.as_tensor(ordering, dtype=torch.long)
        if sorted(perm.tolist()) != list(range(d)):
            raise ValueError(f"ordering must be a permutation of 0..{d - 1}, got {perm.tolist()}")
        return perm

    @property
    def masks(self) -> list[Tensor]:
        """The current masks, first layer including its (all-ones) context columns."""
        return [layer.mask for layer in self.layers]

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        h = x if self.context_features == 0 else torch.cat([x, context], dim=-1)
        for layer in self.layers[:-1]:
            h = self.activation(layer(h))
        out = self.layers[-1](h)
        return out.unflatten(-1, (self.features, self.params_per_feature))

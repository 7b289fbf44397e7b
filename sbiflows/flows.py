"""Flows: a base distribution pushed through transforms, and factories for the classic architectures.

``log_prob(x)`` maps data to latent (``forward`` of every layer) and adds the log-determinants;
``sample`` draws latent points from the base and maps them to data (``inverse`` of every layer).
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from sbiflows.checks import check_choice
from sbiflows.distributions import BoxUniform, StandardNormal
from sbiflows.transforms import (
    AdditiveCoupling,
    Compose,
    Coupling,
    ElementwiseAffine,
    InverseAutoregressive,
    LULinear,
    MaskedAutoregressive,
    Planar,
    Transform,
    alternating_mask,
    bit_mask,
    make_transformer,
)
from sbiflows.transforms.autoregressive import LOG_SCALE_BOUND as MAF_LOG_SCALE_BOUND
from sbiflows.transforms.coupling import LOG_SCALE_BOUND as COUPLING_LOG_SCALE_BOUND
from sbiflows.transforms.transformers import DEFAULT_BINS, DEFAULT_BOUND

__all__ = [
    "DEFAULT_BINS", "DEFAULT_BOUND", "MIXINGS", "BoxUniform", "Flow", "StandardNormal", "iaf", "maf", "nice", "nsf",
    "planar_flow", "realnvp",
]

#: How :func:`realnvp` and :func:`nsf` let every dimension depend on every other: nothing (the masks
#: alternate), an LU-linear layer after each coupling, or masks that cycle through binary digits (:func:`~sbiflows.transforms.bit_mask`).
MIXINGS = ("none", "lu", "masks")


#: Start of the warning of :func:`maf` and :func:`iaf` for one feature (callers that already warned filter it).
ONE_FEATURE_WARNING = "with 1 feature, a stack of affine autoregressive layers is a Gaussian"


def _warn_one_feature(features: int, name: str, transformer: str) -> None:
    if features == 1 and transformer == "affine":
        warnings.warn(
            f"{ONE_FEATURE_WARNING} (conditional on the context, if any): {name}(1) cannot represent skewed or "
            "multimodal densities; use more features or transformer='spline'",
            UserWarning,
            stacklevel=3,
        )


class Flow(nn.Module):
    """A normalizing flow ``p(x | context)``: a base distribution and a chain of transforms.

    Args:
        transforms: One :class:`~sbiflows.transforms.Transform` or a sequence, applied in order from
            data to latent.
        base: The latent distribution (a module with ``log_prob`` and ``sample``); default
            :class:`StandardNormal`.

    Example:
        >>> flow = maf(2, context_features=3)
        >>> flow.sample(10, context=torch.zeros(3)).shape
        torch.Size([10, 2])
        >>> flow.sample(10, context=torch.zeros(4, 3)).shape
        torch.Size([10, 4, 2])
        >>> flow.log_prob(torch.zeros(5, 2), context=torch.zeros(3)).shape
        torch.Size([5])
    """

    def __init__(self, transforms: Transform | Sequence[Transform], base: nn.Module | None = None):
        super().__init__()
        self.transform = transforms if isinstance(transforms, Transform) else Compose(*transforms)
        self.features = self.transform.features
        self.context_features = self.transform.context_features
        self.base = StandardNormal(self.features) if base is None else base
        if getattr(self.base, "features", self.features) != self.features:
            raise ValueError(f"base has {self.base.features} features but the transforms have {self.features}")

    # -------------------------------------------------------------------------------- checks
    def _check_x(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.ndim == 0 or x.shape[-1] != self.features:
            raise ValueError(f"x must have shape (*batch, {self.features}), got {tuple(x.shape)}")
        dtype = self._dtype()
        if x.dtype != dtype:
            raise TypeError(f"x has dtype {x.dtype} but the flow is {dtype}; convert one of them")

    def _check_context(self, context: Tensor | None) -> Tensor | None:
        if self.context_features == 0:
            if context is not None:
                raise ValueError("this flow is unconditional (context_features=0) but a context was given")
            return None
        if context is None:
            raise ValueError(f"this flow is conditional: context of shape (*batch, {self.context_features}) is required")
        if not isinstance(context, Tensor):
            raise TypeError(f"context must be a torch.Tensor, got {type(context).__name__}")
        if context.ndim == 0 or context.shape[-1] != self.context_features:
            raise ValueError(
                f"context must have shape ({self.context_features},) or (*batch, {self.context_features}), "
                f"got {tuple(context.shape)}"
            )
        if context.dtype != self._dtype():
            raise TypeError(f"context has dtype {context.dtype} but the flow is {self._dtype()}")
        return context

    def _dtype(self) -> torch.dtype:
        # Lazy: stops at the first floating tensor instead of collecting every parameter (this runs on
        # every log_prob call, and walking all modules was a visible share of a training step).
        tensors = itertools.chain(self.parameters(), self.buffers())
        return next((t.dtype for t in tensors if t.is_floating_point()), torch.get_default_dtype())

    # --------------------------------------------------------------------------------- public
    def log_prob(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """Log-density of ``x`` (``(*batch, D)``) given ``context`` (``(C,)`` broadcasts over all rows).

        Raises:
            ValueError: If the batch shapes of ``x`` and ``context`` do not broadcast together (or any
                of the checks on ``x`` and ``context`` fails; see the messages).
            TypeError: If ``x`` or ``context`` is not a tensor of the flow's dtype.
        """
        self._check_x(x)
        context = self._check_context(context)
        if context is not None:
            try:
                batch = torch.broadcast_shapes(x.shape[:-1], context.shape[:-1])
            except RuntimeError:
                raise ValueError(
                    f"context of shape {tuple(context.shape)} does not broadcast with x of shape "
                    f"{tuple(x.shape)}: their batch shapes {tuple(context.shape[:-1])} and "
                    f"{tuple(x.shape[:-1])} are incompatible"
                ) from None
            x = x.expand(*batch, self.features)
        z, logdet = self.transform(x, context)
        return self.base.log_prob(z) + logdet

    def sample_and_log_prob(
        self, n: int, context: Tensor | None = None, *, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """``n`` samples and their log-densities.

        A context of shape ``(C,)`` (or none) gives samples ``(n, D)``; a batch of contexts ``(*B, C)``
        gives ``(n, *B, D)``: ``n`` samples for each context, in one batched computation.
        """
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        context = self._check_context(context)
        batch = () if context is None else tuple(context.shape[:-1])
        z = self.base.sample((n, *batch), generator=generator)
        return self.from_base(z, context)

    def from_base(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Samples and log-densities of given base draws ``z`` (``(n, *B, D)`` for context ``(*B, C)``).

        What :meth:`sample_and_log_prob` does after drawing ``z``; lets a caller choose the noise
        (e.g. reproducible blocks that do not depend on how a large draw is chunked).
        """
        context = self._check_context(context)
        if context is not None:
            context = context.expand(*z.shape[:-1], self.context_features)
        x, logdet = self.transform.inverse(z, context)
        return x, self.base.log_prob(z) - logdet

    def sample(self, n: int, context: Tensor | None = None, *, generator: torch.Generator | None = None) -> Tensor:
        """``n`` samples; shapes as in :meth:`sample_and_log_prob`."""
        return self.sample_and_log_prob(n, context, generator=generator)[0]


# ------------------------------------------------------------------------------------ factories
def maf(
    features: int,
    context_features: int = 0,
    *,
    transforms: int = 5,
    hidden_features: Sequence[int] = (50, 50),
    random_degrees: bool = True,
    activation: type[nn.Module] = nn.ReLU,
    seed: int = 0,
    transformer: str = "affine",
    bins: int = DEFAULT_BINS,
    bound: float = DEFAULT_BOUND,
) -> Flow:
    """Masked autoregressive flow: ``transforms`` MAF layers, reversing the ordering between layers.

    Density evaluation is one pass per layer; sampling is ``D`` passes per layer. With one feature
    and ``transformer="affine"`` every layer is an affine map of a Gaussian, so the flow is a
    Gaussian (it warns).

    Args:
        features: Dimension D.
        context_features: Context dimension C (0: unconditional).
        transforms: Number of layers.
        hidden_features: Hidden sizes of each layer's MADE.
        random_degrees: Random (True) or cyclic MADE connectivity.
        activation: Activation class of the MADEs.
        seed: Seed of the MADE degrees (layer ``i`` uses ``seed + i``).
        transformer: ``"affine"`` (``x = z * exp(s) + m``) or ``"spline"`` (rational-quadratic
            splines on ``[-bound, bound]`` with ``bins`` bins and identity tails).
        bins: Number of spline bins (``>= 1``; validated, used by ``"spline"`` only).
        bound: Half-width of the spline interval (``> 0``; validated, used by ``"spline"`` only).

    Raises:
        TypeError, ValueError: For a ``transformer``, ``bins`` or ``bound`` of the wrong type or value.

    Example:
        >>> maf(3, 2).log_prob(torch.randn(4, 3), torch.randn(4, 2)).shape
        torch.Size([4])
        >>> maf(3, 2, transformer="spline", bins=8).log_prob(torch.randn(4, 3), torch.randn(4, 2)).shape
        torch.Size([4])
    """
    map_ = make_transformer(transformer, bins=bins, bound=bound, log_scale_bound=MAF_LOG_SCALE_BOUND)
    _warn_one_feature(features, "maf", transformer)
    layers = [
        MaskedAutoregressive(
            features, context_features, hidden_features=hidden_features,
            ordering="natural" if i % 2 == 0 else "reverse", random_degrees=random_degrees,
            activation=activation, seed=seed + i, transformer=map_,
        )
        for i in range(transforms)
    ]
    return Flow(layers)


def iaf(
    features: int,
    context_features: int = 0,
    *,
    transforms: int = 5,
    hidden_features: Sequence[int] = (50, 50),
    random_degrees: bool = True,
    activation: type[nn.Module] = nn.ReLU,
    seed: int = 0,
    transformer: str = "affine",
    bins: int = DEFAULT_BINS,
    bound: float = DEFAULT_BOUND,
) -> Flow:
    """Inverse autoregressive flow: MAF layers used the other way round.

    Sampling is one pass per layer; the density of an arbitrary point takes ``D`` passes per layer.
    With one feature and affine layers the flow is a Gaussian (it warns), as for :func:`maf`, whose
    options (``transformer``, ``bins``, ``bound``) it takes.

    Example:
        >>> iaf(2).sample(3).shape
        torch.Size([3, 2])
    """
    map_ = make_transformer(transformer, bins=bins, bound=bound, log_scale_bound=MAF_LOG_SCALE_BOUND)
    _warn_one_feature(features, "iaf", transformer)
    layers = [
        InverseAutoregressive(
            features, context_features, hidden_features=hidden_features,
            ordering="natural" if i % 2 == 0 else "reverse", random_degrees=random_degrees,
            activation=activation, seed=seed + i, transformer=map_,
        )
        for i in range(transforms)
    ]
    return Flow(layers)


def realnvp(
    features: int,
    context_features: int = 0,
    *,
    transforms: int = 6,
    hidden_features: Sequence[int] = (64, 64),
    activation: type[nn.Module] = nn.ReLU,
    transformer: str = "affine",
    bins: int = DEFAULT_BINS,
    bound: float = DEFAULT_BOUND,
    mixing: str = "none",
) -> Flow:
    """Coupling layers with alternating masks: RealNVP (affine) or, with ``transformer="spline"``, NSF.

    ``transformer``, ``bins`` and ``bound`` are as in :func:`maf`. Affine couplings need
    ``features >= 2``; spline couplings also take one feature with a context (the conditioner then
    sees the context alone). ``"none"`` (default) alternates the masks (even dimensions, then odd ones),
    so each layer conditions one half on the other and two dimensions of the same half never act on
    each other directly. ``mixing="lu"`` puts a :class:`~sbiflows.transforms.LULinear` after each
    coupling (as sbi's ``nsf`` does); ``mixing="masks"`` keeps the couplings alone but lets the masks
    cycle through the binary digits of the dimension index (:func:`~sbiflows.transforms.bit_mask`), so every pair of
    dimensions is split by some layer, at no extra parameters or cost. With two features all three
    masks agree.

    Raises:
        ValueError: For one feature with affine couplings or without a context (and see :func:`maf`).

    Example:
        >>> realnvp(2).log_prob(torch.zeros(1, 2)).shape
        torch.Size([1])
    """
    map_ = make_transformer(transformer, bins=bins, bound=bound, log_scale_bound=COUPLING_LOG_SCALE_BOUND)
    if features < 2 and (transformer == "affine" or context_features < 1):
        raise ValueError(
            f"realnvp needs features >= 2 (couplings condition one half on the other), or features == 1 with "
            f"transformer='spline' and context_features >= 1; got features={features}, transformer="
            f"{transformer!r}, context_features={context_features}"
        )
    check_choice(mixing, "mixing", MIXINGS)
    layers: list[Transform] = []
    for i in range(transforms):
        layers.append(Coupling(
            features, context_features, transformer=map_, hidden_features=hidden_features, activation=activation,
            mask=(None if features < 2 else bit_mask(features, layer=i) if mixing == "masks"
                  else alternating_mask(features, parity=i % 2)),
        ))
        if mixing == "lu" and features > 1:
            layers.append(LULinear(features))
    return Flow(layers)


def nsf(
    features: int,
    context_features: int = 0,
    *,
    transforms: int = 5,
    hidden_features: Sequence[int] = (50, 50),
    activation: type[nn.Module] = nn.ReLU,
    bins: int = DEFAULT_BINS,
    bound: float = DEFAULT_BOUND,
    mixing: str = "none",
) -> Flow:
    """Neural spline flow (Durkan et al. 2019): rational-quadratic spline couplings, alternating masks.

    The architecture of sbi's ``nsf`` without its LU-linear layers between couplings (``mixing="lu"``
    adds them, see :func:`realnvp`): each layer
    transforms half of the features with splines on ``[-bound, bound]`` (``bins`` bins, identity
    tails) whose parameters an MLP computes from the other half and the context. With one feature
    (which needs a context) the MLP sees the context alone, as in sbi. Same as
    ``realnvp(..., transformer="spline")`` with this function's defaults (5 layers of ``(50, 50)``).

    Example:
        >>> nsf(2, 3).log_prob(torch.zeros(4, 2), torch.zeros(4, 3)).shape
        torch.Size([4])
        >>> nsf(1, 3).sample(5, torch.zeros(3)).shape
        torch.Size([5, 1])
    """
    return realnvp(
        features, context_features, transforms=transforms, hidden_features=hidden_features, activation=activation,
        transformer="spline", bins=bins, bound=bound, mixing=mixing,
    )


def nice(
    features: int,
    context_features: int = 0,
    *,
    transforms: int = 4,
    hidden_features: Sequence[int] = (64, 64),
    activation: type[nn.Module] = nn.ReLU,
) -> Flow:
    """NICE: additive (volume-preserving) couplings with alternating masks, then a diagonal scaling.

    The final :class:`~sbiflows.transforms.ElementwiseAffine` is the NICE paper's scaling layer (it is
    conditional when the flow is); it is the only layer that changes volume.

    Example:
        >>> nice(2).log_prob(torch.zeros(1, 2)).shape
        torch.Size([1])
    """
    layers: list[Transform] = [
        AdditiveCoupling(
            features, context_features, mask=alternating_mask(features, parity=i % 2),
            hidden_features=hidden_features, activation=activation,
        )
        for i in range(transforms)
    ]
    layers.append(ElementwiseAffine(features, context_features, hidden_features=hidden_features))
    return Flow(layers)


def planar_flow(
    features: int,
    context_features: int = 0,
    *,
    transforms: int = 16,
    hidden_features: Sequence[int] = (64, 64),
) -> Flow:
    """A stack of planar layers. Sampling is exact; ``log_prob`` inverts each layer by root finding.

    Example:
        >>> planar_flow(2, transforms=2).sample(3).shape
        torch.Size([3, 2])
    """
    return Flow([Planar(features, context_features, hidden_features=hidden_features) for _ in range(transforms)])

"""Invertible flow layers. ``forward`` maps data -> latent, ``inverse`` latent -> data (see :mod:`.base`)."""

from sbiflows.transforms.autoregressive import InverseAutoregressive, MaskedAutoregressive
from sbiflows.transforms.base import Compose, Inverse, Transform, broadcast_context
from sbiflows.transforms.coupling import AdditiveCoupling, AffineCoupling, Coupling, alternating_mask, bit_mask
from sbiflows.transforms.elementwise import BatchNorm, ElementwiseAffine, Permutation
from sbiflows.transforms.linear import LULinear
from sbiflows.transforms.made import MADE, MaskedLinear
from sbiflows.transforms.planar import Planar
from sbiflows.transforms.transformers import Affine, RationalQuadraticSpline, Transformer, make_transformer

__all__ = [
    "MADE",
    "AdditiveCoupling",
    "Affine",
    "AffineCoupling",
    "BatchNorm",
    "Compose",
    "Coupling",
    "ElementwiseAffine",
    "Inverse",
    "InverseAutoregressive",
    "LULinear",
    "MaskedAutoregressive",
    "MaskedLinear",
    "Permutation",
    "Planar",
    "RationalQuadraticSpline",
    "Transform",
    "Transformer",
    "alternating_mask",
    "bit_mask",
    "broadcast_context",
    "make_transformer",
]

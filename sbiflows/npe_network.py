"""NPE's network: its options checked when :class:`~sbiflows.npe.NPE` is made, built at the first fit, described.

:func:`check_network_options` refuses a bad architecture before any data is seen;
:func:`build_network` makes a member's :class:`~sbiflows.estimator.PosteriorNet` from the first fit's
rows (the embedding's output size and the z-scoring come from them); :func:`network_config` is the
description a posterior keeps and saves; :func:`partial_posterior` keeps the trained weights of a fit that
raised.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributions import Distribution

from sbiflows.checks import check_int
from sbiflows.embeddings import EMBEDDINGS, auto_embedding, embedding_config, from_name
from sbiflows.ensemble import EnsembleNet, members_of, weights_of
from sbiflows.posterior import Posterior
from sbiflows.seeding import global_seed
from sbiflows.training import TrainingHistory
from sbiflows.estimator import (
    ACTIVATIONS,
    ESTIMATORS,
    PosteriorNet,
    build_flow,
    check_hidden_features,
    check_mixing,
    resolve_transformer,
)
from sbiflows.flows import Flow
from sbiflows.xshape import layout, zscore_shaped

__all__ = ["build_network", "check_network_options", "network_config"]


def check_network_options(
    estimator: str | Callable[[int, int], Flow],
    theta_dim: int,
    *,
    transformer: str | None,
    bins: int | None,
    bound: float | None,
    embedding_net: nn.Module | str | None,
    activation: str,
    transforms: int | None,
    hidden_features: Sequence[int],
    mixing: str = "none",
) -> tuple[dict[str, Any], int | None, tuple[int, ...]]:
    """Check the architecture options of :class:`~sbiflows.npe.NPE` for ``theta_dim`` parameters.

    Warns (pointing at the caller of ``NPE(...)``) for an affine MAF on 1-D theta, which is a conditional
    Gaussian in the unconstrained space.

    Returns:
        ``(transformer, transforms, hidden_features)``: the transformer options of
        :func:`~sbiflows.estimator.resolve_transformer` with ``mixing`` added (the flow options a saved
        config records and :func:`~sbiflows.estimator.build_flow` takes), the number of layers (None: the default rule at
        the first fit) and the hidden sizes as a tuple.

    Raises:
        TypeError: For an estimator that is neither a name nor a callable, or an embedding net that is
            not an ``nn.Module``, None or ``"auto"``.
        ValueError: For an unknown estimator or activation name, an affine ``"realnvp"`` with 1-D theta,
            an embedding name other than ``"auto"``, or transformer, bins, bound, transforms or hidden sizes
            out of range.

    Example:
        >>> transformer, transforms, hidden = check_network_options(
        ...     "nsf", 2, transformer=None, bins=None, bound=None, embedding_net=None, activation="tanh",
        ...     transforms=None, hidden_features=[50, 50])
        >>> transformer["transformer"], transforms, hidden
        ('spline', None, (50, 50))
    """
    if isinstance(estimator, str) and estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; valid names are {sorted(ESTIMATORS)} or a callable")
    if not isinstance(estimator, str) and not callable(estimator):
        raise TypeError(f"estimator must be a name {sorted(ESTIMATORS)} or a callable, got {type(estimator).__name__}")
    resolved = {**resolve_transformer(estimator, transformer, bins, bound), "mixing": check_mixing(estimator, mixing)}
    spline = resolved["transformer"] == "spline"
    if estimator == "realnvp" and theta_dim < 2 and not spline:
        raise ValueError(
            "estimator 'realnvp' with affine couplings needs theta with at least 2 dimensions (couplings split "
            "theta); use 'nsf' or 'maf'"
        )
    if estimator == "maf" and theta_dim == 1 and not spline:
        warnings.warn(
            "with 1-D theta, a MAF of affine layers is a conditional Gaussian in the prior's unconstrained "
            "space (it cannot represent multimodal posteriors); use estimator='nsf' or transformer='spline' for "
            "more flexibility",
            UserWarning,
            stacklevel=3,  # the caller of NPE(...)
        )
    names = ("auto", *EMBEDDINGS)
    if isinstance(embedding_net, str):
        if embedding_net not in names:
            raise ValueError(f"embedding_net must be an nn.Module, None or one of {names}, got {embedding_net!r}")
    elif embedding_net is not None and not isinstance(embedding_net, nn.Module):
        raise TypeError(f"embedding_net must be a torch.nn.Module, None or one of {names}, got "
                        f"{type(embedding_net).__name__}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; valid names are {sorted(ACTIVATIONS)}")
    transforms = check_int(transforms, "transforms", minimum=1, optional="the default rule")
    if transforms is not None and not isinstance(estimator, str):
        raise ValueError(f"transforms sets the depth of a named estimator; a callable estimator builds its own flow "
                         f"(leave transforms out), got transforms={transforms}")
    return resolved, transforms, check_hidden_features(hidden_features)


def build_network(
    u: Tensor,
    x: Tensor,
    *,
    estimator: str | Callable[[int, int], Flow],
    theta_dim: int,
    seed: int,
    transforms: int,
    hidden_features: tuple[int, ...],
    activation: str,
    transformer: dict[str, Any],
    embedding_net: nn.Module | str | None,
    device: torch.device,
    dtype: torch.dtype,
) -> PosteriorNet:
    """A new :class:`~sbiflows.estimator.PosteriorNet` for training rows ``u`` ``(N, D)`` and ``x`` ``(N, *x_shape)``.

    The embedding net (a deep copy of ``embedding_net``; ``"auto"``:
    :func:`~sbiflows.embeddings.auto_embedding`, and a built-in's name: :func:`~sbiflows.embeddings.from_name`
    for ``x``'s shape, both with weights from ``seed``; without one, flat ``x`` passes
    unchanged and structured ``x`` is flattened) is probed on two z-scored rows to read its output size,
    then a flow of ``estimator`` is built with ``seed`` (torch's global RNG state is left unchanged) and the network
    z-scores with the statistics of ``u`` and ``x``. The options are those :func:`check_network_options`
    returned; ``transformer`` is its transformer dict.

    Raises:
        ValueError: If the embedding net fails on ``x`` or does not map it to ``(N, C)``.

    Example:
        >>> options = check_network_options("maf", 2, transformer=None, bins=None, bound=None, embedding_net=None,
        ...                                 activation="tanh", transforms=1, hidden_features=(8,))
        >>> net = build_network(torch.randn(20, 2), torch.randn(20, 3), estimator="maf", theta_dim=2, seed=0,
        ...                     transforms=1, hidden_features=options[2], activation="tanh", transformer=options[0],
        ...                     embedding_net=None, device=torch.device("cpu"), dtype=torch.float32)
        >>> net.x_shape, net.x_dim
        ((3,), 3)
    """
    x_shape = tuple(x.shape[1:])
    if embedding_net == "auto":
        with global_seed(seed):  # its weights come from the seed, as the flow's do
            embedding_net = auto_embedding(x_shape, theta_dim)
    elif isinstance(embedding_net, str):  # a built-in by name: each member's weights from its own seed
        with global_seed(seed):
            embedding_net = from_name(embedding_net, x_shape)
    if embedding_net is not None:
        try:
            embedding = copy.deepcopy(embedding_net)  # trained jointly: the caller's module stays as it is
        except Exception as error:  # noqa: BLE001 - whatever a module's copy raises (a lock, an open file)
            raise TypeError(f"embedding_net must be a module that copy.deepcopy can copy (NPE trains a copy of it), "
                            f"but copying {type(embedding_net).__name__} failed: {error}") from error
        extra = [key for key, value in embedding.state_dict().items() if not isinstance(value, Tensor)]
        if extra:
            raise TypeError(f"embedding_net's state_dict must hold tensors only (its weights are saved without "
                            f"pickle), but {type(embedding_net).__name__} has other values at {extra[:5]} "
                            "(get_extra_state)")
    else:  # structured x without an embedding: the flow sees it flattened
        embedding = nn.Identity() if len(x_shape) == 1 else nn.Flatten()
    embedding.to(device, dtype)
    axes, padded = layout(embedding, x_shape)
    x_mean, x_std, constant = zscore_shaped(x, axes=axes, padded_trials=padded)
    if constant:
        where = "dimensions" if not axes else f"z-scoring groups (statistics of shape {tuple(x_mean.shape)})"
        warnings.warn(
            f"x has constant {where} {constant} in the training data; they carry no information and are "
            "not standardized (std set to 1)",
            UserWarning,
            stacklevel=3,
        )
    probe = ((x[:2] - x_mean) / x_std).to(dtype)
    expected = f"(N, {', '.join(map(str, x_shape))})"
    try:
        with torch.no_grad():
            out = embedding(probe)
    except (RuntimeError, ValueError, TypeError) as error:
        raise ValueError(
            f"embedding_net failed on training x of shape {expected} (x_shape {x_shape}): {error}"
        ) from error
    if not isinstance(out, Tensor) or out.ndim != 2 or out.shape[0] != len(probe):
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"embedding_net must map {expected} to (N, C), got output {shape}")
    with global_seed(seed):
        flow = build_flow(estimator, theta_dim, out.shape[1], transforms=transforms,
                          hidden_features=hidden_features, activation=activation, seed=seed,
                          **transformer)
    net = PosteriorNet(flow, embedding, theta_dim=theta_dim, x_shape=x_shape).to(device, dtype)
    net.set_standardization(u, x)
    return net


def network_config(
    net: PosteriorNet | EnsembleNet,
    *,
    estimator: str | Callable[[int, int], Flow],
    transformer: dict[str, Any],
    transforms: int,
    hidden_features: tuple[int, ...],
    activation: str,
    theta_dim: int,
    flow_seed: int,
    balancing: float,
    space: str,
    coverage_penalty: float = 0.0,
) -> dict:
    """The architecture description a :class:`~sbiflows.posterior.Posterior` keeps as ``config`` (and saves).

    A callable ``estimator`` is recorded as ``"custom"``; ``flow_seed`` is the seed of the first fit; the
    embedding recorded is the one the network holds (:func:`~sbiflows.embeddings.embedding_config`).
    """
    return {
        "estimator": estimator if isinstance(estimator, str) else "custom",
        **transformer,
        "transforms": transforms,
        "hidden_features": list(hidden_features),
        "activation": activation,
        **embedding_config(members_of(net)[0].embedding),  # the one built (``"auto"`` resolved)
        **({} if members_of(net)[0].fewest_trials is None else {"fewest_trials": members_of(net)[0].fewest_trials}),
        "theta_dim": theta_dim,
        "x_dim": net.x_dim,
        "x_shape": list(net.x_shape),
        "x_stats_shape": list(net.x_shift.shape),
        "context_features": members_of(net)[0].flow.context_features,
        "flow_seed": flow_seed,
        "ensemble": len(members_of(net)),
        **({} if weights_of(net) is None else {"mixture_weights": weights_of(net)}),
        "balancing": balancing,
        "coverage_penalty": coverage_penalty,
        "space": space,
    }


def partial_posterior(
    net: PosteriorNet | EnsembleNet, prior: Distribution, config: dict, history: TrainingHistory,
    error: BaseException, *, of: int, max_batch_elements: int | None,
) -> Posterior | None:
    """The posterior of the trained weights of a fit that raised after some epochs (``NPE.partial_posterior``),
    or None if even that fails; a note on ``error`` says where they are. ``of``: the members the fit trains."""
    try:
        posterior = Posterior(net, prior, config=config, history=history, max_batch_elements=max_batch_elements)
    except Exception:  # noqa: BLE001 - rescuing the weights must never hide the original error
        return None
    if hasattr(error, "add_note"):  # Python >= 3.11
        what = (f"{len(net.members)} of {of} ensemble members" if isinstance(net, EnsembleNet)
                else f"epoch {history.best_epoch}")
        error.add_note("sbiflows: the NPE was restored to its state before this fit; the best weights of this "
                       f"attempt ({what}) are in npe.partial_posterior")
    return posterior

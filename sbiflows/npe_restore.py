"""What :meth:`sbiflows.NPE.restore` adopts from an earlier fit, checked before the NPE changes: the
posterior's weights, its training rows, their validation splits and the training histories (how
:class:`~sbiflows.TSNPE` resumes a killed run from its saved rounds)."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from sbiflows.ensemble import AUTO_MEMBERS, member_seed
from sbiflows.posterior import Posterior
from sbiflows.training import TrainingHistory
from sbiflows.training_data import check_training_data, duplicate_groups
from sbiflows.training_options import check_validation, validation_mask

__all__ = ["SNAPSHOT_CHOICES", "RestoredState", "restored_state"]

#: The ``ensemble`` choices that train one flow and keep its snapshots (:mod:`sbiflows.snapshots`).
SNAPSHOT_CHOICES = ("snapshots", "auto-snapshots", "auto-stacked")


@dataclass
class RestoredState:
    """The state an :class:`~sbiflows.NPE` takes over from an earlier fit (all checked)."""

    net: nn.Module
    theta: Tensor
    x: Tensor
    masks: list[Tensor]
    histories: list[TrainingHistory]
    flow_seed: int
    transforms: int
    auto_summary: dict | None


def restored_state(npe: Any, posterior: Posterior, theta: Any, x: Any, *, validation: Any = None,
                   histories: list[TrainingHistory] | None = None) -> RestoredState:
    """Check ``posterior``, its rows and splits against ``npe`` (an :class:`~sbiflows.NPE`) and return what
    :meth:`~sbiflows.NPE.restore` adopts; ``npe`` itself is not changed. The arguments are ``restore``'s.

    Raises:
        ValueError: For a posterior of another shape, space or number of flows than ``npe.ensemble``
            allows, or rows, splits or histories that do not fit it.
    """
    if not isinstance(posterior, Posterior):
        raise TypeError(f"posterior must be a Posterior (e.g. sbiflows.load(path)), got {type(posterior).__name__}")
    members = posterior.config.get("ensemble", 1)
    allowed = {"auto": (1, AUTO_MEMBERS), **dict.fromkeys(SNAPSHOT_CHOICES, (1, 2, 3))}.get(
        npe.ensemble, (npe.ensemble,))
    if members not in allowed:
        raise ValueError(f"the posterior has {members} flow(s), this NPE has ensemble={npe.ensemble!r}")
    if posterior.theta_dim != npe.theta_dim:
        raise ValueError(f"the posterior has {posterior.theta_dim} parameters, this NPE's prior {npe.theta_dim}")
    space = posterior.config.get("space", "unconstrained")  # files saved before the option: unconstrained
    if space != npe.space:
        raise ValueError(f"the posterior's flow lives in the {space!r} space, this NPE's in {npe.space!r}")
    theta, x = check_training_data(theta, x, prior=npe._prior, theta_dim=npe.theta_dim, dtype=npe.dtype,
                                   device=npe.device, earlier=None, validation_fraction=0.5)
    x_shape = tuple(posterior.x_shape)
    if tuple(x.shape[1:]) != x_shape:
        wanted = ", ".join(map(str, ("N", *x_shape)))
        raise ValueError(f"x must have shape ({wanted}) like the posterior's, got {tuple(x.shape)}")
    _check_architecture(npe, posterior.config)
    flow_seed = posterior.config.get("flow_seed", 0)
    members = 1 if npe.ensemble in SNAPSHOT_CHOICES else members  # one flow trained: one split, one history
    if validation is None:
        groups = duplicate_groups(theta, x)
        masks = [validation_mask(len(theta), 0.1, seed=member_seed(flow_seed, k), groups=groups)
                 for k in range(members)]
    else:
        validation = torch.as_tensor(validation)
        if members == 1 and validation.ndim == 2 and len(validation) == 1:
            validation = validation[0]
        if members > 1 and (validation.ndim != 2 or len(validation) != members):
            raise ValueError(f"validation must be {members} boolean masks of shape ({members}, {len(theta)}) "
                             f"for an ensemble of {members} flows, got shape {tuple(validation.shape)}")
        masks = list(validation) if members > 1 else [validation]
    masks = [check_validation(mask, len(theta)) for mask in masks]
    first = copy.deepcopy(posterior.history) if posterior.history is not None else TrainingHistory()
    if histories is None:
        histories = [first] + [TrainingHistory() for _ in range(members - 1)]
    elif len(histories) != members or not all(isinstance(h, TrainingHistory) for h in histories):
        raise ValueError(f"histories must be {members} TrainingHistory objects, one per flow, got "
                         f"{type(histories).__name__} of length {len(histories)}")
    return RestoredState(net=copy.deepcopy(posterior.net).to(npe.device), theta=theta, x=x, masks=masks,
                         histories=copy.deepcopy(list(histories)), flow_seed=flow_seed,
                         transforms=posterior.config["transforms"], auto_summary=posterior.config.get("ensemble_auto"))


def _check_architecture(npe: Any, config: dict) -> None:
    """The posterior's network must be the one ``npe``'s options build: the refit's posterior records ``npe``'s
    options, and a file whose options describe another network saves but does not load."""
    architecture = npe._architecture()
    if not isinstance(architecture["estimator"], str):  # a callable builds its own flow: the options do not
        expected = {"estimator": "custom"}                  # describe it, and load takes the callable again
    else:
        expected = {"estimator": architecture["estimator"], **architecture["transformer"],
                    "hidden_features": list(architecture["hidden_features"]), "activation": architecture["activation"]}
    if npe.transforms is not None:
        expected["transforms"] = npe.transforms
    differing = [f"{key}: {config[key]!r} (posterior) against {value!r} (this NPE)" for key, value in expected.items()
                 if key in config and config[key] != value]  # files saved before an option do not record it
    if differing:
        raise ValueError(f"the posterior's network is not the one this NPE's options build ({'; '.join(differing)}); "
                         "restore it into an NPE made with the options it was trained with")

"""Save and load posteriors without pickle: tensors plus a JSON config in one ``torch.save`` file.

The file is a dict of plain types and tensors, readable with
``torch.load(path, weights_only=True, map_location=...)``:

* ``format_version`` (int) and ``sbiflows_version`` (str);
* ``config``: a JSON string with the architecture (estimator name, transformer with its bins and
  bound, layers, hidden sizes, seed),
  shapes (``theta_dim``, ``x_dim``, context size, every tensor's shape), dtype, the prior spec (a
  whitelist of ``torch.distributions`` classes and the names of their parameter tensors, nested for
  ``Independent`` and ``IndependentPrior``; null only for a prior that ``save`` was told to leave out
  with ``allow_unsaved_prior=True``: any other prior is refused at save), the training history and
  the posterior's ``default_x`` (a list of floats, or absent/null; e.g. the ``x_o`` of a sequential run) and
  ``max_batch_elements`` (``2**17`` for None, the device's size, unless ``max_batch_elements_chosen`` is true);
* ``state_dict``: the network's tensors, z-score buffers included;
* ``prior_tensors``: the prior's parameters;
* ``sha256``: a digest of the config and every tensor (names, dtypes, shapes and bytes).

Classes are only ever looked up in registries (:data:`sbiflows.estimator.ESTIMATORS`,
:data:`sbiflows.prior_specs.PRIOR_CLASSES`), never imported by name. Objects that JSON cannot describe (a
custom prior left out on purpose, a callable estimator, an embedding net of the user's own) are passed to
:func:`load` by the caller; a built-in embedding (:data:`sbiflows.embeddings.EMBEDDINGS`) is saved as its
name, its constructor arguments and its weights.
"""

from __future__ import annotations

import dataclasses
from copy import deepcopy
import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributions import Distribution

import sbiflows
from sbiflows.checks import check_bool, check_device
from sbiflows.embeddings import EMBEDDINGS
from sbiflows.embeddings import build as build_embedding
from sbiflows.ensemble import mixture
from sbiflows.estimator import ESTIMATORS, PosteriorNet, build_flow
from sbiflows.flows import Flow
from sbiflows.prior_specs import KNOWN, build_prior, move_prior, prior_spec
from sbiflows.priors import check_prior
from sbiflows.training import TrainingHistory

__all__ = ["FORMAT_VERSION", "MIN_FORMAT_VERSION", "digest", "read", "read_history", "save"]

#: Version of the file layout; :func:`load` reads versions ``MIN_FORMAT_VERSION`` to ``FORMAT_VERSION``.
#: 2 (sbiflows with splines): the config records ``transformer``, ``bins`` and ``bound``, and the
#: estimator may be ``"nsf"``. Version 1 files have no such keys: their flows are affine.
#: 3: the config may record ``ensemble`` (K members, state keys ``members.<k>.``); older files are single flows.
#: 4: the config may record ``x_shape`` and ``x_stats_shape`` (structured x; older files are flat, ``(x_dim,)``)
#: and a built-in embedding (``embedding`` a name of :data:`sbiflows.embeddings.EMBEDDINGS` with its
#: ``embedding_config``), whose weights are in the state dict like the flow's.
#: 5: an ensemble's config may record ``mixture_weights`` (older files mix with equal weights). A file without
#: them is written as version 4, so that sbiflows releases before version 5 still read it.
FORMAT_VERSION = 5
#: The oldest file layout :func:`load` reads.
MIN_FORMAT_VERSION = 1
_KEYS = {"format_version", "sbiflows_version", "config", "state_dict", "prior_tensors", "sha256"}
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}


def save(posterior: Any, path: str | Path, *, allow_unsaved_prior: bool = False) -> None:
    """Write ``posterior`` (a :class:`~sbiflows.posterior.Posterior`) to ``path``; the object is not modified.

    This module knows the file format and nothing of the ``Posterior`` class, which calls it
    (``Posterior.save``) and builds itself from :func:`read` (:func:`sbiflows.load`), so the two
    modules do not import each other.

    The prior is saved when it is made of whitelisted classes (:mod:`sbiflows.prior_specs`: the common
    ``torch.distributions``, ``Independent``, :func:`~sbiflows.priors.box_uniform`,
    :class:`~sbiflows.priors.IndependentPrior` of such marginals). Any other prior (a hand-written class,
    a ``TransformedDistribution``, a conditioned posterior) is refused, never dropped silently, unless
    ``allow_unsaved_prior=True``: then the file holds no prior and :func:`load` needs ``prior=...``.

    Args:
        posterior: The posterior to save.
        path: The file (written atomically: an interrupted save leaves the previous file intact).
        allow_unsaved_prior: Save a prior that the file cannot describe by leaving it out.

    Raises:
        ValueError: If the prior cannot be saved and ``allow_unsaved_prior`` is False.

    Example:
        >>> import tempfile, torch
        >>> from torch.distributions import Normal
        >>> from sbiflows import NPE, load
        >>> prior = Normal(torch.zeros(2), torch.ones(2))
        >>> theta = prior.sample((200,))
        >>> post = NPE(prior, transforms=1).fit(theta, theta, max_epochs=2, progress=False)
        >>> path = tempfile.mkdtemp() + "/post.pt"
        >>> post.save(path)
        >>> bool((load(path).log_prob(theta[:3], x=theta[0]) == post.log_prob(theta[:3], x=theta[0])).all())
        True
    """
    state = {k: v.detach().clone() for k, v in posterior.net.state_dict().items()}
    allow_unsaved_prior = check_bool(allow_unsaved_prior, "allow_unsaved_prior")
    spec = prior_spec(posterior.prior)
    if spec is None and not allow_unsaved_prior:
        raise ValueError(
            f"cannot save the {type(posterior.prior).__name__} prior: a file holds only priors made of {KNOWN} "
            "(e.g. sbiflows.priors.box_uniform or IndependentPrior of standard marginals). Either build the prior "
            "from those, or save without it, save(path, allow_unsaved_prior=True), and pass it back at load: "
            "load(path, prior=...)"
        )
    prior_config, prior_tensors = (None, {}) if spec is None else spec
    dtype = next(name for name, value in _DTYPES.items() if value == posterior.dtype)
    config = {
        "posterior": posterior.config,
        "dtype": dtype,
        "shapes": {k: list(v.shape) for k, v in state.items()},
        "prior": prior_config,
        "prior_class": type(posterior.prior).__name__,
        "max_batch_elements": _saved_chunk(posterior.max_batch_elements),
        "history": None if posterior.history is None else posterior.history.as_dict(),
    }
    if posterior.max_batch_elements == LEGACY_DEFAULT_CHUNK:  # a choice that equals the old default: say so
        config["max_batch_elements_chosen"] = True
    default_x = getattr(posterior, "default_x", None)
    if default_x is not None:  # only when set: files without one stay byte-identical to earlier versions
        config["default_x"] = {"values": default_x.detach().double().cpu().tolist(), "dtype": str(default_x.dtype)}
    config_json = json.dumps(config, sort_keys=True)
    blob = {
        "format_version": FORMAT_VERSION if "mixture_weights" in posterior.config else 4,
        "sbiflows_version": sbiflows.__version__,
        "config": config_json,
        "state_dict": state,
        "prior_tensors": prior_tensors,
        "sha256": _digest(config_json, state, prior_tensors),
    }
    _atomic_save(blob, Path(path))


def _atomic_save(blob: dict, path: Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename: an interrupted save leaves the
    previous file intact (a rename within one folder is atomic)."""
    if path.is_dir():
        raise ValueError(f"path {str(path)!r} is a folder; save to a file in it, e.g. {str(path / 'posterior.pt')!r}")
    if not path.parent.is_dir():
        raise ValueError(f"path {str(path)!r}: its folder {str(path.parent)!r} does not exist")
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(blob, temporary)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def read(
    path: str | Path,
    *,
    prior: Distribution | None = None,
    estimator=None,
    embedding_net: nn.Module | None = None,
    map_location: torch.device | str = "cpu",
) -> dict[str, Any]:
    """The parts of a posterior saved by :func:`save`: the keyword arguments of ``Posterior(...)``.

    Never unpickles (``torch.load(weights_only=True)``). :func:`sbiflows.load` is
    ``Posterior(**read(path, ...))``.

    Args:
        path: The file.
        prior: Required if the saved prior is not made of whitelisted classes (its spec is null);
            otherwise it must equal the saved prior (the same classes and parameters).
        estimator: The callable used at training time, required if the posterior was trained with one.
        embedding_net: A module of the architecture used at training time, required if one was used
            (the posterior gets a copy with the saved weights; the module passed stays as it is).
        map_location: Device for the loaded tensors (a file saved on a GPU loads on the CPU by default).

    Raises:
        ValueError: On a ``format_version`` that is not an int from :data:`MIN_FORMAT_VERSION` to
            :data:`FORMAT_VERSION` (a newer one asks to upgrade sbiflows), missing or extra keys, a
            digest mismatch, unknown class names, shapes that do not match, or a missing
            ``prior``/``estimator``/``embedding_net``.

    Example:
        See :func:`save`.
    """
    if isinstance(map_location, (str, torch.device)):
        map_location = check_device(map_location, "map_location")
    try:
        blob = torch.load(Path(path), weights_only=True, map_location="cpu")  # checked on the CPU, then moved
    except Exception as error:  # noqa: BLE001 - any unreadable file gets one clear message
        raise ValueError(f"{path} is not a readable sbiflows posterior file: {error}") from error
    config, state, prior_tensors = _check_blob(blob, path)
    post_config = config["posterior"]
    if config["prior"] is not None and prior is None:
        prior = build_prior(config["prior"], prior_tensors, device=map_location)
    elif config["prior"] is not None:
        _check_same_prior(prior, config["prior"], prior_tensors, path)
        prior = move_prior(prior, map_location)  # where the network goes, as a saved prior is built
    if prior is None:
        raise ValueError(
            f"{path} was trained with a {config['prior_class']} prior, which the file cannot describe; "
            "pass it as load(path, prior=...)"
        )
    theta_dim = check_prior(prior)[1]
    if theta_dim != post_config["theta_dim"]:
        raise ValueError(f"prior has {theta_dim} dimensions but the saved posterior has {post_config['theta_dim']}")
    x_shape = post_config.get("x_shape", [post_config["x_dim"]])  # format <= 3: flat x
    members = [
        PosteriorNet(_flow(post_config, estimator), _embedding(post_config, embedding_net),
                     theta_dim=theta_dim, x_shape=x_shape, stats_shape=post_config.get("x_stats_shape", x_shape))
        .to(_DTYPES[config["dtype"]]) for k in range(post_config.get("ensemble", 1))
    ]  # in the saved dtype before mixing: a float64 mixture's weights are not rounded through float32
    for member in members:
        member.fewest_trials = post_config.get("fewest_trials")  # None in files of sets saved before it was kept
    net = mixture(members, post_config.get("mixture_weights"))  # None: equal weights
    shapes = {k: list(v.shape) for k, v in net.state_dict().items()}
    if shapes != config["shapes"]:
        diff = sorted(k for k in set(shapes) | set(config["shapes"]) if shapes.get(k) != config["shapes"].get(k))
        if post_config["embedding"] == "custom" and any(".embedding." in f".{k}" for k in diff):
            shown = "; ".join(f"{k}: {config['shapes'].get(k, 'absent')} in the file, {shapes.get(k, 'absent')} "
                              "in the module" for k in diff[:5])
            raise ValueError(
                f"the embedding_net passed to load does not match the one the posterior was trained with "
                f"(x_shape {tuple(x_shape)}): {shown}; pass a module of the same architecture and sizes"
            )
        raise ValueError(f"the rebuilt network does not match the saved one; differing tensors: {diff}")
    try:
        net.load_state_dict(state)
    except RuntimeError as error:
        raise ValueError(f"the saved weights do not fit the rebuilt network: {error}") from None
    history = None if config["history"] is None else read_history(config["history"], path)
    default_x = config.get("default_x")
    if default_x is not None:
        dtype = torch.float64 if default_x.get("dtype") == "torch.float64" else _DTYPES[config["dtype"]]
        default_x = torch.tensor(default_x["values"], dtype=dtype, device=torch.device(map_location))
    return {"net": net.to(torch.device(map_location)), "prior": prior, "config": post_config, "history": history,
            "max_batch_elements": (config["max_batch_elements"] if config.get("max_batch_elements_chosen")
                                   else _chunk(config["max_batch_elements"])), "default_x": default_x}


# ------------------------------------------------------------------------------------ internals
#: What every file saved before the device-dependent chunk recorded as ``max_batch_elements``: the fixed
#: default of then, not a choice, so it loads as None (the device's size). Files save None as this value, so
#: earlier versions still load them and files of default posteriors stay byte-identical to theirs; a posterior
#: whose chosen value is this one saves ``max_batch_elements_chosen`` beside it.
LEGACY_DEFAULT_CHUNK = 2**17


def _chunk(saved: int | None) -> int | None:
    return None if saved == LEGACY_DEFAULT_CHUNK else saved


def _saved_chunk(max_batch_elements: int | None) -> int:
    return LEGACY_DEFAULT_CHUNK if max_batch_elements is None else max_batch_elements


def _check_same_prior(prior: Distribution, saved: dict, saved_tensors: dict[str, Tensor], path) -> None:
    """A prior passed to :func:`load` must be the saved one: the posterior's theta space (a box's bounds) and
    its meaning depend on it, so another prior would change draws and densities without a word."""
    spec = prior_spec(prior)
    same = spec is not None and spec[0] == saved and set(spec[1]) == set(saved_tensors) and all(
        torch.equal(spec[1][k].detach().cpu().to(saved_tensors[k].dtype), saved_tensors[k]) for k in saved_tensors)
    if not same:
        shown = {k: v.tolist() for k, v in saved_tensors.items()}
        raise ValueError(f"the prior passed to load is not the one {path} was trained with ({saved.get('class')} "
                         f"with {shown}); leave prior out to use the saved one")


def _check_blob(blob, path) -> tuple[dict, dict[str, Tensor], dict[str, Tensor]]:
    if not isinstance(blob, dict):
        raise ValueError(f"{path} is not an sbiflows posterior file (top level is {type(blob).__name__})")
    version = blob.get("format_version")
    if type(version) is not int or version < MIN_FORMAT_VERSION:  # type(): a bool is not a version
        raise ValueError(
            f"{path} is not a valid sbiflows posterior file: format_version must be an int from "
            f"{MIN_FORMAT_VERSION} to {FORMAT_VERSION}, got {type(version).__name__} {version!r}"
        )
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{path} was saved with format {version} (sbiflows {blob.get('sbiflows_version')}); "
            f"this sbiflows reads <= {FORMAT_VERSION}: upgrade sbiflows"
        )
    missing, extra = _KEYS - set(blob), set(blob) - _KEYS
    if missing or extra:
        raise ValueError(f"{path} has missing keys {sorted(missing)} and extra keys {sorted(extra)}")
    state, prior_tensors = blob["state_dict"], blob["prior_tensors"]
    if blob["sha256"] != _digest(blob["config"], state, prior_tensors):
        raise ValueError(f"{path} failed its SHA-256 check: the file is corrupt or was modified")
    config = json.loads(blob["config"])
    if config.get("dtype") not in _DTYPES:
        raise ValueError(f"unknown dtype {config.get('dtype')!r} in {path}; known: {sorted(_DTYPES)}")
    return config, state, prior_tensors


def read_history(fields: dict, path) -> TrainingHistory:
    """A training history from its :meth:`~sbiflows.training.TrainingHistory.as_dict` fields, as read from
    ``path``; fields this version does not know (a newer sbiflows's additions) are dropped with a warning,
    since the history describes the fit and is not needed to use the posterior.

    Example:
        >>> read_history({"epochs": 3, "best_epoch": 1}, "post.pt").epochs
        3
    """
    known = {f.name for f in dataclasses.fields(TrainingHistory)}
    unknown = sorted(set(fields) - known)
    if unknown:
        warnings.warn(
            f"{path}: ignored the training-history fields {unknown}, which sbiflows {sbiflows.__version__} "
            "does not know (the file was written by a newer version); upgrade sbiflows to read them",
            UserWarning,
            stacklevel=3,
        )
    return TrainingHistory(**{key: value for key, value in fields.items() if key in known})


def _flow(config: dict, estimator) -> Flow:
    name = config["estimator"]
    if name == "custom":
        if estimator is None:
            raise ValueError(
                "this posterior was trained with a callable estimator, which a file cannot hold; pass the same "
                "callable: load(path, estimator=...)"
            )
    elif name in ESTIMATORS:
        estimator = name
    else:
        raise ValueError(f"unknown estimator {name!r} in the saved config; known: {sorted(ESTIMATORS)}")
    with torch.random.fork_rng(devices=[]):  # weights are overwritten: keep the global RNG untouched
        return build_flow(
            estimator, config["theta_dim"], config["context_features"], transforms=config["transforms"],
            hidden_features=config["hidden_features"], seed=config.get("flow_seed", 0),
            activation=config.get("activation", "relu"),  # files written before the option used ReLU
            # format 1 has no transformer keys: its flows are affine (a callable's stay None)
            transformer=config.get("transformer", None if name == "custom" else "affine"),
            bins=config.get("bins"), bound=config.get("bound"),
            mixing=config.get("mixing", "none"),  # files written before the option had no mixing layers
        )


def _embedding(config: dict, embedding_net: nn.Module | None) -> nn.Module:
    name = config["embedding"]
    if name == "none":
        if embedding_net is not None:
            raise ValueError("this posterior was trained without an embedding_net, but one was passed")
        return nn.Identity() if len(config.get("x_shape", [0])) == 1 else nn.Flatten()  # structured x: flattened
    if name in EMBEDDINGS:
        if embedding_net is not None:
            raise ValueError(
                f"this posterior was trained with the built-in embedding {name!r}, which the file holds "
                "(architecture and weights); load it without embedding_net="
            )
        with torch.random.fork_rng(devices=[]):  # weights are overwritten: keep the global RNG untouched
            return build_embedding(name, config.get("embedding_config"))
    if name != "custom":
        raise ValueError(f"unknown embedding {name!r} in the saved config; known: {sorted(EMBEDDINGS)} or 'custom'")
    if embedding_net is None:
        raise ValueError(
            "this posterior was trained with an embedding_net of your own, which a file cannot hold (only its "
            "weights); pass a module of the same architecture: load(path, embedding_net=...)"
        )
    if not isinstance(embedding_net, nn.Module):
        raise TypeError(f"embedding_net must be a torch.nn.Module, got {type(embedding_net).__name__}")
    return deepcopy(embedding_net)  # the caller's module stays theirs: a second load would overwrite its weights


def digest(value: Tensor | nn.Module | dict[str, Tensor], *, text: str = "") -> str:
    """SHA-256 of a tensor, a module's state or named tensors, and of ``text``, by the rule a saved file's ``sha256``
    uses (names, dtypes, shapes and bytes): e.g. whether a run's stored samples came from these weights.

    Example:
        >>> digest(torch.zeros(2)) == digest(torch.zeros(2)), digest(torch.zeros(2)) == digest(torch.zeros(3))
        (True, False)
        >>> digest({"a": torch.zeros(2)}, text="x") == digest({"a": torch.zeros(2)}, text="y")
        False
    """
    if isinstance(value, nn.Module):
        value = value.state_dict()
    return _digest(text, value if isinstance(value, dict) else {"": value})


def _digest(config_json: str, *tensor_dicts: dict[str, Tensor]) -> str:
    sha = hashlib.sha256(config_json.encode())
    for tensors in tensor_dicts:
        if not isinstance(tensors, dict):
            raise ValueError("the file's tensor collections must be dicts")
        for name in sorted(tensors):
            tensor = tensors[name]
            if not isinstance(tensor, Tensor):
                raise ValueError(f"entry {name!r} of the file is not a tensor")
            sha.update(f"{name}|{tensor.dtype}|{list(tensor.shape)}|".encode())
            sha.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return sha.hexdigest()

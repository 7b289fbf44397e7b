"""Embedding networks: learned summaries of structured ``x``, trained jointly with the flow by NPE.

Pass one as ``NPE(prior, embedding_net=...)``. Each maps z-scored simulations ``(B, *x_shape)`` to
``(B, out_features)``, the flow's context:

* :class:`MLP` - any ``x_shape``, flattened (a short vector, or many features of which few matter,
  as in slcp_distractors);
* :class:`Linear` - any ``x_shape``, flattened: a learned linear summary, shared by all flow layers
  (what ``NPE``'s default ``embedding_net="auto"`` uses for long ``x``, :func:`auto_embedding`);
* :class:`CNN1d` - time series ``(channels, time)`` (or ``(time,)``, one channel);
* :class:`CNN2d` - images ``(channels, height, width)`` (or ``(height, width)``);
* :class:`PermutationInvariant` - sets of iid trials ``(trials, features)`` (DeepSets): one network
  serves sets of any size up to ``trials``, smaller ones NaN-padded (all-NaN trials are masked out).

Each declares how NPE z-scores its input (``zscore_axes``, see :mod:`sbiflows.xshape`): the CNNs per
channel, the set network per trial feature, the MLP per element. The built-in classes are saved with
the posterior as their :data:`EMBEDDINGS` name, their constructor arguments (:attr:`config`) and their
weights, and :func:`sbiflows.load` rebuilds them from that alone.

Example:
    >>> net = from_name("cnn1d", (2, 50), out_features=8)
    >>> net(torch.randn(4, 2, 50)).shape, net.config["in_channels"]
    (torch.Size([4, 8]), 2)
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from sbiflows.checks import check_choice, check_int
from sbiflows.estimator import ACTIVATIONS, check_hidden_features
from sbiflows.seeding import global_seed
from sbiflows.xshape import trial_mask

__all__ = [
    "AUTO_VALUES_PER_PARAMETER", "EMBEDDINGS", "MLP", "CNN1d", "CNN2d", "Linear", "PermutationInvariant",
    "auto_embedding", "auto_features", "build", "embedding_config", "from_choice", "from_name",
]


def _mlp(sizes: Sequence[int], activation: str) -> nn.Sequential:
    """Linear layers of the given sizes with ``activation`` between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(ACTIVATIONS[activation]())
    return nn.Sequential(*layers)


class _Embedding(nn.Module):
    """Common parts: the registry name, the constructor arguments and an input-shape check."""

    #: The name in :data:`EMBEDDINGS` (and of ``sbiflows fit --embedding``).
    name = ""
    #: Axes of ``x_shape`` pooled by z-scoring (None: per element); see :mod:`sbiflows.xshape`.
    zscore_axes: tuple[int, ...] | None = None
    #: Whether all-NaN trials are padding that the network masks out.
    nan_padded_trials = False

    def __init__(self, config: dict[str, Any]):
        super().__init__()
        self.config = config  # JSON-serializable constructor arguments: type(self)(**config) rebuilds it
        self.out_features = int(config["out_features"])

    def _check(self, x: Tensor, shapes: Sequence[tuple[int, ...]]) -> Tensor:
        """``x`` if its shape after the batch axis is one of ``shapes``, else a ValueError naming both."""
        if x.ndim < 1 or tuple(x.shape[1:]) not in [tuple(s) for s in shapes]:
            wanted = " or ".join(f"(B, {', '.join(map(str, s))})" for s in shapes)
            raise ValueError(f"{type(self).__name__} expects input of shape {wanted}, got {tuple(x.shape)}")
        return x

    def _flat(self, x: Tensor) -> Tensor:
        """``x`` ``(B, *x_shape)`` as ``(B, in_features)``, else a ValueError naming both shapes."""
        flat = x.reshape(len(x), -1) if x.ndim > 1 else x
        if flat.ndim != 2 or flat.shape[1] != self.config["in_features"]:
            raise ValueError(
                f"{type(self).__name__} expects input of shape (B, {self.config['in_features']}) (or (B, *x_shape) "
                f"of that many values), got {tuple(x.shape)}"
            )
        return flat

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.config.items())


class MLP(_Embedding):
    """A fully connected network on the flattened simulation: ``(B, *x_shape) -> (B, out_features)``.

    The default size (two hidden layers of 50, as sbi's ``FCEmbedding``) is small on purpose: a wide
    network on high-dimensional x can tell every training simulation apart by its uninformative
    values and overfits within a few epochs (measured on slcp_distractors in docs/benchmarks.md,
    where ``(100, 100)`` fitted worse on every seed). A smaller ``out_features`` (e.g. twice the number of
    parameters) can help further.

    Args:
        in_features: Values per simulation (``prod(x_shape)``).
        out_features: Output size (the flow's context).
        hidden_features: Hidden layer sizes.
        activation: ``"relu"`` (default), ``"tanh"``, ``"elu"`` or ``"gelu"``.

    Example:
        >>> MLP(100, out_features=10)(torch.randn(7, 100)).shape
        torch.Size([7, 10])
    """

    name = "mlp"

    def __init__(self, in_features: int, *, out_features: int = 20, hidden_features: Sequence[int] = (50, 50),
                 activation: str = "relu"):
        in_features = check_int(in_features, "in_features", minimum=1)
        out_features = check_int(out_features, "out_features", minimum=1)
        hidden = check_hidden_features(hidden_features)
        activation = check_choice(activation, "activation", ACTIVATIONS)
        super().__init__({"in_features": in_features, "out_features": out_features, "hidden_features": list(hidden),
                          "activation": activation})
        self.net = _mlp([in_features, *hidden, out_features], activation)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(self._flat(x))


class Linear(_Embedding):
    """A learned linear map of the flattened simulation: ``(B, *x_shape) -> (B, out_features)``.

    Without an embedding every flow layer's conditioner reads all of ``x`` and learns its own first
    layer on it; with many values per simulation those ten or so copies fit noise in the training rows
    within a few epochs. One shared linear summary has far fewer weights and loses nothing a linear
    statistic carries (e.g. the sufficient statistics of a GLM, which are linear in its raw
    responses). The measurements behind :func:`auto_embedding` are in docs/benchmarks.md.

    Args:
        in_features: Values per simulation (``prod(x_shape)``).
        out_features: Output size (the flow's context).

    Example:
        >>> Linear(100, out_features=10)(torch.randn(7, 100)).shape
        torch.Size([7, 10])
    """

    name = "linear"

    def __init__(self, in_features: int, *, out_features: int):
        in_features = check_int(in_features, "in_features", minimum=1)
        out_features = check_int(out_features, "out_features", minimum=1)
        super().__init__({"in_features": in_features, "out_features": out_features})
        self.linear = nn.Linear(in_features, out_features)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(self._flat(x))


class _CNN(_Embedding):
    """Convolutions (same padding, ReLU, max-pooling) then a fully connected head, in 1 or 2 dimensions."""

    def __init__(self, spatial: tuple[int, ...], config: dict[str, Any]):
        super().__init__(config)
        conv, pool = (nn.Conv1d, nn.MaxPool1d) if len(spatial) == 1 else (nn.Conv2d, nn.MaxPool2d)
        layers: list[nn.Module] = []
        channels = [config["in_channels"], *config["channels"]]
        size = list(spatial)
        for a, b in itertools.pairwise(channels):
            layers += [conv(a, b, config["kernel_size"], padding=config["kernel_size"] // 2), nn.ReLU()]
            if min(size) >= 2 * config["pool"]:  # pool while the signal is long enough
                layers.append(pool(config["pool"]))
                size = [s // config["pool"] for s in size]
        self.conv = nn.Sequential(*layers)
        self.head = _mlp([channels[-1] * math.prod(size), *config["hidden_features"], config["out_features"]], "relu")
        self._shape = (config["in_channels"], *spatial)

    def forward(self, x: Tensor) -> Tensor:
        shapes = [self._shape] + ([self._shape[1:]] if self._shape[0] == 1 else [])
        x = self._check(x, shapes)
        if x.ndim == len(self._shape):  # one channel without its axis
            x = x.unsqueeze(1)
        return self.head(self.conv(x).flatten(1))


def _cnn_config(in_channels, spatial: dict[str, int], out_features, channels, kernel_size, pool, hidden_features):
    config = {"in_channels": check_int(in_channels, "in_channels", minimum=1)}
    config.update({k: check_int(v, k, minimum=1) for k, v in spatial.items()})
    channels = check_hidden_features(channels)
    config.update(out_features=check_int(out_features, "out_features", minimum=1), channels=list(channels),
                  kernel_size=check_int(kernel_size, "kernel_size", minimum=1), pool=check_int(pool, "pool", minimum=1),
                  hidden_features=list(check_hidden_features(hidden_features)))
    return config


class CNN1d(_CNN):
    """A 1-D convolutional network for time series: ``(B, in_channels, length) -> (B, out_features)``.

    ``(B, length)`` is accepted when ``in_channels == 1``. NPE z-scores its input per channel.

    Args:
        in_channels: Channels of the series (e.g. S, I, R of an epidemic).
        length: Time points.
        out_features: Output size.
        channels: Output channels of each convolution (each followed by ReLU and, while the series is
            at least ``2 * pool`` long, max-pooling by ``pool``).
        kernel_size: Convolution width (odd sizes keep the length).
        pool: Max-pooling factor.
        hidden_features: The fully connected head's hidden sizes.

    Example:
        >>> CNN1d(3, 100, out_features=12)(torch.randn(5, 3, 100)).shape
        torch.Size([5, 12])
    """

    name = "cnn1d"
    zscore_axes = (-1,)

    def __init__(self, in_channels: int, length: int, *, out_features: int = 20, channels: Sequence[int] = (16, 32),
                 kernel_size: int = 5, pool: int = 2, hidden_features: Sequence[int] = (100,)):
        config = _cnn_config(in_channels, {"length": length}, out_features, channels, kernel_size, pool,
                             hidden_features)
        super().__init__((config["length"],), config)


class CNN2d(_CNN):
    """A 2-D convolutional network for images: ``(B, in_channels, height, width) -> (B, out_features)``.

    ``(B, height, width)`` is accepted when ``in_channels == 1``. NPE z-scores its input per channel.
    Arguments as :class:`CNN1d`, with ``height`` and ``width`` for ``length``.

    Example:
        >>> CNN2d(1, 16, 16, out_features=6)(torch.randn(2, 16, 16)).shape
        torch.Size([2, 6])
    """

    name = "cnn2d"
    zscore_axes = (-2, -1)

    def __init__(self, in_channels: int, height: int, width: int, *, out_features: int = 20,
                 channels: Sequence[int] = (8, 16), kernel_size: int = 3, pool: int = 2,
                 hidden_features: Sequence[int] = (100,)):
        config = _cnn_config(in_channels, {"height": height, "width": width}, out_features, channels, kernel_size,
                             pool, hidden_features)
        super().__init__((config["height"], config["width"]), config)


class PermutationInvariant(_Embedding):
    """DeepSets for sets of iid trials: ``(B, trials, trial_features) -> (B, out_features)``.

    Every trial goes through the same network ``phi``; the trial embeddings are pooled over the
    valid trials and a second network ``rho`` maps the pool to the output. All-NaN trials are
    padding and are masked out, so one network serves sets of 1 to ``trials`` trials (NPE pads
    smaller observations automatically). Pooling:

    * ``"sum"`` (default): the sum of the trial embeddings, the form of an exponential family's
      sufficient statistic ``sum_i T(x_i)``; the count is in its magnitude (a constant in ``phi`` sums
      to it), so the posterior can narrow as trials are added;
    * ``"mean"``: the mean with ``log(number of trials)`` appended, inputs on one scale whatever the
      count. Its fluctuations between sets shrink like ``1 / sqrt(trials)``, which can starve ``rho``
      of signal when every set has many trials (docs/benchmarks.md, "bernoulli_glm_raw").

    The output does not depend on the order of the trials. NPE z-scores the input per trial feature.

    Args:
        trial_features: Values per trial.
        out_features: Output size.
        hidden_features: Hidden sizes of ``phi`` and of ``rho``.
        trial_out_features: Size of each trial's embedding (``phi``'s output).
        pooling: ``"sum"`` or ``"mean"``.

    Example:
        >>> net = PermutationInvariant(2, out_features=4).double()
        >>> x = torch.randn(3, 10, 2, dtype=torch.float64)
        >>> bool(torch.allclose(net(x), net(x[:, torch.randperm(10)])))
        True
        >>> padded = torch.cat([x[:, :4], torch.full((3, 6, 2), float("nan"), dtype=torch.float64)], 1)
        >>> bool(torch.allclose(net(padded), net(x[:, :4])))
        True
    """

    name = "set"
    zscore_axes = (-2,)
    nan_padded_trials = True

    def __init__(self, trial_features: int, *, out_features: int = 20, hidden_features: Sequence[int] = (100, 100),
                 trial_out_features: int = 50, pooling: str = "sum"):
        trial_features = check_int(trial_features, "trial_features", minimum=1)
        hidden = check_hidden_features(hidden_features)
        trial_out = check_int(trial_out_features, "trial_out_features", minimum=1)
        pooling = check_choice(pooling, "pooling", ("mean", "sum"))
        super().__init__({"trial_features": trial_features, "out_features": check_int(out_features, "out_features",
                          minimum=1), "hidden_features": list(hidden), "trial_out_features": trial_out,
                          "pooling": pooling})
        self.phi = _mlp([trial_features, *hidden, trial_out], "relu")
        self.rho = _mlp([trial_out + (pooling == "mean"), *hidden, self.out_features], "relu")

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 3 or x.shape[2] != self.config["trial_features"]:
            raise ValueError(
                f"PermutationInvariant expects input of shape (B, trials, {self.config['trial_features']}), "
                f"got {tuple(x.shape)}"
            )
        mask = trial_mask(x)  # (B, trials)
        phi = self.phi(torch.where(mask[..., None], x, torch.zeros_like(x))) * mask[..., None]
        pooled = phi.sum(1)
        if self.config["pooling"] == "mean":
            count = mask.sum(1, keepdim=True).clamp(min=1).to(x.dtype)
            pooled = torch.cat([pooled / count, count.log()], 1)
        return self.rho(pooled)


#: The built-in embeddings by name (``sbiflows fit --embedding``, saved files): ``EMBEDDINGS[name](**config)``.
EMBEDDINGS: dict[str, type[_Embedding]] = {
    "mlp": MLP, "linear": Linear, "cnn1d": CNN1d, "cnn2d": CNN2d, "set": PermutationInvariant,
}


def from_name(name: str, x_shape: Sequence[int], **options: Any) -> _Embedding:
    """The built-in embedding ``name`` sized for simulations of shape ``x_shape``; ``options`` go to its class.

    ``"mlp"`` flattens any shape; ``"cnn1d"`` takes ``(channels, time)`` or ``(time,)``; ``"cnn2d"``
    ``(channels, height, width)`` or ``(height, width)``; ``"set"`` ``(trials, features)``.

    Raises:
        ValueError: For an unknown name or an ``x_shape`` the embedding does not take.

    Example:
        >>> from_name("set", (50, 3)).config["trial_features"]
        3
    """
    name = check_choice(name, "embedding", EMBEDDINGS)
    x_shape = tuple(int(s) for s in x_shape)
    takes = {"mlp": (1, 2, 3, 4), "linear": (1, 2, 3, 4), "cnn1d": (1, 2), "cnn2d": (2, 3), "set": (2,)}[name]
    if len(x_shape) not in takes:
        described = {"cnn1d": "(channels, time) or (time,)", "cnn2d": "(channels, height, width) or (height, width)",
                     "set": "(trials, features)", "mlp": "any", "linear": "any"}[name]
        raise ValueError(f"embedding {name!r} takes x of shape {described} per simulation, got x_shape {x_shape}")
    if name == "mlp":
        return MLP(math.prod(x_shape), **options)
    if name == "linear":
        return Linear(math.prod(x_shape), **{"out_features": 20, **options})
    if name == "set":
        return PermutationInvariant(x_shape[1], **options)
    if name == "cnn1d":
        return CNN1d(*((1,) + x_shape if len(x_shape) == 1 else x_shape), **options)
    return CNN2d(*((1,) + x_shape if len(x_shape) == 2 else x_shape), **options)


#: ``embedding_net="auto"``: a :class:`Linear` summary when ``x`` has more than this many values per parameter.
AUTO_VALUES_PER_PARAMETER = 5


def auto_features(x_shape: Sequence[int], theta_dim: int) -> int | None:
    """The size of the summary ``NPE(prior, embedding_net="auto")`` (the default) learns for simulations of
    ``x_shape``, or None where ``x`` goes to the flow as it is (the rule of :func:`auto_embedding`).

    Example:
        >>> auto_features((100,), 10), auto_features((8,), 5)
        (20, None)
    """
    values = math.prod(int(s) for s in x_shape)
    return 2 * theta_dim if values > AUTO_VALUES_PER_PARAMETER * theta_dim else None


def auto_embedding(x_shape: Sequence[int], theta_dim: int) -> Linear | None:
    """What ``NPE(prior, embedding_net="auto")`` (the default) puts before the flow for simulations of ``x_shape``.

    ``x`` with more than :data:`AUTO_VALUES_PER_PARAMETER` values per parameter (counting every value of
    structured ``x``) gets a learned :class:`Linear` summary of two values per parameter
    (``out_features=2 * theta_dim``: one per parameter loses information where the statistics that
    matter are not linear in ``x``, e.g. the second moments of slcp's draws); shorter ``x`` goes to
    the flow as it is (None). The evidence (held-out posterior log-density and C2ST) is in
    docs/benchmarks.md, "A shared linear summary of long x".

    Example:
        >>> auto_embedding((100,), 10).config, auto_embedding((8,), 5)
        ({'in_features': 100, 'out_features': 20}, None)
    """
    features = auto_features(x_shape, theta_dim)
    return None if features is None else Linear(math.prod(int(s) for s in x_shape), out_features=features)


def from_choice(choice: str, x_shape: Sequence[int], *, seed: int) -> _Embedding | str | None:
    """``NPE``'s ``embedding_net`` for a command-line ``--embedding`` choice: ``"none"`` -> None, ``"auto"`` stays
    ``"auto"`` (NPE decides), any other name -> :func:`from_name` for ``x_shape`` with weights drawn from ``seed``
    (torch's global generator is left as it was), so a rerun of the same job builds the same network and resumes
    its training checkpoint.

    Example:
        >>> from_choice("none", (3,), seed=0), from_choice("auto", (3,), seed=0)
        (None, 'auto')
        >>> first, again = (from_choice("mlp", (3,), seed=1) for _ in range(2))
        >>> type(first).__name__, all(torch.equal(a, b) for a, b in zip(first.parameters(), again.parameters()))
        ('MLP', True)
    """
    if choice == "none":
        return None
    if choice == "auto":
        return "auto"
    with global_seed(seed):
        return from_name(choice, x_shape)


def embedding_config(embedding: nn.Module | None) -> dict[str, Any]:
    """How a saved file describes an embedding: ``{"embedding": "none"}`` (also for the ``nn.Identity`` or
    ``nn.Flatten`` that NPE uses without one), a built-in's name with its
    ``"embedding_config"`` (constructor arguments), or ``{"embedding": "custom"}`` for any other module
    (a subclass of a built-in included: its code may differ), which :func:`sbiflows.load` needs passed back.

    Example:
        >>> embedding_config(MLP(3, out_features=2, hidden_features=(4,)))
        {'embedding': 'mlp', 'embedding_config': {'in_features': 3, 'out_features': 2, 'hidden_features': [4], 'activation': 'relu'}}
    """
    plain_flatten = type(embedding) is nn.Flatten and (embedding.start_dim, embedding.end_dim) == (1, -1)
    if embedding is None or type(embedding) is nn.Identity or plain_flatten:  # what NPE uses without one
        return {"embedding": "none"}
    name = getattr(embedding, "name", None)
    if isinstance(name, str) and EMBEDDINGS.get(name) is type(embedding):
        return {"embedding": name, "embedding_config": dict(embedding.config)}
    return {"embedding": "custom"}


def build(name: str, config: dict[str, Any]) -> _Embedding:
    """The built-in embedding ``name`` rebuilt from its saved constructor arguments (weights are loaded after).

    Raises:
        ValueError: For a name that is not in :data:`EMBEDDINGS` or arguments its class refuses.

    Example:
        >>> build("set", {"trial_features": 2, "out_features": 5}).out_features
        5
    """
    if name not in EMBEDDINGS:
        raise ValueError(f"unknown embedding {name!r}; the built-in ones are {sorted(EMBEDDINGS)}")
    if not isinstance(config, dict):
        raise ValueError(f"the arguments of embedding {name!r} must be a dict, got {type(config).__name__}")  # noqa: TRY004 - a bad file
    positional = {"mlp": ("in_features",), "linear": ("in_features",), "cnn1d": ("in_channels", "length"),
                  "cnn2d": ("in_channels", "height", "width"), "set": ("trial_features",)}[name]
    try:
        args = [config[k] for k in positional]
        return EMBEDDINGS[name](*args, **{k: v for k, v in config.items() if k not in positional})
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"cannot rebuild embedding {name!r} from {config}: {error!r}") from error

"""The conditional density estimator of NPE: z-scoring, an optional embedding net, and a flow.

:class:`PosteriorNet` models ``q(u | x)`` for ``u``, the parameters in the prior's unconstrained
space (see :class:`sbiflows.unconstrained.Unconstrained`). It z-scores ``u`` and ``x`` with statistics of
the training data, passes the z-scored ``x`` through the embedding net, and feeds the result as the
context to every layer of the flow (the MADE of every MAF layer, the conditioner of every coupling).
"""

from __future__ import annotations

import math

import numbers
import warnings
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from sbiflows.checks import check_choice
from sbiflows.flows import DEFAULT_BINS, DEFAULT_BOUND, MIXINGS, ONE_FEATURE_WARNING, Flow, maf, nsf, realnvp
from sbiflows.transforms.transformers import make_transformer
from sbiflows.xshape import layout, trial_mask, zscore, zscore_shaped
from sbiflows.xshape import stats_shape as xshape_stats

__all__ = [
    "ACTIVATIONS", "DEFAULT_ESTIMATOR", "ESTIMATORS", "ESTIMATOR_TRANSFORMERS", "PosteriorNet", "build_flow",
    "check_hidden_features", "check_mixing", "default_transforms", "resolve_transformer", "zscore",
]

#: Estimator names accepted by :class:`~sbiflows.npe.NPE` and the command line's ``--estimator``, and
#: stored in saved files.
ESTIMATORS: dict[str, Callable[..., Flow]] = {"maf": maf, "nsf": nsf, "realnvp": realnvp}

#: NPE's default estimator, chosen by held-out posterior log-density on all ten benchmark tasks
#: (docs/benchmarks.md, "Defaults from all ten tasks").
DEFAULT_ESTIMATOR = "nsf"

#: The transformers each named estimator takes; the first is its default. ``"nsf"`` is spline
#: couplings by definition (``"realnvp"`` with ``transformer="spline"`` is the same architecture with
#: RealNVP's defaults of 6 layers).
ESTIMATOR_TRANSFORMERS: dict[str, tuple[str, ...]] = {
    "maf": ("affine", "spline"), "nsf": ("spline",), "realnvp": ("affine", "spline"),
}


def resolve_transformer(
    estimator: str | Callable, transformer: str | None = None, bins: int | None = None, bound: float | None = None,
) -> dict:
    """The transformer options of an estimator, defaults filled in, as stored in saved configs.

    Returns ``{"transformer": name, "bins": int, "bound": float}`` for a spline,
    ``{"transformer": "affine", "bins": None, "bound": None}`` for an affine estimator, and all None
    for a callable estimator.

    Raises:
        TypeError: For a ``transformer`` that is not a string, ``bins`` not an int or ``bound`` not a number.
        ValueError: For a transformer the estimator does not take, ``bins``/``bound`` without a spline,
            any of them with a callable estimator, ``bins < 1`` or ``bound <= 0``.

    Example:
        >>> resolve_transformer("nsf")
        {'transformer': 'spline', 'bins': 8, 'bound': 5.0}
        >>> resolve_transformer("maf", "spline", bins=8)
        {'transformer': 'spline', 'bins': 8, 'bound': 5.0}
        >>> resolve_transformer("maf")
        {'transformer': 'affine', 'bins': None, 'bound': None}
    """
    given = {k: v for k, v in (("transformer", transformer), ("bins", bins), ("bound", bound)) if v is not None}
    if not isinstance(estimator, str):
        if given:
            raise ValueError(f"{sorted(given)} apply to named estimators only; a callable estimator builds its own flow")
        return {"transformer": None, "bins": None, "bound": None}
    if estimator not in ESTIMATOR_TRANSFORMERS:
        raise ValueError(f"unknown estimator {estimator!r}; valid names are {sorted(ESTIMATORS)} or a callable")
    choices = ESTIMATOR_TRANSFORMERS[estimator]
    name = choices[0] if transformer is None else transformer
    make_transformer(name, bins=DEFAULT_BINS if bins is None else bins,  # type and value checks
                     bound=DEFAULT_BOUND if bound is None else bound, log_scale_bound=1.0)
    if name not in choices:
        raise ValueError(f"estimator {estimator!r} takes transformer {' or '.join(map(repr, choices))}, got {name!r}")
    if name != "spline":
        extra = sorted(set(given) - {"transformer"})
        if extra:
            raise ValueError(f"{extra} apply to transformer='spline' only; got transformer={name!r}")
        return {"transformer": name, "bins": None, "bound": None}
    return {"transformer": name, "bins": DEFAULT_BINS if bins is None else int(bins),
            "bound": DEFAULT_BOUND if bound is None else float(bound)}

def check_mixing(estimator: str | Callable, mixing: str) -> str:
    """``mixing`` if the estimator takes it: ``"lu"`` and ``"masks"`` are for the coupling flows ``"nsf"`` and
    ``"realnvp"`` only.

    Example:
        >>> check_mixing("nsf", "lu")
        'lu'
        >>> check_mixing("maf", "lu")
        Traceback (most recent call last):
        ...
        ValueError: mixing='lu' applies to the coupling estimators 'nsf' and 'realnvp', got estimator 'maf'
    """
    check_choice(mixing, "mixing", MIXINGS)
    if mixing != "none" and estimator not in ("nsf", "realnvp"):
        shown = repr(estimator) if isinstance(estimator, str) else "a callable"
        raise ValueError(f"mixing={mixing!r} applies to the coupling estimators 'nsf' and 'realnvp', got estimator {shown}")
    return mixing


#: Activation names of the flows' conditioner networks (stored in saved files by name). NPE defaults to
#: ``"tanh"``: bounded hidden units keep the flow's shift and log-scale bounded for observations outside
#: the training range; with ``"relu"`` they extrapolate linearly and held-out log-densities collapse (see
#: docs/benchmarks.md). Files without the entry were trained with ``"relu"``.
ACTIVATIONS: dict[str, type[nn.Module]] = {"tanh": nn.Tanh, "relu": nn.ReLU, "elu": nn.ELU, "gelu": nn.GELU}


def check_hidden_features(hidden_features: Sequence[int]) -> tuple[int, ...]:
    """A non-empty sequence of positive ints, returned as a tuple.

    Raises:
        TypeError: For other types (e.g. a single int, a string or floats).
        ValueError: For an empty sequence or sizes below 1.

    Example:
        >>> check_hidden_features([64, 64])
        (64, 64)
    """
    if isinstance(hidden_features, str) or not isinstance(hidden_features, Sequence) or not all(
        isinstance(h, numbers.Integral) and not isinstance(h, bool) for h in hidden_features
    ):
        raise TypeError(f"hidden_features must be a sequence of ints >= 1, got {hidden_features!r}")
    if not hidden_features or min(hidden_features) < 1:
        raise ValueError(f"hidden_features must be a non-empty sequence of ints >= 1, got {hidden_features!r}")
    return tuple(int(h) for h in hidden_features)


def default_transforms(n_train: int, theta_dim: int) -> int:
    """NPE's default number of flow layers: 10 from 5,000 training rows on when ``theta_dim >= 3``, else 5.

    More simulations support a more flexible flow, and more parameters need more layers to model
    their joint dependence: with two parameters, two MAF layers of opposite orderings already
    condition each parameter on the other, and deeper flows cost training time without a gain worth
    it. The evidence for the rule (C2ST and training time at 1,000 and 10,000 simulations) is in
    docs/benchmarks.md, "Flow depth" (measured with the affine MAF; the spline default was chosen
    with this rule in place, "Defaults from all ten tasks"); the switch point between the measured
    budgets is a round number, not a tuned one.

    Example:
        >>> default_transforms(900, 5), default_transforms(9000, 5), default_transforms(9000, 2)
        (5, 10, 5)
    """
    return 10 if n_train >= 5000 and theta_dim >= 3 else 5


def build_flow(
    estimator: str | Callable[[int, int], Flow],
    features: int,
    context_features: int,
    *,
    transforms: int,
    hidden_features: Sequence[int],
    activation: str = "tanh",
    seed: int = 0,
    transformer: str | None = None,
    bins: int | None = None,
    bound: float | None = None,
    mixing: str = "none",
) -> Flow:
    """Build the flow of an estimator name (``"maf"``, ``"nsf"``, ``"realnvp"``) or call a user factory.

    ``activation`` (a key of :data:`ACTIVATIONS`), ``transformer``, ``bins`` and ``bound`` apply to
    named estimators only (see :func:`resolve_transformer` for their defaults and checks); ``mixing``
    to the coupling estimators only (:func:`check_mixing`).

    Raises:
        ValueError: On an unknown estimator or activation name, or transformer options that do not fit.
        TypeError: If a user factory does not return a :class:`~sbiflows.flows.Flow` of the right size.

    Example:
        >>> build_flow("maf", 2, 3, transforms=2, hidden_features=(8, 8)).features
        2
        >>> build_flow("nsf", 1, 3, transforms=2, hidden_features=(8, 8), bins=4).features
        1
    """
    if isinstance(estimator, str) and estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; valid names are {sorted(ESTIMATORS)} or a callable")
    check_mixing(estimator, mixing)
    if isinstance(estimator, str):
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; valid names are {sorted(ACTIVATIONS)}")
        options = {"transforms": transforms, "hidden_features": tuple(hidden_features),
                   "activation": ACTIVATIONS[activation]}
        resolved = resolve_transformer(estimator, transformer, bins, bound)
        if resolved["transformer"] == "spline":
            options.update(bins=resolved["bins"], bound=resolved["bound"])
        if estimator != "nsf":
            options["transformer"] = resolved["transformer"]
        if estimator != "maf":
            options["mixing"] = mixing
        if estimator == "maf":
            options["seed"] = seed
        with warnings.catch_warnings():  # NPE warns about a 1-D MAF when it is constructed, not again here
            warnings.filterwarnings("ignore", message=ONE_FEATURE_WARNING, category=UserWarning)
            return ESTIMATORS[estimator](features, context_features, **options)
    resolve_transformer(estimator, transformer, bins, bound)  # refuses spline options for a callable
    flow = estimator(features, context_features)
    if not isinstance(flow, Flow):
        raise TypeError(f"the estimator callable must return a sbiflows Flow, got {type(flow).__name__}")
    if flow.features != features or flow.context_features != context_features:
        raise TypeError(
            f"the estimator callable was asked for a flow with features={features}, context_features="
            f"{context_features} and returned one with {flow.features} and {flow.context_features}"
        )
    return flow


#: A value more than this many robust standard deviations (interquartile range / 1.349) from its
#: column's median is extreme.
EXTREME_Z = 1000.0


def extreme_rows(x: Tensor, *, max_rows: int = 100_000) -> tuple[Tensor, list[int], float]:
    """Rows of ``x`` (N, K) whose values are extreme enough to wreck a column's z-scoring.

    A column is flagged when values beyond :data:`EXTREME_Z` robust standard deviations from its median
    inflate its standard deviation more than twice (then standardizing squeezes every other row
    together and the column's information is lost). Columns with a zero interquartile range (discrete
    or mostly constant) are left alone. The quantiles come from the first ``max_rows`` rows.

    Returns:
        ``(rows, columns, inflation)``: a boolean ``(N,)`` mask of rows with an extreme value in a
        flagged column, the flagged columns, and the largest standard-deviation inflation.

    Example:
        >>> x = torch.randn(1000, 2)
        >>> x[3, 1] = 1e30
        >>> rows, columns, _ = extreme_rows(x)
        >>> int(rows.sum()), columns
        (1, [1])
    """
    flat = x.reshape(len(x), -1).double()
    sample = flat[:max_rows].sort(0).values
    n = len(sample)
    median = sample[n // 2]
    scale = (sample[(3 * n) // 4] - sample[n // 4]) / 1.349
    far = (flat - median).abs() > EXTREME_Z * scale
    far &= scale > 0
    rows = torch.zeros(len(flat), dtype=torch.bool)
    columns, worst = [], 1.0
    for j in torch.nonzero(far.any(0)).flatten().tolist():
        kept = flat[~far[:, j], j]
        inflation = float(flat[:, j].std() / kept.std()) if len(kept) > 1 and kept.std() > 0 else math.inf
        if inflation > 2:
            columns.append(j)
            rows |= far[:, j]
            worst = max(worst, inflation)
    return rows, columns, worst


class PosteriorNet(nn.Module):
    """``q(u | x)``: z-score ``u`` and ``x``, embed ``x``, evaluate or sample the flow.

    The z-score statistics are buffers (they move with ``.to()`` and are saved in the state dict).
    Those of ``x`` stay float64 whatever the network's dtype: ``x`` is standardized in float64 and only
    then cast, so float64 simulations on a large offset (``1e8 + theta``) keep their signal. Their
    shape fits the embedding (:mod:`sbiflows.xshape`): per element of a flat ``x``, per channel for
    the CNNs, per trial feature for a set network.

    Args:
        flow: A conditional flow over ``theta_dim`` features with the embedding's output as context.
        embedding: Maps z-scored ``x`` of shape ``(B, *x_shape)`` to ``(B, context_features)``.
        theta_dim: Number of parameters ``D``.
        x_dim: Dimension of one flat simulation (shorthand for ``x_shape=(x_dim,)``).
        x_shape: Shape of one simulation.
        stats_shape: Shape of x's z-score statistics (default: from the embedding's ``zscore_axes``).

    Example:
        >>> net = PosteriorNet(maf(2, 3, transforms=1), nn.Identity(), theta_dim=2, x_dim=3)
        >>> net.log_prob(torch.zeros(4, 2), torch.zeros(4, 3)).shape
        torch.Size([4])
    """

    def __init__(self, flow: Flow, embedding: nn.Module, *, theta_dim: int, x_dim: int | None = None,
                 x_shape: Sequence[int] | None = None, stats_shape: Sequence[int] | None = None):
        super().__init__()
        if (x_dim is None) == (x_shape is None):
            raise TypeError("PosteriorNet needs exactly one of x_dim and x_shape")
        self.flow = flow
        self.embedding = embedding
        self.x_shape = (int(x_dim),) if x_shape is None else tuple(int(s) for s in x_shape)
        self.theta_dim, self.x_dim = theta_dim, math.prod(self.x_shape)
        self.zscore_axes, self.padded_trials = layout(embedding, self.x_shape)
        #: With NaN-padded sets: the fewest finite trials of a training set (None: not known, e.g. an older file).
        self.fewest_trials: int | None = None
        if stats_shape is None:
            stats_shape = xshape_stats(self.x_shape, self.zscore_axes)
        self.register_buffer("u_shift", torch.zeros(theta_dim))
        self.register_buffer("u_scale", torch.ones(theta_dim))
        self.register_buffer("x_shift", torch.zeros(tuple(stats_shape), dtype=torch.float64))
        self.register_buffer("x_scale", torch.ones(tuple(stats_shape), dtype=torch.float64))

    def _apply(self, fn, recurse=True):
        """As ``nn.Module._apply`` (``.to()``, ``.float()``, ...), but x's statistics keep float64."""
        before = {name: self._buffers[name] for name in ("x_shift", "x_scale")}
        super()._apply(fn, recurse)
        for name, tensor in before.items():
            self._buffers[name] = tensor.to(device=self._buffers[name].device, dtype=torch.float64)
        return self

    @torch.no_grad()
    def set_standardization(self, u: Tensor, x: Tensor) -> None:
        """Set the z-score buffers from training rows ``u`` (N, D) and ``x`` (N, *x_shape) (see :func:`zscore`)."""
        mean, std, _ = zscore(u)
        self.u_shift.copy_(mean)
        self.u_scale.copy_(std)
        mean, std, _ = zscore_shaped(x.double(), axes=self.zscore_axes, padded_trials=self.padded_trials)
        self.x_shift.copy_(mean.reshape(self.x_shift.shape))
        self.x_scale.copy_(std.reshape(self.x_scale.shape))
        if self.padded_trials:
            self.fewest_trials = int(trial_mask(x).sum(-1).min())

    def context(self, x: Tensor) -> Tensor:
        """The flow's context ``(*batch, C)`` for raw observations ``x`` ``(*batch, *x_shape)`` (any float dtype).

        The embedding sees one batch axis: ``(prod(batch), *x_shape)``.
        """
        batch = x.shape[: x.ndim - len(self.x_shape)]
        z = ((x.double() - self.x_shift) / self.x_scale).to(self.u_shift.dtype)
        out = self.embedding(z.reshape(-1, *self.x_shape))
        return out.reshape(*batch, out.shape[-1])

    def log_prob(self, u: Tensor, x: Tensor) -> Tensor:
        """``log q(u | x)``; ``u`` ``(*batch, D)`` and ``x`` ``(*batch', x_dim)`` broadcast together."""
        return self.log_prob_given_context(u, self.context(x))

    def log_prob_given_context(self, u: Tensor, context: Tensor) -> Tensor:
        """``log q(u | x)`` with the context of ``x`` already computed (by :meth:`context`)."""
        z = (u - self.u_shift) / self.u_scale
        return self.flow.log_prob(z, context) - torch.log(self.u_scale).sum()

    def sample_given_context(self, n: int, context: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """``n`` draws of ``u`` for each context row: ``(n, *batch, D)`` for context ``(*batch, C)``."""
        z = self.flow.sample(n, context, generator=generator)
        return z * self.u_scale + self.u_shift

    def sample_from_base(self, noise: Tensor, context: Tensor) -> Tensor:
        """Draws of ``u`` from given base noise ``(n, *batch, D)`` for context ``(*batch, C)``."""
        return self.sample_and_log_prob_from_base(noise, context)[0]

    def sample_and_log_prob_from_base(self, noise: Tensor, context: Tensor) -> tuple[Tensor, Tensor]:
        """Draws of ``u`` as :meth:`sample_from_base` makes them, and their ``log q(u | x)`` ``(n, *batch)``
        from the same inverse pass (no second pass through the flow)."""
        z, log_q = self.flow.from_base(noise, context)
        return z * self.u_scale + self.u_shift, log_q - torch.log(self.u_scale).sum()

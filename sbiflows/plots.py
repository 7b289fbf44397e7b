"""Figures for posterior samples and calibration checks; every function returns a matplotlib Figure.

* :func:`corner` -- pairwise marginals of posterior samples (the ``corner`` package), optionally
  with the true parameters and a reference sample set overlaid in a second colour;
* :func:`sbc_ranks` -- SBC rank histograms with a binomial confidence band (or ECDF differences
  with a simultaneous band);
* :func:`coverage` -- HPD expected coverage against the diagonal, with the accepted band;
* :func:`tarp` -- the TARP expected-coverage curve against the diagonal, with a KS band.

Inputs may be torch tensors or NumPy arrays. In scripts and tests use a non-interactive backend
(``MPLBACKEND=Agg``), and close figures you are done with (``plt.close(fig)``).
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any, Literal

import corner as corner_package
import matplotlib.pyplot as plt
import numpy as np
import scipy.stats
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from sbiflows.checks import check_choice, check_int, check_real
from sbiflows.diagnostics.coverage import CoverageResult
from sbiflows.diagnostics.sbc import SBCResult
from sbiflows.diagnostics.tarp import TARPResult
from sbiflows.diagnostics.verdict import verdict

__all__ = ["corner", "coverage", "sbc_ranks", "tarp"]

#: Colours of the Okabe-Ito palette (distinguishable with every common colour-vision deficiency).
SAMPLES_COLOR = "#0072B2"
REFERENCE_COLOR = "#E69F00"
TRUTH_COLOR = "#000000"
#: Panels per row of :func:`sbc_ranks` (ten parameters in one row made a page-wide figure unreadable).
SBC_COLUMNS = 5
#: The central share of each sample set that sets a corner plot's axis ranges.
VIEW_MASS = 0.998


def corner(
    samples: torch.Tensor | np.ndarray,
    *,
    truths: torch.Tensor | np.ndarray | Sequence[float] | None = None,
    reference: torch.Tensor | np.ndarray | None = None,
    labels: Sequence[str] | None = None,
    task: Any = None,
    title: str | None = None,
    color: str = SAMPLES_COLOR,
    reference_color: str = REFERENCE_COLOR,
    truth_color: str = TRUTH_COLOR,
    legend: tuple[str, str, str] = ("posterior", "reference", "true parameters"),
    **kwargs: Any,
) -> Figure:
    """Corner plot of ``samples`` (N, D), optionally with ``truths`` and overlaid ``reference``.

    The axis range of each parameter follows the posterior: it spans the central 99.8% of the
    samples (and of the reference), includes the true value and is padded by 10%, so a posterior
    much narrower than the prior fills its panels; the bins follow the Freedman-Diaconis rule with
    the spread within modes (20 to 100 per axis), so narrow and multi-modal shapes stay visible. Nothing is
    smoothed in 1-D (mass the flow puts between modes shows as it is); 2-D contours are smoothed by one
    bin. A reference is drawn as contour lines over the posterior's filled contours.

    Args:
        samples: Posterior samples, shape ``(N, D)`` (or ``(N,)`` for one parameter).
        truths: True parameters, shape ``(D,)``: drawn as lines and markers in ``truth_color``.
        reference: Reference samples ``(M, D)`` drawn into the same panels in ``reference_color``
            (e.g. the reference posterior); both sets then get density-normalised histograms.
        labels: One label per parameter; default ``task.parameter_names`` if a ``task`` is given,
            else ``theta_1, ..., theta_D``.
        task: Anything with a ``parameter_names`` attribute, e.g. a ``simulators`` task.
        title: Figure title (e.g. the observation's name).
        color: Colour of ``samples``.
        reference_color: Colour of ``reference``.
        truth_color: Colour of ``truths``.
        legend: Legend entries for samples, reference and truths (each shown when drawn).
        **kwargs: Passed to ``corner.corner`` (e.g. ``bins``, ``smooth``, ``range`` override the rules above; a
            fraction in ``range`` is the central share of ``samples``); ``weights`` weigh ``samples`` only.

    Returns:
        The figure, with ``D x D`` axes.

    Example:
        >>> fig = corner(torch.randn(2000, 2), truths=[0.0, 0.0], reference=torch.randn(2000, 2), title="obs1")
        >>> len(fig.axes), fig.texts[0].get_text()
        (4, 'obs1')
    """
    data = _as_2d(samples, "samples")
    dim = data.shape[1]
    if data.shape[0] < 2:
        raise ValueError(f"samples must hold at least 2 draws for a corner plot, got shape {data.shape}")
    if labels is None and task is not None:
        labels = getattr(task, "parameter_names", None)
    labels = _labels(labels, dim)
    truth = None if truths is None else _as_1d(truths, "truths", dim)
    ref = None if reference is None else _as_2d(reference, "reference")
    if ref is not None and ref.shape[1] != dim:
        raise ValueError(f"reference must have {dim} columns like samples, got shape {ref.shape}")
    if len(legend) != 3 or not all(isinstance(entry, str) for entry in legend):
        raise ValueError(f"legend must be 3 strings (samples, reference, truths), got {legend!r}")
    # fractions of samples become bounds here, so the reference is drawn on the posterior's axes
    kwargs["range"] = _bounds(kwargs["range"], data, dim) if "range" in kwargs else _view_range(data, ref, truth)
    kwargs.setdefault("bins", _bins(data, kwargs["range"]))
    kwargs.setdefault("smooth", 1.0)  # 2-D contours only: one bin of Gaussian smoothing; 1-D histograms are raw
    hist_kwargs = dict(kwargs.pop("hist_kwargs", None) or {})
    if ref is not None:
        hist_kwargs.setdefault("density", True)
    # corner.corner writes the colour into hist_kwargs, so each call gets its own copy.
    fig = corner_package.corner(  # one parameter: the truth drawn below (corner indexes a grid of axes for it)
        data, labels=labels, color=color, truths=None if dim == 1 else truth, truth_color=truth_color,
        hist_kwargs=dict(hist_kwargs), **kwargs,
    )
    if dim == 1 and truth is not None:
        fig.axes[0].axvline(float(truth[0]), color=truth_color)
    handles = [Line2D([], [], color=color, label=legend[0])]
    if ref is not None:
        outline = {"plot_datapoints": False, "plot_density": False, "fill_contours": False,
                   **{k: v for k, v in kwargs.items() if k != "weights"}, "no_fill_contours": True}
        corner_package.corner(  # contour lines only (no white base fill), so the posterior underneath stays visible
            ref, fig=fig, labels=labels, color=reference_color, hist_kwargs=dict(hist_kwargs), **outline
        )
        _fit_diagonal_heights(fig, dim)  # the second call scaled the 1-D panels to the reference alone
        handles.append(Line2D([], [], color=reference_color, label=legend[1]))
    if truth is not None:
        handles.append(Line2D([], [], color=truth_color, marker="s", label=legend[2]))
    if dim == 1:  # one panel: the legend right of it, on a wider figure (above it, it ran into the title)
        width, height = fig.get_size_inches()
        fig.set_size_inches(width * 1.6, height)
        fig.subplots_adjust(right=0.6)
        fig.axes[0].legend(handles=handles, loc="upper left", bbox_to_anchor=(1.03, 1.0), frameon=False)
    else:
        fig.legend(handles=handles, loc="upper right", frameon=False)
    if title is not None:
        fig.suptitle(title)
    return fig


def _fit_diagonal_heights(fig: Figure, dim: int) -> None:
    """Give each 1-D panel of a corner figure the height of its tallest histogram (plus corner's 10%)."""
    for i in range(dim):
        ax = fig.axes[i * dim + i]
        heights = [patch.get_path().vertices[:, 1].max() for patch in ax.patches if len(patch.get_path().vertices)]
        if heights:
            ax.set_ylim(0, 1.1 * max(heights))


def sbc_ranks(
    result_or_ranks: SBCResult | torch.Tensor | np.ndarray,
    *,
    num_posterior_samples: int | None = None,
    num_bins: int | None = None,
    kind: Literal["hist", "ecdf"] = "hist",
    labels: Sequence[str] | None = None,
    confidence: float | None = None,
) -> Figure:
    """Per-parameter SBC rank histograms (or ECDF differences) with a confidence band.

    Given an :class:`SBCResult`, the title states its verdict in words and which test decided it,
    and each panel says whether that parameter passed. The ECDF view's band is simultaneous: at the
    default ``confidence`` of ``1 - result.threshold`` a curve leaving it is exactly what the KS test
    rejects. The histogram's bands are pointwise (one per bin): a bar outside one does not by itself
    contradict a passed KS test, and the title says so.

    ``kind="hist"``: counts of ranks in ``num_bins`` bins and the central ``confidence`` interval
    of each bin's Binomial(N, p_bin) count under uniformity (shaded), plus the expected count.
    ``kind="ecdf"``: ``ECDF(u) - u`` of the normalised ranks ``u`` with the simultaneous KS band
    at ``confidence``. A ∪-shaped histogram means over-confidence, ∩-shaped under-confidence and a
    skewed one bias; as ECDF differences, ∪ is positive at low and negative at high ranks, ∩ the
    reverse, and bias a single one-signed bump.

    Args:
        result_or_ranks: An :class:`SBCResult`, or ranks ``(N, D)`` in ``0..L``.
        num_posterior_samples: ``L``; required with raw ranks.
        num_bins: Histogram bins; default the result's ``num_bins`` (or ``min(20, N // 10, L + 1)``).
        kind: "hist" or "ecdf".
        labels: Panel titles; default the result's parameter names or ``theta_1, ...``.
        confidence: Coverage of the band, in (0, 1); default ``1 - result.threshold`` for a result
            decided by the KS test, else 0.99.

    Returns:
        The figure, with one axis per parameter.

    Example:
        >>> fig = sbc_ranks(torch.randint(0, 101, (300, 2)), num_posterior_samples=100)
        >>> len(fig.axes)
        2
    """
    ranks, num_draws, default_bins, default_labels = _unpack_ranks(result_or_ranks, num_posterior_samples)
    result = result_or_ranks if isinstance(result_or_ranks, SBCResult) else None
    if confidence is None:
        confidence = 1 - result.threshold if result is not None and result.test == "ks" else 0.99
    num, dim = ranks.shape
    levels = num_draws + 1
    bins = num_bins if num_bins is not None else default_bins
    check_int(bins, "num_bins (at most L + 1)", minimum=1, maximum=levels)
    check_choice(kind, "kind", ("hist", "ecdf"))
    check_real(confidence, "confidence", low=0, high=1, low_open=True, high_open=True)
    names = _labels(labels if labels is not None else default_labels, dim)

    columns = min(dim, SBC_COLUMNS)
    rows = -(-dim // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 2.8 * rows + 0.4), squeeze=False,
                             layout="constrained")
    for ax in axes.flat[dim:]:  # the last row's empty places
        ax.remove()
    for i, ax in enumerate(axes.flat[:dim]):
        if kind == "hist":
            _rank_histogram(ax, ranks[:, i], levels, bins, confidence)
        else:
            _rank_ecdf(ax, ranks[:, i], levels, confidence)
        if result is None:
            ax.set_title(names[i])
        else:
            passed = result.pvalues[i] >= result.threshold
            ax.set_title(f"{names[i]}: {'uniform' if passed else 'FAILED'} (p = {result.pvalues[i]:.2g})",
                         color="k" if passed else "#D55E00")
    band = "simultaneous" if kind == "ecdf" else "pointwise, per bin"
    title = f"SBC ranks: {num} datasets, {num_draws} draws, {confidence:.3g} band ({band})"
    if result is not None:
        title = (f"SBC: {verdict(result)}, decided by the {result.test.upper()} test per parameter at "
                 f"level {result.threshold:.2g}\n{title}")
    fig.suptitle(title)
    return fig


def coverage(result: CoverageResult, *, ax: Axes | None = None, source: str | None = None) -> Figure:
    """Empirical vs nominal coverage of HPD regions, with the diagonal and the accepted band.

    Below the diagonal = over-confident (too narrow), above = conservative (too wide). ``source``, where the
    datasets' parameters came from when not the prior (TSNPE's check: ``"the last truncated prior"``), joins
    the title.

    Example:
        >>> import sbiflows.diagnostics as d
        >>> prior = torch.distributions.MultivariateNormal(torch.zeros(1), torch.eye(1))
        >>> class Exact:
        ...     def sample_batched(self, n, xs): return xs / 2 + torch.randn(n, *xs.shape) / 2**0.5
        ...     def log_prob(self, theta, x): return -(theta - x / 2).square().sum(-1)
        >>> r = d.expected_coverage(Exact(), prior, lambda t: t + torch.randn_like(t), num_datasets=200)
        >>> len(coverage(r).axes[0].lines)
        2
    """
    if not isinstance(result, CoverageResult):
        raise TypeError(
            f"result must be a CoverageResult from expected_coverage, got {type(result).__name__}"
        )
    fig, ax = _figure(ax)
    levels, empirical, band = (t.numpy() for t in (result.levels, result.empirical, result.band))
    ax.fill_between(levels, levels - band, levels + band, color="0.85", label="accepted band")
    ax.plot([0, 1], [0, 1], color="k", linestyle="--", linewidth=1, label="calibrated")
    ax.plot(levels, empirical, color=SAMPLES_COLOR, marker="o", markersize=3, label="empirical")
    ax.text(0.97, 0.03, "over-confident\n(too narrow)", ha="right", va="bottom", transform=ax.transAxes, color="0.4")
    ax.text(0.03, 0.97, "conservative (too wide)", ha="left", va="top", transform=ax.transAxes, color="0.4")
    _unit_square(ax, "credibility level of HPD region", "empirical coverage")
    datasets = f"{result.num_datasets} datasets" + ("" if source is None else f" from {source}")
    failing = "below the band = failed" if result.one_sided else "outside the band = failed"
    ax.set_title(f"Expected coverage: {verdict(result)}\n{datasets}"
                 + (f", {failing}" if source is None else f"\n{failing}"))
    ax.legend(loc="upper left", bbox_to_anchor=(0.0, 0.9), frameon=False)
    return fig


def tarp(result: TARPResult, *, ax: Axes | None = None) -> Figure:
    """TARP expected coverage probability (ECP) vs credibility, with the diagonal and a KS band.

    The band is ``alpha ± d``, with ``d`` the smaller of the KS critical distance at the result's significance level
    and the result's tolerance for ``max |ECP - alpha|``: the check fails a curve that leaves either. The title
    gives both numbers against their limits.

    Example:
        >>> import sbiflows.diagnostics as d
        >>> prior = torch.distributions.MultivariateNormal(torch.zeros(2), torch.eye(2))
        >>> class Exact:
        ...     def sample_batched(self, n, xs): return xs / 2 + torch.randn(n, *xs.shape) / 2**0.5
        >>> r = d.tarp(Exact(), prior, lambda t: t + torch.randn_like(t), num_datasets=200)
        >>> [line.get_label() for line in tarp(r).axes[0].lines]
        ['calibrated', 'ECP']
    """
    if not isinstance(result, TARPResult):
        raise TypeError(f"result must be a TARPResult from tarp, got {type(result).__name__}")
    fig, ax = _figure(ax)
    grid, ecp = result.credibility.numpy(), result.ecp.numpy()
    crit = float(scipy.stats.kstwo.ppf(1 - result.alpha, result.num_datasets))
    width = min(crit, result.tolerance)  # the check wants both: the KS test and |ECP - alpha| <= tolerance
    source = "KS test" if crit <= result.tolerance else "tolerance"  # the numbers are in the title
    ax.fill_between(grid, grid - width, grid + width, color="0.85", label=f"accepted band ({source})")
    ax.plot([0, 1], [0, 1], color="k", linestyle="--", linewidth=1, label="calibrated")
    ax.plot(grid, ecp, color=SAMPLES_COLOR, label="ECP")
    _unit_square(ax, "credibility level alpha", "expected coverage probability")
    within = result.max_deviation <= result.tolerance
    tests = (f"max |ECP - alpha| {result.max_deviation:.3f} {'<=' if within else '>'} {result.tolerance:g}; "
             f"KS p {result.ks_pvalue:.2g} {'>=' if result.ks_pvalue >= result.alpha else '<'} {result.alpha:g}")
    tests = tests.replace("; ", "\n") if ax.figure.get_figwidth() < 6 else tests  # a small figure: two lines
    ax.set_title(f"TARP: {verdict(result)}, ATC {result.atc:+.3f}\n{tests}")
    ax.legend(loc="upper left", frameon=False)
    return fig


# ----------------------------------------------------------------------------------- helpers
def _rank_histogram(ax: Axes, ranks: np.ndarray, levels: int, bins: int, confidence: float) -> None:
    """Bars of rank counts per bin (bins of whole ranks) and the binomial band for each bin."""
    bin_of_level = np.arange(levels) * bins // levels
    edges = np.append(np.searchsorted(bin_of_level, np.arange(bins)), levels) - 0.5
    counts = np.bincount(ranks * bins // levels, minlength=bins)
    p = np.diff(edges) / levels
    low, high = scipy.stats.binom.interval(confidence, len(ranks), p)
    ax.bar(edges[:-1], counts, width=np.diff(edges), align="edge", color=SAMPLES_COLOR, alpha=0.7)
    band_low, band_high = np.append(low, low[-1]), np.append(high, high[-1])  # last step's right edge
    ax.fill_between(edges, band_low, band_high, step="post", color="0.5", alpha=0.35, zorder=3)
    expected = len(ranks) * np.append(p, p[-1])
    ax.plot(edges, expected, drawstyle="steps-post", color="k", linewidth=1)
    ax.set_xlim(edges[0], edges[-1])
    ax.set_xlabel("rank")
    ax.set_ylabel("count")


def _rank_ecdf(ax: Axes, ranks: np.ndarray, levels: int, confidence: float) -> None:
    """ECDF of the normalised ranks minus the uniform CDF, with the simultaneous KS band.

    The ECDF is read at the boundaries ``k / (L + 1)`` between rank levels (at most about 200 of them),
    where the CDF of uniform ranks is exactly ``k / (L + 1)``: uniform ranks give no sawtooth at small ``L``.
    """
    sorted_ranks = np.sort(ranks)
    k = np.unique(np.round(np.linspace(0, levels, min(levels, 200) + 1)).astype(np.int64))
    grid = k / levels
    diff = np.searchsorted(sorted_ranks, k, side="left") / len(sorted_ranks) - grid
    crit = float(scipy.stats.kstwo.ppf(confidence, len(sorted_ranks)))
    ax.fill_between(grid, -crit, crit, color="0.85")
    ax.axhline(0.0, color="k", linewidth=1)
    ax.plot(grid, diff, color=SAMPLES_COLOR)
    ax.set_xlim(0, 1)
    ax.set_xlabel("normalised rank")
    ax.set_ylabel("ECDF - uniform")


def _unpack_ranks(
    value: SBCResult | torch.Tensor | np.ndarray, num_posterior_samples: int | None
) -> tuple[np.ndarray, int, int, Sequence[str] | None]:
    if isinstance(value, SBCResult):
        ranks = value.ranks.numpy().astype(np.int64)
        return ranks, value.num_posterior_samples, value.num_bins, value.parameter_names
    ranks = _as_2d(value, "result_or_ranks")
    if num_posterior_samples is None:
        raise ValueError("num_posterior_samples (L) is required when passing raw ranks")
    check_int(num_posterior_samples, "num_posterior_samples", minimum=1)
    if np.any(ranks != np.round(ranks)) or ranks.min() < 0 or ranks.max() > num_posterior_samples:
        raise ValueError(f"ranks must be integers in 0..{num_posterior_samples} (num_posterior_samples)")
    default_bins = max(1, min(20, len(ranks) // 10, num_posterior_samples + 1))  # as rank_statistics
    return ranks.astype(np.int64), num_posterior_samples, default_bins, None


def _figure(ax: Axes | None) -> tuple[Figure, Axes]:
    if ax is None:
        fig, ax = plt.subplots(figsize=(4.2, 4.0), layout="constrained")
        return fig, ax
    if not isinstance(ax, Axes):
        raise TypeError(f"ax must be a matplotlib Axes, got {type(ax).__name__}")
    return ax.figure, ax


def _unit_square(ax: Axes, xlabel: str, ylabel: str) -> None:
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_aspect("equal")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)


def _view_range(samples: np.ndarray, reference: np.ndarray | None, truth: np.ndarray | None) -> list[tuple[float, float]]:
    """Per column: the central ``VIEW_MASS`` of each sample set and the truth, padded by 10%."""
    tail = (1 - VIEW_MASS) / 2
    bounds = [np.quantile(a, [tail, 1 - tail], axis=0) for a in (samples, reference) if a is not None]
    low = np.min([b[0] for b in bounds], axis=0)
    high = np.max([b[1] for b in bounds], axis=0)
    if truth is not None:
        low, high = np.minimum(low, truth), np.maximum(high, truth)
    pad = np.where(high > low, 0.1 * (high - low), np.maximum(0.05 * np.abs(low), 0.5))
    return [(float(lo), float(hi)) for lo, hi in zip(low - pad, high + pad)]


def _bounds(ranges: object, samples: np.ndarray, dim: int) -> list[tuple[float, float]]:
    """``corner``'s ``range``: per column bounds ``(low, high)``, or a fraction in (0, 1] of the samples (the central,
    equal-tailed share), as bounds."""
    if isinstance(ranges, np.ndarray):
        ranges = ranges.tolist()
    if not isinstance(ranges, (list, tuple)) or len(ranges) != dim:
        raise ValueError(f"range must have {dim} entries (one per parameter), each (low, high) or a fraction in "
                         f"(0, 1], got {ranges!r}")
    bounds = []
    for column, entry in zip(samples.T, ranges):
        if isinstance(entry, np.ndarray):
            entry = entry.tolist()
        if isinstance(entry, numbers.Real) and not isinstance(entry, bool) and 0 < entry <= 1:
            low, high = np.quantile(column, [(1 - entry) / 2, (1 + entry) / 2])
        elif isinstance(entry, (list, tuple)) and len(entry) == 2 and float(entry[0]) < float(entry[1]):
            low, high = entry
        else:
            raise ValueError(f"range entries must be (low, high) with low < high or a fraction in (0, 1], got "
                             f"{entry!r}")
        bounds.append((float(low), float(high)))
    return bounds


def _bins(samples: np.ndarray, ranges: Sequence[tuple[float, float]]) -> list[int]:
    """Bins per column over its range: the Freedman-Diaconis width of the modes, between 20 and 100.

    Freedman and Diaconis use the interquartile range, which for two narrow modes far apart is the
    distance between them; the median width of windows holding 10% of the samples measures the
    spread within a mode instead (4.6 of those widths make an IQR for a normal distribution).
    """
    ordered = np.sort(samples, axis=0)
    k = max(1, len(ordered) // 10)
    local = 4.6 * np.median(ordered[k:] - ordered[:-k], axis=0)
    width = 2 * np.maximum(local, 1e-12) * len(samples) ** (-1 / 3)
    spans = np.array([hi - lo for lo, hi in ranges])
    return [int(b) for b in np.clip(np.ceil(spans / width), 20, 100)]


def _as_numpy(value: object, name: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().double().numpy()
    if isinstance(value, np.ndarray):
        return value.astype(np.float64)
    raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(value).__name__}")


def _as_2d(value: object, name: str) -> np.ndarray:
    array = _as_numpy(value, name)
    if array.ndim == 1:
        array = array[:, None]
    if array.ndim != 2 or array.shape[0] == 0:
        raise ValueError(f"{name} must have shape (N, D), got {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contains NaN/inf values")
    return array


def _as_1d(value: object, name: str, dim: int) -> np.ndarray:
    if isinstance(value, (list, tuple)):
        array = np.asarray(value, dtype=np.float64)
    else:
        array = _as_numpy(value, name)
    if array.reshape(-1).shape != (dim,):
        raise ValueError(f"{name} must have {dim} entries (one per parameter), got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contains NaN/inf values: {array.reshape(-1).tolist()}")
    return array.reshape(-1)


def _labels(labels: Sequence[str] | None, dim: int) -> list[str]:
    if labels is None:
        return [f"theta_{i + 1}" for i in range(dim)]
    labels = [str(label) for label in labels]
    if len(labels) != dim:
        raise ValueError(f"labels must have {dim} entries (one per parameter), got {len(labels)}")
    return labels

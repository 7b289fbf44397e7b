"""Tests of sbiflows.plots: what is drawn (axes, artists, their data, labels), not only "no error"."""

from __future__ import annotations

from types import SimpleNamespace

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import scipy.stats  # noqa: E402
import torch  # noqa: E402
from matplotlib.colors import to_rgba  # noqa: E402

from gaussian_posterior import GaussianLinearModel  # noqa: E402
from sbiflows import plots  # noqa: E402
from sbiflows.diagnostics import expected_coverage, sbc, simulate_datasets, tarp  # noqa: E402


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


@pytest.fixture(scope="module")
def results():
    model = GaussianLinearModel(dim=2, sigma=0.5)
    theta, x = simulate_datasets(model.prior, model, 300, seed=0)
    options = {"theta": theta, "x": x, "num_posterior_samples": 200}
    return SimpleNamespace(
        sbc=sbc(model.posterior(scale=0.8), parameter_names=["mass", "spin"], **options),
        coverage=expected_coverage(model.posterior(scale=0.8), **options),
        tarp=tarp(model.posterior(), **options),
    )


def samples(n=2000, dim=2, shift=0.0, seed=0):
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)) + shift


# -------------------------------------------------------------------------------------- corner
def test_corner_draws_a_grid_with_labels_and_truth_lines():
    truths = torch.tensor([0.5, -0.5, 1.0])
    fig = plots.corner(samples(dim=3), truths=truths, labels=["a", "b", "c"])
    assert len(fig.axes) == 9
    grid = np.array(fig.axes).reshape(3, 3)
    assert [ax.get_xlabel() for ax in grid[-1]] == ["a", "b", "c"]
    for i in range(3):
        vertical = [line.get_xdata()[0] for line in grid[i, i].lines]
        assert float(truths[i]) in vertical  # the truth line on each 1-D marginal
        assert len(grid[i, i].patches) == 1  # one histogram
    entries = [t.get_text() for t in fig.legends[0].get_texts()]
    assert entries == ["posterior", "true parameters"]  # no reference: no reference entry
    truth_colour = [line.get_color() for line in grid[0, 0].lines if line.get_xdata()[0] == 0.5]
    assert to_rgba(truth_colour[0]) == to_rgba(plots.TRUTH_COLOR) != to_rgba(plots.SAMPLES_COLOR)


def test_corner_overlays_reference_in_a_second_colour_on_a_shared_range():
    post, ref = samples(seed=1), samples(seed=2, shift=3.0).numpy()  # numpy works too
    fig = plots.corner(post, reference=ref, title="obs1")
    diagonal = [fig.axes[0], fig.axes[3]]
    for i, ax in enumerate(diagonal):
        colours = [patch.get_edgecolor() for patch in ax.patches]
        assert colours == [to_rgba(plots.SAMPLES_COLOR), to_rgba(plots.REFERENCE_COLOR)]
        low = min(np.quantile(post[:, i].numpy(), 0.001), np.quantile(ref[:, i], 0.001))
        high = max(np.quantile(post[:, i].numpy(), 0.999), np.quantile(ref[:, i], 0.999))
        pad = 0.1 * (high - low)
        assert ax.get_xlim() == pytest.approx((low - pad, high + pad))
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["posterior", "reference"]
    assert fig.texts[0].get_text() == "obs1"


def test_corner_with_a_reference_keeps_the_posteriors_1d_peaks_inside_their_panels():
    """The reference is drawn by a second corner call, which scaled the 1-D panels to the reference alone:
    a posterior narrower than the reference (an over-confident one) ran off the top (walkthrough, session 57)."""
    g = torch.Generator().manual_seed(0)
    narrow = torch.cat([0.05 * torch.randn(5000, 2, generator=g) - 0.3, 0.05 * torch.randn(5000, 2, generator=g) + 0.5])
    wide = torch.cat([0.2 * torch.randn(5000, 2, generator=g) - 0.3, 0.2 * torch.randn(5000, 2, generator=g) + 0.5])
    fig = plots.corner(narrow, reference=wide)
    for i in range(2):
        ax = fig.axes[3 * i]
        tallest = max(patch.get_path().vertices[:, 1].max() for patch in ax.patches)
        assert tallest > 3 and ax.get_ylim()[1] >= tallest  # the posterior's density near 4, the reference's near 1
    plt.close(fig)


def test_corner_range_follows_a_narrow_posterior_and_includes_the_truth():
    narrow = 0.01 * samples(seed=3) + 0.5  # far narrower than any prior, away from the truth
    fig = plots.corner(narrow, truths=[0.0, 0.5])
    low, high = fig.axes[0].get_xlim()
    assert low < 0.0 < 0.48 < 0.52 < high < 0.7  # the truth 0.0 is in view, and the posterior fills it
    low, high = fig.axes[3].get_xlim()
    assert 0.45 < low < 0.48 and 0.52 < high < 0.55


def test_corner_bins_resolve_narrow_modes_far_apart():
    two = torch.cat([0.01 * samples(seed=4) - 1.0, 0.01 * samples(seed=5) + 1.0])  # two modes 200 sd apart
    fig = plots.corner(two)
    edges = [patch.get_path().vertices[:, 0] for patch in fig.axes[0].patches][0]
    width = np.diff(np.unique(edges)).min()
    assert width < 0.05  # a mode (sd 0.01) spans several bins; interquartile bins would be ~0.5 wide


def test_corner_takes_labels_from_a_task_and_defaults_otherwise():
    task = SimpleNamespace(parameter_names=("alpha", "beta"))
    fig = plots.corner(samples(), task=task)
    assert [fig.axes[2].get_xlabel(), fig.axes[3].get_xlabel()] == ["alpha", "beta"]
    fig = plots.corner(samples())
    assert fig.axes[3].get_xlabel() == "theta_2"
    assert len(plots.corner(samples(dim=1)[:, 0]).axes) == 1  # (N,) is one parameter


def test_the_reference_draws_lines_only_over_the_posteriors_shading():
    """The reference's corner call painted its white base fill over the posterior's density inside its outer
    contour; ``range`` fractions crashed; ``weights`` of the samples weighed (or broke) the reference too."""
    from matplotlib.collections import PolyQuadMesh
    from matplotlib.contour import ContourSet

    post, ref = samples(seed=1), samples(n=3000, seed=2, shift=0.5)
    panel = plots.corner(post, reference=ref).axes[2]
    density = next(i for i, c in enumerate(panel.collections) if isinstance(c, PolyQuadMesh))
    later_fills = [c for c in panel.collections[density:] if isinstance(c, ContourSet) and c.filled]
    assert later_fills == []
    fig = plots.corner(post, reference=ref, range=[np.float32(0.9), (-1.0, 1.0)], weights=np.ones(len(post)))
    low, high = np.quantile(post[:, 0].numpy(), [0.05, 0.95])
    assert fig.axes[0].get_xlim() == pytest.approx((low, high)) and fig.axes[3].get_xlim() == (-1.0, 1.0)
    fig = plots.corner(post, range=np.array([[-3.0, 3.0], [-2.0, 2.0]]))  # an array of bounds, as corner takes it
    assert fig.axes[0].get_xlim() == (-3.0, 3.0) and fig.axes[3].get_xlim() == (-2.0, 2.0)
    assert plots.corner(post, range=[1.0, 1.0]).axes[0].get_xlim() == pytest.approx(
        (float(post[:, 0].min()), float(post[:, 0].max())))


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        ((torch.zeros(10, 2),), {"legend": ("a", "b")}, ValueError, r"legend must be 3 strings .* got \('a', 'b'\)"),
        ((torch.zeros(10, 2),), {"range": [2.0, 0.5]}, ValueError, "range entries must be .* got 2.0"),
        ((torch.zeros(10, 2),), {"range": [0.5]}, ValueError, "range must have 2 entries"),
        (([[0.0, 1.0]] * 10,), {}, TypeError, "samples must be a torch.Tensor or numpy.ndarray, got list"),
        ((torch.zeros(10, 2, 2),), {}, ValueError, r"samples must have shape \(N, D\), got \(10, 2, 2\)"),
        ((torch.full((10, 2), float("nan")),), {}, ValueError, "samples contains NaN"),
        ((torch.zeros(10, 2),), {"truths": [0.0, 0.0, 0.0]}, ValueError, "truths must have 2 entries"),
        ((torch.zeros(10, 2),), {"labels": ["a"]}, ValueError, "labels must have 2 entries"),
        ((torch.zeros(10, 2),), {"reference": torch.zeros(10, 3)}, ValueError, "reference must have 2 columns"),
    ],
)
def test_corner_rejects_bad_input(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        plots.corner(*args, **kwargs)


# ------------------------------------------------------------------------------------ sbc_ranks
def test_sbc_ranks_histogram_matches_the_ranks_and_the_binomial_band(results):
    result = results.sbc
    fig = plots.sbc_ranks(result, confidence=0.99)
    assert len(fig.axes) == 2
    assert [ax.get_title().split(":")[0] for ax in fig.axes] == ["mass", "spin"]
    assert "pointwise" in fig.get_suptitle() and "decided by the KS test" in fig.get_suptitle()
    bins, levels = result.num_bins, result.num_posterior_samples + 1
    for i, ax in enumerate(fig.axes):
        heights = [bar.get_height() for bar in ax.patches]
        expected = np.bincount(result.ranks[:, i].numpy() * bins // levels, minlength=bins)
        assert heights == expected.tolist()
        band = ax.collections[0].get_paths()[0].vertices[:, 1]
        sizes = np.bincount(np.arange(levels) * bins // levels, minlength=bins)
        low, high = scipy.stats.binom.interval(0.99, result.num_datasets, sizes / levels)
        assert band.min() == pytest.approx(low.min()) and band.max() == pytest.approx(high.max())
        assert ax.get_xlabel() == "rank"


def test_sbc_ranks_ecdf_difference_and_ks_band(results):
    result = results.sbc
    fig = plots.sbc_ranks(result, kind="ecdf", labels=["m", "s"], confidence=0.95)
    assert [ax.get_title().split(":")[0] for ax in fig.axes] == ["m", "s"]
    assert [ax.get_title().split(": ")[1].split(" ")[0] for ax in fig.axes] == [
        "uniform" if p >= result.threshold else "FAILED" for p in result.pvalues]
    default = plots.sbc_ranks(result, kind="ecdf")  # the band of the test that decides
    band = default.axes[0].collections[0].get_paths()[0].vertices[:, 1]
    assert band.max() == pytest.approx(scipy.stats.kstwo.ppf(1 - result.threshold, result.num_datasets))
    assert "simultaneous" in default.get_suptitle()
    unit = np.sort((result.ranks[:, 0].numpy() + 0.5) / (result.num_posterior_samples + 1))
    x, y = fig.axes[0].lines[-1].get_data()
    np.testing.assert_allclose(y, np.searchsorted(unit, x, side="right") / len(unit) - x)
    band = fig.axes[0].collections[0].get_paths()[0].vertices[:, 1]
    assert band.max() == pytest.approx(scipy.stats.kstwo.ppf(0.95, result.num_datasets))


def test_sbc_ranks_ecdf_of_exactly_uniform_ranks_is_flat_at_few_draws():
    """The ECDF was read on a fine grid against the continuous CDF: uniform ranks of 0..5 drew a sawtooth of
    +-1/12 (a third of the KS band at 300 datasets) instead of zero."""
    ranks = torch.arange(300).remainder(6).unsqueeze(1)
    fig = plots.sbc_ranks(ranks, num_posterior_samples=5, kind="ecdf")
    x, y = fig.axes[0].lines[-1].get_data()
    np.testing.assert_allclose(x, np.arange(7) / 6)
    np.testing.assert_allclose(y, 0.0, atol=1e-12)


def test_sbc_ranks_accepts_raw_ranks():
    ranks = torch.randint(0, 51, (200, 3), generator=torch.Generator().manual_seed(0))
    fig = plots.sbc_ranks(ranks, num_posterior_samples=50, num_bins=10)
    assert len(fig.axes) == 3 and all(len(ax.patches) == 10 for ax in fig.axes)
    assert fig.axes[2].get_title() == "theta_3"


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({}, ValueError, "num_posterior_samples .* is required when passing raw ranks"),
        ({"num_posterior_samples": 10}, ValueError, r"ranks must be integers in 0..10"),
        ({"num_posterior_samples": 50.0}, TypeError, "num_posterior_samples must be an int"),
        ({"num_posterior_samples": 50, "kind": "violin"}, ValueError, "kind must be one of 'hist', 'ecdf', got 'violin'"),
        ({"num_posterior_samples": 50, "num_bins": 52}, ValueError, r"num_bins \(at most L \+ 1\) must be an int in \[1, 51\], got 52"),
        ({"num_posterior_samples": 50, "confidence": 1.0}, ValueError, r"confidence must be a real number in \(0, 1\), got 1.0"),
        ({"num_posterior_samples": 50, "labels": ["a"]}, ValueError, "labels must have 2 entries"),
    ],
)
def test_sbc_ranks_rejects_bad_input(kwargs, error, match):
    ranks = torch.randint(0, 51, (100, 2), generator=torch.Generator().manual_seed(0))
    with pytest.raises(error, match=match):
        plots.sbc_ranks(ranks, **kwargs)


def test_sbc_ranks_rejects_non_arrays():
    with pytest.raises(TypeError, match="result_or_ranks must be a torch.Tensor or numpy.ndarray"):
        plots.sbc_ranks([[1, 2]], num_posterior_samples=5)


# ------------------------------------------------------------------------------ coverage, tarp
def test_coverage_plot_shows_diagonal_empirical_curve_and_band(results):
    result = results.coverage
    fig = plots.coverage(result)
    (ax,) = fig.axes
    diagonal, empirical = ax.lines
    assert list(diagonal.get_xdata()) == [0, 1] and list(diagonal.get_ydata()) == [0, 1]
    np.testing.assert_allclose(empirical.get_xdata(), result.levels.numpy())
    np.testing.assert_allclose(empirical.get_ydata(), result.empirical.numpy())
    band = ax.collections[0].get_paths()[0].vertices
    assert band[:, 1].min() == pytest.approx(float((result.levels - result.band).min()))
    assert ax.get_xlabel() == "credibility level of HPD region" and ax.get_ylabel() == "empirical coverage"
    assert result.verdict in ax.get_title() and "datasets from" not in ax.get_title()
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["accepted band", "calibrated", "empirical"]
    titled = plots.coverage(result, source="the last truncated prior").axes[0].get_title()
    assert f"{result.num_datasets} datasets from the last truncated prior\n" in titled  # a PNG shared alone says so


def test_tarp_plot_shows_ecp_against_the_diagonal_with_a_ks_band(results):
    result = results.tarp
    fig = plots.tarp(result)
    (ax,) = fig.axes
    assert [line.get_label() for line in ax.lines] == ["calibrated", "ECP"]
    np.testing.assert_allclose(ax.lines[1].get_ydata(), result.ecp.numpy())
    np.testing.assert_allclose(ax.lines[1].get_xdata(), result.credibility.numpy())
    band = ax.collections[0].get_paths()[0].vertices
    crit = scipy.stats.kstwo.ppf(1 - result.alpha, result.num_datasets)
    assert band[:, 1].max() == pytest.approx(1 + crit)
    assert "calibrated" in ax.get_title() and f"{result.atc:+.3f}" in ax.get_title()
    assert f"max |ECP - alpha| {result.max_deviation:.3f} <= 0.1" in ax.get_title() and "KS p" in ax.get_title()


def test_the_tarp_band_and_title_show_the_tolerance_where_it_decides():
    """Below about 265 datasets the KS band is wider than the tolerance of 0.1: the plot drew only the KS band, so
    a curve inside it could come with "FAILED" and no visible reason."""
    model = GaussianLinearModel(dim=2, sigma=0.5)
    theta, x = simulate_datasets(model.prior, model, 100, seed=0)
    result = tarp(model.posterior(scale=0.8), theta=theta, x=x, num_posterior_samples=200, seed=0)
    ax = plots.tarp(result).axes[0]
    assert ax.get_legend().get_texts()[0].get_text() == "accepted band (tolerance)"
    assert ax.collections[0].get_paths()[0].vertices[:, 1].max() == pytest.approx(1.1)
    assert ("<=" if result.max_deviation <= 0.1 else ">") in ax.get_title().split("\n")[1]


def test_a_one_sided_coverage_plot_fails_only_below_the_band_and_sbc_panels_wrap(results):
    import dataclasses

    one_sided = dataclasses.replace(results.coverage, one_sided=True)
    assert "below the band = failed" in plots.coverage(one_sided).axes[0].get_title()
    ranks = torch.randint(0, 51, (100, 7), generator=torch.Generator().manual_seed(0))
    fig = plots.sbc_ranks(ranks, num_posterior_samples=50)
    assert len(fig.axes) == 7 and fig.get_size_inches()[0] == pytest.approx(3.2 * 5)


def test_coverage_and_tarp_draw_into_a_given_axes(results):
    fig, (left, right) = plt.subplots(1, 2)
    assert plots.coverage(results.coverage, ax=left) is fig
    assert plots.tarp(results.tarp, ax=right) is fig
    assert len(left.lines) == 2 and len(right.lines) == 2


def test_coverage_and_tarp_reject_the_wrong_result(results):
    with pytest.raises(TypeError, match="result must be a CoverageResult from expected_coverage, got TARPResult"):
        plots.coverage(results.tarp)
    with pytest.raises(TypeError, match="result must be a TARPResult from tarp, got SBCResult"):
        plots.tarp(results.sbc)
    with pytest.raises(TypeError, match="ax must be a matplotlib Axes"):
        plots.tarp(results.tarp, ax="left")


def test_a_one_parameter_corner_plot_draws_its_truth_and_keeps_the_legend_off_the_title():
    """corner's truths indexed a grid of axes (a TypeError for one parameter), and the figure legend sat on the
    title of the one panel."""
    samples = torch.randn(2000, 1, generator=torch.Generator().manual_seed(0))
    fig = plots.corner(samples, truths=[0.4], reference=samples + 0.1, title="model: run.v1")
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    legend = fig.axes[0].get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["posterior", "reference", "true parameters"]
    assert not legend.get_window_extent(renderer).overlaps(fig._suptitle.get_window_extent(renderer))
    assert not legend.get_window_extent(renderer).overlaps(fig.axes[0].get_window_extent(renderer))
    assert any(list(line.get_xdata()) == [0.4, 0.4] for line in fig.axes[0].get_lines())
    plt.close(fig)

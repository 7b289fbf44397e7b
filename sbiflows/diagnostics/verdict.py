"""Calibration verdicts in words: calibrated, conservative, over-confident or biased.

Each calibration check has its own vocabulary (SBC rank shapes, coverage's "under-confident", TARP's
verdicts); :func:`verdict` maps a result to one of four words a scientist can act on, and
:func:`overall` combines several, in this order:

* **biased** -- the truth lies systematically on one side of the posterior (or the ranks are
  non-uniform in another way that is not a plain widening). It comes first because a shifted
  posterior also misses the truth too often, which coverage and TARP report as over-confidence:
  only SBC's rank shapes tell a shift from a narrowing;
* **over-confident** -- credible regions miss the truth more often than they claim (too narrow):
  intervals from this posterior are not trustworthy;
* **conservative** -- credible regions contain the truth more often than they claim (too wide):
  safe, only less sharp than it could be;
* **calibrated** -- no check found a deviation at its level.
"""

from __future__ import annotations

from collections.abc import Iterable

from sbiflows.diagnostics.coverage import CoverageResult
from sbiflows.diagnostics.sbc import SBCResult
from sbiflows.diagnostics.tarp import TARPResult

__all__ = ["ADVICE", "FAILING", "VERDICTS", "overall", "verdict"]

#: The words, in the order :func:`overall` picks them.
VERDICTS = ("biased", "over-confident", "conservative", "calibrated")
#: The verdicts that make ``sbiflows fit --strict`` exit with an error.
FAILING = ("over-confident", "biased")
#: What each verdict means for the user, and what to try.
ADVICE = {
    "calibrated": "its credible regions contain the true parameters as often as they claim.",
    "conservative": "the posterior is wider than it needs to be: its credible regions contain the true "
    "parameters more often than they claim. That is safe to report; more simulations usually sharpen it.",
    "over-confident": "the posterior is too narrow: its credible regions miss the true parameters more often "
    "than they claim, so intervals from it understate the uncertainty. Try an ensemble of flows (ensemble=3, "
    "or --ensemble 3 on the command line: calibrated on the two benchmark tasks where one flow was "
    "over-confident on every seed), more simulations, and check the simulator's failed rows.",
    "biased": "the true parameters lie systematically on one side of the posterior for some parameters. Try "
    "more simulations, an ensemble of flows (ensemble=3, --ensemble 3) or a more flexible estimator, and more "
    "calibration datasets to confirm it (the check runs on fresh simulations from the prior, so the "
    "observations play no part in it).",
}


def verdict(result: SBCResult | CoverageResult | TARPResult) -> str:
    """The verdict word of one calibration check.

    Example:
        >>> import torch
        >>> from sbiflows.diagnostics import sbc
        >>> class Exact:  # the exact posterior of theta ~ N(0, 1), x ~ N(theta, 1)
        ...     def sample_batched(self, n, xs):
        ...         return xs / 2 + torch.randn(n, *xs.shape) / 2**0.5
        >>> prior = torch.distributions.MultivariateNormal(torch.zeros(1), torch.eye(1))
        >>> verdict(sbc(Exact(), prior, lambda t: t + torch.randn_like(t), num_datasets=300,
        ...             num_posterior_samples=100))
        'calibrated'
    """
    if isinstance(result, SBCResult):
        if result.passed:
            return "calibrated"
        shapes = [shape for name, shape in zip(result.parameter_names, result.shapes)
                  if name in result.failed_parameters]
        if any("biased" in s or s == "non-uniform" for s in shapes):  # first, as in overall(): see the module
            return "biased"
        if any("over-confident" in s for s in shapes):
            return "over-confident"
        return "conservative" if any("under-confident" in s for s in shapes) else "biased"
    if isinstance(result, CoverageResult):
        return {"calibrated": "calibrated", "over-confident": "over-confident", "under-confident": "conservative",
                "mis-calibrated": "biased"}[result.verdict]
    if isinstance(result, TARPResult):
        return {"calibrated": "calibrated", "over-confident": "over-confident",
                "under-confident": "conservative"}[result.verdict]
    raise TypeError(f"result must be an SBCResult, CoverageResult or TARPResult, got {type(result).__name__}")


def overall(words: Iterable[str]) -> str:
    """The first of :data:`VERDICTS` among several verdicts (``calibrated`` for none).

    Example:
        >>> overall(["calibrated", "conservative", "calibrated"])
        'conservative'
    """
    found = set(words)
    unknown = found - set(VERDICTS)
    if unknown:
        raise ValueError(f"verdicts must be among {VERDICTS}, got {sorted(unknown)}")
    return next((word for word in VERDICTS if word in found), "calibrated")

"""The argument parser of the ``sbiflows`` command: its subcommands, options, defaults and help.

:func:`build_parser` only describes the command line; :func:`sbiflows.cli.main` runs it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sbiflows import __version__
from sbiflows.divergence import NONFINITE_CHOICES
from sbiflows.ensemble import ENSEMBLE_CHOICES
from sbiflows.estimator import ESTIMATORS
from sbiflows.flows import MIXINGS
from sbiflows.training_options import MAX_EPOCHS
from sbiflows.transforms.transformers import DEFAULT_BINS, TRANSFORMERS
from sbiflows.truncated_space import SPACE_OPTIONS

#: ``--embedding`` names (:data:`sbiflows.embeddings.EMBEDDINGS`; listed here so that ``--help`` imports no network code).
EMBEDDING_NAMES = ("mlp", "linear", "cnn1d", "cnn2d", "set")


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr and exit code 2."""

    def error(self, message: str):  # noqa: D102 - argparse hook
        self.exit(2, f"{self.prog}: error: {message}\n")


class _DefaultsFormatter(argparse.HelpFormatter):
    """Help that shows an option's default where it has a meaningful one (not None or False)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        shown = not any(action.default is value for value in (None, False, argparse.SUPPRESS))  # 0 == False
        if shown and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``sbiflows`` command."""
    parser = _Parser(
        prog="sbiflows",
        description="Simulation-based inference with normalizing flows: simulate, train a neural posterior "
        "estimator, check its calibration and write a report.",
        epilog="Run 'sbiflows fit --help' for the main job.",
    )
    parser.add_argument("--version", action="version", version=f"sbiflows {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    fit = sub.add_parser(
        "fit",
        help="simulate, train NPE, sample the posterior, run calibration checks, write a report",
        description="Simulate from the prior, train a neural posterior estimator, sample the posterior for "
        "the observations, run calibration checks (SBC, expected coverage, TARP, posterior predictive; C2ST "
        "against the reference posterior of a benchmark task) and write everything into --out.",
        formatter_class=_DefaultsFormatter,
    )
    fit.add_argument("task", nargs="?", help="benchmark task name (see 'sbiflows tasks'); omit with --simulator")
    fit.add_argument("--simulator", metavar="MODULE:FUNCTION", help="your simulator: theta (N, D) -> x (N, x_dim) or (N, *x_shape); MODULE may also be a file, path/to/model.py")
    fit.add_argument("--prior", metavar="MODULE:OBJECT", help="your prior: a torch Distribution (or a function returning one); MODULE may be a file")
    fit.add_argument("--observation", type=Path, action="append", metavar="FILE",
                     help="observed data: .csv/.txt with one observation per row (reshaped to the simulator's "
                     "x shape), or .npy of shape x_shape (one) or (B, *x_shape); repeatable")
    fit.add_argument("--observations", default=None, metavar="LIST",
                     help="which of a task's published observations to use, e.g. '1-10' (the default) or '1,4'")
    fit.add_argument("--simulations", type=_positive_int, default=10_000, help="simulation budget")
    fit.add_argument("--rounds", type=_positive_int, default=1, metavar="R",
                     help="R > 1: truncated sequential NPE for exactly one observation (one --observation file "
                     "with one row, or a task with --observations N), the budget split over R rounds; 1: "
                     "amortized NPE")
    fit.add_argument("--estimator", choices=sorted(ESTIMATORS), default=None,
                     help="flow architecture: nsf (neural spline flow; the default, also with --rounds), maf (affine "
                     "masked autoregressive), realnvp (affine couplings)")
    fit.add_argument("--transformer", choices=sorted(TRANSFORMERS), default=None,
                     help="elementwise map of the flow's layers (default: spline for nsf, affine otherwise)")
    fit.add_argument("--bins", type=_positive_int, default=None, metavar="K",
                     help=f"spline bins (default {DEFAULT_BINS}); only with a spline transformer")
    fit.add_argument("--mixing", choices=list(MIXINGS), default="none",
                     help="how nsf and realnvp mix dimensions: none (default: alternating masks), lu (sbi's "
                     "LU-linear layer after each coupling) or masks (masks cycling through binary digits)")
    fit.add_argument("--space", choices=list(SPACE_OPTIONS), default="auto",
                     help="where the flow models the parameters: auto (default: truncated for a box prior, "
                     "unconstrained otherwise), truncated (theta itself, restricted to the support by rejection, "
                     "as sbi does) or unconstrained (mapped onto the real line: samples never leave the support, "
                     "exact densities)")
    fit.add_argument("--ensemble", type=_ensemble, default=None, metavar="K",
                     help="train K flows with different seeds and use their equal-weight mixture (trained together "
                     "in one vectorized pass; wider, less over-confident posteriors; with --rounds, in every round, and each "
                     "region is the mixture's); auto: one flow, and three when that flow is over-confident on its "
                     "own held-out validation rows; snapshots: one flow, mixed with two earlier snapshots of its "
                     "own training (no extra training); auto-snapshots: that mixture only where the flow fails "
                     "auto's check; auto-stacked (default; 1 with --rounds): as auto-snapshots, but where the check "
                     "passes, the snapshots weighted to fit the validation rows (sometimes the flow alone)")
    fit.add_argument("--balancing", type=_nonnegative_float, default=0.0, metavar="WEIGHT",
                     help="weight of balanced NPE's penalty (Delaunoy et al. 2023; the paper uses 100): more "
                     "conservative posteriors at two to three times the training cost (--ensemble 3 did better "
                     "where both were measured); 0 (default): plain NPE; not with --rounds")
    fit.add_argument("--coverage-penalty", type=_nonnegative_float, default=0.0, metavar="WEIGHT",
                     help="weight of calibrated NPE's penalty on the coverage of the posterior's highest-density "
                     "regions (Falkiewicz et al. 2023; 200 was measured): widens over-confident posteriors at "
                     "several times the training cost; 0 (default): plain NPE; not with --rounds")
    fit.add_argument("--embedding", choices=[*EMBEDDING_NAMES, "auto", "none"], default=None,
                     help="embedding net trained with the flow: mlp (any x, flattened), linear (a learned linear "
                     "summary), cnn1d (series (channels, time)), cnn2d (images), set (iid trials (trials, "
                     "features), NaN-padded), auto (linear, two values per parameter, for x with more than 5 values "
                     "per parameter; else none), none. Default: the task's own (cnn1d for sir and lotka_volterra, "
                     "set for bernoulli_glm_raw, mlp for slcp_distractors, auto for the others); for --simulator, "
                     "auto for flat x and mlp for structured x")
    fit.add_argument("--out", type=Path, default=None, help="output folder (default runs/<task>)")
    fit.add_argument("--seed", type=int, default=0, help="seed of simulation, training and sampling")
    fit.add_argument("--num-samples", type=_positive_int, default=10_000, help="posterior samples per observation")
    fit.add_argument("--calibration-datasets", type=_positive_int, default=500,
                     help="fresh simulations for SBC / coverage / TARP")
    fit.add_argument("--calibration-samples", type=_positive_int, default=1000,
                     help="posterior samples per calibration dataset")
    fit.add_argument("--c2st-samples", type=_positive_int, default=10_000,
                     help="samples per side for C2ST against the reference posterior (at most --num-samples)")
    fit.add_argument("--no-reference", action="store_true", help="skip the reference posterior and C2ST")
    fit.add_argument("--max-epochs", type=_positive_int, default=MAX_EPOCHS,
                     help="training epoch cap (early stopping usually ends training before it)")
    fit.add_argument("--learning-rate", type=_positive_float, default=None, metavar="STEP",
                     help="Adam step size of training (default: NPE's, 2e-3)")
    fit.add_argument("--patience", type=_positive_int, default=None, metavar="EPOCHS",
                     help="epochs without validation improvement before training stops (default: NPE's 20; "
                          "30 per round with --rounds)")
    fit.add_argument("--step-drops", type=_nonnegative_int, default=None, metavar="N",
                     help="plateaus that lower the step size (times 0.2, from the best weights) before training "
                          "stops (default: NPE's)")
    fit.add_argument("--drop-patience", type=_positive_int, default=None, metavar="EPOCHS",
                     help="epochs a step drop gets to improve before training stops (default: NPE's, 10; with "
                          "--rounds, the round's --patience)")
    fit.add_argument("--retrain-from-scratch", action="store_true",
                     help="with --rounds: train a new network every round on all rounds' simulations (weights, "
                     "depth and standardization anew) instead of training round 1's on; clearly better where the "
                     "posterior is far narrower than the prior, within the noise on the sbibm tasks, at 1.0-1.7x the CPU "
                     "time (docs/benchmarks.md, 'A new network every round')")
    fit.add_argument("--on-nonfinite", choices=list(NONFINITE_CHOICES), default="stop",
                     help="what a non-finite training loss does after a finite validation loss: 'stop' keeps the "
                          "best weights and stops (default); 'restore_best' restarts once from them at half the "
                          "step size, then stops at a second one")
    fit.add_argument("--device", default="cpu", metavar="DEVICE",
                     help="where the network trains: cpu (default), cuda, cuda:1, mps; the simulator gets CPU "
                          "tensors and the checks after training run on the CPU. Not a setting of the run: a "
                          "rerun on another device reuses what is done")
    fit.add_argument("--compile", action="store_true",
                     help="train with torch.compile: a step in about a third of the time, after a one-time compile "
                          "(about 30 s the first time this machine sees the network and batch size, seconds after "
                          "that); worth it for long or repeated fits. Needs a C++ compiler, else trains as usual")
    fit.add_argument("--quiet", action="store_true", help="no progress bars")
    fit.add_argument("--labels", metavar="LIST", default=None,
                     help="comma-separated parameter names for plots and the report (default: the task's, or the "
                     "prior's parameter_names, or theta_1, ...)")
    fit.add_argument("--name", default=None, help="title of the report (default: the task or simulator module)")
    fit.add_argument("--strict", action="store_true",
                     help="exit with code 1 when calibration finds the posterior over-confident or biased")
    fit.add_argument("--force", action="store_true",
                     help="replace the results of an earlier run with other settings in --out (only files sbiflows "
                     "wrote are removed; simulations are kept where the settings they depend on are unchanged, "
                     "the trained posterior where only later steps' settings changed, such as the observations of "
                     "a run without --rounds; the rounds of a --rounds run are kept only where only later steps' "
                     "settings changed, and otherwise round 1's simulations where they stay valid)")
    engine = fit.add_argument_group("simulation engine (see docs/scaling.md)")
    engine.add_argument("--workers", type=_positive_int, default=None, metavar="N",
                        help="local worker processes that run the simulator (default: in this process)")
    engine.add_argument("--scheduler", metavar="ADDRESS", default=None,
                        help="run the simulations on a Dask cluster, e.g. tcp://10.0.0.5:8786 "
                        "(needs pip install 'sbiflows[dask]')")
    engine.add_argument("--timeout", type=_positive_float, default=None, metavar="SECONDS",
                        help="kill a simulator call that runs longer; its rows count as failed")
    engine.add_argument("--batch-size", type=_positive_int, default=100, metavar="ROWS",
                        help="parameter sets per simulator call and per stored chunk; results depend on it, "
                        "not on --workers or --scheduler")
    engine.add_argument("--per-row", action="store_true",
                        help="call the simulator with one parameter set theta of shape (theta_dim,) at a time "
                        "(sbi's habit) instead of a batch (N, theta_dim)")

    sub.add_parser("tasks", help="list the benchmark tasks", description="List the benchmark tasks.")
    return parser


# --------------------------------------------------------------------------------- arguments
def _int_at_least(text: str, minimum: int, expected: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {value}")
    return value


def _positive_int(text: str) -> int:
    return _int_at_least(text, 1, "a positive integer")


def _ensemble(text: str) -> int | str:
    if text in ENSEMBLE_CHOICES:
        return text
    named = ", ".join(ENSEMBLE_CHOICES[:-1]) + " or " + ENSEMBLE_CHOICES[-1]
    return _int_at_least(text, 1, f"a positive integer, {named}")


def _nonnegative_int(text: str) -> int:
    return _int_at_least(text, 0, "an integer >= 0")


def _float_above(text: str, minimum: float, *, inclusive: bool, expected: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if not (value >= minimum if inclusive else value > minimum) or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text}")
    return value


def _positive_float(text: str) -> float:
    return _float_above(text, 0.0, inclusive=False, expected="a positive number")


def _nonnegative_float(text: str) -> float:
    return _float_above(text, 0.0, inclusive=True, expected="a number >= 0")

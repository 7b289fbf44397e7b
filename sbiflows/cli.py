"""The ``sbiflows`` command line: from a simulator to a calibrated posterior and a report.

Examples:
    sbiflows fit two_moons --simulations 10000 --out runs/two_moons
    sbiflows fit --simulator mypackage.model:simulate --prior mypackage.model:prior \\
        --observation x_obs.csv --simulations 5000 --out runs/mine
    sbiflows tasks
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from sbiflows import __version__
from sbiflows.estimator import ESTIMATORS


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr and exit code 2."""

    def error(self, message: str):  # noqa: D102 - argparse hook
        self.exit(2, f"{self.prog}: error: {message}\n")


class _DefaultsFormatter(argparse.HelpFormatter):
    """Help that shows an option's default where it has a meaningful one (not None or False)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "%(default)" not in text:
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
    fit.add_argument("--simulator", metavar="MODULE:FUNCTION", help="your simulator: theta (N, D) -> x (N, x_dim)")
    fit.add_argument("--prior", metavar="MODULE:OBJECT", help="your prior: a torch Distribution (or a function returning one)")
    fit.add_argument("--observation", type=Path, action="append", metavar="FILE",
                     help="observed data (.csv/.txt/.npy, one observation per row); repeatable")
    fit.add_argument("--observations", default="1-10", metavar="LIST",
                     help="which of a task's published observations to use, e.g. '1-10' or '1,4'")
    fit.add_argument("--simulations", type=_positive_int, default=10_000, help="simulation budget")
    fit.add_argument("--estimator", choices=sorted(ESTIMATORS), default="maf",
                     help="flow architecture: maf (affine masked autoregressive), nsf (neural spline flow), "
                     "realnvp (affine couplings)")
    fit.add_argument("--out", type=Path, default=None, help="output folder (default runs/<task>)")
    fit.add_argument("--seed", type=int, default=0, help="seed of simulation, training and sampling")
    fit.add_argument("--num-samples", type=_positive_int, default=10_000, help="posterior samples per observation")
    fit.add_argument("--calibration-datasets", type=_positive_int, default=500,
                     help="fresh simulations for SBC / coverage / TARP")
    fit.add_argument("--calibration-samples", type=_positive_int, default=1000,
                     help="posterior samples per calibration dataset")
    fit.add_argument("--c2st-samples", type=_positive_int, default=10_000,
                     help="samples per side for C2ST against the reference posterior")
    fit.add_argument("--no-reference", action="store_true", help="skip the reference posterior and C2ST")
    fit.add_argument("--max-epochs", type=_positive_int, default=500, help="training epoch cap")
    fit.add_argument("--quiet", action="store_true", help="no progress bars")
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

    sub.add_parser("tasks", help="list the benchmark tasks", description="List the benchmark tasks.")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``sbiflows``; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if args.command == "tasks":
        import simulators

        for name in simulators.names():
            task = simulators.get(name)
            print(f"{name:24s} theta_dim={task.theta_dim:<3d} x_dim={task.x_dim}")
        return 0
    try:
        setup = _setup(args)
    except ValueError as error:
        parser.exit(2, f"sbiflows fit: error: {error}\n")
    from sbiflows.pipeline import run

    client = None
    if args.scheduler:
        try:
            client = setup["executor"] = _dask_client(args.scheduler)
        except ValueError as error:
            parser.exit(2, f"sbiflows fit: error: {error}\n")
    try:
        run(**setup)
    except KeyboardInterrupt:
        print(f"\nsbiflows fit: interrupted. Everything finished is kept in {setup['out']}: run the same command "
              "again to resume", file=sys.stderr)
        return 130
    finally:
        if client is not None:
            client.close()
    return 0


def _dask_client(address: str):
    try:
        from distributed import Client
    except ImportError:
        raise ValueError("--scheduler needs Dask: pip install 'sbiflows[dask]'") from None
    try:
        return Client(address, timeout=30)
    except OSError as error:
        raise ValueError(f"--scheduler: cannot reach a Dask scheduler at {address!r} ({error})") from None


# --------------------------------------------------------------------------------- arguments
def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def _setup(args: argparse.Namespace) -> dict:
    """Resolve the task or user simulator, the observations and the options; ValueError on bad input."""
    task = None
    if args.simulator or args.prior:
        if args.task:
            raise ValueError("give either a task name or --simulator/--prior, not both")
        if not (args.simulator and args.prior):
            raise ValueError("--simulator and --prior go together")
        simulator = _import_object(args.simulator, "--simulator")
        prior = _import_object(args.prior, "--prior")
        if callable(prior) and not hasattr(prior, "sample"):
            prior = prior()
        if not isinstance(prior, torch.distributions.Distribution):
            raise ValueError(f"--prior must name a torch.distributions.Distribution, got {type(prior).__name__}")
        if not callable(simulator):
            raise ValueError(f"--simulator must name a callable, got {type(simulator).__name__}")
        name = args.simulator.split(":")[-1]
    elif args.task:
        import simulators

        if args.task not in simulators.names():
            raise ValueError(f"unknown task {args.task!r}; valid names: {', '.join(simulators.names())}")
        task = simulators.get(args.task)
        simulator, prior, name = task.simulate, task.prior, args.task
    else:
        raise ValueError("name a task (e.g. 'sbiflows fit two_moons') or give --simulator and --prior")

    observations: list[tuple[str, torch.Tensor, torch.Tensor | None]] = []
    if args.observation:
        for path in args.observation:
            for k, row in enumerate(_read_observations(path)):
                observations.append((f"{path.stem}" + (f"_{k + 1}" if k else ""), row, None))
    elif task is not None:
        for i in _parse_indices(args.observations):
            observations.append((f"obs{i}", task.observation(i), task.true_parameters(i)))
    else:
        raise ValueError("with --simulator, give the observed data with --observation FILE")
    return {
        "name": name,
        "task": task,
        "simulator": simulator,
        "prior": prior,
        "observations": observations,
        "out": args.out or Path("runs") / name,
        "simulations": args.simulations,
        "estimator": args.estimator,
        "seed": args.seed,
        "num_samples": args.num_samples,
        "calibration_datasets": args.calibration_datasets,
        "calibration_samples": args.calibration_samples,
        "c2st_samples": args.c2st_samples,
        # C2ST needs the reference posterior of a published observation, not of a user's file.
        "reference": not args.no_reference and task is not None and not args.observation,
        "max_epochs": args.max_epochs,
        "progress": not args.quiet,
        "batch_size": args.batch_size,
        "workers": args.workers,
        "timeout": args.timeout,
    }


def _import_object(spec: str, option: str):
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"{option} must look like 'package.module:name', got {spec!r}")
    sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"{option}: cannot import module {module_name!r} ({error})") from None
    finally:
        sys.path.pop(0)
    if not hasattr(module, attr):
        raise ValueError(f"{option}: module {module_name!r} has no attribute {attr!r}")
    return getattr(module, attr)


def _parse_indices(text: str) -> list[int]:
    indices: list[int] = []
    try:
        for part in text.split(","):
            lo, _, hi = part.partition("-")
            indices.extend(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise ValueError(f"--observations must look like '1-10' or '1,4', got {text!r}") from None
    bad = [i for i in indices if not 1 <= i <= 10]
    if bad or not indices:
        raise ValueError(f"--observations must lie in 1..10, got {text!r}")
    return indices


def _read_observations(path: Path) -> torch.Tensor:
    if not path.exists():
        raise ValueError(f"--observation file {str(path)!r} does not exist")
    try:
        if path.suffix == ".npy":
            data = np.load(path, allow_pickle=False)
        else:
            data = np.loadtxt(path, delimiter="," if path.suffix == ".csv" else None, ndmin=2, skiprows=_header(path))
    except ValueError as error:
        raise ValueError(f"--observation {str(path)!r} is not a numeric table: {error}") from None
    data = np.atleast_2d(np.asarray(data, dtype=np.float32))
    return torch.from_numpy(data)


def _header(path: Path) -> int:
    first = path.read_text().splitlines()[:1]
    if not first:
        return 0
    try:
        [float(v) for v in first[0].replace(",", " ").split()]
        return 0
    except ValueError:
        return 1


if __name__ == "__main__":
    raise SystemExit(main())

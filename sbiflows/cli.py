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
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from sbiflows import __version__
from sbiflows.estimator import ESTIMATORS, resolve_transformer
from sbiflows.transforms.transformers import DEFAULT_BINS, TRANSFORMERS

#: ``--embedding`` names (:data:`sbiflows.embeddings.EMBEDDINGS`; listed here so that ``--help`` imports no network code).
EMBEDDING_NAMES = ("mlp", "cnn1d", "cnn2d", "set")

if TYPE_CHECKING:
    from sbiflows.pipeline import Job, Observation
from sbiflows.threads import torch_threads
from sbiflows.training import MAX_EPOCHS


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
    fit.add_argument("--simulator", metavar="MODULE:FUNCTION", help="your simulator: theta (N, D) -> x (N, x_dim) or (N, *x_shape); MODULE may also be a file, path/to/model.py")
    fit.add_argument("--prior", metavar="MODULE:OBJECT", help="your prior: a torch Distribution (or a function returning one); MODULE may be a file")
    fit.add_argument("--observation", type=Path, action="append", metavar="FILE",
                     help="observed data: .csv/.txt with one observation per row (reshaped to the simulator's "
                     "x shape), or .npy of shape x_shape (one) or (B, *x_shape); repeatable")
    fit.add_argument("--observations", default="1-10", metavar="LIST",
                     help="which of a task's published observations to use, e.g. '1-10' or '1,4'")
    fit.add_argument("--simulations", type=_positive_int, default=10_000, help="simulation budget")
    fit.add_argument("--rounds", type=_positive_int, default=1, metavar="R",
                     help="R > 1: truncated sequential NPE for exactly one observation (one --observation file "
                     "with one row, or a task with --observations N), the budget split over R rounds; 1: "
                     "amortized NPE")
    fit.add_argument("--estimator", choices=sorted(ESTIMATORS), default="maf",
                     help="flow architecture: maf (affine masked autoregressive), nsf (neural spline flow), "
                     "realnvp (affine couplings)")
    fit.add_argument("--transformer", choices=sorted(TRANSFORMERS), default=None,
                     help="elementwise map of the flow's layers (default: spline for nsf, affine otherwise)")
    fit.add_argument("--bins", type=_positive_int, default=None, metavar="K",
                     help=f"spline bins (default {DEFAULT_BINS}); only with a spline transformer")
    fit.add_argument("--ensemble", type=_positive_int, default=1, metavar="K",
                     help="train K flows with different seeds and use their equal-weight mixture (K times the "
                     "training cost; wider, less over-confident posteriors)")
    fit.add_argument("--embedding", choices=[*EMBEDDING_NAMES, "none"], default=None,
                     help="embedding net trained with the flow: mlp (any x, flattened), cnn1d (series "
                     "(channels, time)), cnn2d (images), set (iid trials (trials, features), NaN-padded), none. "
                     "Default: the task's own (cnn1d for sir and lotka_volterra, set for bernoulli_glm_raw, mlp "
                     "for slcp_distractors, none for the others); for --simulator, none for flat x and mlp for "
                     "structured x")
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
    fit.add_argument("--max-epochs", type=_positive_int, default=MAX_EPOCHS,
                     help="training epoch cap (early stopping usually ends training before it)")
    fit.add_argument("--quiet", action="store_true", help="no progress bars")
    fit.add_argument("--labels", metavar="LIST", default=None,
                     help="comma-separated parameter names for plots and the report (default: the task's, or the "
                     "prior's parameter_names, or theta_1, ...)")
    fit.add_argument("--name", default=None, help="title of the report (default: the task or simulator module)")
    fit.add_argument("--strict", action="store_true",
                     help="exit with code 1 when calibration finds the posterior over-confident or biased")
    fit.add_argument("--force", action="store_true",
                     help="replace the results of an earlier run with other settings in --out (only files sbiflows "
                     "wrote are removed; simulations are kept where the settings they depend on are unchanged)")
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
            print(f"{name:24s} theta_dim={task.theta_dim:<3d} x_dim={task.x_dim:<4d} x_shape={task.x_shape} "
                  f"embedding={task.default_embedding}")
        return 0
    from sbiflows import outputs
    from sbiflows.diagnostics.verdict import FAILING
    from sbiflows.pipeline import run

    try:
        job = _setup(args)
        job.command = "sbiflows " + shlex.join(sys.argv[1:] if argv is None else list(argv))
        job.parameter_names()  # checks --labels against the prior's dimension
        settings = job.settings()
        removed = outputs.prepare(job.out, settings, force=args.force)
    except ValueError as error:
        parser.exit(2, f"sbiflows fit: error: {error}\n")
    if removed:
        print(f"sbiflows fit: --force: removed {len(removed)} outputs of the earlier run in {job.out}: "
              f"{', '.join(removed)}", file=sys.stderr)

    client = None
    if args.scheduler:
        try:
            client = job.executor = _dask_client(args.scheduler)
        except ValueError as error:
            parser.exit(2, f"sbiflows fit: error: {error}\n")
    try:
        with torch_threads():  # the rule of sbiflows.threads, for the user's in-process simulator too
            report = run(job)
        outputs.record(job.out, settings)
    except KeyboardInterrupt:
        print(f"\nsbiflows fit: interrupted. Everything finished is kept in {job.out}: run the same command "
              "again to resume", file=sys.stderr)
        return 130
    finally:
        if client is not None:
            client.close()
    if args.strict and report["verdict"] in FAILING:
        print(f"sbiflows fit: --strict: calibration found the posterior {report['verdict']}: {report['advice']}",
              file=sys.stderr)
        return 1
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


def _setup(args: argparse.Namespace) -> Job:
    from sbiflows.pipeline import Job, Observation  # noqa: F811 - the module imports matplotlib: only for fit

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
        name = Path(args.simulator.rpartition(":")[0]).stem.split(".")[-1]  # the module, not "simulate"
    elif args.task:
        import simulators

        if args.task not in simulators.names():
            raise ValueError(f"unknown task {args.task!r}; valid names: {', '.join(simulators.names())}")
        task = simulators.get(args.task)
        simulator, prior, name = task.simulate, task.prior, args.task
    else:
        raise ValueError("name a task (e.g. 'sbiflows fit two_moons') or give --simulator and --prior")
    embedding, structured = args.embedding, False
    if task is not None:
        if embedding is None:  # sequential runs take flat x: the task's structured networks become the MLP
            structured_default = task.default_embedding in ("cnn1d", "cnn2d", "set")
            embedding = "mlp" if args.rounds > 1 and structured_default else task.default_embedding
        # the flat x for none/mlp; the task's structure (same information) for the networks made for it
        structured = embedding in ("cnn1d", "cnn2d", "set") and task.x_shape != (task.x_dim,)
        if structured:
            simulator = task.simulate_structured
        x_shape = task.x_shape if structured else (task.x_dim,)
    else:
        x_shape = _probe_x_shape(simulator, prior, args)
        if embedding is None:
            embedding = "none" if x_shape is None or len(x_shape) == 1 else "mlp"
    if embedding != "none" and x_shape is not None:
        from sbiflows.embeddings import from_name

        from_name(embedding, x_shape)  # refuses a shape the network does not take, before simulating

    resolve_transformer(args.estimator, args.transformer, args.bins)  # a bad combination fails before simulating
    observations: list[Observation] = []
    if args.observation:
        taken: set[str] = set()
        for path in args.observation:
            stem = path.stem
            if stem in taken:  # two files with the same name: the second gets its folder's name, or a number
                stem = f"{path.parent.name}_{path.stem}" if path.parent.name else stem
                stem = next(f"{stem}-{k}" for k in range(2, 10_000) if f"{stem}-{k}" not in taken) \
                    if stem in taken else stem
            rows = _split_observations(_read_observations(path), x_shape, path, padded_trials=embedding == "set")
            for k, row in enumerate(rows):
                row_name = stem + (f"_{k + 1}" if k else "")
                taken.add(row_name)
                observations.append(Observation(row_name, row))
            taken.add(stem)
    elif task is not None:
        for i in _parse_indices(args.observations):
            x = task.structured(task.observation(i)) if structured else task.observation(i)
            observations.append(Observation(f"obs{i}", x, task.true_parameters(i), reference=i))
    else:
        raise ValueError("with --simulator, give the observed data with --observation FILE")
    if args.rounds > 1 and len(observations) != 1:
        raise ValueError(f"--rounds {args.rounds} (sequential NPE) needs exactly one observation, got "
                         f"{len(observations)} ({', '.join(o.name for o in observations[:5])}"
                         f"{', ...' if len(observations) > 5 else ''}); give one --observation file with one row, "
                         "or a task with --observations N")
    if args.rounds > 1 and args.ensemble > 1:
        raise ValueError(f"--rounds {args.rounds} (sequential NPE) trains one flow; it does not take --ensemble "
                         f"{args.ensemble}")
    if args.rounds > 1 and len(x_shape or ()) > 1:
        raise ValueError(f"--rounds {args.rounds} (sequential NPE) takes flat observations only, got x of shape "
                         f"{x_shape}; use --embedding none or mlp")
    if args.rounds > args.simulations:
        raise ValueError(f"--rounds {args.rounds} needs at least one simulation per round, got --simulations "
                         f"{args.simulations}")
    _check_observations(observations, x_shape, padded_trials=embedding == "set")
    labels = None if args.labels is None else [label.strip() for label in args.labels.split(",")]
    return Job(
        name=args.name or name,
        labels=labels,
        task=task,
        simulator=simulator,
        prior=prior,
        observations=observations,
        out=args.out or Path("runs") / name,
        simulations=args.simulations,
        estimator=args.estimator,
        transformer=args.transformer,
        bins=args.bins,
        ensemble=args.ensemble,
        embedding=embedding,
        seed=args.seed,
        num_samples=args.num_samples,
        calibration_datasets=args.calibration_datasets,
        calibration_samples=args.calibration_samples,
        c2st_samples=args.c2st_samples,
        reference=not args.no_reference,  # only observations with a published reference posterior get C2ST
        max_epochs=args.max_epochs,
        progress=not args.quiet,
        batch_size=args.batch_size,
        workers=args.workers,
        timeout=args.timeout,
        rounds=args.rounds,
    )


def _import_object(spec: str, option: str):
    """``package.module:name`` (importable from the working directory) or ``path/to/file.py:name``."""
    module_name, _, attr = spec.rpartition(":")
    if not module_name or not attr:
        raise ValueError(f"{option} must look like 'package.module:name' or 'path/to/file.py:name', got {spec!r}")
    folder = Path.cwd()
    if module_name.endswith(".py") or "/" in module_name or "\\" in module_name:
        path = Path(module_name)
        if path.suffix != ".py" or not path.is_file():
            raise ValueError(f"{option}: {module_name!r} looks like a file path but is not an existing .py file")
        folder, module_name = path.resolve().parent, path.stem
        if str(folder) not in sys.path:
            sys.path.append(str(folder))  # kept: worker processes import the simulator's module by name
    sys.path.insert(0, str(folder))
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


def _check_observations(
    observations: list[Observation], x_shape: tuple[int, ...] | None, *, padded_trials: bool = False
) -> None:
    """Every observation finite (up to NaN-padded trials for a set embedding) and of the simulator's x shape
    (None: not known)."""
    from sbiflows.xshape import valid_rows

    for observation in observations:
        name, x = observation.name, observation.x
        if not valid_rows(x[None], padded_trials=padded_trials and x.ndim == 2).all():
            raise ValueError(f"observation {name!r} contains NaN or inf: {x.reshape(-1).tolist()}")
        if x_shape is not None and len(x_shape) == 1 and x.numel() != x_shape[0]:
            raise ValueError(f"observation {name!r} has {x.numel()} values, but the simulator's x has {x_shape[0]}")
        if x_shape is not None and tuple(x.shape) != tuple(x_shape) and len(x_shape) > 1:
            raise ValueError(
                f"observation {name!r} has shape {tuple(x.shape)} ({x.numel()} values), but the simulator's x has "
                f"shape {tuple(x_shape)}"
            )


def _probe_x_shape(simulator, prior, args: argparse.Namespace) -> tuple[int, ...] | None:
    """The shape of one of the simulator's x, from one simulation (None if that simulation fails)."""
    from sbiflows.seeding import derive_seed
    from sbiflows.simulate import simulate

    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(derive_seed(args.seed, "probe"))
        theta = prior.sample((1,)).reshape(1, -1)
    finally:
        torch.random.set_rng_state(generator_state)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a failed probe only skips the check; the run reports failures
        probe = simulate(simulator, theta, seed=derive_seed(args.seed, "probe"), timeout=args.timeout, progress=False)
    x = probe.x
    if x is None or x.numel() == 0 or not probe.valid.all():
        print("sbiflows fit: note: one probe simulation failed, so the observation's shape is checked after "
              "simulating", file=sys.stderr)
        return None
    return tuple(x.shape[1:]) if x.ndim > 1 else (1,)


def _split_observations(
    data: torch.Tensor, x_shape: tuple[int, ...] | None, path: Path, *, padded_trials: bool = False
) -> list[torch.Tensor]:
    """The observations in a file's array: ``x_shape`` is one, ``(B, *x_shape)`` is B; a table's rows are
    reshaped to ``x_shape`` when they hold its number of values (unknown shape: one observation per row).
    For a set embedding (``padded_trials``), sets of fewer trials are NaN-padded to ``x_shape``."""
    if padded_trials and x_shape is not None and len(x_shape) == 2 and data.ndim in (2, 3) \
            and data.shape[-1] == x_shape[1]:
        from sbiflows.xshape import check_observations

        return list(check_observations(data, x_shape, f"--observation {str(path)!r}", padded_trials=True))
    if x_shape is None or len(x_shape) == 1:
        return list(data.reshape(1, -1) if data.ndim <= 1 else data.reshape(len(data), -1))
    x_shape = tuple(x_shape)
    if tuple(data.shape) == x_shape:
        return [data]
    if tuple(data.shape[1:]) == x_shape:
        return list(data)
    if data.ndim == 2 and data.shape[1] == int(np.prod(x_shape)):
        return list(data.reshape(len(data), *x_shape))
    raise ValueError(
        f"--observation {str(path)!r} holds an array of shape {tuple(data.shape)}; the simulator's x has shape "
        f"{x_shape}: give {x_shape} (one observation), (B, {', '.join(map(str, x_shape))}) or a table of "
        f"{int(np.prod(x_shape))} values per row"
    )


_FORMATS = (".csv", ".txt", ".npy")


def _read_observations(path: Path) -> torch.Tensor:
    if path.suffix.lower() not in _FORMATS:
        raise ValueError(f"--observation {str(path)!r}: unsupported file type {path.suffix or '(none)'!r}; "
                         f"use one of {', '.join(_FORMATS)} (one observation per row)")
    if not path.exists():
        raise ValueError(f"--observation file {str(path)!r} does not exist")
    try:
        if path.suffix == ".npy":
            data = np.load(path, allow_pickle=False)
        else:
            data = np.loadtxt(path, delimiter="," if path.suffix == ".csv" else None, ndmin=2, skiprows=_header(path))
    except ValueError as error:
        raise ValueError(f"--observation {str(path)!r} is not a numeric table: {error}") from None
    data = np.asarray(data, dtype=np.float32)  # a .npy keeps its shape (structured x); a table is 2-D
    return torch.from_numpy(data if path.suffix == ".npy" else np.atleast_2d(data))


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

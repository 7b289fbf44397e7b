"""The ``sbiflows`` command line: from a simulator to a calibrated posterior and a report.

:func:`main` parses the arguments (:mod:`sbiflows.cli_parser`), resolves the simulator, prior and
observations (:mod:`sbiflows.cli_observations`) into a :class:`~sbiflows.pipeline_job.Job` and runs it
(:func:`sbiflows.pipeline.run`).

Examples:
    sbiflows fit two_moons --simulations 10000 --out runs/two_moons
    sbiflows fit --simulator mypackage.model:simulate --prior mypackage.model:prior \\
        --observation x_obs.csv --simulations 5000 --out runs/mine
    sbiflows tasks
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import itertools
import re
import shlex
import signal
import sys
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from sbiflows.cli_observations import (
    _check_finite_observations,
    _check_observations,
    _parse_indices,
    _probe_x_shape,
    _read_observations,
    _split_observations,
    _stored_x_shape,
)
from sbiflows.cli_parser import EMBEDDING_NAMES, build_parser  # noqa: F401 - public here
from sbiflows.estimator import DEFAULT_ESTIMATOR, resolve_transformer
from sbiflows.threads import torch_threads

if TYPE_CHECKING:
    from sbiflows.pipeline_job import Job


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``sbiflows``; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if args.command == "tasks":
        import simulators

        from sbiflows.embeddings import auto_features

        for name in simulators.names():
            task = simulators.get(name)
            embedding = task.default_embedding  # what `fit` uses by default: the task's network, else auto
            if embedding == "none":
                summary = auto_features((task.x_dim,), task.theta_dim)
                embedding = f"auto ({'none' if summary is None else f'linear, {summary} features'})"
            print(f"{name:24s} theta_dim={task.theta_dim:<3d} x_dim={task.x_dim:<4d} x_shape={task.x_shape} "
                  f"embedding={embedding}")
        return 0
    with contextlib.ExitStack() as held:  # the output folder's lock, released on every way out
        return _fit(args, parser, held, argv)


def _fit(args: argparse.Namespace, parser: argparse.ArgumentParser, held: contextlib.ExitStack,
         argv: Sequence[str] | None) -> int:
    """``sbiflows fit``; ``held`` closes the output folder's lock when the command ends."""
    from sbiflows import outputs
    from sbiflows.diagnostics.verdict import FAILING
    from sbiflows.pipeline import run
    from sbiflows.pipeline_checks import ObservationShapeError, TooFewSimulationsError
    from sbiflows.simulate import SimulationError, StoreMismatchError

    try:
        job = _setup(args)
        job.command = "sbiflows " + shlex.join(sys.argv[1:] if argv is None else list(argv))
        job.parameter_names()  # checks --labels against the prior's dimension
        settings = job.settings()
        held.enter_context(_closing(outputs.hold(job.out)))  # a second run into this folder is refused meanwhile
        client = job.executor = _dask_client(args.scheduler) if args.scheduler else None  # before --force removes
        removed = outputs.prepare(job.out, settings, force=args.force)
    except ValueError as error:
        parser.exit(2, f"sbiflows fit: error: {error}\n")
    except KeyboardInterrupt:  # e.g. during the probe simulations of a slow simulator: nothing to resume yet
        print("\nsbiflows fit: interrupted while checking the simulator, prior and observations, before the run "
              "started: nothing was simulated into the output folder", file=sys.stderr)
        return 130
    if removed:
        print(f"sbiflows fit: --force: removed {len(removed)} outputs of the earlier run in {job.out}: "
              f"{', '.join(removed)}", file=sys.stderr)

    stop = _StopOnTerm()
    try:
        with torch_threads(), _one_line_warnings(), stop:  # torch_threads: also for the user's in-process simulator
            report = run(job, force=args.force)  # the folder is prepared above: run's guard finds the same settings
    # e.g. rounds made under other TSNPE defaults; an observation whose shape the simulations showed to be wrong
    except (outputs.OutputFolderError, StoreMismatchError, ObservationShapeError) as error:
        parser.exit(2, f"sbiflows fit: error: {error}\n")
    except SimulationError as error:  # the simulator cannot run: one line, what finished is kept
        print(f"sbiflows fit: error: {_simulation_error(error, job.out)}", file=sys.stderr)
        return SIMULATOR_FAILED
    except TooFewSimulationsError as error:  # it ran, but what it returned cannot train anything
        store = job.out / "simulations.zarr"
        print(f"sbiflows fit: error: {error}; the simulations are kept in {store}: run again with more "
              f"--simulations, or fix the simulator and delete {store} (a rerun reuses its rows, made by the "
              "simulator as it was)", file=sys.stderr)
        return SIMULATOR_FAILED
    except KeyboardInterrupt:
        print(f"\nsbiflows fit: {'terminated' if stop.received else 'interrupted'}. Everything finished is kept in "
              f"{job.out}: run the same command again to resume", file=sys.stderr)
        return 143 if stop.received else 130
    finally:
        if client is not None:
            client.close()
    if args.strict and report["verdict"] in FAILING:
        print(f"sbiflows fit: --strict: calibration found the posterior {report['verdict']}: {report['advice']}",
              file=sys.stderr)
        return 1
    return 0



def _closing(handle):
    """``contextlib.closing`` that also takes None (no lock where the folder is a file or there is no flock)."""
    return contextlib.nullcontext() if handle is None else contextlib.closing(handle)


class _StopOnTerm:
    """While entered (in the main thread), SIGTERM (a plain ``kill``, a scheduler's time limit) stops the run as
    Ctrl-C does: what finished is kept and the exit says to rerun; :attr:`received` tells them apart."""

    def __init__(self):
        self.received, self._previous = False, None

    def _handle(self, signum, frame) -> None:
        self.received = True
        raise KeyboardInterrupt

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


#: The exit code of a run stopped because the simulator cannot run (1 is --strict's failing verdict, 2 bad input).
SIMULATOR_FAILED = 3
_BATCH_HINT = re.compile(r"; note that sbiflows calls the simulator with a batch.*?needs vectorized=False")


def _simulation_error(error: Exception, out: Path) -> str:
    """The engine's message in the command line's words: after a step that simulated (a trained posterior, or
    finished rounds) the batch call worked, so no --per-row hint, and a rerun resumes; before, --per-row, and
    --force to rerun with it where nothing was kept."""
    text = str(error).replace(" are in .partial and in the store ", " are kept in the store ")
    text = text.replace(" are in .partial)", " are lost: no store)")
    if (out / "posterior.pt").exists() or any((out / "rounds").glob("round_*/posterior.pt")):
        return _BATCH_HINT.sub("", text) + ". The earlier steps' results are kept: run the same command to resume"
    partial = getattr(error, "partial", None)
    nothing = partial is not None and len(partial.theta) == 0 and not partial.failures
    return _cli_words(text) + (". None of its simulations finished: to rerun with other options, add --force"
                               if nothing else "")


def _cli_words(text: str) -> str:
    """An engine message with the command line's option for the API's ``vectorized=False``."""
    return text.replace("vectorized=False", "--per-row")


@contextlib.contextmanager
def _one_line_warnings():
    """Warnings as one line (``sbiflows fit: warning: ...``), not Python's file, line number and source line,
    in the command line's words (``--per-row`` for the API's ``vectorized=False``)."""
    original = warnings.formatwarning
    warnings.formatwarning = lambda message, category, *args, **kwargs: (
        f"sbiflows fit: warning: {_cli_words(str(message))}\n")
    try:
        yield
    finally:
        warnings.formatwarning = original


def _dask_client(address: str):
    try:
        from distributed import Client
    except ImportError:
        raise ValueError("--scheduler needs Dask: pip install 'sbiflows[dask]'") from None
    try:
        return Client(address, timeout=30)
    except OSError as error:
        raise ValueError(f"--scheduler: cannot reach a Dask scheduler at {address!r} ({error})") from None


def _unused(name: str, taken: set[str]) -> str:
    """``name``, or the first of ``name-2``, ``name-3``, ... not in ``taken``."""
    return name if name not in taken else next(f"{name}-{k}" for k in itertools.count(2) if f"{name}-{k}" not in taken)


def _setup(args: argparse.Namespace) -> Job:
    """Resolve the task or user simulator, the observations and the options; ValueError on bad input."""
    from sbiflows.pipeline_job import Job, Observation  # noqa: F811 - imported here: only for fit

    task = None
    if args.simulator or args.prior:
        if args.task:
            raise ValueError("give either a task name or --simulator/--prior, not both")
        if not (args.simulator and args.prior):
            raise ValueError("--simulator and --prior go together")
        simulator = _import_object(args.simulator, "--simulator")
        prior = _import_object(args.prior, "--prior")
        if callable(prior) and not hasattr(prior, "sample"):
            try:
                prior = prior()
            except Exception as error:  # noqa: BLE001 - the user's function: say which and why, no traceback
                raise ValueError(f"--prior {args.prior}: calling it failed ({type(error).__name__}: {error}); name a "
                                 "torch.distributions.Distribution or a function of no arguments that returns one"
                                 ) from None
        if not isinstance(prior, torch.distributions.Distribution):
            raise ValueError(f"--prior must name a torch.distributions.Distribution, got {type(prior).__name__}")
        if not callable(simulator):
            raise ValueError(f"--simulator must name a callable, got {type(simulator).__name__}")
        module = args.simulator.rpartition(":")[0]  # the module, not "simulate"; pkg.model -> model
        name = Path(module).stem if module.endswith(".py") or "/" in module else module.rpartition(".")[2]
    elif args.task:
        import simulators

        if args.task not in simulators.names():
            raise ValueError(f"unknown task {args.task!r}; valid names: {', '.join(simulators.names())}")
        task = simulators.get(args.task)
        simulator, prior, name = task.simulate, task.prior, args.task
    else:
        raise ValueError("name a task (e.g. 'sbiflows fit two_moons') or give --simulator and --prior")
    embedding, structured, stored_shape = args.embedding, False, None
    out = args.out or Path("runs") / name
    if task is not None:
        if embedding is None:  # sequential runs take flat x: the task's structured networks become the MLP
            structured_default = task.default_embedding in ("cnn1d", "cnn2d", "set")
            embedding = "mlp" if args.rounds > 1 and structured_default else task.default_embedding
            embedding = "auto" if embedding == "none" else embedding  # no network made for it: NPE's default
        # the flat x for none/mlp; the task's structure (same information) for the networks made for it
        structured = embedding in ("cnn1d", "cnn2d", "set") and task.x_shape != (task.x_dim,)
        if structured:
            simulator = task.simulate_structured
        x_shape = task.x_shape if structured else (task.x_dim,)
    else:
        stored_shape = _stored_x_shape(simulator, args, out=out)
        x_shape = stored_shape if stored_shape is not None else _probe_x_shape(simulator, prior, args)
        if embedding is None:
            embedding = "auto" if x_shape is None or len(x_shape) == 1 else "mlp"
    if embedding == "auto" and x_shape is not None:
        # NPE's rule, applied here so that the run's settings (and a resumed run's check) name the network
        from sbiflows.embeddings import auto_features
        from sbiflows.priors import check_prior

        embedding = "none" if auto_features(x_shape, check_prior(prior)[1]) is None else "auto"
        if embedding == "none" and task is None and stored_shape is not None and args.embedding in (None, "auto"):
            from sbiflows.outputs import recorded_settings

            if recorded_settings(out).get("embedding") == "auto":  # the first run's probes all failed: it left
                embedding = "auto"  # "auto" to NPE, which made the same choice (no network); rerun it as it ran
    if embedding not in ("none", "auto") and x_shape is not None:
        from sbiflows.embeddings import from_name

        from_name(embedding, x_shape)  # refuses a shape the network does not take, before simulating

    estimator = args.estimator or DEFAULT_ESTIMATOR
    resolve_transformer(estimator, args.transformer, args.bins)  # a bad combination fails before simulating
    observations: list[Observation] = []
    if args.observation and args.observations is not None:
        raise ValueError("--observations picks a task's published observations; with --observation FILE give only "
                         "the files")
    if args.observation:
        taken: set[str] = set()
        for path in args.observation:
            stem = path.stem
            if stem in taken:  # two files with the same name: the second gets its folder's name, or a number
                stem = _unused(f"{path.parent.name}_{path.stem}" if path.parent.name else stem, taken)
            rows = _split_observations(_read_observations(path), x_shape, path, padded_trials=embedding == "set")
            for k, row in enumerate(rows):  # a row named like another file (a_2.csv beside a.csv's 2nd) gets a number
                row_name = _unused(stem + (f"_{k + 1}" if k else ""), taken)
                taken.add(row_name)
                observations.append(Observation(row_name, row))
            taken.add(stem)
    elif task is not None:
        for i in _parse_indices("1-10" if args.observations is None else args.observations):
            x = task.structured(task.observation(i)) if structured else task.observation(i)
            observations.append(Observation(f"obs{i}", x, task.true_parameters(i), reference=i))
    else:
        raise ValueError("with --simulator, give the observed data with --observation FILE")
    if args.rounds > 1 and len(observations) != 1:
        raise ValueError(f"--rounds {args.rounds} (sequential NPE) needs exactly one observation, got "
                         f"{len(observations)} ({', '.join(o.name for o in observations[:5])}"
                         f"{', ...' if len(observations) > 5 else ''}); give one --observation file with one row, "
                         "or a task with --observations N")
    if args.rounds > 1 and len(x_shape or ()) > 1:
        fix = "use --embedding none or mlp" if task is not None else "make the simulator return flat x"
        raise ValueError(f"--rounds {args.rounds} (sequential NPE) takes flat observations only, got x of shape "
                         f"{x_shape}; {fix}")
    if args.rounds > 1 and args.simulations <= args.rounds:  # round 1 trains: a training and a validation row
        raise ValueError(f"--rounds {args.rounds} needs at least 2 simulations in the first round and 1 in each other "
                         f"(--simulations {args.rounds + 1} or more), got --simulations {args.simulations}")
    _check_finite_observations(observations, padded_trials=embedding == "set")  # not a matter of the stored shape
    try:
        _check_observations(observations, x_shape, padded_trials=embedding == "set")
    except ValueError as error:
        if task is None and stored_shape is not None:
            raise ValueError(f"{error} (the shape of the x stored in {out}; if the "
                             "simulator changed, use another --out)") from None
        raise
    labels = None if args.labels is None else [label.strip() for label in args.labels.split(",")]
    return Job(
        name=args.name or name,
        labels=labels,
        task=task,
        simulator=simulator,
        prior=prior,
        observations=observations,
        out=out,
        simulations=args.simulations,
        estimator=estimator,
        transformer=args.transformer,
        bins=args.bins,
        mixing=args.mixing,
        ensemble=args.ensemble,
        balancing=args.balancing,
        coverage_penalty=args.coverage_penalty,
        space=args.space,
        embedding=embedding,
        seed=args.seed,
        num_samples=args.num_samples,
        calibration_datasets=args.calibration_datasets,
        calibration_samples=args.calibration_samples,
        c2st_samples=args.c2st_samples,
        reference=not args.no_reference,  # only observations with a published reference posterior get C2ST
        max_epochs=args.max_epochs,
        learning_rate=args.learning_rate,
        patience=args.patience,
        step_drops=args.step_drops,
        drop_patience=args.drop_patience,
        compile=args.compile,
        on_nonfinite=args.on_nonfinite,
        device=args.device,
        retrain_from_scratch=args.retrain_from_scratch,
        progress=not args.quiet,
        batch_size=args.batch_size,
        workers=args.workers,
        timeout=args.timeout,
        vectorized=not args.per_row,
        rounds=args.rounds,
    )


def _import_object(spec: str, option: str):
    """``package.module:name`` (importable from the working directory) or ``path/to/file.py:name``."""
    module_name, _, attr = spec.rpartition(":")
    if not module_name or not attr:
        raise ValueError(f"{option} must look like 'package.module:name' or 'path/to/file.py:name', got {spec!r}")
    folder, path = Path.cwd(), None
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
    except Exception as error:  # noqa: BLE001 - the module's own code failed (NameError, SyntaxError, ...)
        raise ValueError(f"{option}: importing module {module_name!r} failed ({type(error).__name__}: "
                         f"{error})") from None
    finally:
        sys.path.pop(0)
    loaded = getattr(module, "__file__", None)
    if path is not None and (loaded is None or Path(loaded).resolve() != path.resolve()):
        raise ValueError(f"{option}: {str(path)!r} is a module named {module_name!r}, but a module of that name was "
                         f"already imported from {loaded or 'elsewhere'}; rename one of the files (worker processes "
                         "import a simulator's module by its name)")
    if not hasattr(module, attr):
        raise ValueError(f"{option}: module {module_name!r} has no attribute {attr!r}")
    return getattr(module, attr)


if __name__ == "__main__":
    raise SystemExit(main())

"""Where jobs run: in-process, local worker processes, any ``concurrent.futures`` executor, or Dask.

Every backend has the same small interface: ``slots()`` (how many jobs to keep in flight),
``submit(job)`` returning a future (``concurrent.futures`` and ``dask.distributed`` futures both have
``add_done_callback`` and ``result``), ``outcome(future)`` (the job's :class:`Outcome`, with the
executor's own failures, such as a Dask worker that died, turned into failed rows) and ``close()``.
The engine's one loop over futures serves all of them.

Which runs the simulator in a :class:`~sbiflows.engine.sandbox.Sandbox` (a child process that can be
killed): local workers and Dask always (a crash or a timeout costs the child, never the worker, so
one poisonous theta cannot exhaust Dask's ``allowed-failures``); a ``concurrent.futures`` executor
when a timeout is set.
"""

from __future__ import annotations

import atexit
import functools
import os
import pickle
import sys
import sysconfig
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from sbiflows.engine.jobs import WORKER_DIED, Job, Outcome, run_job
from sbiflows.engine.sandbox import Sandbox

__all__ = ["close_idle_workers", "is_dask_client", "make_backend"]


def is_dask_client(executor: object) -> bool:
    """Whether ``executor`` is a ``dask.distributed.Client`` (checked without importing Dask)."""
    return type(executor).__module__.split(".")[0] == "distributed" and hasattr(executor, "scheduler_info")


def make_backend(simulator: Callable, *, workers: int | None, executor: object, timeout: float | None,
                 vectorized: bool, seeded: bool):
    """The backend for these options (arguments are checked by the caller).

    In-process (``workers`` None or 1, no executor) with a ``timeout`` runs one worker process, since
    only a process can be killed.
    """
    options = {"vectorized": vectorized, "seeded": seeded}
    if executor is None and (workers or 1) == 1 and timeout is None:
        return InProcess(simulator, **options)
    if isinstance(executor, ThreadPoolExecutor) and timeout is None:  # threads share the simulator object
        return ExecutorBackend(executor, simulator, None, timeout=None, **options)
    payload = serialize(simulator, executor)
    if is_dask_client(executor):
        return DaskBackend(executor, payload, timeout=timeout, **options)
    if executor is None:
        return LocalWorkers(payload, workers=workers or 1, timeout=timeout, **options)
    return ExecutorBackend(executor, simulator, payload, timeout=timeout, **options)


def serialize(simulator: Callable, executor: object) -> bytes:
    """``cloudpickle.dumps(simulator)``, or a clear error naming the fix."""
    import cloudpickle

    try:
        payload = cloudpickle.dumps(simulator)
    except Exception as error:  # noqa: BLE001 - any pickling failure gets the same advice
        raise TypeError(
            f"the simulator cannot be sent to worker processes ({type(error).__name__}: {error}); make it a "
            "module-level function or an object without open files, locks or connections, or run in-process "
            "(workers=None, no executor, no timeout)"
        ) from error
    if isinstance(executor, Executor) and not isinstance(executor, ThreadPoolExecutor):
        try:  # concurrent.futures process pools pickle arguments with the standard pickle
            pickle.dumps(simulator)
        except Exception as error:  # noqa: BLE001
            raise TypeError(
                f"{type(executor).__name__} cannot pickle the simulator ({type(error).__name__}: {error}); "
                "define it at module level, or use workers=N, which sends it with cloudpickle"
            ) from error
    return payload


class InProcess:
    """Runs each job in the calling process, one at a time, when it is submitted."""

    def __init__(self, simulator: Callable, *, vectorized: bool, seeded: bool):
        self._simulator, self._options = simulator, {"vectorized": vectorized, "seeded": seeded}

    def slots(self) -> int:
        return 1

    def submit(self, job: Job) -> Future:
        future: Future = Future()
        future.set_result(run_job(self._simulator, job, **self._options))
        return future

    def outcome(self, future: Future) -> Outcome:
        return future.result()

    def close(self, *, kill: bool = False) -> None:
        pass


#: Worker processes of finished runs, kept for the next run of this process (starting one costs the
#: 1.4 s of importing torch); at most one per core, closed when the interpreter exits. Each is kept with the
#: :func:`code_stamp` of when it started.
_IDLE: list[tuple[Sandbox, dict[str, int]]] = []
_IDLE_LOCK = threading.Lock()


def close_idle_workers() -> None:
    """Close the idle worker processes that finished runs left for the next one (see :class:`_Sandboxes`)."""
    with _IDLE_LOCK:
        boxes, _IDLE[:] = [box for box, _ in _IDLE], []
    _close(boxes)


def _close(boxes: list[Sandbox]) -> None:
    for box in boxes:  # all children exit at once, not one after the other
        box.release()
    for box in boxes:
        box.reap()


@functools.cache
def _installed_roots() -> tuple[str, ...]:
    paths = [sysconfig.get_paths()[key] for key in ("stdlib", "platstdlib", "purelib", "platlib")]
    return tuple({os.path.join(form, "") for path in paths for form in (path, os.path.realpath(path))})


def code_stamp() -> dict[str, int]:
    """The modification times (ns) of the source files of the modules this process has imported, outside the
    installed packages and the standard library: the user's code, which an editor and ``importlib.reload`` (or
    IPython's ``%autoreload``) can change while this process runs.

    A worker process that imported the simulator's module keeps the code it read then, however the parent
    reloads it (a module-level simulator is sent by reference, so its pickled bytes do not change), so an idle
    worker is reused only while no file in its stamp has changed since it started (:func:`code_changed`).
    """
    roots, stamp = _installed_roots(), {}
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if not isinstance(path, str) or path.startswith(roots):
            continue
        try:
            stamp[name] = os.stat(path).st_mtime_ns
        except OSError:
            continue
    return stamp


def code_changed(stamp: dict[str, int], now: dict[str, int]) -> bool:
    """Whether a module in ``stamp`` has another source file in ``now`` (both :func:`code_stamp`), or is gone."""
    return any(now.get(name) != mtime for name, mtime in stamp.items())


atexit.register(close_idle_workers)


class _Sandboxes:
    """One :class:`Sandbox` per thread of the process that uses it: an idle one if there is, else new."""

    def __init__(self, payload: bytes, *, vectorized: bool, seeded: bool):
        self._payload, self._options = payload, {"vectorized": vectorized, "seeded": seeded}
        self._local = threading.local()
        self._all: list[tuple[Sandbox, dict[str, int]]] = []
        self._lock = threading.Lock()

    def box(self) -> Sandbox:
        """This thread's sandbox: an idle one whose code is current (:func:`code_changed`), else a new one."""
        box = getattr(self._local, "box", None)
        if box is None:
            now = code_stamp()
            with _IDLE_LOCK:  # one thread at a time: each takes its own idle worker
                stale = [(box, stamp) for box, stamp in _IDLE if code_changed(stamp, now)]
                _IDLE[:] = [entry for entry in _IDLE if entry not in stale]
                entry = _IDLE.pop() if _IDLE else None
            _close([box for box, _ in stale])
            if entry is None:
                entry = (Sandbox(self._payload, **self._options), now)
            else:  # the modules this simulator makes the worker import now enter its stamp as they are now
                entry[0].bind(self._payload, **self._options)
                for name, mtime in now.items():
                    entry[1].setdefault(name, mtime)
            box = self._local.box = entry[0]
            with self._lock:
                self._all.append(entry)
        return box

    def run(self, job: Job, timeout: float | None) -> Outcome:
        return self.box().run(job, timeout)

    def close(self, *, kill: bool = False) -> None:
        """Kill the children (``kill``), or keep them idle for the next run of this process."""
        with self._lock:
            entries, self._all = self._all, []
        if kill:
            for box, _ in entries:
                box.kill()
            return
        with _IDLE_LOCK:
            keep = max(0, (os.cpu_count() or 2) - len(_IDLE))
            _IDLE.extend((box, stamp) for box, stamp in entries[:keep] if box.alive)
        _close([box for box, _ in entries[keep:]])


class LocalWorkers:
    """``workers`` child processes on this machine, each fed by a thread of a thread pool."""

    def __init__(self, payload: bytes, *, workers: int, timeout: float | None, vectorized: bool, seeded: bool):
        self._boxes = _Sandboxes(payload, vectorized=vectorized, seeded=seeded)
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="sbiflows-worker")
        self._workers, self._timeout = workers, timeout

    def slots(self) -> int:
        return self._workers

    def submit(self, job: Job) -> Future:
        return self._pool.submit(self._boxes.run, job, self._timeout)

    def outcome(self, future: Future) -> Outcome:
        return future.result()

    def close(self, *, kill: bool = False) -> None:
        self._pool.shutdown(wait=not kill, cancel_futures=True)
        self._boxes.close(kill=kill)


#: Sandboxes of the worker processes of a user's executor or Dask cluster, one set per simulator.
_WORKER_SANDBOXES: dict[bytes, _Sandboxes] = {}
_WORKER_LOCK = threading.Lock()


def _broken_pool() -> RuntimeError:
    return RuntimeError(
        "the executor's process pool broke (a worker process died while running the simulator); finished chunks "
        "are kept in the store, if any. Use workers=N or a timeout, which run the simulator in replaceable processes")


def _payload(payload: bytes) -> bytes:
    """The pickled simulator, as a Dask task's result (recomputed from the graph if its worker dies)."""
    return payload


def run_in_worker(payload: bytes, job: Job, timeout: float | None, vectorized: bool, seeded: bool,
                  stop: str | None = None) -> Outcome:
    """The task an executor or Dask worker runs: the job in a sandbox of that worker's process (on Dask, killed
    when the run's ``Event`` named ``stop`` is set: see :func:`_run_stoppable`)."""
    import hashlib

    key = hashlib.sha256(payload).digest() + bytes([vectorized, seeded])
    with _WORKER_LOCK:
        boxes = _WORKER_SANDBOXES.pop(key, None)
        if boxes is None:
            boxes = _Sandboxes(payload, vectorized=vectorized, seeded=seeded)
        _WORKER_SANDBOXES[key] = boxes  # most recent last
        while len(_WORKER_SANDBOXES) > 2:  # a long-lived worker keeps the children of two simulators at most
            _WORKER_SANDBOXES.pop(next(iter(_WORKER_SANDBOXES))).close()
    if stop is None:
        return boxes.run(job, timeout)
    return _run_stoppable(boxes.box(), job, timeout, stop)


#: How long a Dask task's watcher waits on the scheduler at a time (a long poll) for its run's stop event.
STOP_POLL = 5.0
#: Why the chunks that a stopped run left on a Dask cluster end without simulating.
RUN_STOPPED = "the run that submitted this chunk stopped"


def _run_stoppable(box: Sandbox, job: Job, timeout: float | None, stop: str) -> Outcome:
    """Run ``job`` in ``box`` on a Dask worker, killing the child when the run's Dask ``Event`` ``stop`` is set.

    A Dask task cannot be interrupted once it runs, so when a run stops (an error with ``on_error="raise"``,
    a simulator that cannot run, Ctrl-C) the driver sets the event and cancels its futures: a watcher thread
    (one long poll of the scheduler per :data:`STOP_POLL` s) kills the simulation, and chunks that start
    after it return at once, instead of the cluster simulating rows nobody will read.
    """
    from distributed import Event

    event = Event(stop)
    if event.is_set():
        return Outcome.failed(WORKER_DIED, RUN_STOPPED)
    finished = threading.Event()

    def watch() -> None:
        while not finished.is_set():
            try:
                if event.wait(timeout=STOP_POLL):
                    if not finished.is_set():
                        box.kill()
                    return
            except Exception:  # noqa: BLE001 - no scheduler to ask: the worker does not outlive it
                return

    threading.Thread(target=watch, name="sbiflows-stop-watch", daemon=True).start()
    try:
        return box.run(job, timeout)
    finally:
        finished.set()


class ExecutorBackend:
    """A user's ``concurrent.futures.Executor``; the simulator runs in a sandbox only with a timeout."""

    def __init__(self, executor: Executor, simulator: Callable, payload: bytes | None, *, timeout: float | None,
                 vectorized: bool, seeded: bool):
        self._executor, self._simulator, self._payload = executor, simulator, payload
        self._timeout, self._vectorized, self._seeded = timeout, vectorized, seeded
        self._workers = getattr(executor, "_max_workers", None) or 2
        # threads of this process: their sandboxes are ours to close; a process pool's live in its workers
        self._boxes = (_Sandboxes(payload, vectorized=vectorized, seeded=seeded)
                       if timeout is not None and isinstance(executor, ThreadPoolExecutor) else None)
        self._running: set[Future] = set()

    def slots(self) -> int:
        return 2 * self._workers

    def submit(self, job: Job) -> Future:
        try:  # a pool that broke on an earlier chunk refuses new ones
            if self._timeout is None:
                future = self._executor.submit(run_job, self._simulator, job, vectorized=self._vectorized,
                                               seeded=self._seeded)
            elif self._boxes is not None:
                future = self._executor.submit(self._boxes.run, job, self._timeout)
            else:
                future = self._executor.submit(run_in_worker, self._payload, job, self._timeout, self._vectorized,
                                               self._seeded)
        except BrokenProcessPool as error:
            raise _broken_pool() from error
        self._running.add(future)
        return future

    def outcome(self, future: Future) -> Outcome:
        self._running.discard(future)
        try:
            return future.result()
        except BrokenProcessPool as error:
            raise _broken_pool() from error

    def close(self, *, kill: bool = False) -> None:
        if kill:  # chunks still queued never start; running ones finish, except in this process's sandboxes
            for future in self._running:
                future.cancel()
        self._running.clear()
        if self._boxes is not None:  # the user's executor itself stays theirs to shut down
            self._boxes.close(kill=kill)


class DaskBackend:
    """A ``dask.distributed.Client``: each job is a task that runs the simulator in a sandbox on a worker."""

    def __init__(self, client, payload: bytes, *, timeout: float | None, vectorized: bool, seeded: bool):
        self._client = client
        # The simulator goes to the cluster as the result of a task, not by scatter: if the worker holding
        # it dies, Dask recomputes a task's result from the graph, while scattered data is lost for good
        # (and the Active Memory Manager trims a broadcast back to one copy). pure=False: a key of its own,
        # so a second run never shares a key whose release is still in flight.
        self._payload = client.submit(_payload, payload, pure=False)
        self._stop = f"sbiflows-stop-{uuid.uuid4().hex}"  # set when the run stops: see _run_stoppable
        self._args = (timeout, vectorized, seeded, self._stop)
        self._threads, self._checked = 1, 0.0
        self._running: set = set()

    def slots(self) -> int:
        if time.monotonic() - self._checked > 5.0:  # clusters grow and shrink: look again every 5 s
            self._threads = max(1, sum(self._client.nthreads().values()))
            self._checked = time.monotonic()
        return 2 * self._threads

    def submit(self, job: Job):
        future = self._client.submit(run_in_worker, self._payload, job, *self._args, pure=False)
        self._running.add(future)
        return future

    def outcome(self, future) -> Outcome:
        from distributed import KilledWorker

        self._running.discard(future)
        try:
            return future.result()
        except KilledWorker as error:  # the chunk took down every worker Dask let it try
            return Outcome.failed(WORKER_DIED, f"Dask workers died running this chunk ({error})")
        except Exception as error:  # noqa: BLE001 - the cluster itself failed, not the simulator
            raise RuntimeError(f"the Dask cluster could not run a chunk ({type(error).__name__}: {error}); "
                               "finished chunks are kept in the store, if any: rerun to resume") from error

    def close(self, *, kill: bool = False) -> None:
        """Release the simulator; with ``kill``, also stop the chunks still running or queued on the cluster."""
        if kill and self._running:
            from distributed import Event

            try:
                Event(self._stop, client=self._client).set()  # the scheduler keeps a set event: a few bytes per stop
                self._client.cancel(list(self._running), force=True)
            except Exception:  # noqa: BLE001 - a cluster that is gone runs nothing; the run's own error stands
                pass
        self._running.clear()
        self._payload.release()

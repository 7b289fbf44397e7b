"""A worker process the engine owns: it runs jobs for one simulator and can be killed at any moment.

:class:`Sandbox` starts a Python child process (running :func:`_child`) in a session of its
own, sends it the simulator once (with cloudpickle, so lambdas and functions of a script's
``__main__`` work) and then one job at a time over its stdin/stdout pipes. It gives the engine what a
thread cannot:

* **timeouts that kill**: a job that runs past ``timeout`` has the child's whole process group
  killed (the simulator's own subprocesses included) and comes back as a ``TimeoutError`` row;
* **crash isolation**: a simulator that segfaults or is killed for memory takes only the child with
  it; the job comes back as ``WorkerDied`` and the next job starts a fresh child;
* **no orphans**: the child exits as soon as the process that started it is gone (a watchdog thread
  checks its parent every 0.2 s), so a killed driver leaves no simulation running.

A child can be reused: :meth:`Sandbox.bind` gives it another simulator, which it loads (with the
driver's ``sys.path``, working directory and environment variables) before its next job, so a second
run skips the 1.4 s of importing torch. The child runs torch with one thread (``OMP_NUM_THREADS=1``):
several children share the cores.
Anything the simulator prints goes to the driver's stderr.
"""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection

from sbiflows.engine.jobs import TIMEOUT, WORKER_DIED, Job, Outcome

__all__ = ["LOAD_TIMEOUT", "Sandbox", "SandboxStartError"]

_PROTOCOL = pickle.HIGHEST_PROTOCOL


#: With a ``timeout``, how long a worker process may take to load the simulator (unpickle it, which imports its
#: modules) if the timeout is shorter: a load that hangs (an import waiting on a lock, a licence server or a network
#: file system) fails the run instead of blocking it. Without a timeout loading waits, as simulations do.
LOAD_TIMEOUT = 600.0


class SandboxStartError(RuntimeError):
    """The worker process could not load the simulator (the message holds the child's error)."""


class Sandbox:
    """One child process that runs jobs of one simulator; see the module docstring.

    Args:
        payload: ``cloudpickle.dumps(simulator)``.
        vectorized: Passed to :func:`~sbiflows.engine.jobs.run_job`.
        seeded: Passed to :func:`~sbiflows.engine.jobs.run_job`.
        threads: torch threads in the child.

    Example:
        >>> import cloudpickle, torch
        >>> box = Sandbox(cloudpickle.dumps(lambda t: 2 * t), vectorized=True, seeded=False)
        >>> box.run(Job(chunk=0, start=0, theta=torch.ones(2, 1), seeds=(0,)), timeout=60).x.tolist()
        [[2.0], [2.0]]
        >>> box.close()
    """

    def __init__(self, payload: bytes, *, vectorized: bool, seeded: bool, threads: int = 1):
        self._threads = threads
        self._process: subprocess.Popen | None = None
        self._send: Connection | None = None
        self._receive: Connection | None = None
        self._loaded: bytes | None = None  # the load message the child has accepted
        # Another thread may kill or release this sandbox while a job runs in it (a run that is
        # aborted): it then only kills the process, and the thread running the job closes the pipes it
        # is reading from when the job returns, so no pipe is closed twice or under a reader.
        self._lock = threading.Lock()
        self._busy = False
        self._pending: str | None = None  # "reset" or "release", done when the running job returns
        self.bind(payload, vectorized=vectorized, seeded=seeded)

    def bind(self, payload: bytes, *, vectorized: bool, seeded: bool) -> None:
        """Run this simulator from now on (a live child loads it before its next job, and is reused)."""
        context = (list(sys.path), os.getcwd(), self._environment())  # a reused child follows the driver's
        self._load = pickle.dumps(("load", (context, payload, vectorized, seeded, self._threads)), _PROTOCOL)
        self._vectorized = vectorized

    def run(self, job: Job, timeout: float | None) -> Outcome:
        """Run ``job`` in the child; kill the child if it takes longer than ``timeout`` seconds."""
        with self._lock:
            self._busy = True
        try:
            return self._run(job, timeout)
        finally:
            with self._lock:
                self._busy, pending, self._pending = False, self._pending, None
            if pending == "reset":
                self._reset()
            elif pending == "release":
                self.release()

    def _run(self, job: Job, timeout: float | None) -> Outcome:
        if self._process is not None and self._process.poll() is not None:  # died while idle
            self._reset()
        if self._process is None:
            self._start()
        if self._loaded != self._load:
            self._load_simulator(timeout)
        assert self._send is not None and self._receive is not None
        start = time.perf_counter()
        if timeout is not None and not self._vectorized:  # a per-row job makes one call per row
            timeout = timeout * len(job.seeds)
        try:
            self._send.send_bytes(pickle.dumps(("job", job), _PROTOCOL))
            if not _poll(self._receive, timeout):
                self.kill()
                return Outcome.failed(TIMEOUT, f"simulation ran past the timeout of {timeout:g} s and was killed",
                                      time.perf_counter() - start)
            return pickle.loads(self._receive.recv_bytes())
        except (EOFError, OSError):
            return Outcome.failed(WORKER_DIED, self._death(), time.perf_counter() - start)

    @property
    def alive(self) -> bool:
        """Whether the child process is running."""
        return self._process is not None and self._process.poll() is None

    def kill(self) -> None:
        """Kill the child and every process it started; the next :meth:`run` starts a new one."""
        with self._lock:
            process, busy = self._process, self._busy
            if busy:
                self._pending = "reset"
        if process is not None:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            process.wait()
        if not busy:
            self._reset()

    def close(self) -> None:
        """Let the child exit (end of input), killing it if it does not within a second."""
        self.release()
        self.reap()

    def release(self) -> None:
        """Close the pipes: the child exits when it has finished its current job (see :meth:`reap`)."""
        with self._lock:
            if self._busy:
                self._pending = self._pending or "release"
                return
            connections = (self._send, self._receive)
        for connection in connections:
            if connection is not None and not connection.closed:
                connection.close()

    def reap(self) -> None:
        """Wait up to a second for a released child to exit, then kill it."""
        if self._process is None:
            return
        try:
            self._process.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            pass
        self.kill()

    # ------------------------------------------------------------------------------- internals
    def _environment(self) -> dict[str, str]:
        return dict(os.environ, OMP_NUM_THREADS=str(self._threads), MKL_NUM_THREADS=str(self._threads),
                    PYTHONUNBUFFERED="1")

    def _start(self) -> None:
        self._process = subprocess.Popen(
            [sys.executable, "-c", "from sbiflows.engine.sandbox import _child; _child()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True, env=self._environment(),
        )
        self._send = Connection(os.dup(self._process.stdin.fileno()), readable=False)
        self._receive = Connection(os.dup(self._process.stdout.fileno()), writable=False)
        self._process.stdin.close()
        self._process.stdout.close()
        self._loaded = None

    def _load_simulator(self, timeout: float | None) -> None:
        limit = None if timeout is None else max(timeout, LOAD_TIMEOUT)
        try:
            self._send.send_bytes(self._load)
            if _poll(self._receive, limit):
                status, detail = pickle.loads(self._receive.recv_bytes())
            else:
                status, detail = "error", (f"it did not finish loading it within {limit:g} s (the timeout, at least "
                                           f"{LOAD_TIMEOUT:g} s): does importing its modules hang in a new process?")
        except (EOFError, OSError):
            status, detail = "error", self._death()
        if status != "ready":
            self.kill()
            raise SandboxStartError(f"the worker process could not load the simulator: {detail}")
        self._loaded = self._load

    def _death(self) -> str:
        process = self._process
        code = process.wait() if process is not None else None
        self._reset()
        if code is not None and code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = str(-code)
            return f"worker process died (killed by signal {name})"
        return f"worker process died (exit code {code})"

    def _reset(self) -> None:
        with self._lock:
            connections = (self._send, self._receive)
            self._process = self._send = self._receive = None
        for connection in connections:
            if connection is not None and not connection.closed:
                connection.close()

    def __del__(self):  # best effort: never leave a child behind
        try:
            self.kill()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


# ------------------------------------------------------------------------------------ the child
def _watch_parent(parent: int) -> None:
    while True:
        if os.getppid() != parent:
            try:
                os.killpg(0, signal.SIGKILL)
            finally:
                os._exit(1)
        time.sleep(0.2)


def _child() -> None:
    parent = os.getppid()
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    receive = Connection(os.dup(0), writable=False)
    send = Connection(os.dup(1), readable=False)
    os.dup2(2, 1)  # the simulator's prints go to stderr, never into the protocol
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    import cloudpickle
    import torch

    from sbiflows.engine.jobs import run_job

    simulator, options = None, {}
    while True:
        try:
            kind, body = pickle.loads(receive.recv_bytes())
        except EOFError:  # the driver is done: exit at once (an interpreter teardown with torch takes 0.5 s)
            sys.stderr.flush()
            os._exit(0)
        if kind == "load":
            try:
                (path, cwd, environment), payload, vectorized, seeded, threads = body
                sys.path[:0] = [p for p in path if p not in sys.path]
                os.chdir(cwd)
                os.environ.clear()
                os.environ.update(environment)
                torch.set_num_threads(threads)
                simulator, options = cloudpickle.loads(payload), {"vectorized": vectorized, "seeded": seeded}
                reply = ("ready", None)
            except Exception as error:  # noqa: BLE001 - reported to the driver
                simulator, reply = None, ("error", f"{type(error).__name__}: {error}")
            send.send_bytes(pickle.dumps(reply, _PROTOCOL))
        else:
            send.send_bytes(pickle.dumps(run_job(simulator, body, **options), _PROTOCOL))


#: The longest single wait of :func:`_poll` (``Connection.poll`` overflows past about 2.1e6 s).
_POLL_SLICE = 1e5


def _poll(connection, timeout: float | None) -> bool:
    """``connection.poll(timeout)`` for any timeout: a long one is waited in slices of :data:`_POLL_SLICE` s."""
    if timeout is None:
        return connection.poll(None)
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if connection.poll(max(0.0, min(left, _POLL_SLICE))):
            return True
        if left <= _POLL_SLICE:
            return False

"""The loop that runs a simulation plan: jobs out to a backend, outcomes back, chunks into the store.

The plan splits ``N`` rows into chunks of ``batch_size``; chunk ``c`` is simulated with the seed
``stream_seeds(seed, f"simulate/{c}", 1)``. A chunk whose call raised, timed out or lost its worker
is retried row by row, row ``k`` of the chunk with the seed ``stream_seeds(seed, f"simulate/{c}/rows",
batch_size)[k]``, so every row has its own stream and the numbers depend on the seed and the chunking
alone, never on which worker ran what. A per-row simulator (``vectorized=False``) always uses the row
seeds. Finished chunks go to the store at once, in whatever order they finish.
"""

from __future__ import annotations

import queue
import re
import warnings
from collections import Counter, deque
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from sbiflows.engine.jobs import BAD_OUTPUT, TIMEOUT, WORKER_DIED, Job, Outcome
from sbiflows.engine.progress import Progress
from sbiflows.engine.store import SimulationStore, StoreMismatchError
from sbiflows.seeding import stream_seeds

#: Failed rows, all of one exception type and before any success, that stop a run as "cannot run at all"
#: (a simulator failing half of its rows at random reaches it by chance once in a million runs).
BROKEN_AFTER = 20


class AbortRun(Exception):
    """Raised inside the loop to stop the run at the row ``index`` (on_error="raise", or a broken simulator)."""

    def __init__(self, message: str, *, index: int):
        super().__init__(message)
        self.index = index


@dataclass
class _Chunk:
    start: int
    rows: int
    seed: int
    x: np.ndarray | None = None  # allocated (NaN) when its first rows arrive, once the x layout is known
    errors: dict[int, tuple[str, str]] = field(default_factory=dict)  # row within chunk -> (type, message)
    waiting: int = 0  # row jobs still out
    seconds: float = 0.0
    stored: bool = False  # a stored chunk whose failed rows are simulated again (retry_failed, a longer timeout)
    split: tuple[str, str] | None = None  # why the chunk's call failed as a whole, if its rows ran alone


class Driver:
    """Runs the plan for ``theta`` (see the module docstring); :meth:`run` returns the assembled arrays."""

    def __init__(self, backend, theta: Tensor, *, seed: int, batch_size: int, vectorized: bool,
                 on_error: str, store: SimulationStore | None, retry_failed: bool, progress: bool,
                 timeout: float | None = None):
        self.backend, self.theta, self.seed, self.batch_size = backend, theta, seed, batch_size
        self.vectorized, self.on_error, self.store = vectorized, on_error, store
        self.retry_failed, self.show_progress, self.timeout = retry_failed, progress, timeout
        self.n = len(theta)
        self.num_chunks = -(-self.n // batch_size)
        self.layout: tuple[tuple[int, ...], np.dtype] | None = None
        self.layout_from_store = False
        self.x_done: dict[int, np.ndarray] = {}  # chunk -> x of finished chunks
        self.failures: dict[int, tuple[str, str]] = {}  # row index -> (type, message)
        self.reused = 0
        self._chunks: dict[int, _Chunk] = {}
        self._deferred: list[int] = []  # finished chunks waiting for the x layout or this call's first success
        self._pending: deque[Job] = deque()
        self._done: queue.Queue = queue.Queue()
        self._in_flight = 0
        self._succeeded = False
        self._early: Counter = Counter()
        #: Chunks whose call failed as a whole although every row then succeeded alone, and the first reason:
        #: the batch path is broken (e.g. a per-row simulator), and those rows ran up to batch_size times slower.
        self.batch_only_failures: int = 0
        self.batch_only_reason: tuple[str, str] | None = None
        self.batch_calls_succeeded: int = 0  # chunks whose one call of several rows worked

    # ------------------------------------------------------------------------------- plan
    def _span(self, c: int) -> tuple[int, int]:
        return c * self.batch_size, min(self.n, (c + 1) * self.batch_size)

    def _new_chunk(self, c: int) -> _Chunk:
        start, stop = self._span(c)
        seed = int(stream_seeds(self.seed, f"simulate/{c}", 1)[0])
        chunk = self._chunks[c] = _Chunk(start, stop - start, seed)
        return chunk

    def _row_seeds(self, c: int) -> np.ndarray:
        return stream_seeds(self.seed, f"simulate/{c}/rows", self.batch_size)

    def _plan(self) -> None:
        stored = self._from_store() if self.store is not None else set()
        for c in range(self.num_chunks):
            if c in stored:
                continue
            chunk = self._new_chunk(c)
            theta = self.theta[chunk.start:chunk.start + chunk.rows]
            seeds = (chunk.seed,) if self.vectorized else tuple(int(s) for s in self._row_seeds(c)[:chunk.rows])
            self._pending.append(Job(c, chunk.start, theta, seeds))

    def _from_store(self) -> set[int]:
        """Chunks the store already holds (verified); failed rows to retry go into the queue."""
        records, theta, x = self.store.read_verified()
        if self.store.x_layout is not None:
            self.layout, self.layout_from_store = self.store.x_layout, True
        mine = self.theta.cpu().numpy()  # a theta on another device is stored from a CPU copy
        reusable = set()
        for c, record in records.items():
            if c >= self.num_chunks:
                continue
            start, stop = self._span(c)
            stored = min(record["rows"], stop - start)
            # a shorter last chunk of a smaller run: a vectorized simulator's call drew its rows' noise together, so
            # it is simulated again as a full chunk; a per-row simulator's rows have their own seeds, and only the
            # missing rows are simulated
            extend = stored < stop - start and not self.vectorized and self.layout is not None
            if stored < stop - start and not extend:
                continue
            if not np.array_equal(theta[start:start + stored], mine[start:start + stored]):
                raise StoreMismatchError(
                    f"chunk {c} of the store at {self.store.path} holds other parameters than this run (another "
                    "prior, seed plan or theta); use another store path, or delete it to start over")
            failed = {i - start: (t, m) for i, t, m in record["failures"] if i < stop}
            retry = {k for k, (kind, message) in failed.items()
                     if self.retry_failed or self._longer_limit(kind, message)}
            if retry and record["rows"] > stop - start:  # rewriting the chunk would drop the rows past this run
                warnings.warn(f"{len(retry)} failed rows of chunk {c} in the store at {self.store.path} are not "
                              f"simulated again: the chunk holds {record['rows']} rows and this run only its first "
                              f"{stop - start}; rerun with all {start + record['rows']} or more rows to retry them",
                              UserWarning, stacklevel=6)
                retry = set()
            if retry or extend:
                chunk = self._new_chunk(c)
                chunk.stored = True
                chunk.x = np.full((stop - start, *self.layout[0]), np.nan, dtype=self.layout[1])
                chunk.x[:stored] = x[start:start + stored]
                chunk.errors = {k: error for k, error in failed.items() if k not in retry}  # kept as they failed
                seeds = self._row_seeds(c)
                for k in [*sorted(retry), *range(stored, stop - start)]:  # each row alone, with its own seed
                    chunk.waiting += 1
                    self._pending.append(Job(c, start + k, self.theta[start + k:start + k + 1],
                                             (int(seeds[k]),), retry=True))
                self.reused += stored - len(retry)
            else:
                self.x_done[c] = x[start:stop]
                self.failures.update({start + k: v for k, v in failed.items()})
                self.reused += stop - start
            reusable.add(c)
        # the chunks made so far are the stored ones being rewritten; their kept failures and the others' rows
        kept = {chunk.start + k: e for chunk in self._chunks.values() for k, e in chunk.errors.items()} | self.failures
        if self.on_error == "raise" and kept:  # as the run that stored them would have raised
            index = min(kept)
            kind, message = kept[index]
            raise AbortRun(f"simulation of theta index {index} failed with {kind}: {message} (a failed row kept in "
                           f"the store at {self.store.path}; retry_failed=True simulates it again)", index=index)
        self.store.grow(len(self.theta))  # after every stored chunk proved to be this run's
        return reusable

    def _longer_limit(self, kind: str, message: str) -> bool:
        """Whether a stored row that timed out ran under a shorter limit than this run's: it is simulated
        again, since the user raised the limit for such rows (not without a limit: nothing could stop a
        row that hangs again)."""
        if kind != TIMEOUT or self.timeout is None:
            return False
        match = re.search(r"timeout of ([0-9.e+-]+) s", message)
        # the message gives the limit to 6 significant digits (``:g``): the same limit again is not a longer one
        return match is not None and self.timeout > float(match.group(1)) * (1 + 1e-5)

    # ------------------------------------------------------------------------------- loop
    def run(self) -> np.ndarray | None:
        """Simulate what the store does not hold; returns x for all rows (None if no row ever succeeded)."""
        self._plan()
        self.progress = Progress(self.n, enabled=self.show_progress, initial=self.reused)
        self.progress.failed = len(self.failures)
        try:
            while self._pending or self._in_flight:
                while self._pending and self._in_flight < self.backend.slots():
                    job = self._pending.popleft()
                    future = self.backend.submit(job)
                    self._in_flight += 1
                    future.add_done_callback(lambda f, job=job: self._done.put((f, job)))
                try:
                    future, job = self._done.get(timeout=1.0)
                except queue.Empty:
                    self.progress.update(0)
                    continue
                self._in_flight -= 1
                self._handle(job, self.backend.outcome(future))
        except AbortRun:
            raise  # "cannot run" (held chunks are dropped) or on_error="raise" (nothing is held then)
        except BaseException:
            self._flush_deferred(final=True)  # an interrupt keeps what finished, failed rows included
            raise
        else:
            self._flush_deferred(final=True)  # a call that ended with every row failed, without stopping early
        finally:
            self.progress.close()
        return self._assemble()

    def _handle(self, job: Job, outcome: Outcome) -> None:
        chunk = self._chunks[job.chunk]
        chunk.seconds += outcome.seconds
        whole = outcome.x is None and outcome.errors[0][0] == -1  # the call failed as a whole
        if whole and not job.retry:
            kind = outcome.errors[0][1]
            retry = kind != BAD_OUTPUT and (len(job.theta) > 1 or kind == WORKER_DIED)
            if retry:  # isolate the bad rows: each row alone, with its own seed
                if self.vectorized and len(job.theta) > 1 and kind not in (TIMEOUT, WORKER_DIED):
                    chunk.split = (kind, outcome.errors[0][2])  # the batch call itself may be what fails
                seeds = self._row_seeds(job.chunk)
                rows = [Job(job.chunk, job.start + k, job.theta[k:k + 1],
                            (int(seeds[job.start + k - chunk.start]),), retry=True) for k in range(len(job.theta))]
                chunk.waiting += len(rows)
                self._pending.extendleft(reversed(rows))  # finish this chunk before starting new ones
                return
        offset = job.start - chunk.start
        if whole:
            _, kind, message = outcome.errors[0]
            for k in range(len(job.theta)):
                self._fail(chunk, offset + k, kind, message)
        elif outcome.x is None:  # a per-row job whose every row failed: each with its own error
            for k, kind, message in outcome.errors:
                self._fail(chunk, offset + k, kind, message)
        else:
            x = self._conform(outcome.x)
            if isinstance(x, str):
                for k in range(len(job.theta)):
                    self._fail(chunk, offset + k, BAD_OUTPUT, x)
            else:
                failed = {k for k, _, _ in outcome.errors}
                first_success = not self._succeeded and len(failed) < len(job.theta)
                self._succeeded = self._succeeded or first_success
                for k, kind, message in outcome.errors:
                    self._fail(chunk, offset + k, kind, message)
                self._put(chunk, offset, x, failed)
                if first_success:
                    self._flush_deferred()
        if job.retry:
            chunk.waiting -= 1
        if chunk.waiting == 0:
            if chunk.split is not None and not chunk.errors:  # the call failed, yet no row does alone
                self.batch_only_failures += 1
                self.batch_only_reason = self.batch_only_reason or chunk.split
            elif not job.retry and len(job.theta) > 1:
                self.batch_calls_succeeded += 1
            self._finish(job.chunk)

    def _conform(self, x: np.ndarray) -> np.ndarray | str:
        """x in the run's layout, or why it cannot be (a message)."""
        shape, dtype = x.shape[1:], x.dtype
        if self.layout is None:
            self.layout = (shape, dtype)
            if self.store is not None:
                self.store.set_x_layout(shape, dtype)
            self._flush_deferred()
            return x
        if (shape, dtype) == self.layout:
            self.layout_from_store = False
            return x
        if shape != self.layout[0]:  # a bad chunk is a counted failure, also the first one after a resume
            where = "the store's rows have" if self.layout_from_store else "earlier chunks had"
            advice = " (if the simulator changed, use another store)" if self.layout_from_store else ""
            return f"simulator returned x of shape {shape} per row, but {where} {self.layout[0]}{advice}"
        cast = x.astype(self.layout[1])  # as an uninterrupted run casts to its first chunk's dtype, a resume does
        if self.layout_from_store and not np.array_equal(cast.astype(dtype), x, equal_nan=True):
            raise StoreMismatchError(  # a simulator that changed its output: the store would round it
                f"the store at {self.store.path} holds x of dtype {self.layout[1]}, but the simulator now returns "
                f"{dtype} values that {self.layout[1]} cannot hold; use another store path, or delete it")
        return cast

    def _allocate(self, chunk: _Chunk) -> np.ndarray:
        if chunk.x is None:
            chunk.x = np.full((chunk.rows, *self.layout[0]), np.nan, dtype=self.layout[1])
        return chunk.x

    def _put(self, chunk: _Chunk, offset: int, x: np.ndarray, failed: set[int]) -> None:
        self._allocate(chunk)[offset:offset + len(x)] = x
        for k in failed:
            chunk.x[offset + k] = np.nan

    def _fail(self, chunk: _Chunk, k: int, kind: str, message: str) -> None:
        chunk.errors[k] = (kind, message)
        index = chunk.start + k
        if self.on_error == "raise":
            raise AbortRun(f"simulation of theta index {index} failed with {kind}: {message}",
                           index=index)
        if not self._succeeded and not chunk.stored:  # rows that failed before are no evidence of a broken simulator
            self._early[kind] += 1
            if self._early[kind] >= min(BROKEN_AFTER, self.n):
                hint = ("" if not self.vectorized or kind in (TIMEOUT, WORKER_DIED) else
                        "; note that sbiflows calls the simulator with a batch theta of shape (N, theta_dim): "
                        "a simulator written for one parameter set theta (theta_dim,) needs vectorized=False")
                raise AbortRun(f"the simulator cannot run: the first {self._early[kind]} simulations all failed "
                               f"with {kind}: {message}{hint}", index=index)

    def _finish(self, c: int, *, final: bool = False) -> None:
        # Every row of this call failed so far: hold a chunk of new rows back, so that a call stopped as
        # "cannot run" stores none of its failures and a rerun with the simulator fixed simulates those rows
        # (not only with retry_failed). Held chunks are finished at the first success, or when the call ends
        # or is interrupted. A chunk already in the store is rewritten at once: its record exists anyway.
        if self.layout is None:
            if final:  # every row failed and no x shape is known: count the failures, nothing can be stored
                chunk = self._chunks.pop(c)
                self.failures.update({chunk.start + k: v for k, v in chunk.errors.items()})
                self.progress.update(chunk.rows, failed=len(chunk.errors))
            else:
                self._deferred.append(c)
            return
        if not self._succeeded and not final and not self._chunks[c].stored:
            self._deferred.append(c)
            return
        chunk = self._chunks.pop(c)
        x = self._allocate(chunk)
        for k in chunk.errors:
            x[k] = np.nan
        start = chunk.start
        if self.store is not None:
            failures = [(start + k, t, m) for k, (t, m) in sorted(chunk.errors.items())]
            self.store.write_chunk(c, start, self.theta[start:start + chunk.rows].cpu().numpy(), chunk.x,
                                   seed=chunk.seed, failures=failures, seconds=chunk.seconds)
        self.x_done[c] = chunk.x
        self.failures.update({start + k: v for k, v in chunk.errors.items()})
        self.progress.update(chunk.rows, failed=len(chunk.errors))

    def _flush_deferred(self, *, final: bool = False) -> None:
        deferred, self._deferred = self._deferred, []
        for c in deferred:
            self._finish(c, final=final)

    def _assemble(self) -> np.ndarray | None:
        if self.layout is None:
            return None
        x = np.empty((self.n, *self.layout[0]), dtype=self.layout[1])
        for c, part in self.x_done.items():
            start, stop = self._span(c)
            x[start:stop] = part[:stop - start]
        return x

    def partial(self) -> tuple[Tensor, Tensor | None]:
        """``(theta, x)`` of the chunks finished so far, in order (for interrupted or aborted runs)."""
        done = sorted(self.x_done)
        if not done or self.layout is None:
            return self.theta[:0], None
        rows = torch.cat([torch.arange(*self._span(c)) for c in done])
        x = np.concatenate([self.x_done[c][: self._span(c)[1] - self._span(c)[0]] for c in done])
        return self.theta[rows], torch.from_numpy(x)

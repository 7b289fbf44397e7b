"""Training checkpoints: a fit that is killed resumes from its last saved epoch instead of starting over.

:func:`~sbiflows.training.train` given a :class:`Checkpoint` writes the whole state of its loop to one file
at the end of an epoch, at most every :attr:`Checkpoint.every` seconds, and once more when training ends:
the weights, Adam's moments, the weight average, the best weights so far, the early-stopping rule, the
history, the minibatch generator and the snapshot trail. The same call made again (the same initial
weights, rows, split and options: the file records a SHA-256 key of them) continues from that epoch and
ends with the weights, history and snapshots an uninterrupted call would have ended with, on the same
machine and versions; a finished checkpoint returns at once. A checkpoint of any other call is ignored
and overwritten, so a stale file never changes a result. ``sbiflows fit`` keeps one in its output folder
while it trains (``training.ckpt``, removed once ``posterior.pt`` is saved).

While a training call with a checkpoint runs (in the main thread), the first Ctrl-C (SIGINT) or SIGTERM (a
plain ``kill``, a scheduler's time limit) lets the current epoch end, writes the checkpoint, and then stops
as the signal would have without it (KeyboardInterrupt, the handler that was installed, or the process
ends); a second one stops at once. So a stopped fit resumes from the epoch it was stopped in, not from the
last periodic write.

The file holds tensors and plain Python values only: it loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sbiflows.checks import check_real

__all__ = ["CHECKPOINT_FILE", "CHECKPOINT_SECONDS", "Checkpoint", "deferred_stops"]

#: Default seconds between two writes of a checkpoint (each at the end of an epoch).
CHECKPOINT_SECONDS = 60.0
#: The file name ``sbiflows fit`` and :class:`~sbiflows.TSNPE`'s rounds give their checkpoints.
CHECKPOINT_FILE = "training.ckpt"
#: The parts a fit's checkpoint has siblings for (:meth:`Checkpoint.sibling`).
_PART = re.compile(r"members|member\d+")
#: Version of the file's layout; a file of another version is ignored.
FORMAT = 1
#: The signals that end the current epoch and write the checkpoint before they stop a training call.
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM"))


class Checkpoint:
    """Where a training call keeps its state while it trains, and resumes from.

    Args:
        path: The file. It is written atomically (a temporary file next to it, then renamed), so a kill
            while writing leaves the previous checkpoint.
        every: Seconds between writes (``>= 0``; 0: after every epoch); None: :data:`CHECKPOINT_SECONDS`
            (read when the checkpoint is made). Training also writes when it ends.
        log: Called with one line when a training call resumes from the file (e.g. ``print``); None: silent.

    Attributes:
        resumed_epoch: The epoch (counted like :attr:`~sbiflows.training.TrainingHistory.epochs`) that the
            latest training call resumed from, None if it started afresh.
        finished: Whether the latest call found a finished checkpoint and trained no epoch.
        structure: What the network computes beyond its weights, part of the key (``NPE.fit`` sets its
            architecture; :func:`~sbiflows.training.train` adds the model's ``repr``). The code of a custom
            module is not: change it, and use another file.

    One file holds one training call: give each fit its own path (a second ``fit`` on more data with the same
    path replaces the first's finished state, so a rerun of both trains the first again).

    Example:
        >>> import tempfile
        >>> from sbiflows.flows import maf
        >>> from sbiflows.training import train
        >>> path = Path(tempfile.mkdtemp()) / "training.ckpt"
        >>> data = torch.randn(200, 2, generator=torch.Generator().manual_seed(0))
        >>> _ = torch.manual_seed(0)
        >>> history = train(maf(2, transforms=1), data, max_epochs=3, checkpoint=Checkpoint(path))
        >>> _ = torch.manual_seed(0)  # the same initial weights: the same call
        >>> again = Checkpoint(path)
        >>> history2 = train(maf(2, transforms=1), data, max_epochs=3, checkpoint=again)
        >>> again.finished, history2.validation_loss == history.validation_loss
        (True, True)
    """

    def __init__(self, path: str | os.PathLike, *, every: float | None = None,
                 log: Callable[[str], None] | None = None):
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"checkpoint must be a path (str or os.PathLike), got {type(path).__name__} {path!r}")
        self.path = Path(path)
        self.every = check_real(CHECKPOINT_SECONDS if every is None else every, "every", low=0.0)
        self.resumed_epoch: int | None = None
        self.finished = False
        self.structure = ""
        self.log = log
        self._written = -math.inf
        self._siblings: dict[str, Checkpoint] = {}
        self._stop: int | None = None  # a stop signal that arrived while training, carried out at the epoch's end
        self._handlers: dict[int, Any] = {}  # the handlers it replaced while training, by signal

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, every={self.every})"

    def due(self) -> bool:
        """Whether :attr:`every` seconds have passed since the last write (or the call's start)."""
        return time.monotonic() - self._written >= self.every

    def epoch_end(self, state: Callable[[], dict]) -> None:
        """At the end of an epoch: write ``state()`` if :meth:`due` or a stop signal arrived during the epoch,
        then carry out that stop (:func:`deferred_stops`)."""
        saved = self.due()
        if saved:
            self.save(state())
        if self._stop is not None:  # read after the check above: a stop arriving in between is written too
            if not saved:
                self.save(state())
            self._carry_out()

    def resumed_parts(self) -> list[Checkpoint]:
        """The :meth:`parts` that the latest training calls resumed from (their :attr:`resumed_epoch` is set)."""
        return [part for part in self.parts() if part.resumed_epoch is not None]

    def _defer(self, signum: int, frame: Any) -> None:
        first = self._stop is None
        self._stop = signum
        if not first:  # the second stop: at once, as this signal acts (Ctrl-C then SIGTERM: terminated)
            self._carry_out()
            return
        key = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        say_on_stderr(f"\n{key}: stopping at the end of this epoch, after writing the training checkpoint "
                      f"{str(self.path)!r} (press Ctrl-C again to stop at once)")

    def _restore(self) -> None:
        for signum, handler in self._handlers.items():
            signal.signal(signum, handler)
        self._handlers = {}

    def _carry_out(self) -> None:
        """Restore the replaced handlers, then do what the waiting stop signal would have done without them (a
        signal that arrives after the handlers are back goes straight to them: none is lost in between)."""
        handlers = dict(self._handlers)
        self._restore()
        signum, self._stop = self._stop, None
        if signum is None:
            return
        handler = handlers.get(signum)
        if callable(handler):  # Python's SIGINT handler raises KeyboardInterrupt; sbiflows fit's SIGTERM one too
            handler(signum, None)
        else:  # the default action (the process ends), now that the default handler is back
            signal.raise_signal(signum)

    def start(self) -> None:
        """Start a training call: check that the file can be written (before any training), and make the first
        write come :attr:`every` seconds from now.

        Raises:
            ValueError: If the path is a folder or cannot be written (its folder cannot be made, no permission).
        """
        if self.path.is_dir() or not self.path.name:
            raise ValueError(f"checkpoint must be a file path, got the folder {str(self.path)!r}")
        probe = self._temporary()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as error:
            raise ValueError(f"checkpoint {str(self.path)!r} cannot be written: {error}") from None
        self.resumed_epoch, self.finished, self._written = None, False, time.monotonic()

    def resumed(self, epoch: int, finished: bool) -> None:
        """Record (and :attr:`log`) that the training call resumed from the file's state before ``epoch``."""
        self.resumed_epoch, self.finished = epoch, finished
        if self.log is not None:
            self.log(f"resuming training from the checkpoint of a stopped run ({self.path.name}, epoch {epoch}"
                     + (": training had finished)" if finished else ")"))

    def _temporary(self) -> Path:
        return self.path.with_name(self.path.name + ".tmp")

    def load(self, key: str, device: torch.device | str) -> dict | None:
        """The saved state if the file holds one of the call with ``key``, else None (also for an unreadable file)."""
        try:
            state = torch.load(self.path, map_location=device, weights_only=True)
        except FileNotFoundError:
            return None
        except Exception:  # another format, a foreign file: ignored, overwritten by the next write
            return None
        if not isinstance(state, dict) or state.get("format") != FORMAT or state.get("key") != key:
            return None
        return state

    def save(self, state: dict) -> None:
        """Write ``state`` (with its ``key``) atomically. A failed write (e.g. a full disk) warns and leaves the
        previous file: training goes on, it is never lost to its checkpoint."""
        temporary = self._temporary()
        try:
            torch.save({**state, "format": FORMAT}, temporary)
            os.replace(temporary, self.path)
        except (OSError, RuntimeError) as error:  # torch reports a failed open as RuntimeError
            warnings.warn(f"could not write the training checkpoint {str(self.path)!r} ({error}); training goes on",
                          RuntimeWarning, stacklevel=3)
            temporary.unlink(missing_ok=True)
        self._written = time.monotonic()

    def sibling(self, part: str) -> Checkpoint:
        """The checkpoint of another training call of the same fit (e.g. ``"members"``: the flows of an ensemble
        trained together after the first), in ``<stem>.<part><suffix>`` next to this one; made once per part.

        Example:
            >>> Checkpoint("run/training.ckpt").sibling("members")
            Checkpoint('run/training.members.ckpt', every=60.0)
        """
        if not _PART.fullmatch(part):
            raise ValueError(f"part must be 'members' or 'member<k>', got {part!r}")
        if part not in self._siblings:
            path = self.path.with_name(f"{self.path.stem}.{part}{self.path.suffix}")
            self._siblings[part] = Checkpoint(path, every=self.every, log=self.log)
        self._siblings[part].structure = self.structure
        return self._siblings[part]

    def parts(self) -> list[Checkpoint]:
        """This checkpoint and the siblings made from it (and theirs), e.g. to say which of them a fit resumed from."""
        return [self, *(part for sibling in self._siblings.values() for part in sibling.parts())]

    def remove(self) -> None:
        """Delete the file and its siblings' (e.g. once the posterior they lead to is saved)."""
        stem, suffix = re.escape(self.path.stem), re.escape(self.path.suffix)
        pattern = re.compile(rf"{stem}(\.(?:{_PART.pattern}))*{suffix}(\.tmp)?")
        if self.path.parent.is_dir():
            for path in self.path.parent.iterdir():
                if pattern.fullmatch(path.name):
                    path.unlink(missing_ok=True)


def say_on_stderr(line: str) -> None:
    """Print ``line`` on stderr at once (where progress bars write): a :attr:`Checkpoint.log` for scripts."""
    print(line, file=sys.stderr, flush=True)


@contextlib.contextmanager
def deferred_stops(checkpoint: Checkpoint | None) -> Iterator[None]:
    """While a training call with ``checkpoint`` runs in the main thread, the first SIGINT or SIGTERM waits for
    the end of the epoch (:meth:`Checkpoint.epoch_end` writes the checkpoint and then carries it out); one that
    arrives after the last epoch is carried out when the call ends. Elsewhere (no checkpoint, another thread,
    a signal that is ignored) signals act as usual."""
    if checkpoint is None or threading.current_thread() is not threading.main_thread():
        yield
        return
    for signum in STOP_SIGNALS:
        handler = signal.getsignal(signum)
        if handler is not None and handler is not signal.SIG_IGN:  # None: set outside Python, cannot be restored
            checkpoint._handlers[signum] = handler
            signal.signal(signum, checkpoint._defer)
    try:
        yield
    except BaseException:
        checkpoint._stop = None  # the call failed or stopped already: nothing left to carry out
        checkpoint._restore()
        raise
    checkpoint._carry_out()


def call_key(tensors: dict[str, Tensor | None], options: dict[str, Any], histories: list[dict]) -> str:
    """SHA-256 (:func:`~sbiflows.serialization.digest`) of what decides a training call: ``tensors`` (the initial
    weights, the rows, the split and the minibatch generators' states; None entries by name), the options (the
    network's structure among them) and the histories it extends (not their seconds, nor their restart epochs)."""
    from sbiflows.serialization import digest  # here: serialization imports training, which imports this module

    # not the seconds; nor restart_epochs, which every call empties before its key (and which is newer than many
    # checkpoints: their keys stay valid)
    histories = [{k: v for k, v in history.items() if k not in ("seconds", "restart_epochs")} for history in histories]
    absent = sorted(name for name, value in tensors.items() if value is None)
    text = json.dumps({"options": options, "histories": histories, "absent": absent}, sort_keys=True, default=str)
    return digest({name: value for name, value in tensors.items() if value is not None}, text=text)


def loop_state(*, key: str, epoch: int, finished: bool, model: nn.Module, optimizer: torch.optim.Optimizer,
               average: Any, best_state: dict[str, Tensor], rule: Any, history: Any, generator: torch.Generator,
               snapshots: Any, running: float = 0.0) -> dict:
    """The state of :func:`~sbiflows.training.train`'s loop before epoch ``epoch`` (``finished``: after its end);
    ``running``: the seconds of the running call not yet in the history's ``seconds``."""
    return {
        "key": key, "epoch": epoch, "finished": finished, "model": model.state_dict(),
        "optimizer": optimizer.state_dict(), "best_state": best_state, "rule": dict(vars(rule)),
        "history": with_seconds(history.as_dict(), running), "generator": generator.get_state(),
        "average": None if average is None else {"module": average.module.state_dict(), "updates": average.updates},
        "snapshots": None if snapshots is None else [[at, weights] for at, weights in snapshots.snapshots],
    }


def with_seconds(history: dict, running: float) -> dict:
    """A history's fields with ``running`` seconds (of a call still training) added to its ``seconds``: a resumed
    call's history then counts the time trained before the stop."""
    return {**history, "seconds": history.get("seconds", 0.0) + running}


def restore_loop(state: dict, *, model: nn.Module, optimizer: torch.optim.Optimizer, average: Any, rule: Any,
                 history: Any, generator: torch.Generator, snapshots: Any) -> tuple[int, dict[str, Tensor], bool]:
    """Put :func:`loop_state`'s ``state`` back into the loop's objects (in place); returns
    ``(epoch, best_state, finished)``."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if average is not None:
        average.module.load_state_dict(state["average"]["module"])
        average.updates = state["average"]["updates"]
    vars(rule).update(state["rule"])
    vars(history).update(state["history"])
    generator.set_state(state["generator"].cpu())  # a generator's state is a CPU tensor, whatever its device
    if snapshots is not None:
        snapshots.snapshots = [(int(epoch), weights) for epoch, weights in state["snapshots"]]
    return int(state["epoch"]), state["best_state"], bool(state["finished"])


def as_checkpoint(value: Any, *, objectives: dict[str, float],
                  log: Callable[[str], None] | None = None) -> Checkpoint | None:
    """:meth:`sbiflows.NPE.fit`'s ``checkpoint`` option as a :class:`Checkpoint` (a path gets the default
    interval and ``log``; a :class:`Checkpoint` keeps its own), checked before training: ``objectives``, the
    NPE's options that change the loss, must be 0 (only the default loss's state is all in the checkpoint).

    Example:
        >>> as_checkpoint("run/training.ckpt", objectives={"balancing": 0.0})
        Checkpoint('run/training.ckpt', every=60.0)
        >>> as_checkpoint("run/training.ckpt", objectives={"balancing": 100.0})
        Traceback (most recent call last):
        ...
        ValueError: checkpoint needs the default loss, got balancing=100.0 (set it to 0 or leave checkpoint=None)
    """
    checkpoint = value if value is None or isinstance(value, Checkpoint) else Checkpoint(value, log=log)
    changed = {name: weight for name, weight in objectives.items() if weight}
    if checkpoint is not None and changed:
        name, weight = next(iter(changed.items()))
        raise ValueError(f"checkpoint needs the default loss, got {name}={weight!r} (set it to 0 or leave "
                         "checkpoint=None)")
    return checkpoint

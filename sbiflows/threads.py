"""How many CPU threads torch uses inside sbiflows: one rule for every call.

The rule: every sbiflows call that runs a flow (``NPE.fit``, :func:`~sbiflows.training.train`,
``Posterior.sample``/``sample_batched``/``log_prob``/``log_prob_batched``/``map``, the diagnostics
and the command line) runs torch with **one intra-op thread** and restores the previous setting when
it returns, unless

* the call's ``num_threads`` option asks for another number, or
* you chose a thread count yourself: ``torch.set_num_threads`` (a count that differs from the one
  torch had when sbiflows was imported) or the ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` environment
  variables. Your choice is then left alone.

Why one thread: the flows are small (matrices of a few hundred columns), so a second thread has
little to share, and several sbiflows processes (simulation workers, pytest-xdist, Dask workers,
parallel jobs) each spinning one OpenMP thread per core oversubscribe a shared machine. One thread
per process keeps the cost of a call predictable; ``examples/benchmark_threads.py`` measures the
trade-off on a given machine (docs/benchmarks.md, "Threads", has our numbers: on 2 cores the two
choices were within a factor of two either way, and a process with more threads gets a larger share
of a machine that other processes keep busy).

torch's thread count is a property of the calling OS thread, and each call restores the value it
found, on the thread it runs on: calls from the threads of a ``ThreadPoolExecutor`` do not disturb one
another.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from sbiflows.checks import check_int

__all__ = ["DEFAULT_THREADS", "resolve_threads", "torch_threads"]

#: Intra-op threads of sbiflows' own calls when neither the call nor the user chose a number.
DEFAULT_THREADS = 1

_AT_IMPORT = torch.get_num_threads()
_ENVIRONMENT = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def resolve_threads(num_threads: int | None) -> int | None:
    """The thread count a call runs with: ``num_threads`` if given, else the rule (None: leave as is).

    Example:
        >>> resolve_threads(3)
        3
        >>> resolve_threads(0)
        Traceback (most recent call last):
        ...
        ValueError: num_threads must be an int >= 1, got 0
    """
    if num_threads is not None:
        return check_int(num_threads, "num_threads", minimum=1)
    if any(os.environ.get(name) for name in _ENVIRONMENT) or torch.get_num_threads() != _AT_IMPORT:
        return None  # the user's choice
    return DEFAULT_THREADS


@contextlib.contextmanager
def torch_threads(num_threads: int | None = None) -> Iterator[None]:
    """Run the block with torch's intra-op thread count of :func:`resolve_threads`, then restore it.

    Also a decorator (``@torch_threads()``). Nested uses keep the outer choice unless they name a count.

    Example:
        >>> before = torch.get_num_threads()
        >>> with torch_threads(2):
        ...     torch.get_num_threads()
        2
        >>> torch.get_num_threads() == before
        True
    """
    wanted = resolve_threads(num_threads)
    before = torch.get_num_threads()
    if wanted is None or wanted == before:
        yield
        return
    torch.set_num_threads(wanted)
    try:
        yield
    finally:
        torch.set_num_threads(before)

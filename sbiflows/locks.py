"""Advisory locks that keep a second process out of a folder while one writes it (a simulation store, a run).

Example:
    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / ".lock"
    >>> handle = hold_lock(path)
    >>> try:
    ...     hold_lock(path)
    ... except LockHeld as held:
    ...     held.owner == str(os.getpid())
    True
    >>> handle.close()  # released: the next process takes it
    >>> hold_lock(path).close()
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import IO

__all__ = ["LockHeld", "hold_lock"]


class LockHeld(OSError):
    """Another process holds the lock; ``owner`` is the pid it wrote (``"unknown"`` if none)."""

    def __init__(self, owner: str):
        super().__init__(f"held by pid {owner}")
        self.owner = owner


def hold_lock(file: Path) -> IO[str]:
    """Open ``file``, take an exclusive advisory ``flock`` on it without waiting and write this process's pid.

    Returns the open file: the lock lasts until it is closed or the process ends. Where there is no
    ``flock`` (Windows) the file is returned unlocked.

    Raises:
        LockHeld: If another process holds the lock.
    """
    handle = open(file, "a+")  # noqa: SIM115 - held open for the lifetime of the lock
    try:
        import fcntl
    except ImportError:  # Windows: no advisory lock
        return handle
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        owner = handle.read().strip() or "unknown"
        handle.close()
        raise LockHeld(owner) from None
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    return handle

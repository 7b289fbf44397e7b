"""Helpers for tests of the simulation engine: process liveness and bitwise comparison."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (NaN rows included, which torch.equal calls unequal)."""
    return a.dtype == b.dtype and a.shape == b.shape and a.numpy().tobytes() == b.numpy().tobytes()


def running(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie waiting to be reaped is not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False
    except OSError:  # no /proc (macOS)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


def wait_for_exit(pids, seconds: float = 10.0) -> set[int]:
    """The pids still running after up to ``seconds``."""
    deadline = time.monotonic() + seconds
    alive = {p for p in pids if running(p)}
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = {p for p in alive if running(p)}
    return alive

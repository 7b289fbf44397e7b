"""Progress of a simulation run: a live bar in terminals and notebooks, plain lines in log files.

A batch job's log is not a terminal: a bar there writes thousands of carriage-return lines. When
stderr is not a terminal (and no notebook kernel is running), :class:`Progress` prints one line every
:data:`LOG_INTERVAL` seconds instead, with the same numbers: rows done, rate, ETA, failed rows.
"""

from __future__ import annotations

import sys
import time

__all__ = ["Progress", "LOG_INTERVAL"]

#: Seconds between two plain progress lines when stderr is not a terminal.
LOG_INTERVAL = 30.0


class Progress:
    """Rows done out of ``total`` (``initial`` of them reused from a store), with the failed-row count.

    Example:
        >>> bar = Progress(100, enabled=False)
        >>> bar.update(10, failed=1); bar.close()
    """

    def __init__(self, total: int, *, enabled: bool, initial: int = 0, stream=None):
        self.total, self.done, self.failed = total, initial, 0
        self._initial, self._stream = initial, stream or sys.stderr
        self._start = self._last = time.monotonic()
        self._bar = None
        self._lines = False
        if not enabled:
            return
        if _interactive(self._stream):
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=initial, desc="simulating", unit="sim", leave=False,
                             dynamic_ncols=True, file=self._stream)
            self._bar.set_postfix(failed=0)
        else:
            self._lines = True

    def update(self, rows: int, *, failed: int = 0) -> None:
        """Count ``rows`` more finished rows, ``failed`` of which failed."""
        self.done += rows
        self.failed += failed
        if self._bar is not None:
            self._bar.update(rows)
            if failed:
                self._bar.set_postfix(failed=self.failed)
        elif self._lines and time.monotonic() - self._last >= LOG_INTERVAL:
            self._line()

    def line(self) -> str:
        """The plain progress line (once every row is done: how long it took and how many came from a store).

        Example:
            >>> Progress(100, enabled=False, initial=100).line()
            'simulating: 100/100 rows (100%, 100 read from the store), finished in 0 s, 0 failed'
        """
        elapsed = time.monotonic() - self._start
        if self.done >= self.total:
            stored = f", {self._initial} read from the store" if self._initial else ""
            return (f"simulating: {self.done}/{self.total} rows (100%{stored}), finished in {_duration(elapsed)}, "
                    f"{self.failed} failed")
        rate = (self.done - self._initial) / elapsed if elapsed > 0 else 0.0
        left = (self.total - self.done) / rate if rate > 0 else float("inf")
        eta = "?" if left == float("inf") else _duration(left)
        return (f"simulating: {self.done}/{self.total} rows ({self.done / max(self.total, 1):.0%}), "
                f"{rate:.3g} rows/s, ETA {eta}, {self.failed} failed")

    def close(self) -> None:
        """Close the bar (or print the last line)."""
        if self._bar is not None:
            self._bar.close()
        elif self._lines:
            self._line()

    def _line(self) -> None:
        print(self.line(), file=self._stream, flush=True)
        self._last = time.monotonic()


def _interactive(stream) -> bool:
    if "ipykernel" in sys.modules:
        return True
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"

"""A small progress printer for stderr (no dependencies)."""

from __future__ import annotations

import sys
import time
from typing import TextIO

__all__ = ["ProgressPrinter"]


class ProgressPrinter:
    """Prints ``desc: 42.0% (420/1000 unit), eta 1s, 1,234 unit/s`` to a stream.

    On a terminal the line is redrawn in place at most every ``interval`` seconds; otherwise a
    new line is printed at most every ``10 * interval`` seconds. :meth:`close` prints the last
    line.

    Args:
        total: Amount of work (0 or less: unknown, no percentage).
        desc: Label in front of the line.
        unit: Name of the unit of work.
        enabled: Print nothing when False.
        stream: Where to print (stderr by default).
        interval: Minimum seconds between redraws.
    """

    def __init__(
        self,
        total: float,
        *,
        desc: str,
        unit: str = "",
        enabled: bool = True,
        stream: TextIO | None = None,
        interval: float = 0.25,
    ) -> None:
        self.total = total
        self.desc = desc
        self.unit = unit
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.done = 0.0
        self._start = time.monotonic()
        self._last = -1e9
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._interval = interval if self._tty else 10 * interval

    def _line(self, note: str) -> str:
        elapsed = max(time.monotonic() - self._start, 1e-9)
        rate = self.done / elapsed
        unit = f" {self.unit}" if self.unit else ""
        text = f"{self.desc}: "
        if self.total > 0:
            text += (
                f"{100 * self.done / self.total:5.1f}% ({self.done:,.0f}/{self.total:,.0f}{unit})"
            )
            if rate > 0 and self.done < self.total:
                text += f", eta {(self.total - self.done) / rate:,.0f}s"
        else:
            text += f"{self.done:,.0f}{unit}"
        text += f", {rate:,.0f}{unit}/s"
        return f"{text} {note}".rstrip()

    def update(self, amount: float = 1, note: str = "") -> None:
        """Adds ``amount`` of finished work and redraws when due."""
        self.done += amount
        now = time.monotonic()
        if self.enabled and now - self._last >= self._interval:
            self._last = now
            end = "\r" if self._tty else "\n"
            self.stream.write(self._line(note) + end)
            self.stream.flush()

    def close(self, note: str = "") -> None:
        """Prints the final line."""
        if self.enabled:
            self.stream.write(self._line(note) + "\n")
            self.stream.flush()

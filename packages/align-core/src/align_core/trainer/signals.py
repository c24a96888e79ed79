"""Stop requests: SIGTERM (a scheduler's pre-emption notice) and the wall-clock limit.

The handler only sets a flag; the trainer reads it at the next step boundary, saves a checkpoint
and returns. Ranks agree on stopping through one small all-reduce per step, so a signal that
reaches only some ranks still stops all of them at the same step.
"""

from __future__ import annotations

import signal
import threading
import time
from types import FrameType

__all__ = ["StopRequest", "parse_max_time"]


def parse_max_time(value: str | None) -> float | None:
    """Seconds in a ``DD:HH:MM:SS`` limit (NeMo's format; fewer fields count from seconds up).

    Args:
        value: ``"DD:HH:MM:SS"``, ``"HH:MM:SS"``, ``"MM:SS"``, ``"SS"`` or None.

    Returns:
        The limit in seconds, or None for no limit.

    Raises:
        ValueError: A malformed value.
    """
    if value is None:
        return None
    parts = str(value).strip().split(":")
    if not 1 <= len(parts) <= 4 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"trainer.max_time: {value!r} is not DD:HH:MM:SS")
    seconds = 0
    for unit, part in zip((1, 60, 3600, 86400), reversed(parts), strict=False):
        seconds += unit * int(part)
    return float(seconds)


class StopRequest:
    """A flag set by SIGTERM or by a wall-clock limit.

    Install with `install` (main thread only; elsewhere signals cannot be caught and only the
    time limit applies) and remove with `restore`, which puts the previous handler back.
    """

    def __init__(self, max_time_s: float | None = None) -> None:
        """Start the clock.

        Args:
            max_time_s: Wall-clock budget in seconds from now; None for no limit.
        """
        self._deadline = None if max_time_s is None else time.monotonic() + max_time_s
        self.signalled = False
        self._previous: dict[int, object] = {}

    def install(self, signals: tuple[int, ...] = (signal.SIGTERM,)) -> None:
        """Catch ``signals`` (SIGTERM by default) by setting the flag."""
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        """Put the previous handlers back."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signalled = True

    @property
    def time_up(self) -> bool:
        """Whether the wall-clock limit has passed."""
        return self._deadline is not None and time.monotonic() >= self._deadline

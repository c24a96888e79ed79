"""Stop requests: SIGTERM (a scheduler's pre-emption notice), SIGINT (Ctrl-C), the time limit.

The handler only sets a flag; the trainer reads it at the next step boundary, saves a checkpoint
and returns. Ranks agree on stopping through one small all-reduce per step, so a signal that
reaches only some ranks still stops all of them at the same step. A second SIGINT while the
first is pending quits at once (`KeyboardInterrupt`): the last complete checkpoint is intact,
as after any kill. SIGINTs within `REPEAT_WINDOW_S` of the first count as the same Ctrl-C: under
torchrun a worker gets the terminal's SIGINT and torchrun's forwarded copy of it.
`stop_signal` tells the process which signal stopped it, so that it can exit ``128 + N``
(130 after SIGINT, 143 after SIGTERM).
"""

from __future__ import annotations

import signal
import threading
import time
from types import FrameType

__all__ = ["REPEAT_WINDOW_S", "StopRequest", "parse_max_time", "stop_signal"]

REPEAT_WINDOW_S = 1.0
"""SIGINTs this soon after the first are the same Ctrl-C (delivered twice), not a second one."""

_received: list[int] = []


def stop_signal() -> int | None:
    """The first signal a `StopRequest` of this process caught, or None."""
    return _received[0] if _received else None


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
    """A flag set by SIGTERM or SIGINT, or by a wall-clock limit.

    Install with `install` (main thread only; elsewhere signals cannot be caught and only the
    time limit applies) and remove with `restore`, which puts the previous handler back.
    Installs nest: a run installing it around several loops that install it themselves keeps
    its handlers until the outermost `restore`.
    """

    def __init__(self, max_time_s: float | None = None) -> None:
        """Start the clock.

        Args:
            max_time_s: Wall-clock budget in seconds from now; None for no limit.
        """
        self._deadline = None if max_time_s is None else time.monotonic() + max_time_s
        self.signalled = False
        self.signal: int | None = None
        self._interrupted_at: float | None = None
        self._previous: dict[int, object] = {}
        self._depth = 0

    def install(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> None:
        """Catch ``signals`` (SIGTERM and SIGINT by default) by setting the flag."""
        self._depth += 1
        if self._depth > 1 or threading.current_thread() is not threading.main_thread():
            return
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        """Put the previous handlers back (at the outermost of nested installs)."""
        self._depth = max(self._depth - 1, 0)
        if self._depth:
            return
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()

    @property
    def reason(self) -> str:
        """``"sigint"`` or ``"sigterm"``: what set the flag (``"max_time"`` when none did)."""
        if self.signal == signal.SIGINT:
            return "sigint"
        return "sigterm" if self.signalled else "max_time"

    def stop_reason(self, signalled: bool) -> str:
        """``sigint``, ``sigterm`` or ``max_time``, once the ranks agreed to stop.

        ``signalled`` is the flag reduced over the ranks (another rank may have received the
        signal); a stop without it is the time limit.
        """
        if not signalled:
            return "max_time"
        return "sigint" if self.reason == "sigint" else "sigterm"

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT:
            now = time.monotonic()
            if self._interrupted_at is None:
                self._interrupted_at = now
            elif now - self._interrupted_at > REPEAT_WINDOW_S:
                raise KeyboardInterrupt  # a second Ctrl-C: quit now
        if self.signal is None:
            self.signal = signum
            _received.append(signum)
        self.signalled = True

    @property
    def time_up(self) -> bool:
        """Whether the wall-clock limit has passed."""
        return self._deadline is not None and time.monotonic() >= self._deadline

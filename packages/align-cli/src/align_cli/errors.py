"""Errors the ``align`` command reports to the user as one clear line (no traceback).

`expected_failure` decides, for any exception, whether it describes the user's input (exit 2,
also a run directory another run holds), a non-finite training step or a full disk (exit 1) or
neither (a bug: its traceback is shown). Exceptions of
the libraries are recognised by class name, so that no library has to be imported to report
them. An error that rank 0 broadcast to the other ranks before raising it (align-core's
``on_main_then_all``: ``RuntimeError("rank 0 failed: Kind: message")``) counts as its
original kind, so every rank of a multi-process run agrees on the exit status.
"""

from __future__ import annotations

import re

__all__ = ["USER_ERRORS", "ConfigError", "UsageError", "expected_failure"]


class UsageError(Exception):
    """Something the user asked for cannot be done; the message says what and how to fix it."""


class ConfigError(UsageError):
    """A configuration key or value is wrong.

    Args:
        message: The full message, starting with the dotted key.
        key: The dotted key at fault (may be empty for whole-config problems).
    """

    def __init__(self, message: str, key: str = "") -> None:
        super().__init__(message)
        self.key = key


USER_ERRORS = frozenset(
    {
        "ConfigError",
        "DamagedCheckpointError",
        "DataError",
        "FileNotFoundError",
        "HFFormatError",
        "NemoFormatError",
        "RunDirBusyError",
        "UnsafeCheckpointError",
        "UnsupportedNemoConfigError",
        "UsageError",
        "ValueError",
    }
)
"""Class names of exceptions that describe a user's input: one line, exit status 2."""

_NON_FINITE = "NonFiniteError"
_RUNTIME_FAILURES = frozenset({_NON_FINITE, "DiskFullError"})
"""Class names of failures while training (exit 1): a non-finite step, a full disk."""
_FROM_RANK0 = re.compile(r"rank 0 failed: (\w+): (.*)", re.DOTALL)


def _message(exc: BaseException) -> str:
    if isinstance(exc, FileNotFoundError) and exc.filename is not None:
        return f"{exc.filename}: no such file or directory"
    return str(exc)


def expected_failure(exc: BaseException) -> tuple[int, str] | None:
    """The exit status and one-line message of an expected failure, or None for anything else.

    2 for bad input (`UsageError` and `USER_ERRORS`), 1 for a non-finite loss or gradient or a
    full disk (align-core's ``NonFiniteError``, ``DiskFullError``); the same for such an error
    broadcast by rank 0.
    """
    if isinstance(exc, UsageError):
        return 2, str(exc)
    kind = type(exc).__name__
    if kind in _RUNTIME_FAILURES:
        return 1, str(exc)
    if kind in USER_ERRORS:
        return 2, _message(exc)
    if isinstance(exc, RuntimeError):
        match = _FROM_RANK0.fullmatch(str(exc))
        if match and match.group(1) in USER_ERRORS:
            return 2, match.group(2)
        if match and match.group(1) in _RUNTIME_FAILURES:
            return 1, match.group(2)
    return None

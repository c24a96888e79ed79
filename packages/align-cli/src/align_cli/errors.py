"""Errors the ``align`` command reports to the user as one clear line (no traceback)."""

from __future__ import annotations

__all__ = ["ConfigError", "UsageError"]


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

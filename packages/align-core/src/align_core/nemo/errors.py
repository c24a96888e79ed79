"""Errors raised while reading or writing `.nemo` files."""

from __future__ import annotations

__all__ = ["NemoFormatError", "UnsupportedNemoConfigError"]


class NemoFormatError(ValueError):
    """The file is not a usable `.nemo`: unsafe, truncated, corrupt or missing a member.

    The message names the file and the member or key at fault.
    """


class UnsupportedNemoConfigError(ValueError):
    """The `.nemo` describes an architecture this package cannot build (e.g. mixture of experts).

    Raised instead of silently ignoring a key whose value would change the model.
    """

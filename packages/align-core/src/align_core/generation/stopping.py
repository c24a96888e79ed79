"""Pure functions for end strings: detecting the one a new token completes, trimming text at it."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["end_string_window", "first_end_string", "new_end_string", "trim_at_end_string"]


def first_end_string(text: str, end_strings: Sequence[str], min_end: int = 0) -> int | None:
    """Index where the earliest end string in ``text`` starts, among those ending after ``min_end``.

    Args:
        text: Decoded text.
        end_strings: Strings that end generation.
        min_end: Only occurrences whose last character lies at index ``>= min_end`` count.

    Returns:
        The start index of the earliest such occurrence, or None.
    """
    best: int | None = None
    for s in end_strings:
        start = max(0, min_end - len(s) + 1)
        at = text.find(s, start)
        if at >= 0 and (best is None or at < best):
            best = at
    return best


def _common_prefix_length(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def end_string_window(end_strings: Sequence[str]) -> int:
    """How many trailing tokens to decode so that any end string a token completes is visible.

    A token holds at least one byte except special tokens, and a character at most four bytes.
    """
    return 4 * max((len(s) for s in end_strings), default=0) + 4


def new_end_string(text_before: str, text_after: str, end_strings: Sequence[str]) -> bool:
    """Whether appending a token (``text_before`` → ``text_after``) completed an end string.

    Only occurrences that end beyond the part the two texts share count, so an end string already
    present before the token (for example while ``min_length`` held generation back) does not.

    Args:
        text_before: Decoded tail of the response without the newest token.
        text_after: The same tail with the newest token.
        end_strings: Strings that end generation.
    """
    shared = _common_prefix_length(text_before, text_after)
    return first_end_string(text_after, end_strings, min_end=shared) is not None


def trim_at_end_string(text: str, end_strings: Sequence[str]) -> str:
    """``text`` up to (not including) its earliest end string; unchanged when there is none."""
    at = first_end_string(text, end_strings)
    return text if at is None else text[:at]

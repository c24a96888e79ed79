r"""Errors that point at the bad input, and the report file of skipped records.

Every problem with a user's data is a :class:`DataError` whose text is
``file:line: field: what is wrong``. For Parquet files the "line" is the 1-based row number.
Problems that concern a whole record rather than one field (invalid JSON, non-UTF-8 bytes)
use the field name ``<record>``. Problems with the file as a whole (not a regular file, not a
readable Parquet file) have no line and no field: ``file: what is wrong``.

Lone surrogates (an unpaired ``\ud800`` escape in JSON) are written as their escape in every
message, so that an error about bad text can always be printed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

__all__ = ["RECORD_FIELD", "DataError", "SkipReportWriter", "SkippedRecord", "printable"]

RECORD_FIELD = "<record>"
"""Field name used when the whole record is at fault (invalid JSON, bad bytes, not an object)."""


class DataError(ValueError):
    """A bad record, located by file, line and field.

    Args:
        path: The file the record came from.
        line: 1-based line number (JSONL) or row number (Parquet); None when the whole file is
            at fault.
        field: The offending field, e.g. ``chosen``, ``messages[2].role`` or ``<record>``;
            None when the whole file is at fault.
        message: What is wrong, in words.
    """

    def __init__(self, path: str | Path, line: int | None, field: str | None, message: str) -> None:
        self.path = printable(str(path))
        self.line = None if line is None else int(line)
        self.field = None if field is None else printable(field)
        self.message = printable(message)
        super().__init__(self.path, self.line, self.field, self.message)

    @classmethod
    def whole_file(cls, path: str | Path, message: str) -> DataError:
        """An error about the file itself (its kind, its container format), not one record."""
        return cls(path, None, None, message)

    def __str__(self) -> str:
        if self.line is None:
            return f"{self.path}: {self.message}"
        return f"{self.path}:{self.line}: {self.field}: {self.message}"

    def __reduce__(self) -> tuple[type[DataError], tuple[str, int | None, str | None, str]]:
        return (DataError, (self.path, self.line, self.field, self.message))


def printable(text: str) -> str:
    r"""``text`` with lone surrogates written as ``\udXXX`` escapes (always encodable as UTF-8)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", errors="backslashreplace").decode("utf-8")
    return text


@dataclass(frozen=True)
class SkippedRecord:
    """One record left out in lenient mode (or dropped by the over-long policy).

    Attributes:
        error: Where and why.
        raw: The record's original text (JSONL line, or the Parquet row as JSON), possibly
            shortened to keep the report readable.
    """

    error: DataError
    raw: str


class SkipReportWriter:
    """Writes skipped records to a JSONL report: one object per record with its reason.

    Each report line has the keys ``file``, ``line``, ``field``, ``reason`` (the
    ``file:line: field: message`` text) and ``raw`` (the original record text).

    Args:
        path: Report file to create (parent directories are created).
        max_raw_chars: Longer raw texts are cut to this length and marked with ``...``.
    """

    def __init__(self, path: str | Path, *, max_raw_chars: int = 4000) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("w", encoding="utf-8")
        self._max_raw_chars = max_raw_chars
        self.count = 0

    def write(self, skipped: SkippedRecord) -> None:
        """Append one skipped record to the report."""
        raw = skipped.raw
        if len(raw) > self._max_raw_chars:
            raw = raw[: self._max_raw_chars] + "..."
        entry = {
            "file": skipped.error.path,
            "line": skipped.error.line,
            "field": skipped.error.field,
            "reason": str(skipped.error),
            "raw": raw,
        }
        self._file.write(json.dumps(entry, ensure_ascii=False) + "\n")
        self.count += 1

    def close(self) -> None:
        """Flush and close the report file."""
        self._file.close()

    def __enter__(self) -> SkipReportWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

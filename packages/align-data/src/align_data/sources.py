"""Reading JSONL and Parquet files: line-exact spans, format detection, strict or lenient loading.

Files are cut into :class:`Span` objects (byte ranges aligned to line starts for JSONL, row ranges
for Parquet) that know the number of their first line, so that worker processes can parse spans
independently and still report exact ``file:line`` locations.
"""

from __future__ import annotations

import json
import mmap
import os
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from align_data._extras import import_extra
from align_data.errors import RECORD_FIELD, DataError, SkippedRecord, SkipReportWriter
from align_data.formats import (
    FORMAT_KIND,
    FormatName,
    check_format_kind,
    convert_to_kind,
    detect_format,
    json_type_name,
    parse_record,
)
from align_data.records import Kind, Record, Source

__all__ = [
    "FileType",
    "LoadResult",
    "RawRow",
    "Span",
    "check_source_file",
    "detect_file_format",
    "file_type",
    "iter_rows",
    "load_records",
    "parse_span",
    "plan_spans",
]

FileType = Literal["jsonl", "parquet"]

_DETECT_MAX_ROWS = 100


_SPECIAL_KINDS = (
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def check_source_file(path: str | Path) -> None:
    """Checks that ``path`` is a readable regular file, before anything opens it.

    A FIFO would block the reader forever and a directory cannot be read as data, so the kind
    of path is checked from its metadata alone (symbolic links are followed).

    Raises:
        DataError: ``file: no such file``, ``file: is a directory``, ``file: not a regular
            file (a FIFO)`` (or socket, device), or ``file: not readable (permission denied)``.
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise DataError.whole_file(path, "no such file") from None
    except NotADirectoryError:
        raise DataError.whole_file(path, "no such file (a parent is not a directory)") from None
    except OSError as exc:
        raise DataError.whole_file(path, f"cannot be read: {exc.strerror}") from None
    if stat.S_ISDIR(mode):
        raise DataError.whole_file(path, "is a directory")
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _SPECIAL_KINDS if test(mode)), "a special file")
        raise DataError.whole_file(path, f"not a regular file ({kind})")
    if not os.access(path, os.R_OK):
        raise DataError.whole_file(path, "not readable (permission denied)")


def file_type(path: str | Path) -> FileType:
    """Returns ``parquet`` for ``.parquet``/``.pq`` files and ``jsonl`` otherwise."""
    return "parquet" if Path(path).suffix.lower() in (".parquet", ".pq") else "jsonl"


@dataclass(frozen=True)
class Span:
    """A contiguous piece of one source file.

    Attributes:
        path: The file.
        file_type: ``jsonl`` or ``parquet``.
        start: First byte (JSONL, at a line start) or first row (Parquet, 0-based).
        end: One past the last byte or row.
        first_line: 1-based number of the span's first line or row.
        num_lines: Lines (blank ones included) or rows in the span.
    """

    path: str
    file_type: FileType
    start: int
    end: int
    first_line: int
    num_lines: int


@dataclass(frozen=True)
class RawRow:
    """One non-blank line or row, decoded or not.

    Attributes:
        line: 1-based line or row number.
        value: The decoded JSON value (None when ``error`` is set).
        error: Why the row could not be decoded, or None.
        raw: The original text of the row.
    """

    line: int
    value: Any
    error: DataError | None
    raw: str


def _parquet_module() -> Any:
    return import_extra("pyarrow.parquet", "reading Parquet needs pyarrow", "parquet")


def _parquet_file(path: str) -> Any:
    """Opens a Parquet file; a file that is not one is a :class:`DataError` naming it."""
    pq = _parquet_module()
    import pyarrow as pa

    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        message = f"not a readable Parquet file ({_arrow_reason(exc)})"
        with open(path, "rb") as f:
            head = f.read(64).lstrip()
        if head[:1] in (b"{", b"["):
            message += "; it looks like JSON lines: name it .jsonl"
        raise DataError.whole_file(path, message) from None


def _arrow_reason(exc: BaseException) -> str:
    """The first sentence of a pyarrow error, without its period."""
    lines = str(exc).strip().splitlines()
    return lines[0].split(". ")[0].rstrip(" :.") if lines else type(exc).__name__


def plan_spans(
    path: str | Path, *, chunk_bytes: int = 8 << 20, chunk_rows: int = 20_000
) -> list[Span]:
    """Cuts a file into spans of about ``chunk_bytes`` (JSONL) or ``chunk_rows`` (Parquet).

    Args:
        path: The source file.
        chunk_bytes: Target span size for JSONL files; spans end at line ends.
        chunk_rows: Span size for Parquet files.

    Returns:
        Spans covering the whole file in order (none for an empty file).
    """
    path = str(path)
    check_source_file(path)
    kind = file_type(path)
    if kind == "parquet":
        rows = _parquet_file(path).metadata.num_rows
        step = max(1, chunk_rows)
        return [
            Span(
                path, "parquet", start, min(start + step, rows), start + 1, min(step, rows - start)
            )
            for start in range(0, rows, step)
        ]
    size = Path(path).stat().st_size
    if size == 0:
        return []
    spans: list[Span] = []
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        start, line = 0, 1
        while start < size:
            target = start + max(1, chunk_bytes)
            if target >= size:
                end = size
            else:
                newline = mm.find(b"\n", target - 1)
                end = size if newline < 0 else newline + 1
            count = mm[start:end].count(b"\n")
            unterminated = int(mm[end - 1 : end] != b"\n")
            spans.append(Span(path, "jsonl", start, end, line, count + unterminated))
            line += count
            start = end
    return spans


def _decode_line(data: bytes, path: str, line: int, strip_bom: bool) -> RawRow:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raw = data.decode("utf-8", errors="backslashreplace")
        message = f"not valid UTF-8 (byte 0x{data[exc.start]:02x} at column {exc.start + 1})"
        return RawRow(line, None, DataError(path, line, RECORD_FIELD, message), raw)
    if strip_bom and text.startswith("\ufeff"):
        text = text[1:]
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        message = f"invalid JSON: {exc.msg} (column {exc.colno})"
        return RawRow(line, None, DataError(path, line, RECORD_FIELD, message), text)
    except RecursionError:
        # Not the limit's number: libraries raise sys.getrecursionlimit() at run time.
        message = (
            "invalid JSON: nested too deeply (more levels of lists and objects than the "
            "parser's recursion limit allows)"
        )
        return RawRow(line, None, DataError(path, line, RECORD_FIELD, message), text[:200])
    return RawRow(line, value, None, text)


def iter_rows(span: Span) -> Iterator[RawRow]:
    """Yields the non-blank rows of a span with their line numbers.

    Rows that are not valid UTF-8 or not valid JSON come with ``error`` set instead of raising,
    so that the caller decides between strict and lenient handling.
    """
    if span.file_type == "parquet":
        yield from _iter_parquet_rows(span)
        return
    with open(span.path, "rb") as f:
        f.seek(span.start)
        data = f.read(span.end - span.start)
    line = span.first_line
    for chunk in data.split(b"\n"):
        body = chunk[:-1] if chunk.endswith(b"\r") else chunk
        if body.strip():
            yield _decode_line(body, span.path, line, strip_bom=line == 1)
        line += 1


def _iter_parquet_rows(span: Span) -> Iterator[RawRow]:
    pf = _parquet_file(span.path)
    row = 0
    for group in range(pf.metadata.num_row_groups):
        rows_in_group = pf.metadata.row_group(group).num_rows
        lo, hi = row, row + rows_in_group
        row = hi
        if hi <= span.start or lo >= span.end:
            continue
        first = max(span.start, lo) - lo
        last = min(span.end, hi) - lo
        table = _read_row_group(pf, span.path, group, lo, hi).slice(first, last - first)
        yield from _table_rows(table, span.path, lo + first + 1)


def _read_row_group(pf: Any, path: str, group: int, lo: int, hi: int) -> Any:
    """Row group ``group`` (rows ``lo:hi`` of the file) as a pyarrow table.

    Raises:
        DataError: The row group cannot be decoded, naming its first row and its rows.
    """
    import pyarrow as pa

    try:
        return pf.read_row_group(group)
    except (pa.ArrowException, OSError) as exc:
        message = f"row group {group} (rows {lo + 1}-{hi}) cannot be read: {_arrow_reason(exc)}"
        raise DataError(path, lo + 1, RECORD_FIELD, message) from None


def _table_rows(table: Any, path: str, first_number: int) -> Iterator[RawRow]:
    """The rows of a table, numbered from ``first_number``.

    A row whose string column holds bytes that are not UTF-8 comes with its error (file, row,
    column) instead of a value.
    """
    try:
        values = table.to_pylist()
    except UnicodeDecodeError:
        values = None
    for offset in range(table.num_rows):
        number = first_number + offset
        if values is not None:
            value = values[offset]
        else:
            value, error = _decode_table_row(table, offset, path, number)
            if error is not None:
                yield RawRow(number, None, error, "")
                continue
        yield RawRow(number, value, None, json.dumps(value, ensure_ascii=False, default=str))


def _decode_table_row(
    table: Any, offset: int, path: str, number: int
) -> tuple[dict[str, Any] | None, DataError | None]:
    """One row as a dict, or the error naming the first column that is not valid UTF-8."""
    row: dict[str, Any] = {}
    for name in table.column_names:
        try:
            row[name] = table.column(name)[offset].as_py()
        except UnicodeDecodeError as exc:
            byte = exc.object[exc.start]
            message = f"not valid UTF-8 (byte 0x{byte:02x} at position {exc.start + 1})"
            return None, DataError(path, number, name, message)
    return row, None


def detect_file_format(path: str | Path, *, strict: bool = True) -> FormatName:
    """Detects a file's format from its first decodable record.

    Args:
        path: The source file.
        strict: If True, a first row that cannot be decoded or matched raises; if False, up to
            100 leading bad rows are passed over (they are reported when the file is parsed).

    Returns:
        The detected format.

    Raises:
        DataError: When the file is empty or no format can be detected.
    """
    path = str(path)
    first_error: DataError | None = None
    seen = 0
    for span in plan_spans(path):
        for row in iter_rows(span):
            seen += 1
            try:
                if row.error is not None:
                    raise row.error
                if not isinstance(row.value, dict):
                    got = json_type_name(row.value)
                    message = f"expected a JSON object, got {got}"
                    raise DataError(path, row.line, RECORD_FIELD, message)
                return detect_format(row.value, Source(path, row.line))
            except DataError as exc:
                if strict:
                    raise
                first_error = first_error or exc
            if seen >= _DETECT_MAX_ROWS:
                break
        if seen >= _DETECT_MAX_ROWS:
            break
    if first_error is not None:
        raise first_error
    raise DataError(path, 1, RECORD_FIELD, "no records: the file is empty")


def parse_span(
    span: Span, fmt: FormatName, kind: Kind, *, strict: bool
) -> tuple[list[Record], list[SkippedRecord], int]:
    """Parses every row of a span into records of ``kind``.

    Args:
        span: The piece of file to read.
        fmt: The file's format.
        kind: The records wanted (conversions as in :func:`align_data.convert_to_kind`).
        strict: Raise at the first bad row (True) or skip bad rows and return them (False).

    Returns:
        ``(records, skipped, num_rows)``: parsed records, skipped rows with their reasons, and the
        number of non-blank rows read.

    Raises:
        DataError: In strict mode, for the first bad row.
    """
    records: list[Record] = []
    skipped: list[SkippedRecord] = []
    num_rows = 0
    for row in iter_rows(span):
        num_rows += 1
        try:
            if row.error is not None:
                raise row.error
            parsed = parse_record(row.value, fmt, Source(span.path, row.line))
        except DataError as exc:
            if strict:
                raise
            skipped.append(SkippedRecord(exc, row.raw))
            continue
        records.extend(convert_to_kind(parsed, kind))
    return records, skipped, num_rows


@dataclass
class LoadResult:
    """Records loaded from one or more files.

    Attributes:
        records: The valid records, in file order.
        formats: The format of each file.
        num_rows: Non-blank rows read.
        skipped: Rows left out in lenient mode, with their reasons.
    """

    records: list[Record] = field(default_factory=list)
    formats: dict[str, FormatName] = field(default_factory=dict)
    num_rows: int = 0
    skipped: list[SkippedRecord] = field(default_factory=list)


def load_records(
    paths: str | Path | Sequence[str | Path],
    *,
    kind: Kind | None = None,
    format: FormatName | None = None,
    strict: bool = True,
    report_path: str | Path | None = None,
) -> LoadResult:
    """Loads and validates records from JSONL or Parquet files.

    Args:
        paths: One file or several.
        kind: ``preference``, ``unpaired`` or ``sft`` (None: whatever each file's format
            provides, as for validating a file).
        format: Force a format instead of detecting it per file.
        strict: Stop at the first bad record with ``file:line: field: message`` (default), or
            skip bad records and count them.
        report_path: In lenient mode, write every skipped row and its reason to this JSONL file.

    Returns:
        The records, the detected formats and the skipped rows.

    Raises:
        DataError: In strict mode for the first bad record; in either mode when a path is not a
            readable regular file, a Parquet file or row group cannot be read, or a file's
            format cannot feed ``kind``.
    """
    if isinstance(paths, str | Path):
        paths = [paths]
    paths = [str(p) for p in paths]
    for path in paths:
        check_source_file(path)
    result = LoadResult()
    for path in paths:
        fmt = format or detect_file_format(path, strict=strict)
        wanted = kind or FORMAT_KIND[fmt]
        check_format_kind(fmt, wanted, Source(path, 1))
        result.formats[path] = fmt
        for span in plan_spans(path):
            records, skipped, rows = parse_span(span, fmt, wanted, strict=strict)
            result.records.extend(records)
            result.skipped.extend(skipped)
            result.num_rows += rows
    if report_path is not None:
        with SkipReportWriter(report_path) as report:
            for item in result.skipped:
                report.write(item)
    return result

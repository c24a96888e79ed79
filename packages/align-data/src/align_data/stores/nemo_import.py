"""Importer of NeMo-Aligner ``compute_topk_logits`` JSONL into a teacher top-k store.

Each input line holds one sample: ``index``, ``topk_logits`` ``[S][K]``, ``topk_token_ids``
``[S][K]``, ``log_sum_exp_logits`` ``[S]`` and the collate fields of NeMo's SFT dataset
(``tokens``, ``loss_mask``, ``token_count`` depending on the version). ``S`` is the padded batch
length, so the real positions are cut out: up to the last position with ``loss_mask`` 1 (the
response is the end of an SFT sample), else ``token_count``, else all ``S``. Lines may come in any
order and from several files (one per ``start_from_idx`` chunk); together they must cover a
contiguous index range without duplicates. Logits are kept as written (NeMo subtracts the
per-position maximum from logits and log-sum-exp alike, which leaves the teacher's
probabilities unchanged).

The import is resumable: rerunning it continues after the last committed sample.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from align_data.errors import DataError
from align_data.stores.teacher_shards import TeacherDType, TeacherTopKReader, TeacherTopKWriter

__all__ = ["import_nemo_topk_jsonl"]


def _fail(path: str, line: int, field: str, message: str) -> DataError:
    return DataError(path, line, field, message)


def _matrix(obj: dict[str, Any], key: str, path: str, line: int) -> np.ndarray:
    if key not in obj:
        raise _fail(path, line, key, "missing key")
    try:
        array = np.asarray(obj[key], dtype=np.float64)
    except (TypeError, ValueError):
        raise _fail(path, line, key, "expected a list of lists of numbers") from None
    if array.ndim != 2 or array.shape[1] == 0:
        raise _fail(path, line, key, f"expected [S][K] numbers, got shape {list(array.shape)}")
    return array


def _num_positions(obj: dict[str, Any], rows: int, path: str, line: int) -> int:
    mask = obj.get("loss_mask")
    if mask is not None:
        nonzero = np.flatnonzero(np.asarray(mask, dtype=np.float64).reshape(-1))
        if nonzero.size == 0:
            raise _fail(path, line, "loss_mask", "no position has loss_mask 1")
        return int(nonzero[-1]) + 1
    count = obj.get("token_count")
    if isinstance(count, list):
        count = count[0] if count else None
    if isinstance(count, int) and not isinstance(count, bool) and 0 < count <= rows:
        return count
    return rows


def _scan(paths: Sequence[str]) -> list[tuple[int, str, int, int]]:
    """First pass: ``(index, path, byte offset, line)`` of every sample, sorted by index."""
    found: list[tuple[int, str, int, int]] = []
    where: dict[int, tuple[str, int]] = {}
    for path in paths:
        with open(path, "rb") as f:
            offset, line = 0, 0
            for raw in f:
                line += 1
                start, offset = offset, offset + len(raw)
                if not raw.strip():
                    continue
                try:
                    obj = json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                    raise _fail(path, line, "<record>", f"invalid JSON: {exc}") from None
                index = obj.get("index") if isinstance(obj, dict) else None
                if isinstance(index, list) and len(index) == 1:
                    index = index[0]
                if not isinstance(index, int) or isinstance(index, bool) or index < 0:
                    raise _fail(
                        path, line, "index", f"expected a non-negative integer, got {index!r}"
                    )
                if index in where:
                    first = where[index]
                    raise _fail(
                        path, line, "index", f"duplicate {index} (also {first[0]}:{first[1]})"
                    )
                where[index] = (path, line)
                found.append((index, path, start, line))
    found.sort()
    for (a, *_), (b, path, _, line) in itertools.pairwise(found):
        if b != a + 1:
            raise _fail(path, line, "index", f"indices {a + 1}..{b - 1} are missing")
    return found


def import_nemo_topk_jsonl(
    paths: str | Path | Sequence[str | Path],
    out_dir: str | Path,
    *,
    dtype: TeacherDType = "fp32",
    keep_input_ids: bool = True,
    vocab_size: int | None = None,
) -> TeacherTopKReader:
    """Converts NeMo-Aligner ``compute_topk_logits`` output into a teacher top-k store.

    Args:
        paths: The JSONL file(s) written by ``compute_topk_logits.py``.
        out_dir: The store directory (resumed if it exists).
        dtype: Storage dtype of the logits.
        keep_input_ids: Keep the ``tokens`` field as the store's input ids (lets collate check
            that the dataset tokenizes to the same ids).
        vocab_size: The teacher's vocabulary size, if known: ids are checked against it and
            stored in 16 bits when it is at most 65,536 (the JSONL does not record it).

    Returns:
        A reader over the store.

    Raises:
        DataError: For a malformed line, a duplicate index or a gap, as ``file:line: field: ...``.
    """
    sources = [str(p) for p in ([paths] if isinstance(paths, str | Path) else paths)]
    entries = _scan(sources)
    if not entries:
        raise DataError(sources[0], 1, "<record>", "no samples found")
    handles: dict[str, Any] = {}

    def read_line(path: str, offset: int) -> Any:
        if path not in handles:
            handles[path] = open(path, "rb")  # noqa: SIM115 - closed below
        handles[path].seek(offset)
        return json.loads(handles[path].readline())

    try:
        return _write(entries, read_line, out_dir, dtype, keep_input_ids, vocab_size)
    finally:
        for handle in handles.values():
            handle.close()


def _write(
    entries: list[tuple[int, str, int, int]],
    read_line: Any,
    out_dir: str | Path,
    dtype: TeacherDType,
    keep_input_ids: bool,
    vocab_size: int | None,
) -> TeacherTopKReader:
    first = read_line(entries[0][1], entries[0][2])
    top_k = _matrix(first, "topk_logits", entries[0][1], entries[0][3]).shape[1]
    with TeacherTopKWriter(
        out_dir,
        top_k=top_k,
        dtype=dtype,
        start_index=entries[0][0],
        vocab_size=vocab_size,
        with_input_ids=keep_input_ids,
    ) as writer:
        for index, path, offset, line in entries:
            if index < writer.next_index:
                continue
            obj = read_line(path, offset)
            logits = _matrix(obj, "topk_logits", path, line)
            ids = _matrix(obj, "topk_token_ids", path, line)
            if ids.shape != logits.shape:
                raise _fail(
                    path,
                    line,
                    "topk_token_ids",
                    f"shape {list(ids.shape)} differs from topk_logits {list(logits.shape)}",
                )
            if logits.shape[1] != top_k:
                raise _fail(path, line, "topk_logits", f"expected {top_k} values per position")
            lse = np.asarray(obj.get("log_sum_exp_logits", []), dtype=np.float64).reshape(-1)
            if lse.shape[0] != logits.shape[0]:
                raise _fail(path, line, "log_sum_exp_logits", f"expected {logits.shape[0]} numbers")
            n = _num_positions(obj, logits.shape[0], path, line)
            tokens = None
            if keep_input_ids:
                if "tokens" not in obj:
                    raise _fail(path, line, "tokens", "missing key (or pass keep_input_ids=False)")
                tokens = np.asarray(obj["tokens"], dtype=np.int64).reshape(-1)[:n]
                if tokens.shape[0] != n:
                    raise _fail(path, line, "tokens", f"expected at least {n} ids")
            try:
                writer.append(index, logits[:n], ids[:n].astype(np.int64), lse[:n], tokens)
            except ValueError as exc:
                raise _fail(path, line, "topk_logits", str(exc)) from None
    return TeacherTopKReader(out_dir)

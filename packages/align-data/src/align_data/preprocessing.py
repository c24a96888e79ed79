"""Preprocessing: validate, tokenize and write memory-mapped shards, in parallel, cached.

``preprocess(paths, tokenizer, out_dir, config)`` returns a :class:`TokenizedDataset` stored in
``out_dir/<fingerprint>``. The fingerprint hashes the source files' *contents*, the tokenizer,
the chat template and every setting that changes the output, so a second run with the same
inputs opens the existing shards instead of recomputing them (``dataset.reused`` is then True).

Files are cut into line-aligned spans, each parsed, validated and tokenized by a worker process
into its own shard; the run is written to a temporary directory that is renamed into place only
when complete, so an interrupted run never leaves a half-written dataset behind.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import time
from collections.abc import Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from align_data.chat import ChatTemplate
from align_data.dataset import DATASET_FORMAT_VERSION, TokenizedDataset, write_shard
from align_data.errors import RECORD_FIELD, DataError, SkippedRecord, SkipReportWriter
from align_data.formats import FormatName, check_format_kind
from align_data.progress import ProgressPrinter
from align_data.records import Kind, Source
from align_data.sources import (
    Span,
    check_source_file,
    detect_file_format,
    parse_span,
    plan_spans,
)
from align_data.summary import PreprocessSummary, length_histogram
from align_data.tokenize import (
    Example,
    PreferenceExample,
    SFTExample,
    TokenizeConfig,
    Tokenized,
    TokenizeStats,
    UnpairedExample,
    resolve_add_bos,
    tokenize_record,
)
from align_data.tokenizer import Tokenizer

__all__ = ["PreprocessConfig", "dataset_fingerprint", "file_sha256", "preprocess"]


@dataclass(frozen=True, kw_only=True)
class PreprocessConfig:
    """Settings of :func:`preprocess`.

    Attributes:
        kind: ``preference``, ``unpaired`` or ``sft`` records.
        format: Force a format instead of detecting it per file.
        strict: Stop at the first bad record (True) or skip and count bad records (False).
        tokenize: Lengths, BOS/EOS and the over-long policy.
        num_workers: Worker processes (1: in this process).
        chunk_bytes: Target JSONL bytes per shard.
        chunk_rows: Parquet rows per shard.
        progress: Print progress and the summary to stderr.
        report_path: Write skipped rows (lenient mode) and dropped examples, with their reasons,
            to this JSONL file.
        start_method: multiprocessing start method (None: ``fork`` where available).
    """

    kind: Kind
    format: FormatName | None = None
    strict: bool = True
    tokenize: TokenizeConfig = field(default_factory=TokenizeConfig)
    num_workers: int = 1
    chunk_bytes: int = 4 << 20
    chunk_rows: int = 20_000
    progress: bool = True
    report_path: str | None = None
    start_method: str | None = None

    def __post_init__(self) -> None:
        if self.num_workers < 1:
            raise ValueError(f"num_workers must be at least 1, got {self.num_workers}")


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's contents.

    Raises:
        DataError: ``path`` is not a readable regular file (checked before opening it, so a
            FIFO never blocks).
    """
    check_source_file(path)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def dataset_fingerprint(
    paths: list[str],
    tokenizer: Tokenizer,
    config: PreprocessConfig,
    chat_template: ChatTemplate | None = None,
) -> str:
    """The cache key of a preprocessing run.

    Hashes the sources' contents (in order), the tokenizer, the chat template, and the settings
    that change the output (kind, format, strictness, tokenization, with ``add_bos`` resolved
    against the tokenizer); worker count, chunking and progress printing do not change it.
    """
    template = chat_template if chat_template is not None else tokenizer.chat_template
    key = {
        "version": DATASET_FORMAT_VERSION,
        "sources": [file_sha256(p) for p in paths],
        "tokenizer": tokenizer.fingerprint,
        "chat_template": template.fingerprint if template is not None else None,
        "kind": config.kind,
        "format": config.format,
        "strict": config.strict,
        "tokenize": _tokenize_settings(config.tokenize, tokenizer),
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


def _tokenize_settings(config: TokenizeConfig, tokenizer: Tokenizer) -> dict[str, Any]:
    """The tokenization settings with ``add_bos`` as applied (True/False, never None)."""
    settings = asdict(config)
    settings["add_bos"] = resolve_add_bos(config.add_bos, tokenizer)
    return settings


@dataclass(frozen=True)
class _Task:
    index: int
    span: Span
    file_index: int
    fmt: FormatName
    kind: Kind
    strict: bool
    shard_dir: str


@dataclass
class _TaskResult:
    index: int
    num_examples: int
    rows: int
    records: int
    stats: TokenizeStats
    skipped: list[SkippedRecord]
    dropped: list[tuple[Source, str]]
    lengths: np.ndarray
    label_tokens: int


_WORKER: dict[str, Any] = {}


def _init_worker(
    tokenizer: Tokenizer, template: ChatTemplate | None, config: TokenizeConfig
) -> None:
    _WORKER.update(tokenizer=tokenizer, template=template, config=config)


def _sequence_lengths(example: Example) -> tuple[list[int], int]:
    p = len(example.prompt_ids)
    if isinstance(example, PreferenceExample):
        c, r = len(example.chosen_ids), len(example.rejected_ids)
        return [p + c, p + r], c + r
    assert isinstance(example, UnpairedExample | SFTExample)
    labels = len(example.completion_ids)
    if isinstance(example, SFTExample) and example.prompt_loss_mask is not None:
        labels += int(example.prompt_loss_mask.sum())
    return [p + len(example.completion_ids)], labels


def _empty_prompt_error(item: Tokenized) -> DataError:
    """Strict mode's refusal of an example whose prompt truncation would leave only the BOS."""
    return DataError(
        item.source.path,
        item.source.line,
        "prompt",
        f"{item.drop_reason}; shorten the response or raise the sequence length "
        "(lenient mode drops such examples and counts them)",
    )


def _run_task(task: _Task) -> _TaskResult:
    records, skipped, rows = parse_span(task.span, task.fmt, task.kind, strict=task.strict)
    stats = TokenizeStats()
    examples: list[Example] = []
    sources: list[tuple[int, int]] = []
    dropped: list[tuple[Source, str]] = []
    lengths: list[int] = []
    label_tokens = 0
    for record in records:
        try:
            item = tokenize_record(
                record, _WORKER["tokenizer"], _WORKER["config"], chat_template=_WORKER["template"]
            )
            if task.strict and item.drop_kind == "empty_prompt":
                raise _empty_prompt_error(item)
        except DataError as exc:
            if task.strict:
                raise
            skipped.append(SkippedRecord(exc, ""))
            continue
        stats.add(item)
        if item.example is None:
            dropped.append((item.source, item.drop_reason or ""))
            continue
        examples.append(item.example)
        sources.append((task.file_index, record.source.line))
        seq, labels = _sequence_lengths(item.example)
        lengths += seq
        label_tokens += labels
    write_shard(task.shard_dir, task.kind, examples, sources)
    return _TaskResult(
        task.index,
        len(examples),
        rows,
        len(records),
        stats,
        skipped,
        dropped,
        np.asarray(lengths, dtype=np.int64),
        label_tokens,
    )


def _execute(
    tasks: list[_Task],
    config: PreprocessConfig,
    init_args: tuple[Any, ...],
    progress: ProgressPrinter,
) -> list[_TaskResult]:
    """Runs tasks inline or in a process pool; raises the error of the earliest failing span."""
    results: dict[int, _TaskResult] = {}

    def done(result: _TaskResult) -> None:
        results[result.index] = result
        progress.update(tasks[result.index].span.num_lines)

    if config.num_workers == 1 or len(tasks) == 1:
        _init_worker(*init_args)
        for task in tasks:
            done(_run_task(task))
        return [results[i] for i in range(len(tasks))]
    method = config.start_method or (
        "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    )
    errors: dict[int, BaseException] = {}
    with ProcessPoolExecutor(
        max_workers=min(config.num_workers, len(tasks)),
        mp_context=multiprocessing.get_context(method),
        initializer=_init_worker,
        initargs=init_args,
    ) as pool:
        futures: dict[Future[_TaskResult], int] = {
            pool.submit(_run_task, t): t.index for t in tasks
        }
        for future in as_completed(futures):
            index = futures[future]
            if future.cancelled():
                continue
            exc = future.exception()
            if exc is not None:
                errors[index] = exc
                for other, other_index in futures.items():
                    if other_index > index:
                        other.cancel()
                continue
            done(future.result())
    if errors:
        raise errors[min(errors)]
    return [results[i] for i in range(len(tasks))]


def _summarize(
    kind: Kind,
    formats: dict[str, str],
    results: list[_TaskResult],
    config: PreprocessConfig,
    seconds: float,
) -> PreprocessSummary:
    stats = TokenizeStats()
    for r in results:
        stats.merge(r.stats)
    lengths = np.concatenate([r.lengths for r in results]) if results else np.zeros(0)
    return PreprocessSummary(
        kind=kind,
        formats=formats,
        rows=sum(r.rows for r in results),
        records=sum(r.records for r in results),
        examples=stats.examples,
        skipped_invalid=sum(len(r.skipped) for r in results),
        truncated=stats.truncated,
        prompt_truncated=stats.prompt_truncated,
        response_truncated=stats.response_truncated,
        dropped_overlong=stats.dropped_overlong,
        dropped_empty_prompt=stats.dropped_empty_prompt,
        dropped_empty_response=stats.dropped_empty_response,
        sequences=len(lengths),
        tokens=int(lengths.sum()),
        label_tokens=sum(r.label_tokens for r in results),
        max_length=config.tokenize.max_length,
        length_histogram=length_histogram(lengths, config.tokenize.max_length),
        seconds=seconds,
    )


def _write_report(path: Path, results: list[_TaskResult]) -> None:
    with SkipReportWriter(path) as report:
        for result in results:
            items = list(result.skipped)
            for source, reason in result.dropped:
                error = DataError(source.path, source.line, RECORD_FIELD, f"dropped: {reason}")
                items.append(SkippedRecord(error, ""))
            # Whole-file errors (no line) first.
            for item in sorted(items, key=lambda s: -1 if s.error.line is None else s.error.line):
                report.write(item)


def preprocess(
    paths: str | Path | Sequence[str | Path],
    tokenizer: Tokenizer,
    out_dir: str | Path,
    config: PreprocessConfig,
    *,
    chat_template: ChatTemplate | None = None,
) -> TokenizedDataset:
    """Validates, tokenizes and stores records as memory-mapped shards, or reuses a previous run.

    Args:
        paths: JSONL or Parquet files (one or several, concatenated in order).
        tokenizer: The tokenizer.
        out_dir: Cache directory; the dataset goes to ``out_dir/<fingerprint>``.
        config: Kind, format, strictness, tokenization, workers, progress, report.
        chat_template: Template for chat records (default: the tokenizer's).

    Returns:
        The dataset; ``dataset.summary`` has the counts and ``dataset.reused`` tells whether an
        existing run was reused.

    Raises:
        DataError: In strict mode, for the first bad record (``file:line: field: message``) or
            example whose prompt truncation would leave only the BOS; in either mode when a
            path is not a readable regular file (checked for every path before any is read), a
            file is empty, a Parquet file or row group cannot be read, or a file's format
            cannot feed ``config.kind``.
    """
    sources = [str(p) for p in ([paths] if isinstance(paths, str | Path) else paths)]
    if not sources:
        raise ValueError("preprocess needs at least one source file")
    for path in sources:
        check_source_file(path)
    out = Path(out_dir)
    fingerprint = dataset_fingerprint(sources, tokenizer, config, chat_template)
    target = out / fingerprint
    if (target / "meta.json").exists():
        dataset = TokenizedDataset(target)
        dataset.reused = True
        if config.report_path is not None and (target / "report.jsonl").exists():
            shutil.copyfile(target / "report.jsonl", config.report_path)
        if config.progress:
            print(f"preprocess: reusing {target}\n{dataset.summary.format()}", file=sys.stderr)
        return dataset

    start = time.monotonic()
    formats: dict[str, str] = {}
    tasks: list[_Task] = []
    tmp = out / f".tmp-{fingerprint}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        for file_index, path in enumerate(sources):
            fmt = config.format or detect_file_format(path, strict=config.strict)
            check_format_kind(fmt, config.kind, Source(path, 1))
            formats[path] = fmt
            for span in plan_spans(
                path, chunk_bytes=config.chunk_bytes, chunk_rows=config.chunk_rows
            ):
                shard = tmp / f"shard-{len(tasks):05d}"
                tasks.append(
                    _Task(len(tasks), span, file_index, fmt, config.kind, config.strict, str(shard))
                )
        total = sum(t.span.num_lines for t in tasks)
        progress = ProgressPrinter(total, desc="preprocess", unit="rows", enabled=config.progress)
        template = chat_template if chat_template is not None else tokenizer.chat_template
        results = _execute(tasks, config, (tokenizer, template, config.tokenize), progress)
        summary = _summarize(config.kind, formats, results, config, time.monotonic() - start)
        progress.close()
        _write_report(tmp / "report.jsonl", results)
        meta = {
            "version": DATASET_FORMAT_VERSION,
            "kind": config.kind,
            "fingerprint": fingerprint,
            "sources": sources,
            "shards": [Path(t.shard_dir).name for t in tasks],
            "shard_sizes": [r.num_examples for r in results],
            "settings": {
                "format": config.format,
                "strict": config.strict,
                "tokenize": _tokenize_settings(config.tokenize, tokenizer),
                "tokenizer": tokenizer.fingerprint,
            },
            "summary": summary.to_dict(),
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            tmp.rename(target)
        except OSError:
            if not (target / "meta.json").exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if config.report_path is not None:
        shutil.copyfile(target / "report.jsonl", config.report_path)
    dataset = TokenizedDataset(target)
    if config.progress:
        print(dataset.summary.format(), file=sys.stderr)
    return dataset

"""``align data validate|preprocess|stats``: check, tokenize and describe data files (align-data).

Nothing here imports megatron; a ``.nemo`` tokenizer is read through align-core's ``.nemo``
reader only when ``--tokenizer`` names one.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from align_cli.errors import UsageError

__all__ = ["load_tokenizer", "preprocess_files", "stats", "validate"]

KINDS = ("preference", "unpaired", "sft")


def load_tokenizer(spec: str) -> Any:
    """A tokenizer from ``byte``, a ``.nemo`` file, a ``tokenizer.json`` or a sentencepiece model.

    Raises:
        UsageError: The file does not exist or is of an unknown kind.
    """
    if spec == "byte":
        from align_data import ByteTokenizer

        return ByteTokenizer()
    path = Path(spec)
    if not path.exists():
        raise UsageError(f"--tokenizer: {spec}: no such file (or 'byte')")
    if path.suffix == ".nemo" or (
        path.is_dir() and ((path / "model_config.yaml").exists() or (path / "config.json").exists())
    ):
        # align-core's own construction, so data statistics match what training will see.
        from align_core.nemo import build_tokenizer
        from align_core.pretrained import open_pretrained

        with open_pretrained(path) as ckpt:
            try:
                return build_tokenizer(ckpt.tokenizer)
            except (ValueError, NotImplementedError) as exc:
                raise UsageError(f"--tokenizer: {exc}") from exc
    if path.suffix == ".json":
        from align_data import HFTokenizer

        return HFTokenizer(path)
    if path.suffix == ".model":
        from align_data import SentencePieceTokenizer

        return SentencePieceTokenizer(path)
    raise UsageError(
        f"--tokenizer: {spec}: expected 'byte', a .nemo, a tokenizer.json or a sentencepiece .model"
    )


def _kind_of(path: str, kind: str | None, fmt: str | None) -> str:
    from align_data import FORMAT_KIND, detect_file_format

    if kind is not None:
        if kind not in KINDS:
            raise UsageError(f"--kind: {kind!r} is not one of {', '.join(KINDS)}")
        return kind
    detected = fmt or detect_file_format(path)
    return FORMAT_KIND[detected]  # type: ignore[index]


def validate(
    files: list[str],
    *,
    kind: str | None,
    fmt: str | None,
    lenient: bool,
    report: str | None,
    console: Console,
) -> int:
    """Check every record of ``files``; print counts per file.

    Every path is first checked to be a readable regular file (``file: is a directory``,
    ``not a regular file (a FIFO)``, ``no such file``: exit 2). Strict mode stops at the first
    bad record with ``file:line: field: message`` (exit 2). Lenient mode counts the bad records,
    prints the first few and writes all of them to ``report`` (exit 1 when any was bad).
    """
    from align_data import check_source_file, load_records

    for path in files:
        check_source_file(path)
    bad_total = 0
    for path in files:
        wanted = _kind_of(path, kind, fmt)
        result = load_records(
            path,
            kind=wanted,  # type: ignore[arg-type]
            format=fmt,  # type: ignore[arg-type]
            strict=not lenient,
            report_path=report,
        )
        formats = ", ".join(sorted(set(result.formats.values())))
        line = (
            f"{path}: {len(result.records)} {wanted} records from {result.num_rows} rows "
            f"(format {formats})"
        )
        if result.skipped:
            bad_total += len(result.skipped)
            line += f", {len(result.skipped)} invalid"
        console.print(line, highlight=False)
        for skipped in result.skipped[:5]:
            console.print(f"  {skipped.error}", highlight=False, markup=False)
        if len(result.skipped) > 5:
            console.print(f"  ... and {len(result.skipped) - 5} more", highlight=False)
    if bad_total and report:
        console.print(f"invalid records written to {report}", highlight=False)
    return 1 if bad_total else 0


def _preprocess_config(
    kind: str,
    fmt: str | None,
    lenient: bool,
    max_length: int | None,
    overlong: str | None,
    workers: int,
    progress: bool,
    report: str | None,
) -> Any:
    from align_data import PreprocessConfig, TokenizeConfig

    tokenize: dict[str, Any] = {}
    if max_length is not None:
        tokenize["max_length"] = max_length
    if overlong is not None:
        tokenize["overlong"] = overlong
    try:
        return PreprocessConfig(
            kind=kind,  # type: ignore[arg-type]
            format=fmt,  # type: ignore[arg-type]
            strict=not lenient,
            tokenize=TokenizeConfig(**tokenize),
            num_workers=workers,
            progress=progress,
            report_path=report,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from exc


def preprocess_files(
    files: list[str],
    *,
    out: str,
    tokenizer: str,
    kind: str | None,
    fmt: str | None,
    lenient: bool,
    max_length: int | None,
    overlong: str | None,
    workers: int,
    report: str | None,
    console: Console,
) -> int:
    """Tokenize ``files`` into memory-mapped shards under ``out`` (reused when unchanged)."""
    from align_data import preprocess

    wanted = _kind_of(files[0], kind, fmt)
    config = _preprocess_config(wanted, fmt, lenient, max_length, overlong, workers, True, report)
    dataset = preprocess(files, load_tokenizer(tokenizer), out, config)
    state = "reused" if dataset.reused else "written"
    console.print(f"dataset {state}: {dataset.directory}", highlight=False)
    return 0


def _summary_table(summary: Any, title: str) -> Table:
    table = Table(title=title, show_header=False)
    table.add_column("")
    table.add_column("", justify="right")
    rows = [
        ("kind", summary.kind),
        ("rows read", f"{summary.rows:,}"),
        ("records", f"{summary.records:,}"),
        ("examples kept", f"{summary.examples:,}"),
        ("invalid (skipped)", f"{summary.skipped_invalid:,}"),
        (
            "truncated (prompt / response)",
            f"{summary.truncated:,} ({summary.prompt_truncated:,} / "
            f"{summary.response_truncated:,})",
        ),
        (
            "dropped (over-long / BOS-only prompt / empty response)",
            f"{summary.dropped_overlong:,} / {summary.dropped_empty_prompt:,} / "
            f"{summary.dropped_empty_response:,}",
        ),
        ("sequences", f"{summary.sequences:,}"),
        ("tokens", f"{summary.tokens:,}"),
        ("label tokens", f"{summary.label_tokens:,}"),
        ("mean tokens / sequence", f"{summary.tokens / max(1, summary.sequences):,.1f}"),
        ("max_length", f"{summary.max_length:,}"),
    ]
    for name, value in rows:
        table.add_row(name, str(value))
    return table


def _histogram_table(histogram: list[tuple[int, int, int]], span: str) -> Table:
    table = Table(title=f"sequence lengths ({span})")
    table.add_column("tokens", justify="right")
    table.add_column("count", justify="right")
    table.add_column("")
    peak = max((c for _, _, c in histogram), default=0)
    for lo, hi, count in histogram:
        bar = "#" * (round(30 * count / peak) if peak else 0)
        table.add_row(f"{lo}-{hi}", f"{count:,}", bar)
    return table


def _model_seq_length(spec: str) -> int | None:
    """The sequence length of the model whose tokenizer ``--tokenizer`` names, if it is one."""
    path = Path(spec)
    if spec == "byte" or not path.exists():
        return None
    if path.suffix == ".nemo" or (
        path.is_dir() and ((path / "model_config.yaml").exists() or (path / "config.json").exists())
    ):
        from align_core.pretrained import open_pretrained

        with open_pretrained(path) as ckpt:
            return int(ckpt.model_config.seq_length)
    return None


def _tokenizer_line(spec: str, tok: Any) -> str:
    vocab = getattr(tok, "vocab_size", None)
    size = f", vocabulary {vocab:,}" if isinstance(vocab, int) else ""
    return f"tokenizer: {spec} ({type(tok).__name__}{size})"


def stats(
    files: list[str],
    *,
    tokenizer: str,
    kind: str | None,
    fmt: str | None,
    max_length: int | None,
    lenient: bool,
    console: Console,
) -> int:
    """Print records, tokens, lengths and truncation counts of data files or a dataset directory.

    A directory written by ``align data preprocess`` is described from its summary; files are
    tokenized into a temporary directory first. The length histogram spans the model's sequence
    length (``--tokenizer`` a ``.nemo`` or Hugging Face directory), else ``--max-length``, else
    the longest sequence in the data.
    """
    from align_data import TokenizedDataset, check_source_file, length_histogram, preprocess

    model_length = None
    if len(files) == 1 and (Path(files[0]) / "meta.json").is_file():
        dataset = TokenizedDataset(files[0])
        summary = dataset.summary
        lengths = dataset.sequence_lengths()
        tokenizer_line = "tokenizer: the one it was preprocessed with (see its meta.json)"
    else:
        for path in files:
            check_source_file(path)
        wanted = _kind_of(files[0], kind, fmt)
        model_length = _model_seq_length(tokenizer)
        if max_length is None and model_length is not None:
            max_length = model_length  # truncate as training with this model will
        config = _preprocess_config(wanted, fmt, lenient, max_length, None, 1, False, None)
        tok = load_tokenizer(tokenizer)
        tokenizer_line = _tokenizer_line(tokenizer, tok)
        with tempfile.TemporaryDirectory(prefix="align-stats-") as tmp:
            dataset = preprocess(files, tok, tmp, config)
            summary = dataset.summary
            lengths = dataset.sequence_lengths()
    longest = int(lengths.max()) if lengths.size else 0
    if model_length is not None:
        upper, span = model_length, f"1-{model_length}: the model's seq_length"
    elif max_length is not None:
        upper, span = max_length, f"1-{max_length}: --max-length"
    else:
        upper, span = max(longest, 1), f"1-{max(longest, 1)}: the longest sequence"
    console.print(_summary_table(summary, ", ".join(files)))
    console.print(tokenizer_line, highlight=False, soft_wrap=True)
    console.print(_histogram_table(length_histogram(lengths, upper), span))
    return 0

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from align_data import (
    ByteTokenizer,
    Message,
    PreferenceRecord,
    PreprocessConfig,
    Source,
    TokenizeConfig,
    TokenizedDataset,
    preprocess,
)


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    """Writes rows: dicts/lists as JSON, str as a raw line, bytes as raw bytes (+ newline)."""
    with open(path, "wb") as f:
        for row in rows:
            if isinstance(row, bytes):
                f.write(row + b"\n")
            elif isinstance(row, str):
                f.write(row.encode() + b"\n")
            else:
                f.write(json.dumps(row).encode() + b"\n")
    return path


@pytest.fixture
def jsonl(tmp_path: Path):
    counter = iter(range(10_000))

    def make(rows: list[Any], name: str | None = None) -> Path:
        return write_jsonl(tmp_path / (name or f"data{next(counter)}.jsonl"), rows)

    return make


@pytest.fixture
def chat_pair():
    """Builds a preference record of one user turn and one assistant reply each, no rewards."""

    def make(user: str, chosen: str, rejected: str, source: Source) -> PreferenceRecord:
        return PreferenceRecord(
            (Message("user", user),),
            (Message("assistant", chosen),),
            (Message("assistant", rejected),),
            None,
            None,
            source,
        )

    return make


@pytest.fixture
def lenient_unpaired(tmp_path: Path):
    """Preprocesses an unpaired file leniently with the byte tokenizer and a skip report.

    The fixture is a function of the data file and the tokenize settings; it returns the
    dataset and the entries of the skip report. Every call shares one cache directory and first
    deletes the report of an earlier call, so a reused run has to write the report again.
    """

    def run(path: Path, tokenize: TokenizeConfig) -> tuple[TokenizedDataset, list[dict]]:
        report = tmp_path / "report.jsonl"
        report.unlink(missing_ok=True)
        cfg = PreprocessConfig(
            kind="unpaired",
            strict=False,
            progress=False,
            report_path=str(report),
            tokenize=tokenize,
        )
        ds = preprocess(path, ByteTokenizer(), tmp_path / "cache", cfg)
        return ds, [json.loads(x) for x in report.read_text().splitlines()]

    return run

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest


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

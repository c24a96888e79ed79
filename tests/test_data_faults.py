"""Odd data files end in one line and exit 2, from ``align data validate`` and ``align run``.

A lone surrogate, JSON nested 100k deep, a JSONL file named ``.parquet``, a Parquet file with a
broken row group, a FIFO, a directory and a missing file each give ``error: file[:line: field]:
reason`` and exit status 2, never a traceback or a hang. ``align run`` refuses the same lone
surrogate before training, prints how many examples the length limit dropped, and names the
drops when too few examples are left for one global batch.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from align_cli.main import app

PAIR = {"prompt": "loud: cat\n", "chosen": "CAT!", "rejected": "cat."}
SURROGATE = "not valid Unicode: lone surrogate \\ud800 at character 2"


def _lines(path: Path, rows: list[str]) -> Path:
    path.write_text("".join(row + "\n" for row in rows))
    return path


def _surrogate(tmp: Path) -> tuple[Path, str]:
    bad = '{"prompt": "a\\ud800b", "chosen": "x", "rejected": "y"}'
    path = _lines(tmp / "surrogate.jsonl", [json.dumps(PAIR), bad])
    return path, f"{path}:2: prompt: {SURROGATE} (a \\uD800-\\uDFFF escape without its pair)"


def _deep(tmp: Path) -> tuple[Path, str]:
    deep = '{"prompt": ' + "[" * 100_000 + "]" * 100_000 + ', "chosen": "x", "rejected": "y"}'
    path = _lines(tmp / "deep.jsonl", [json.dumps(PAIR), deep])
    return path, (
        f"{path}:2: <record>: invalid JSON: nested too deeply (more levels of lists and objects "
        "than the parser's recursion limit allows)"
    )


def _jsonl_named_parquet(tmp: Path) -> tuple[Path, str]:
    path = _lines(tmp / "pairs.parquet", [json.dumps(PAIR)])
    return path, (
        f"{path}: not a readable Parquet file (Parquet magic bytes not found in footer); "
        "it looks like JSON lines: name it .jsonl"
    )


def _broken_row_group(tmp: Path) -> tuple[Path, str]:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp / "broken.parquet"
    pq.write_table(pa.Table.from_pylist([PAIR] * 20), path, row_group_size=10)
    column = pq.ParquetFile(path).metadata.row_group(1).column(0)
    data = bytearray(path.read_bytes())
    start = column.data_page_offset
    for i in range(start + 5, start + column.total_compressed_size - 2):
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))
    return path, f"{path}:11: <record>: row group 1 (rows 11-20) cannot be read: "


def _fifo(tmp: Path) -> tuple[Path, str]:
    path = tmp / "pipe.jsonl"
    os.mkfifo(path)
    return path, f"{path}: not a regular file (a FIFO)"


def _directory(tmp: Path) -> tuple[Path, str]:
    path = tmp / "folder.jsonl"
    path.mkdir()
    return path, f"{path}: is a directory"


def _missing(tmp: Path) -> tuple[Path, str]:
    path = tmp / "missing.jsonl"
    return path, f"{path}: no such file"


CASES = [
    pytest.param(_surrogate, id="lone-surrogate"),
    pytest.param(_deep, id="deep-nesting"),
    pytest.param(_jsonl_named_parquet, id="jsonl-named-parquet"),
    pytest.param(_broken_row_group, id="broken-row-group"),
    pytest.param(_fifo, id="fifo"),
    pytest.param(_directory, id="directory"),
    pytest.param(_missing, id="missing"),
]


@pytest.mark.parametrize("make", CASES)
def test_validate_gives_one_line_and_exit_2(
    tmp_path: Path, make: Callable[[Path], tuple[Path, str]]
) -> None:
    path, expected = make(tmp_path)
    # catch_exceptions=False: anything but the one-line error would fail the test here.
    result = CliRunner().invoke(app, ["data", "validate", str(path)], catch_exceptions=False)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith(f"error: {expected}"), result.output
    assert "Traceback" not in result.output


def _assert_one_error(result, expected: str) -> None:
    """Exit 2; the error is stderr's one line; no traceback anywhere."""
    shown = result.stdout + result.stderr
    assert result.returncode == 2, shown
    assert [line for line in result.stderr.splitlines() if line.strip()] == [expected], shown
    assert "Traceback" not in shown and "[rank" not in shown, shown


def test_run_refuses_a_lone_surrogate_before_training(tmp_path: Path, align) -> None:
    path, expected = _surrogate(tmp_path)
    result = align(
        "run", "dpo", f"model.data.data_prefix={path}", "model.global_batch_size=1",
        f"exp_manager.explicit_log_dir={tmp_path / 'run'}", cwd=tmp_path, check=False,
    )  # fmt: skip
    _assert_one_error(result, f"error: {expected}")


def test_run_says_how_many_were_dropped_as_over_long(tmp_path: Path, align) -> None:
    long = {**PAIR, "chosen": "CAT!" * 40}
    path = _lines(tmp_path / "pairs.jsonl", [json.dumps(PAIR)] * 3 + [json.dumps(long)] * 3)
    result = align(
        "run", "dpo", f"model.data.data_prefix={path}", "model.data.over_long=drop",
        "model.encoder_seq_length=64", "model.global_batch_size=4",
        f"exp_manager.explicit_log_dir={tmp_path / 'run'}", cwd=tmp_path, check=False,
    )  # fmt: skip
    assert "training data: 3 dropped (over-long: 3)" in result.stdout, result.stdout
    _assert_one_error(
        result,
        "error: 3 training examples do not fill one global batch of 4 "
        "(model.global_batch_size): 3 of 6 were dropped as over-long for seq_length 64 "
        "(over-long: 3; model.data.over_long=drop); use model.global_batch_size ≤ 3",
    )

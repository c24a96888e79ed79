"""Odd data and odd paths end in one ``DataError`` naming file (line, field) and reason.

Paths that are not regular files (FIFO, directory, missing) are refused from their metadata
before anything opens them; broken Parquet names the file or the row group; text no tokenizer
can encode is refused at validation; truncation that would leave a prompt nothing but its BOS
drops the example (lenient) or refuses it (strict), and every truncation and drop is counted.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from align_data import (
    ByteTokenizer,
    DataError,
    PreferenceRecord,
    PreprocessConfig,
    PreprocessSummary,
    Source,
    TokenizeConfig,
    check_source_file,
    detect_file_format,
    fit_lengths,
    load_records,
    preprocess,
    tokenize_record,
    tokenize_records,
)
from align_data.preprocessing import file_sha256

TOK = ByteTokenizer()
PAIR = {"prompt": "p", "chosen": "c", "rejected": "r"}


def _finishes(fn: Callable[[], object], seconds: float = 20.0) -> BaseException | None:
    """Runs ``fn`` in a thread; fails the test if it blocks; returns what it raised."""
    raised: list[BaseException] = []

    def target() -> None:
        try:
            fn()
        except BaseException as exc:  # handed back to the test
            raised.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "blocked on the path"
    return raised[0] if raised else None


# ----------------------------------------------------------------------------- kinds of path


def _fifo(tmp_path: Path) -> Path:
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs on this platform")
    path = tmp_path / "pipe.jsonl"
    os.mkfifo(path)
    return path


def _directory(tmp_path: Path) -> Path:
    path = tmp_path / "dir.jsonl"
    path.mkdir()
    return path


PATHS = [
    pytest.param(_fifo, "not a regular file (a FIFO)", id="fifo"),
    pytest.param(_directory, "is a directory", id="directory"),
    pytest.param(lambda tmp: tmp / "missing.jsonl", "no such file", id="missing"),
]

READERS = [
    pytest.param(check_source_file, id="check_source_file"),
    pytest.param(file_sha256, id="file_sha256"),
    pytest.param(detect_file_format, id="detect_file_format"),
    pytest.param(lambda p: load_records(p, kind="preference"), id="load_records"),
    pytest.param(
        lambda p: load_records(p, kind="preference", strict=False), id="load_records-lenient"
    ),
]


@pytest.mark.parametrize(("make", "reason"), PATHS)
@pytest.mark.parametrize("read", READERS)
def test_a_path_that_is_not_a_regular_file_is_named(tmp_path, make, reason, read):
    path = make(tmp_path)
    error = _finishes(lambda: read(path))
    assert isinstance(error, DataError)
    assert str(error) == f"{path}: {reason}"
    assert (error.line, error.field) == (None, None)


@pytest.mark.parametrize(("make", "reason"), PATHS)
def test_preprocess_checks_every_path_before_reading_any(jsonl, tmp_path, make, reason):
    good = jsonl([PAIR] * 3)
    bad = make(tmp_path)
    cfg = PreprocessConfig(kind="preference", progress=False)
    error = _finishes(lambda: preprocess([good, bad], TOK, tmp_path / "cache", cfg))
    assert isinstance(error, DataError) and str(error) == f"{bad}: {reason}"
    assert not (tmp_path / "cache").exists()  # refused before any work


def test_an_unreadable_file_is_named(jsonl):
    if os.geteuid() == 0:
        pytest.skip("root reads any file")
    path = jsonl([PAIR])
    path.chmod(0)
    with pytest.raises(DataError, match=r"not readable \(permission denied\)$"):
        load_records(path)


# --------------------------------------------------------------------------------- Parquet


@pytest.fixture
def parquet_rows(tmp_path: Path) -> Path:
    """40 preference rows in 4 row groups of 10."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows = [{"prompt": f"p{i} " * 20, "chosen": "c" * 50, "rejected": "r" * 50} for i in range(40)]
    path = tmp_path / "pairs.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=10)
    return path


def test_jsonl_named_parquet_is_named_as_such(jsonl):
    pytest.importorskip("pyarrow")
    path = jsonl([PAIR], name="pairs.parquet")
    with pytest.raises(DataError) as err:
        load_records(path)
    assert str(err.value) == (
        f"{path}: not a readable Parquet file (Parquet magic bytes not found in footer); "
        "it looks like JSON lines: name it .jsonl"
    )


def test_truncated_parquet_is_named(parquet_rows):
    data = parquet_rows.read_bytes()
    parquet_rows.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError) as err:
        load_records(parquet_rows)
    assert str(err.value).startswith(f"{parquet_rows}: not a readable Parquet file (")
    assert "looks like JSON" not in str(err.value)


def test_corrupt_row_group_names_file_and_rows(parquet_rows):
    import pyarrow.parquet as pq

    column = pq.ParquetFile(parquet_rows).metadata.row_group(2).column(0)
    data = bytearray(parquet_rows.read_bytes())
    start = column.data_page_offset
    for i in range(start + 5, start + column.total_compressed_size - 2):
        data[i] ^= 0x5A
    parquet_rows.write_bytes(bytes(data))
    for strict in (True, False):  # a broken row group is the file's fault: raised either way
        with pytest.raises(DataError) as err:
            load_records(parquet_rows, kind="preference", strict=strict)
        assert str(err.value).startswith(
            f"{parquet_rows}:21: <record>: row group 2 (rows 21-30) cannot be read: "
        )


def test_parquet_string_that_is_not_utf8_names_row_and_column(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    prompts = pa.array([b"fine", b"p\xff"], pa.binary()).view(pa.string())
    table = pa.table({"prompt": prompts, "chosen": ["c", "c"], "rejected": ["r", "r"]})
    path = tmp_path / "bad.parquet"
    pq.write_table(table, path)
    with pytest.raises(DataError) as err:
        load_records(path, kind="preference")
    assert str(err.value) == f"{path}:2: prompt: not valid UTF-8 (byte 0xff at position 2)"
    lenient = load_records(path, kind="preference", strict=False)
    assert len(lenient.records) == 1 and lenient.skipped[0].error.line == 2


# ---------------------------------------------------------------------------- text and JSON


def test_lone_surrogate_is_refused_before_the_tokenizer(jsonl, tmp_path):
    path = jsonl([PAIR, {"prompt": "a\ud800b", "chosen": "c", "rejected": "r"}])
    cfg = PreprocessConfig(kind="preference", progress=False)
    with pytest.raises(DataError) as err:
        preprocess(path, TOK, tmp_path / "cache", cfg)
    assert str(err.value).startswith(f"{path}:2: prompt: not valid Unicode: lone surrogate")
    lenient = load_records(path, kind="preference", strict=False)
    assert [s.error.line for s in lenient.skipped] == [2]


def test_a_record_built_in_code_with_a_surrogate_is_a_data_error():
    record = PreferenceRecord("a\ud800", "c", "r", None, None, Source("made.jsonl", 7))
    with pytest.raises(DataError) as err:
        tokenize_record(record, TOK, TokenizeConfig())
    assert str(err.value).startswith("made.jsonl:7: <record>: cannot be encoded: ")
    str(err.value).encode("utf-8")  # printable: the surrogate is written as its escape


def test_error_text_with_a_surrogate_can_be_printed(jsonl):
    path = jsonl([PAIR, {"prompt": "p", "chosen": "c", "x\udfff": 1}])
    with pytest.raises(DataError) as err:
        load_records(path, kind="preference")
    assert str(err.value) == (
        f"{path}:2: rejected: missing key (record has keys: chosen, prompt, x\\udfff)"
    )
    bad_key = DataError("f.jsonl", 1, "k\ud800", "role \ud800 unknown")
    assert str(bad_key) == "f.jsonl:1: k\\ud800: role \\ud800 unknown"


def test_deep_nesting_is_one_error_and_lenient_skips_it(jsonl):
    deep = '{"prompt": ' + "[" * 100_000 + "]" * 100_000 + ', "chosen": "c", "rejected": "r"}'
    path = jsonl([PAIR, deep, PAIR])
    with pytest.raises(DataError, match=r":2: <record>: invalid JSON: nested too deeply"):
        load_records(path, kind="preference")
    lenient = load_records(path, kind="preference", strict=False)
    assert len(lenient.records) == 2 and [s.error.line for s in lenient.skipped] == [2]


# ------------------------------------------------------------------------------ truncation


def test_fit_lengths_drops_a_prompt_cut_to_its_bos():
    cfg = TokenizeConfig(max_length=8)
    fit = fit_lengths(5, [7], cfg, prompt_bos=True)
    assert fit.drop_kind == "empty_prompt"
    assert fit.drop_reason == (
        "prompt truncated to the BOS alone: the longest response has 7 tokens, max_length is 8"
    )
    # Without a BOS the one token kept is the prompt's own; with room for one more, kept.
    assert fit_lengths(5, [7], cfg).drop_kind is None
    assert fit_lengths(5, [6], cfg, prompt_bos=True).prompt_length == 2
    # A prompt that is only its BOS to begin with is not truncated, so not dropped.
    assert fit_lengths(1, [7], cfg, prompt_bos=True).drop_kind is None


LONG = {"prompt": "q", "completion": "a" * 30, "label": True}  # prompt = BOS + 1 byte
FITS = {"prompt": "question", "completion": "ok", "label": False}
CUT = {"prompt": "a long prompt here", "completion": "yes", "label": True}


def test_in_memory_tokenization_counts_the_dropped_prompt():
    records = load_records_from([FITS, LONG, CUT])
    result = tokenize_records(records, TOK, TokenizeConfig(max_length=12))
    s = result.stats
    assert (s.examples, s.dropped_empty_prompt, s.prompt_truncated) == (2, 1, 1)
    assert result.dropped[0][1].startswith("prompt truncated to the BOS alone")


def load_records_from(rows: list[dict]) -> list:
    """Unpaired records from dicts (no file)."""
    from align_data import parse_record

    return [parse_record(r, "unpaired", Source("mem.jsonl", i + 1)) for i, r in enumerate(rows)]


def test_strict_preprocess_refuses_a_prompt_cut_to_its_bos(jsonl, tmp_path):
    path = jsonl([FITS, LONG])
    cfg = PreprocessConfig(kind="unpaired", progress=False, tokenize=TokenizeConfig(max_length=12))
    with pytest.raises(DataError) as err:
        preprocess(path, TOK, tmp_path / "cache", cfg)
    assert str(err.value) == (
        f"{path}:2: prompt: prompt truncated to the BOS alone: the longest response has 31 "
        "tokens, max_length is 12; shorten the response or raise the sequence length "
        "(lenient mode drops such examples and counts them)"
    )


def test_lenient_preprocess_drops_counts_reports_and_says_so(jsonl, lenient_unpaired):
    path = jsonl([FITS, LONG, CUT, "not json"])
    ds, entries = lenient_unpaired(path, TokenizeConfig(max_length=12))
    s = ds.summary
    assert len(ds) == 2
    assert (s.dropped_empty_prompt, s.dropped, s.prompt_truncated, s.skipped_invalid) == (
        1,
        1,
        1,
        1,
    )
    assert all(len(ds[i].prompt_ids) > 1 for i in range(len(ds)))  # no BOS-only prompt trained
    assert [e["line"] for e in entries] == [2, 4]
    assert "dropped: prompt truncated to the BOS alone" in entries[0]["reason"]
    assert s.length_line("seq_length 11") == (
        "1 of 2 examples truncated to seq_length 11 (prompt cut: 1, response cut: 0); "
        "1 dropped (prompt cut to the BOS alone: 1); 1 invalid records skipped"
    )
    assert "prompt cut to the BOS alone: 1" in s.format()


def test_length_line_is_none_when_nothing_happened_and_old_summaries_load():
    assert PreprocessSummary(kind="sft", examples=3).length_line() is None
    old = PreprocessSummary(kind="sft", dropped_overlong=2).to_dict()
    del old["dropped_empty_prompt"]  # meta.json written before the count existed
    again = PreprocessSummary.from_dict(old)
    assert again.dropped == 2 and again.length_line() == "2 dropped (over-long: 2)"

"""Preprocessing: shards equal in-memory tokenization; reuse, workers, errors, report."""

from __future__ import annotations

import json

import numpy as np
import pytest

from align_data import (
    ByteTokenizer,
    DataError,
    PreprocessConfig,
    TokenizeConfig,
    TokenizedDataset,
    load_records,
    preprocess,
    tokenize_records,
)

TOK = ByteTokenizer()


def pref_rows(n: int) -> list[dict]:
    return [
        {"prompt": f"q{i}:" + "x" * (i % 5), "chosen": "yes" * (1 + i % 4), "rejected": f"n{i}"}
        for i in range(n)
    ]


def same(a, b) -> bool:
    return all(
        np.array_equal(getattr(a, f), getattr(b, f))
        for f in ("prompt_ids", "chosen_ids", "rejected_ids")
    )


def test_preprocess_matches_in_memory_tokenization(jsonl, tmp_path):
    path = jsonl(pref_rows(50))
    cfg = PreprocessConfig(kind="preference", progress=False)
    ds = preprocess(path, TOK, tmp_path / "cache", cfg)
    expected = tokenize_records(load_records(path, kind="preference").records, TOK, cfg.tokenize)
    assert len(ds) == 50
    for i in (0, 17, 49, -1):
        assert same(ds[i], expected.examples[i])
        assert ds[i].index == i % 50
    assert ds.source(17).line == 18
    lengths = ds.sequence_lengths()
    e = expected.examples[3]
    assert lengths[3].tolist() == [
        len(e.prompt_ids) + len(e.chosen_ids),
        len(e.prompt_ids) + len(e.rejected_ids),
    ]
    with pytest.raises(IndexError):
        ds[50]
    # A Sequence: slices, iteration and membership as for the list of examples.
    assert [x.index for x in ds[45:50:2]] == [45, 47, 49]
    assert all(same(x, y) for x, y in zip(ds[-3:], expected.examples[-3:], strict=True))
    assert sum(1 for _ in ds) == 50 and ds[1:1] == []


def test_second_run_reuses_and_changes_invalidate(jsonl, tmp_path, capsys):
    path = jsonl(pref_rows(20))
    cache = tmp_path / "cache"
    cfg = PreprocessConfig(kind="preference", progress=False)
    first = preprocess(path, TOK, cache, cfg)
    assert not first.reused
    second = preprocess(path, TOK, cache, cfg)
    assert second.reused and second.directory == first.directory
    # Worker count and chunking do not change the output, hence not the fingerprint.
    parallel = preprocess(
        path,
        TOK,
        cache,
        PreprocessConfig(kind="preference", progress=False, num_workers=2, chunk_bytes=100),
    )
    assert parallel.reused
    # Other settings, another tokenization of the same file, or new content: a new dataset.
    other = preprocess(
        path,
        TOK,
        cache,
        PreprocessConfig(kind="preference", progress=False, tokenize=TokenizeConfig(max_length=64)),
    )
    assert not other.reused and other.directory != first.directory
    path.write_text(path.read_text() + json.dumps(pref_rows(21)[-1]) + "\n")
    grown = preprocess(path, TOK, cache, cfg)
    assert not grown.reused and len(grown) == 21
    assert sorted(p.name for p in cache.iterdir() if p.name.startswith(".tmp")) == []


def test_parallel_workers_give_identical_datasets(jsonl, tmp_path):
    path = jsonl(pref_rows(300))
    one = preprocess(path, TOK, tmp_path / "a", PreprocessConfig(kind="preference", progress=False))
    two = preprocess(
        path,
        TOK,
        tmp_path / "b",
        PreprocessConfig(kind="preference", progress=False, num_workers=2, chunk_bytes=1500),
    )
    assert len(two._shard_names) > 3
    assert len(one) == len(two) == 300
    assert all(same(one[i], two[i]) for i in range(300))
    assert [two.source(i).line for i in (0, 150, 299)] == [1, 151, 300]
    assert one.summary.tokens == two.summary.tokens


def test_strict_error_from_a_worker_is_the_first_bad_line(jsonl, tmp_path):
    rows = pref_rows(200)
    rows[120] = {"prompt": "p", "chosen": "c"}
    rows[160] = "{broken"
    path = jsonl(rows)
    cfg = PreprocessConfig(kind="preference", progress=False, num_workers=2, chunk_bytes=800)
    with pytest.raises(DataError) as err:
        preprocess(path, TOK, tmp_path / "cache", cfg)
    assert str(err.value).startswith(f"{path}:121: rejected: missing key")
    # Nothing half-written is left behind.
    assert list((tmp_path / "cache").iterdir()) == []


def test_lenient_summary_counts_and_report(jsonl, lenient_unpaired):
    rows = [
        {"prompt": "p", "completion": "ok", "label": True},  # 2 + 3 = 5 tokens
        {"prompt": "p", "completion": "", "label": True},  # invalid: empty text
        "nope",  # invalid JSON
        {"prompt": "a long prompt", "completion": "x", "label": False},  # 14 + 2: prompt cut
        {"prompt": "p", "completion": "far too long", "label": False},  # 2 + 13: response cut
    ]
    path = jsonl(rows)
    tokenize = TokenizeConfig(max_length=8, min_prompt_length=2)
    ds, entries = lenient_unpaired(path, tokenize)
    s = ds.summary
    assert (s.rows, s.records, s.examples, s.skipped_invalid) == (5, 3, 3, 2)
    assert (s.truncated, s.prompt_truncated, s.response_truncated) == (2, 1, 1)
    assert (s.dropped_overlong, s.dropped_empty_response) == (0, 0)
    # Sequence lengths 5, 8, 8; labels 3 + 2 + 6.
    assert (s.sequences, s.tokens, s.label_tokens) == (3, 21, 11)
    assert sum(c for _, _, c in s.length_histogram) == 3
    assert [(lo, hi, c) for lo, hi, c in s.length_histogram if c] == [(5, 5, 1), (8, 8, 2)]
    assert [(e["line"], e["field"]) for e in entries] == [(2, "completion"), (3, "<record>")]
    assert "kind: unpaired" in s.format() and "skipped (invalid): 2" in s.format()

    # A reused run restores the report as well (the fixture deletes it before each run).
    again, again_entries = lenient_unpaired(path, tokenize)
    assert again.reused and len(again_entries) == 2


def test_drop_policy_counts_and_reports_dropped(jsonl, tmp_path):
    path = jsonl(
        [
            {"prompt": "p", "completion": "ok"},
            {"prompt": "p", "completion": "much too long"},
        ]
    )
    report = tmp_path / "r.jsonl"
    cfg = PreprocessConfig(
        kind="sft",
        progress=False,
        report_path=str(report),
        tokenize=TokenizeConfig(max_length=6, overlong="drop"),
    )
    ds = preprocess(path, TOK, tmp_path / "cache", cfg)
    assert len(ds) == 1 and ds.summary.dropped_overlong == 1
    (entry,) = [json.loads(x) for x in report.read_text().splitlines()]
    assert entry["line"] == 2
    assert entry["reason"].endswith("dropped: over-long: 16 tokens > max_length 6")


def test_strictness_is_part_of_the_fingerprint(jsonl, tmp_path):
    path = jsonl([{"prompt": "p", "completion": "c"}, "bad"])
    lenient = PreprocessConfig(kind="sft", strict=False, progress=False)
    preprocess(path, TOK, tmp_path / "cache", lenient)
    with pytest.raises(DataError):
        preprocess(path, TOK, tmp_path / "cache", PreprocessConfig(kind="sft", progress=False))


def test_parquet_source_and_sft_kinds(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "sft.parquet"
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"u{i}"},
                {"role": "assistant", "content": f"a{i}"},
            ]
        }
        for i in range(30)
    ]
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=7)
    ds = preprocess(
        path,
        TOK,
        tmp_path / "c",
        PreprocessConfig(kind="sft", progress=False, num_workers=2, chunk_rows=10),
    )
    assert len(ds) == 30 and ds.kind == "sft"
    assert TOK.decode(ds[12].completion_ids) == "a12\n"
    assert ds.source(12).line == 13
    assert ds.sequence_lengths().shape == (30,)


def test_progress_and_summary_go_to_stderr(jsonl, tmp_path, capsys):
    path = jsonl(pref_rows(5))
    preprocess(path, TOK, tmp_path / "c", PreprocessConfig(kind="preference"))
    err = capsys.readouterr().err
    assert "preprocess: 100.0% (5/5 rows)" in err
    assert "examples kept: 5" in err


def test_dataset_pickles_and_reopens(jsonl, tmp_path):
    import pickle

    path = jsonl(pref_rows(10))
    ds = preprocess(path, TOK, tmp_path / "c", PreprocessConfig(kind="preference", progress=False))
    ds[3]
    clone = pickle.loads(pickle.dumps(ds))
    assert same(clone[3], ds[3])
    assert same(TokenizedDataset(ds.directory)[9], ds[9])

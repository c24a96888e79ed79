"""Teacher top-k shards (round trip, resume after a crash, merging, NeMo import) and ArrayStore."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from align_data import (
    ArrayStore,
    DataError,
    TeacherTopKReader,
    TeacherTopKWriter,
    import_nemo_topk_jsonl,
)


def sample(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    full = torch.randn(n, 50, generator=g) * 3
    logits, ids = full.topk(k, dim=-1)
    return logits, ids, full.logsumexp(-1)


@pytest.mark.parametrize(
    ("dtype", "torch_dtype"),
    [("fp32", torch.float32), ("fp16", torch.float16), ("bf16", torch.bfloat16)],
)
def test_round_trip(tmp_path, dtype, torch_dtype):
    data = [sample(n, 4, seed) for seed, n in enumerate([5, 1, 9, 3])]
    with TeacherTopKWriter(
        tmp_path / "t", top_k=4, dtype=dtype, vocab_size=50, shard_positions=8
    ) as w:
        for i, (lg, ix, lse) in enumerate(data):
            w.append(i, lg, ix, lse)
    reader = TeacherTopKReader(tmp_path / "t")
    assert len(reader) == 4 and (reader.top_k, reader.dtype) == (4, dtype)
    assert len(list((tmp_path / "t").glob("shard-*.ids"))) >= 2  # shard_positions=8 forced a split
    for i in (2, 0, 3, 1):
        lg, ix, lse = data[i]
        got = reader[i]
        assert got.logits.dtype == torch_dtype and got.ids.dtype == torch.int32
        assert torch.equal(got.logits, lg.to(torch_dtype))
        assert torch.equal(got.ids, ix.to(torch.int32))
        assert torch.equal(got.logsumexp, lse)
        assert got.input_ids is None and got.num_positions == len(lg)


def test_sorting(tmp_path):
    with TeacherTopKWriter(tmp_path, top_k=3, dtype="fp32") as w:
        w.append(0, np.array([[1.0, 3.0, 2.0]]), np.array([[10, 30, 20]]), np.array([4.0]))
    got = TeacherTopKReader(tmp_path)[0]
    assert got.logits.tolist() == [[3.0, 2.0, 1.0]]
    assert got.ids.tolist() == [[30, 20, 10]]


@pytest.mark.parametrize(
    ("vocab_size", "ids", "ids_dtype", "id_bytes"),
    [
        # 65,536 ids are 0..65,535: every one fits in 16 bits.
        (65_536, [[0, 65_535, 1], [65_535, 0, 7]], "uint16", 2),
        # One more and 65,536 itself must be stored: 32 bits.
        (65_537, [[0, 65_535, 65_536], [65_536, 0, 65_535]], "int32", 4),
        # Unknown vocabulary: 32 bits.
        (None, [[0, 65_535, 65_536], [70_000, 0, 1]], "int32", 4),
    ],
)
def test_id_width_follows_the_vocabulary(tmp_path, vocab_size, ids, ids_dtype, id_bytes):
    logits = np.array([[3.0, 2.0, 1.0], [0.5, 0.0, -0.5]])  # already descending: order kept
    with TeacherTopKWriter(
        tmp_path, top_k=3, dtype="bf16", vocab_size=vocab_size, with_input_ids=True
    ) as w:
        w.append(0, logits, np.array(ids), np.array([4.0, 2.0]), input_ids=np.array([5, 6]))
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert (meta["version"], meta["ids_dtype"]) == (2, ids_dtype)
    # Hand count for 2 positions, K=3: logits 2·3·2 (bf16), ids 2·3·id_bytes, log-sum-exp 2·4,
    # input ids 2·4, one index entry 3·8.
    sizes = {p.suffix: p.stat().st_size for p in tmp_path.glob("shard-00000.*")}
    assert sizes == {".logits": 12, ".ids": 6 * id_bytes, ".lse": 8, ".tokens": 8}
    assert (tmp_path / "index.bin").stat().st_size == 24
    raw = np.fromfile(tmp_path / "shard-00000.ids", dtype=f"<{'u2' if id_bytes == 2 else 'i4'}")
    assert raw.tolist() == [i for row in ids for i in row]
    got = TeacherTopKReader(tmp_path)[0]
    assert got.ids.dtype == torch.int32  # callers see int32 whatever the width on disk
    assert got.ids.tolist() == ids
    assert got.logits.float().tolist() == logits.tolist()


def test_uint16_store_rejects_ids_beyond_the_vocabulary(tmp_path):
    w = TeacherTopKWriter(tmp_path, top_k=2, dtype="fp32", vocab_size=65_536)
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 65536\)"):
        w.append(0, np.array([[2.0, 1.0]]), np.array([[65_536, 0]]), np.array([3.0]))
    w.close()


def write_version1_store(directory, data) -> None:
    """A store as version 1 wrote it: no ``ids_dtype`` in meta.json, int32 ids."""
    directory.mkdir()
    meta = {
        "version": 1,
        "top_k": 3,
        "dtype": "fp32",
        "start_index": 0,
        "vocab_size": 100,
        "with_input_ids": False,
        "shard_positions": 1 << 24,
    }
    (directory / "meta.json").write_text(json.dumps(meta))
    first, index = 0, []
    for logits, ids, lse in data:
        with open(directory / "shard-00000.logits", "ab") as f:
            f.write(np.asarray(logits, np.float32).tobytes())
        with open(directory / "shard-00000.ids", "ab") as f:
            f.write(np.asarray(ids, np.int32).tobytes())
        with open(directory / "shard-00000.lse", "ab") as f:
            f.write(np.asarray(lse, np.float32).tobytes())
        index += [0, first, len(lse)]
        first += len(lse)
    np.asarray(index, np.int64).tofile(directory / "index.bin")


def test_version1_store_stays_readable_and_resumable(tmp_path):
    data = [
        ([[3.0, 2.0, 1.0]], [[99, 0, 50]], [4.0]),
        ([[1.0, 0.0, -1.0], [2.0, 1.5, 1.0]], [[1, 2, 3], [98, 97, 96]], [2.0, 3.0]),
    ]
    write_version1_store(tmp_path / "old", data[:1])
    reader = TeacherTopKReader(tmp_path / "old")
    assert reader[0].ids.dtype == torch.int32 and reader[0].ids.tolist() == [[99, 0, 50]]
    # Resuming appends int32 ids (the store's own width), although 100 ids would fit 16 bits.
    with TeacherTopKWriter(tmp_path / "old", top_k=3, dtype="fp32", vocab_size=100) as w:
        assert w.next_index == 1 and w.ids_dtype == "int32"
        w.append(1, *(np.asarray(x) for x in data[1]))
    assert (tmp_path / "old" / "shard-00000.ids").stat().st_size == 3 * 3 * 4
    assert json.loads((tmp_path / "old" / "meta.json").read_text())["version"] == 1
    reader = TeacherTopKReader(tmp_path / "old")
    assert [reader[i].ids.tolist() for i in range(2)] == [data[0][1], data[1][1]]
    # A version 2 store (16-bit ids) merges with it; ids come back as int32 from both.
    with TeacherTopKWriter(
        tmp_path / "new", top_k=3, dtype="fp32", vocab_size=100, start_index=2
    ) as w:
        w.append(2, np.array([[5.0, 4.0, 3.0]]), np.array([[7, 8, 9]]), np.array([6.0]))
    merged = TeacherTopKReader([tmp_path / "old", tmp_path / "new"])
    assert [merged[i].ids.dtype for i in range(3)] == [torch.int32] * 3
    assert merged[2].ids.tolist() == [[7, 8, 9]]


def test_unknown_ids_dtype_is_refused(tmp_path):
    with TeacherTopKWriter(tmp_path, top_k=1, dtype="fp32", vocab_size=10) as w:
        w.append(0, np.array([[1.0]]), np.array([[3]]), np.array([2.0]))
    meta = json.loads((tmp_path / "meta.json").read_text())
    (tmp_path / "meta.json").write_text(json.dumps({**meta, "ids_dtype": "int8"}))
    with pytest.raises(ValueError, match=r"meta.json: ids_dtype must be one of .* got 'int8'"):
        TeacherTopKReader(tmp_path)


def test_writer_rejects_duplicates_gaps_and_bad_values(tmp_path):
    w = TeacherTopKWriter(tmp_path, top_k=2, dtype="fp32", vocab_size=10)
    lg, ix, lse = np.array([[2.0, 1.0]]), np.array([[1, 2]]), np.array([3.0])
    w.append(0, lg, ix, lse)
    with pytest.raises(
        ValueError, match="sample 0 is already stored; the next sample to write is 1"
    ):
        w.append(0, lg, ix, lse)
    with pytest.raises(ValueError, match="sample 2 would leave a gap"):
        w.append(2, lg, ix, lse)
    with pytest.raises(ValueError, match=r"must be \[L, 2\]"):
        w.append(1, np.zeros((1, 3)), np.zeros((1, 3)), lse)
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 10\)"):
        w.append(1, lg, np.array([[1, 10]]), lse)
    with pytest.raises(ValueError, match="finite"):
        w.append(1, np.array([[np.nan, 1.0]]), ix, lse)
    with pytest.raises(ValueError, match="below the largest"):
        w.append(1, lg, ix, np.array([0.5]))
    with pytest.raises(ValueError, match="does not keep input_ids"):
        w.append(1, lg, ix, lse, input_ids=np.array([4]))
    assert w.next_index == 1
    w.close()
    with pytest.raises(ValueError, match="other parameters"):
        TeacherTopKWriter(tmp_path, top_k=3, dtype="fp32", vocab_size=10)


def test_resume_after_an_interrupted_write(tmp_path):
    data = [sample(4, 3, seed) for seed in range(6)]
    w = TeacherTopKWriter(tmp_path, top_k=3, dtype="bf16", shard_positions=10)
    for i in range(4):
        w.append(i, *data[i])
    w.close()
    # A crash after writing part of sample 4's data but before its index entry commits it,
    # plus a torn index entry.
    shard = sorted(tmp_path.glob("shard-*.logits"))[-1].name[:11]
    with open(tmp_path / f"{shard}.logits", "ab") as f:
        f.write(b"\x01" * 10)
    with open(tmp_path / f"{shard}.ids", "ab") as f:
        f.write(b"\x02" * 24)
    with open(tmp_path / "index.bin", "ab") as f:
        f.write(b"\x03" * 5)
    resumed = TeacherTopKWriter(tmp_path, top_k=3, dtype="bf16", shard_positions=10)
    assert resumed.next_index == 4
    for i in range(resumed.next_index, 6):
        resumed.append(i, *data[i])
    resumed.close()
    reader = TeacherTopKReader(tmp_path)
    assert len(reader) == 6
    for i in range(6):
        assert torch.equal(reader[i].logits, data[i][0].to(torch.bfloat16))
        assert torch.equal(reader[i].ids, data[i][1].to(torch.int32))
    # A rerun that starts over is refused instead of duplicating samples.
    again = TeacherTopKWriter(tmp_path, top_k=3, dtype="bf16", shard_positions=10)
    with pytest.raises(ValueError, match="already stored"):
        again.append(0, *data[0])
    again.close()


def test_reader_merges_ranges_and_reports_missing(tmp_path):
    for start, stop in ((0, 3), (3, 5)):
        with TeacherTopKWriter(
            tmp_path / f"r{start}", top_k=2, dtype="fp16", start_index=start, with_input_ids=True
        ) as w:
            for i in range(start, stop):
                lg, ix, lse = sample(2, 2, i)
                w.append(i, lg, ix, lse, input_ids=torch.tensor([i, i + 1]))
    reader = TeacherTopKReader([tmp_path / "r3", tmp_path / "r0"])
    assert len(reader) == 5 and reader.indices() == [range(0, 3), range(3, 5)]
    assert reader[4].input_ids.tolist() == [4, 5]
    assert 4 in reader and 5 not in reader
    with pytest.raises(
        IndexError, match=r"sample 7 is not in the teacher stores \(they hold \[0, 3\), \[3, 5\)\)"
    ):
        reader[7]
    import pickle

    assert pickle.loads(pickle.dumps(reader))[1].input_ids.tolist() == [1, 2]
    with pytest.raises(ValueError, match="overlap"):
        TeacherTopKReader([tmp_path / "r0", tmp_path / "r0"])


def nemo_line(index: int, real: int, pad: int, k: int, seed: int) -> tuple[dict, tuple]:
    logits, ids, lse = sample(real, k, seed)
    shift = logits[:, :1]
    s = real + pad
    line = {
        "tokens": list(range(100 + index, 100 + index + real)) + [0] * pad,
        "labels": [0] * s,
        "loss_mask": [0] * (real - 2) + [1, 1] + [0] * pad,
        "context_lengths": 2,
        "topk_logits": (logits - shift).tolist() + [[0.0] * k] * pad,
        "topk_token_ids": ids.tolist() + [[0] * k] * pad,
        "log_sum_exp_logits": (lse - shift[:, 0]).tolist() + [0.0] * pad,
        "index": index,
    }
    return line, (logits - shift, ids, lse - shift[:, 0])


def test_import_nemo_kd_jsonl(tmp_path):
    lines = {i: nemo_line(i, real=3 + i, pad=4 - i, k=3, seed=i) for i in range(4)}
    a, b = tmp_path / "chunk_0.jsonl", tmp_path / "chunk_1.jsonl"
    # Out of order and across two files, as DP-gathered chunk runs write them.
    a.write_text("\n".join(json.dumps(lines[i][0]) for i in (2, 0)) + "\n")
    b.write_text("\n".join(json.dumps(lines[i][0]) for i in (3, 1)) + "\n")
    reader = import_nemo_topk_jsonl([a, b], tmp_path / "store", dtype="fp32")
    assert len(reader) == 4
    for i in range(4):
        logits, ids, lse = lines[i][1]
        got = reader[i]
        assert got.num_positions == 3 + i  # padding positions cut off
        assert torch.allclose(got.logits, logits)
        assert torch.equal(got.ids, ids.to(torch.int32))
        assert torch.allclose(got.logsumexp, lse)
        assert got.input_ids.tolist() == list(range(100 + i, 103 + 2 * i))
        # Probabilities are unchanged by NeMo's max shift.
        top_mass = (got.logits - got.logsumexp[:, None]).exp().sum(-1)
        assert torch.allclose(top_mass, (logits - lse[:, None]).exp().sum(-1))
        assert (top_mass <= 1.0 + 1e-6).all()
    # Rerunning resumes (nothing to add) instead of duplicating.
    assert len(import_nemo_topk_jsonl([a, b], tmp_path / "store", dtype="fp32")) == 4
    # With the vocabulary size (not in the JSONL) ids are checked and stored in 16 bits.
    narrow = import_nemo_topk_jsonl([a, b], tmp_path / "store16", dtype="fp32", vocab_size=50)
    assert json.loads((tmp_path / "store16" / "meta.json").read_text())["ids_dtype"] == "uint16"
    assert (tmp_path / "store16" / "shard-00000.ids").stat().st_size == (3 + 4 + 5 + 6) * 3 * 2
    for i in range(4):
        assert torch.equal(narrow[i].ids, reader[i].ids)
    with pytest.raises(DataError, match=r"ids must lie in \[0, 10\)"):
        import_nemo_topk_jsonl([a, b], tmp_path / "store10", dtype="fp32", vocab_size=10)


def test_import_nemo_errors_name_file_line_field(tmp_path):
    path = tmp_path / "kd.jsonl"
    line0 = nemo_line(0, 3, 1, 2, 0)[0]
    path.write_text(json.dumps(line0) + "\n" + json.dumps({**line0, "index": 0}) + "\n")
    with pytest.raises(DataError) as err:
        import_nemo_topk_jsonl(path, tmp_path / "s1")
    assert str(err.value) == f"{path}:2: index: duplicate 0 (also {path}:1)"
    path.write_text(json.dumps(line0) + "\n" + json.dumps({**line0, "index": 3}) + "\n")
    with pytest.raises(DataError) as err:
        import_nemo_topk_jsonl(path, tmp_path / "s2")
    assert str(err.value) == f"{path}:2: index: indices 1..2 are missing"
    bad = {**line0, "topk_token_ids": [[1]] * 4}
    path.write_text(json.dumps(bad) + "\n")
    with pytest.raises(DataError) as err:
        import_nemo_topk_jsonl(path, tmp_path / "s3")
    assert str(err.value).startswith(f"{path}:1: topk_token_ids: shape [4, 1] differs")


def test_array_store(tmp_path):
    key = {"model": "abc", "data": "def"}
    store = ArrayStore.open(tmp_path, key=key, num_samples=6, shape=(2,), dtype="float64")
    assert store.num_filled == 0 and store.missing().tolist() == list(range(6))
    store.write([4, 1], torch.tensor([[1.5, -2.0], [3.0, 4.0]]))
    store.flush()
    assert store.read(torch.tensor([1, 4])).tolist() == [[3.0, 4.0], [1.5, -2.0]]
    with pytest.raises(KeyError, match="rows never written: 0, 5"):
        store.read([0, 1, 5])
    # A second open (another run) finds the rows; the same key maps to the same directory.
    again = ArrayStore.open(tmp_path, key=key, num_samples=6, shape=(2,), dtype="float64")
    assert again.directory == store.directory
    assert again.missing().tolist() == [0, 2, 3, 5]
    again.write(np.arange(6), np.zeros((6, 2)))
    assert again.complete
    # Another key (e.g. another model) never sees these values.
    other = ArrayStore.open(
        tmp_path, key={**key, "model": "xyz"}, num_samples=6, shape=(2,), dtype="float64"
    )
    assert other.directory != store.directory and other.num_filled == 0
    with pytest.raises(ValueError, match=r"values must have shape \[1, 2\]"):
        other.write([0], np.zeros(2))
    with pytest.raises(IndexError):
        other.write([6], np.zeros((1, 2)))

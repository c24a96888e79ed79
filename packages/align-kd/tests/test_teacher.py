"""The teacher pass: stored top-k against a plain forward, resume, plan and store checks."""

from __future__ import annotations

import filecmp
from pathlib import Path

import pytest
import torch
from _kd_helpers import TEACHER_CFG, TOKENIZER, VOCAB, build, full_logits, synthetic_examples

from align_data import CollateConfig, TeacherTopKWriter, collate_sft
from align_kd import TeacherPassConfig, open_teacher_store, run_teacher_pass, teacher_vocab_size

K = 6


@pytest.fixture(scope="module")
def setup(dist_ctx, tmp_path_factory):
    examples, _ = synthetic_examples(tmp_path_factory.mktemp("data"), num_train=11)
    return build(TEACHER_CFG, seed=3), examples


def _pass(model, examples, out: Path, **kw):
    cfg = TeacherPassConfig(output_dir=str(out), top_k=K, dtype="fp32", micro_batch_size=4)
    return run_teacher_pass(
        model, examples, cfg, vocab_size=VOCAB, pad_id=TOKENIZER.pad_id, progress=kw.get("progress")
    )


def test_stored_topk_equals_plain_forward(setup, tmp_path):
    model, examples = setup
    result = _pass(model, examples, tmp_path / "t")
    assert result.samples_computed == len(examples) == result.num_examples
    reader = open_teacher_store(tmp_path / "t", examples=examples)
    assert teacher_vocab_size(tmp_path / "t") == VOCAB
    batch = collate_sft(examples, CollateConfig(pad_id=TOKENIZER.pad_id))
    with torch.no_grad():
        logits = full_logits(model, batch.input_ids)
    for i, n in enumerate(batch.lengths.tolist()):
        sample = reader[i]
        top = torch.topk(logits[i, :n], K, dim=-1)
        assert torch.equal(sample.ids.long(), top.indices)
        shift = top.values[:, :1]
        torch.testing.assert_close(sample.logits.double(), top.values - shift, atol=2e-5, rtol=0)
        lse = torch.logsumexp(logits[i, :n], -1) - shift[:, 0]
        torch.testing.assert_close(sample.logsumexp.double(), lse, atol=2e-5, rtol=0)
        assert torch.equal(sample.input_ids.long(), batch.input_ids[i, :n])
    assert result.positions_computed == int(batch.lengths.sum())


def test_interrupted_pass_resumes_to_identical_shards(setup, tmp_path, monkeypatch):
    model, examples = setup
    _pass(model, examples, tmp_path / "whole")

    append = TeacherTopKWriter.append
    calls = {"n": 0}

    def crash_after_six(self, *args, **kwargs):
        if calls["n"] == 6:  # mid-way through the second micro-batch of four
            raise KeyboardInterrupt
        calls["n"] += 1
        return append(self, *args, **kwargs)

    monkeypatch.setattr(TeacherTopKWriter, "append", crash_after_six)
    with pytest.raises(KeyboardInterrupt):
        _pass(model, examples, tmp_path / "resumed")
    monkeypatch.setattr(TeacherTopKWriter, "append", append)
    part = tmp_path / "resumed" / "part-00000"
    with open(part / "shard-00000.logits", "ab") as f:  # a torn write after the last commit
        f.write(b"\x01" * 10)
    with open(part / "index.bin", "ab") as f:
        f.write(b"\x02" * 5)

    seen = []
    result = _pass(model, examples, tmp_path / "resumed", progress=lambda s, p: seen.append(s))
    assert result.samples_computed == sum(seen) == len(examples) - 6
    match, mismatch, errors = filecmp.cmpfiles(
        tmp_path / "whole" / "part-00000",
        part,
        sorted(p.name for p in part.iterdir()),
        shallow=False,
    )
    assert not mismatch and not errors and len(match) == 6  # meta, index, 4 shard files
    assert filecmp.cmp(tmp_path / "whole" / "plan.json", tmp_path / "resumed" / "plan.json")

    again = _pass(model, examples, tmp_path / "resumed")
    assert again.samples_computed == 0


def test_other_data_or_settings_are_refused(setup, tmp_path):
    model, examples = setup
    _pass(model, examples[:5], tmp_path / "t")
    with pytest.raises(ValueError, match="other settings or data"):
        _pass(model, examples[:6], tmp_path / "t")
    with pytest.raises(ValueError, match="other examples"):
        open_teacher_store(tmp_path / "t", examples=examples[1:6])
    cfg = TeacherPassConfig(output_dir=str(tmp_path / "t"), top_k=K + 1, dtype="fp32")
    with pytest.raises(ValueError, match="top_k"):
        run_teacher_pass(model, examples[:5], cfg, vocab_size=VOCAB, pad_id=TOKENIZER.pad_id)


def test_incomplete_pass_is_reported(setup, tmp_path, monkeypatch):
    model, examples = setup

    def stop(samples, positions):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _pass(model, examples, tmp_path / "t", progress=stop)
    with pytest.raises(ValueError, match=r"incomplete \(4 of 11"):
        open_teacher_store(tmp_path / "t")

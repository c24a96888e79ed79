"""Online == offline distillation, different vocabularies, and NeMo-Aligner KD JSONL reuse."""

from __future__ import annotations

import json

import pytest
import torch
from _kd_helpers import (
    STUDENT_CFG,
    TEACHER_CFG,
    TOKENIZER,
    VOCAB,
    build,
    dense_kd,
    full_logits,
    nemo_kd_lines,
    synthetic_examples,
)

from align_core.schedule import forward_backward
from align_data import CollateConfig
from align_kd import (
    HostWeights,
    KDStep,
    KnowledgeDistillationConfig,
    OnlineTeacher,
    TeacherExamples,
    TeacherPassConfig,
    check_vocabularies,
    import_nemo_kd_jsonl,
    logits_forward,
    open_teacher_store,
    run_teacher_pass,
    teacher_vocab_size,
)

K = 8
COLLATE = CollateConfig(pad_id=TOKENIZER.pad_id)


@pytest.fixture(scope="module")
def setup(dist_ctx, tmp_path_factory):
    examples, _ = synthetic_examples(tmp_path_factory.mktemp("data"), num_train=6)
    teacher = build(TEACHER_CFG, seed=3)
    student = build(STUDENT_CFG, seed=5)
    out = tmp_path_factory.mktemp("store")
    cfg = TeacherPassConfig(output_dir=str(out), top_k=K, dtype="fp32", micro_batch_size=3)
    run_teacher_pass(teacher, examples, cfg, vocab_size=VOCAB, pad_id=TOKENIZER.pad_id)
    return teacher, student, examples, open_teacher_store(out, examples=examples)


def _step(student, step, micro_batches):
    student.zero_grad()
    normalizer = step.normalizer(micro_batches, global_examples=6)
    outputs = forward_backward(student, micro_batches, logits_forward, step.loss_fn(normalizer))
    sums = {k: float(sum(o[k] for o in outputs)) for k in outputs[0]}
    grads = {n: p.grad.clone() for n, p in student.named_parameters()}
    return step.finalize_metrics(sums), grads


@pytest.mark.parametrize(
    "cfg",
    [
        KnowledgeDistillationConfig(tail=True, sft_loss_weight=0.5, top_k=5),
        KnowledgeDistillationConfig(kd_loss="bwd_kl", logits_scale=0.8, target_logits_scale=1.3),
    ],
    ids=["fwd-tail-sft", "bwd-scaled"],
)
def test_online_equals_offline(setup, cfg):
    teacher, student, examples, reader = setup
    step = KDStep(cfg, vocab_size=VOCAB)
    paired = TeacherExamples(examples, reader)
    offline = [step.build_micro_batch(paired[i : i + 3], COLLATE) for i in (0, 3)]
    online = OnlineTeacher(teacher, top_k=K, vocab_size=VOCAB, group=None).annotate(
        [step.build_micro_batch(examples[i : i + 3], COLLATE) for i in (0, 3)]
    )
    m_off, g_off = _step(student, step, offline)
    m_on, g_on = _step(student, step, online)
    assert m_off.keys() == m_on.keys() == {"loss", "kd_loss", "sft_loss", "top1_agreement"}
    for key in m_off:
        assert m_on[key] == pytest.approx(m_off[key], rel=1e-5, abs=1e-7), key
    assert m_off["kd_loss"] > 0.01
    for name in g_off:
        torch.testing.assert_close(g_on[name], g_off[name], rtol=1e-4, atol=1e-6, msg=name)
    assert not any(p.requires_grad for p in teacher.parameters())


def test_host_placed_teacher_scores_identically_and_frees_its_weights(setup):
    _, _, examples, _ = setup
    step = KDStep(KnowledgeDistillationConfig(), vocab_size=VOCAB)
    batches = [step.build_micro_batch(examples[i : i + 3], COLLATE) for i in (0, 3)]
    resident = OnlineTeacher(build(TEACHER_CFG, seed=3), top_k=K, vocab_size=VOCAB, group=None)
    model = build(TEACHER_CFG, seed=3)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    held_in_forward = []
    model.register_forward_pre_hook(
        lambda module, args: held_in_forward.append(
            sum(p.untyped_storage().nbytes() for p in module.parameters())
        )
    )
    hosted = OnlineTeacher(model, top_k=K, vocab_size=VOCAB, group=None, on_host=True)
    assert hosted.host_weights is not None and hosted.host_weights.host_bytes == weight_bytes
    for _ in range(2):  # the second pass proves the weights survive a release
        assert all(p.untyped_storage().nbytes() == 0 for p in model.parameters())
        got = hosted.annotate(batches)
        want = resident.annotate(batches)
        for g, w in zip(got, want, strict=True):
            for key in ("teacher_logits", "teacher_ids", "teacher_logsumexp"):
                assert torch.equal(g[key], w[key]), key
    assert held_in_forward == [weight_bytes] * 4  # two micro-batches per pass, weights present
    assert hosted.host_weights.device_bytes == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (device memory to free)")
def test_host_placed_teacher_returns_its_weights_device_memory(setup):
    _, _, examples, _ = setup
    model = build(TEACHER_CFG, seed=3)  # on the current CUDA device
    params = list(model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in params)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    teacher = OnlineTeacher(model, top_k=K, vocab_size=VOCAB, group=None, on_host=True)
    torch.cuda.synchronize()
    freed = before - torch.cuda.memory_allocated()
    assert weight_bytes <= freed <= weight_bytes + 512 * len(params)  # the allocator's rounding
    step = KDStep(KnowledgeDistillationConfig(), vocab_size=VOCAB)
    out = teacher.annotate([step.build_micro_batch(examples[:3], COLLATE)])
    assert out[0]["teacher_ids"].is_cuda and all(p.is_cuda for p in params)
    assert teacher.host_weights is not None and teacher.host_weights.device_bytes == 0


def test_host_placement_refuses_parameters_sharing_a_storage():
    base = torch.zeros(16)
    halves = torch.nn.ParameterDict({"a": base[:8], "b": base[8:]})
    with pytest.raises(ValueError, match="parameter a is a view into a larger storage"):
        HostWeights(halves)
    aliases = torch.nn.ParameterDict({"a": base, "b": base.view(4, 4)})
    with pytest.raises(ValueError, match="parameter b shares its storage with a"):
        HostWeights(aliases)


def test_different_vocabularies_need_cross_tokenizer(setup, tmp_path):
    _, student, examples, _ = setup
    wide_cfg = TEACHER_CFG.replace(vocab_size=300)
    wide = build(wide_cfg, seed=4)
    out = tmp_path / "wide"
    pass_cfg = TeacherPassConfig(output_dir=str(out), top_k=K, dtype="fp32", micro_batch_size=3)
    run_teacher_pass(wide, examples, pass_cfg, vocab_size=300, pad_id=TOKENIZER.pad_id)
    assert teacher_vocab_size(out) == 300
    with pytest.raises(ValueError, match="cross_tokenizer=true"):
        check_vocabularies(teacher_vocab_size=300, student_vocab_size=VOCAB, cross_tokenizer=False)
    paired = TeacherExamples(examples, open_teacher_store(out))
    plain = KDStep(KnowledgeDistillationConfig(), vocab_size=VOCAB)
    assert max(int(paired[i].teacher.ids.max()) for i in range(6)) >= VOCAB
    with pytest.raises(ValueError, match="cross_tokenizer=true"):
        plain.build_micro_batch(paired[:6], COLLATE)

    cross = KDStep(KnowledgeDistillationConfig(cross_tokenizer=True), vocab_size=VOCAB)
    batch = cross.build_micro_batch(paired[:6], COLLATE)
    metrics, _ = _step(student, cross, [batch])
    assert "top1_agreement" not in metrics
    with torch.no_grad():
        t_full = full_logits(wide, batch["tokens"], vocab=300)
        s_full = full_logits(student, batch["tokens"])
    t_top = torch.topk(t_full, K, dim=-1).values
    s_ids = torch.topk(s_full, K, dim=-1).indices
    mask = batch["labels"] != -100
    want = dense_kd(s_full, t_top, s_ids)[mask].mean()
    assert metrics["kd_loss"] == pytest.approx(want.item(), rel=1e-4)


def test_nemo_aligner_jsonl_is_reusable(setup, tmp_path):
    _, student, examples, reader = setup
    lines = nemo_kd_lines(examples, reader, batch_size=4, eos_id=TOKENIZER.eos_id)
    files = [tmp_path / "chunk_0.jsonl", tmp_path / "chunk_1.jsonl"]
    files[0].write_text("".join(json.dumps(x) + "\n" for x in reversed(lines[:4])))
    files[1].write_text("".join(json.dumps(x) + "\n" for x in lines[4:]))
    imported = import_nemo_kd_jsonl(files, tmp_path / "store")
    ours = TeacherExamples(examples, reader)
    assert len(imported) == len(ours) == 6
    step = KDStep(KnowledgeDistillationConfig(tail=True), vocab_size=VOCAB)
    got = step.build_micro_batch(imported[:6], COLLATE)
    want = step.build_micro_batch(ours[:6], COLLATE)
    for key in ("tokens", "labels", "teacher_ids", "teacher_logits", "teacher_logsumexp"):
        assert torch.equal(got[key], want[key]), key
    m_got, _ = _step(student, step, [got])
    m_want, _ = _step(student, step, [want])
    assert m_got == m_want

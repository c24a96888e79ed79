"""On-policy distillation: the on/off schedule, the student's samples in the batches, runs.

The samples are checked against the generator called directly (one call per step, per-example
seeds from the documented ``(run seed, step, example index)`` contract); the teacher's top-1
against a dense forward of the teacher over the sampled sequences.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from _kd_helpers import (
    STUDENT_CFG,
    TEACHER_CFG,
    TOKENIZER,
    VOCAB,
    build,
    full_logits,
    synthetic_examples,
)

from align_core.generation import Generator, LengthConfig, SamplingConfig, generation_seeds
from align_core.nemo import TokenizerSpec, write_tiny_nemo
from align_core.trainer import DataConfig, InMemorySink, SyntheticConfig, TrainerConfig
from align_core.trainer.data import TrainData
from align_data import CollateConfig
from align_kd import (
    KDRunConfig,
    KDStep,
    KnowledgeDistillationConfig,
    OnlineTeacher,
    OnlineTeacherData,
    OnPolicyTeacherData,
    TeacherSourceConfig,
    is_on_policy_step,
    on_policy_length,
    train_kd,
)

COLLATE = CollateConfig(pad_id=TOKENIZER.pad_id)
SEED = 11


def test_schedule_is_a_pure_function_with_the_asked_fraction():
    steps = range(20_000)
    for fraction in (0.1, 0.5, 0.8):
        draws = [is_on_policy_step(SEED, s, fraction) for s in steps]
        assert draws == [is_on_policy_step(SEED, s, fraction) for s in steps]
        share = sum(draws) / len(draws)
        sigma = (fraction * (1 - fraction) / len(draws)) ** 0.5
        assert abs(share - fraction) < 4 * sigma, (fraction, share)
    assert not any(is_on_policy_step(SEED, s, 0.0) for s in range(1000))
    assert all(is_on_policy_step(SEED, s, 1.0) for s in range(1000))
    # Another seed gives another schedule; the same (seed, step) always the same answer.
    a = [is_on_policy_step(SEED, s, 0.5) for s in range(200)]
    b = [is_on_policy_step(SEED + 1, s, 0.5) for s in range(200)]
    assert a != b
    # Nested: a step on-policy at λ is on-policy at every larger λ (one uniform draw per step).
    low = [is_on_policy_step(SEED, s, 0.3) for s in range(500)]
    high = [is_on_policy_step(SEED, s, 0.6) for s in range(500)]
    assert all(h for lo, h in zip(low, high, strict=True) if lo)


@pytest.fixture(scope="module")
def models(dist_ctx, tmp_path_factory):
    examples, _ = synthetic_examples(tmp_path_factory.mktemp("data"), num_train=8)
    return build(TEACHER_CFG, seed=3), build(STUDENT_CFG, seed=5), examples


def _source(models, fraction: float, length: LengthConfig, sampling: SamplingConfig):
    teacher, student, examples = models
    step = KDStep(KnowledgeDistillationConfig(), vocab_size=VOCAB)
    data = TrainData(
        examples, [], step, COLLATE, micro_batch_size=2, global_batch_size=4, shuffle=False
    )
    online = OnlineTeacher(teacher, top_k=4, vocab_size=VOCAB, group=None)
    generator = Generator(
        student, vocab_size=VOCAB, eos_ids=TOKENIZER.eos_id, pad_id=TOKENIZER.pad_id
    )
    source = OnPolicyTeacherData(
        data,
        online,
        generator,
        fraction=fraction,
        seed=SEED,
        sampling=sampling,
        length=length,
        micro_batch_size=3,
        group=None,
    )
    return source, OnlineTeacherData(data, online)


def test_on_policy_batches_hold_the_students_samples(models):
    teacher, student, examples = models
    longest = max(len(e.prompt_ids) for e in examples)
    length = on_policy_length(LengthConfig(max_length=12), examples, 64)
    assert length.max_length == min(12, 64 - longest)
    sampling = SamplingConfig(temperature=1.3, top_k=20)
    source, plain = _source(models, 1.0, length, sampling)

    step, indices = 1, [4, 5, 6, 7]  # no shuffling: global batch 1 is examples 4..7
    prompts = [examples[i].prompt_ids.tolist() for i in indices]
    direct = Generator(student, vocab_size=VOCAB, eos_ids=TOKENIZER.eos_id).generate(
        prompts,
        sampling,
        LengthConfig(max_length=min(12, 64 - longest)),
        seed=generation_seeds(SEED, step, indices),
    )
    want = direct.responses()
    assert any(w != examples[i].completion_ids.tolist() for w, i in zip(want, indices, strict=True))

    batches = source.train_micro_batches(consumed_samples=4)
    assert [b["tokens"].shape[0] for b in batches] == [2, 2]
    rows = [(b, r) for b in batches for r in range(b["tokens"].shape[0])]  # rows in dataset order
    for (batch, r), index, response, prompt in zip(rows, indices, want, prompts, strict=True):
        assert int(batch["cache_rows"][r]) == index
        tokens, labels = batch["tokens"][r], batch["labels"][r]
        n = len(prompt)
        assert tokens[:n].tolist() == prompt  # inputs are the sequence without its last id
        assert tokens[n : n + len(response) - 1].tolist() == response[:-1]
        assert labels[labels != -100].tolist() == response
        assert float(batch["on_policy"][r]) == 1.0
        assert float(batch["generated_tokens"][r]) == len(response)
    for batch in batches:
        # The teacher scored the sampled sequences: its top-1 is the dense argmax there.
        with torch.no_grad():
            dense = full_logits(teacher, batch["tokens"])
        mask = batch["labels"] != -100
        assert torch.equal(batch["teacher_ids"][..., 0][mask], dense.argmax(-1)[mask])
    # Validation keeps the dataset's responses.
    assert source.num_val_batches == plain.num_val_batches == 0

    # Off-policy steps (λ = 0) are the plain online batches plus the two zero markers.
    off, _ = _source(models, 0.0, length, sampling)
    got, ref = off.train_micro_batches(4), plain.train_micro_batches(4)
    for g, w in zip(got, ref, strict=True):
        assert set(g) == set(w) | {"on_policy", "generated_tokens"}
        assert not g["on_policy"].any() and not g["generated_tokens"].any()
        for key in w:
            assert torch.equal(g[key], w[key]), key


def test_samples_do_not_depend_on_the_generation_chunking(models):
    _, _, examples = models
    length = on_policy_length(LengthConfig(max_length=10), examples, 64)
    a, _ = _source(models, 1.0, length, SamplingConfig())
    b, _ = _source(models, 1.0, length, SamplingConfig())
    b.micro_batch_size = 1
    assert a.samples(0) == b.samples(0)
    assert a.samples(0) != a.samples(8)  # another step: other seeds (examples 0..3 again)


def test_on_policy_needs_the_online_teacher(tmp_path):
    for teacher in (
        TeacherSourceConfig(directory="topk"),
        TeacherSourceConfig(nemo_jsonl=("topk.jsonl",)),
    ):
        key = "teacher.directory" if teacher.directory else "teacher.nemo_jsonl"
        with pytest.raises(ValueError, match=rf"on_policy=0.5 needs the online teacher.*{key}"):
            KDRunConfig(
                run_dir=str(tmp_path),
                teacher=teacher,
                knowledge_distillation=KnowledgeDistillationConfig(on_policy=0.5),
            )
        KDRunConfig(run_dir=str(tmp_path), teacher=teacher)  # λ = 0: offline is fine
    with pytest.raises(ValueError, match=r"on_policy must be in \[0, 1\]"):
        KnowledgeDistillationConfig(on_policy=1.5)


# ------------------------------------------------------------------------- train_kd end to end

DATA = DataConfig(
    micro_batch_size=4,
    global_batch_size=8,
    synthetic=SyntheticConfig(num_train=32, num_validation=8, seed=2),
)


@pytest.fixture(scope="module")
def teacher_nemo(tmp_path_factory):
    path = tmp_path_factory.mktemp("teacher") / "teacher.nemo"
    return write_tiny_nemo(path, TEACHER_CFG, tokenizer=TokenizerSpec("byte-level"), seed=3)


def _run(
    run_dir, teacher_nemo, *, fraction: float, steps: int, sink: InMemorySink, placement="device"
):
    return train_kd(
        KDRunConfig(
            run_dir=str(run_dir),
            teacher=TeacherSourceConfig(
                restore_from_path=str(teacher_nemo), top_k=8, placement=placement
            ),
            knowledge_distillation=KnowledgeDistillationConfig(
                tail=True,
                on_policy=fraction,
                on_policy_length=LengthConfig(max_length=8),
            ),
            model=STUDENT_CFG,
            data=DATA,
            trainer=TrainerConfig(
                max_epochs=9, max_steps=steps, val_check_interval=2, save_interval=2
            ),
            seed=SEED,
            export_nemo=False,
        ),
        sinks=[sink],
    )


def test_fraction_zero_is_plain_online_kd(dist_ctx, teacher_nemo, tmp_path):
    # A tiny λ takes the on-policy code path, but no step of these four is drawn on-policy: its
    # losses must be exactly those of λ = 0, which is the plain online source.
    tiny = 1e-6
    assert not any(is_on_policy_step(SEED, s, tiny) for s in range(4))
    plain, wrapped = InMemorySink(), InMemorySink()
    _run(tmp_path / "plain", teacher_nemo, fraction=0.0, steps=4, sink=plain)
    _run(tmp_path / "wrapped", teacher_nemo, fraction=tiny, steps=4, sink=wrapped)
    assert [m["loss"] for _, m in plain.train] == [m["loss"] for _, m in wrapped.train]
    assert [m["loss"] for _, m in plain.val] == [m["loss"] for _, m in wrapped.val]
    assert all("on_policy" not in m for _, m in plain.train)
    assert [m["on_policy"] for _, m in wrapped.train] == [0.0] * 4
    assert all("generated_length_mean" not in m for _, m in wrapped.train)


def test_on_policy_run_resumes_to_the_same_losses(dist_ctx, teacher_nemo, tmp_path):
    fraction = 0.5
    schedule = [is_on_policy_step(SEED, s, fraction) for s in range(4)]
    assert any(schedule[2:]) and not all(schedule)  # both kinds, on-policy after the resume
    whole = InMemorySink()
    _run(tmp_path / "whole", teacher_nemo, fraction=fraction, steps=4, sink=whole)
    assert [m["on_policy"] for _, m in whole.train] == [float(s) for s in schedule]
    for (_, m), on in zip(whole.train, schedule, strict=True):
        assert ("generated_length_mean" in m) == on
        if on:
            assert 1 <= m["generated_length_mean"] <= 8
    assert all("on_policy" not in m for _, m in whole.val)  # validation: dataset responses

    # Resume from the step-2 checkpoint of the same run (the step-4 one removed): same plan, so
    # the same learning rates; steps 3 and 4 must repeat exactly, samples included. The resumed
    # run keeps its teacher in host memory between passes, which must change nothing.
    shutil.rmtree(tmp_path / "whole" / "checkpoints" / "step_000004")
    second = InMemorySink()
    _run(
        tmp_path / "whole", teacher_nemo, fraction=fraction, steps=4, sink=second, placement="host"
    )
    assert second.plan is not None and second.plan.start_step == 2
    assert [s for s, _ in second.train] == [3, 4]
    for (step, got), (_, want) in zip(second.train, whole.train[2:], strict=True):
        for key in ("loss", "kd_loss", "sft_loss", "on_policy", "generated_length_mean"):
            assert got.get(key) == want.get(key), (step, key)
    resumed = whole.train[:2] + second.train
    assert np.isfinite([m["loss"] for _, m in resumed]).all()

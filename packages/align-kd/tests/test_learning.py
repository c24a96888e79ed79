"""Learning test: a tiny student distilled from a tiny teacher trained on the synthetic task.

End to end through the public entry points: the teacher is trained with align-core's SFT run,
``run_teacher`` writes its top-k (bf16 stores), ``train_kd`` distils a narrower student from
them (tail bucket on). Measured independently of the trainer's own metrics:

- the validation KL to the teacher (the KD loss over the validation store) of the distilled
  student against a freshly initialised one: well below the starting value;
- the task score (align-data's ``score_response`` of greedy generations on 128 held-out
  prompts): the student reaches most (≥ 75 %) of the teacher's score and far more than it
  started with. The score of one model is a mean over prompts with a standard error of about
  0.04 here, so the ratio is not asserted tighter: on 48 prompts the same student measured 0.72
  and, after rounding-level changes elsewhere, 0.65 against the teacher's 0.82.

On-policy distillation (GKD, `test_on_policy_student_reaches_the_offline_score`): the student
starts from an SFT start (align-core's SFT run, 40 steps on the KD data: greedy score 0.406), as
in GKD, so its samples make sense from the first step. From that start two runs of 100 steps
differ in λ alone: λ = 0 (the dataset's responses; the online teacher, whose top-k equal a
store's up to its bf16 rounding) and λ = 0.5 (about half the steps train on the student's own
samples, temperature 0.5, at most 32 new tokens). Same teacher, data order, loss (forward KL,
tail bucket), optimizer and seed. Scored like the offline test (greedy, 128 held-out prompts);
measured on the 2-core CPU box: λ = 0 0.608 (standard error 0.013), λ = 0.5 0.623 (0.012); the
per-prompt difference λ=0.5 − λ=0 is +0.016 with a standard error of 0.017, computed from the
same 128 prompts. The assertion allows two of those paired standard errors (computed by the
test from its own scores): at this budget λ's effect on this 2×32 student is of the order of
the prompt-to-prompt noise. Measured in the same setting, other choices moved the difference
both ways (forward KL and temperature 1: −0.040 ± 0.019; JSD: +0.051 ± 0.020; reverse KL:
−0.083 ± 0.014; an SFT start of 100 steps with temperature 1: −0.022 ± 0.017); GKD's gain shows
with longer training (300 steps, temperature 1: λ = 0 0.733, λ = 0.5 0.762, +0.028 ± 0.013,
JSD +0.014 ± 0.016), which takes about 20 minutes here, too long for the suite.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from _kd_helpers import STUDENT_CFG, TEACHER_CFG, TOKENIZER

from align_core import ParallelConfig, build_gpt_model, seed_all
from align_core.generation import Generator, LengthConfig, SamplingConfig
from align_core.nemo import load_nemo_weights, open_nemo
from align_core.optim import OptimizerConfig, SchedulerConfig
from align_core.schedule import forward_backward
from align_core.trainer import (
    DataConfig,
    InMemorySink,
    RunConfig,
    SyntheticConfig,
    TrainerConfig,
    train,
)
from align_data import CollateConfig, load_records, score_response
from align_kd import (
    KDRunConfig,
    KDStep,
    KDTeacherRunConfig,
    KnowledgeDistillationConfig,
    TeacherExamples,
    TeacherPassConfig,
    TeacherSourceConfig,
    logits_forward,
    open_teacher_store,
    run_teacher,
    train_kd,
)

KD = KnowledgeDistillationConfig(tail=True)
OPTIM = OptimizerConfig(lr=1e-2, weight_decay=0.0)
SCHED = SchedulerConfig(warmup_steps=10, min_lr=1e-3)


def _load(path: str, cfg) -> torch.nn.Module:
    model = build_gpt_model(cfg)
    with open_nemo(path) as ckpt:
        load_nemo_weights(model, ckpt)
    return model.eval()


def _val_kl(model, examples, store) -> float:
    step = KDStep(KD, vocab_size=TOKENIZER.vocab_size)
    paired = TeacherExamples(examples, store)
    collate = CollateConfig(pad_id=TOKENIZER.pad_id)
    batches = [step.build_micro_batch(paired[i : i + 16], collate) for i in range(0, 48, 16)]
    normalizer = step.normalizer(batches, global_examples=48)
    with torch.no_grad():
        outputs = forward_backward(
            model, batches, logits_forward, step.loss_fn(normalizer), forward_only=True
        )
    sums = {k: float(sum(o[k] for o in outputs)) for k in outputs[0]}
    return step.finalize_metrics(sums)["kd_loss"]


def _scores(model, records) -> list[float]:
    """align-data's task score of each greedy generation (the trainer's metrics play no part)."""
    gen = Generator(model, vocab_size=TOKENIZER.vocab_size, eos_ids=TOKENIZER.eos_id)
    prompts = [[TOKENIZER.bos_id, *TOKENIZER.encode(r.prompt)] for r in records]
    result = gen.generate(prompts, SamplingConfig(use_greedy=True), LengthConfig(max_length=24))
    texts = [TOKENIZER.decode(ids) for ids in result.responses()]
    return [score_response(r.prompt, t) for r, t in zip(records, texts, strict=True)]


def _score(model, records) -> float:
    scores = _scores(model, records)
    return sum(scores) / len(scores)


def _mean_and_error(values: list[float]) -> tuple[float, float]:
    """The mean and its standard error."""
    n = len(values)
    mean = sum(values) / n
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(variance / n)


@pytest.fixture(scope="module")
def teacher_nemo(dist_ctx, tmp_path_factory) -> str:
    """The teacher: align-core's SFT run on the synthetic task (its ``final.nemo``)."""
    data = DataConfig(
        micro_batch_size=32,
        global_batch_size=32,
        synthetic=SyntheticConfig(num_train=4096, num_validation=32, seed=0),
    )
    return _sft(tmp_path_factory.mktemp("teacher"), TEACHER_CFG, data, steps=300)


def _steps(steps: int) -> TrainerConfig:
    """``steps`` optimizer steps, no validation or checkpoints in between."""
    return TrainerConfig(max_epochs=99, max_steps=steps, val_check_interval=0, save_interval=0)


def _sft(run_dir, model, data: DataConfig, *, steps: int) -> str:
    """align-core's SFT run of ``steps`` steps; its ``final.nemo``."""
    run = train(
        RunConfig(
            algorithm="sft",
            run_dir=str(run_dir),
            model=model,
            data=data,
            trainer=_steps(steps),
            optim=OPTIM,
            sched=SCHED,
            resume=False,
        )
    )
    assert run.nemo_path is not None
    return run.nemo_path


DATA = DataConfig(
    micro_batch_size=32,
    global_batch_size=32,
    synthetic=SyntheticConfig(num_train=512, num_validation=128, seed=1),
)


@pytest.mark.slow
def test_student_learns_from_teacher(teacher_nemo, tmp_path):
    data = DATA
    out = tmp_path / "topk"
    run_teacher(
        KDTeacherRunConfig(
            restore_from_path=teacher_nemo,
            output=TeacherPassConfig(output_dir=str(out), top_k=16, micro_batch_size=32),
            data=data,
        )
    )
    student_run = train_kd(
        KDRunConfig(
            run_dir=str(tmp_path / "student"),
            teacher=TeacherSourceConfig(directory=str(out)),
            knowledge_distillation=KD,
            model=STUDENT_CFG,
            data=data,
            trainer=_steps(200),
            optim=OPTIM,
            sched=SCHED,
            resume=False,
        )
    )
    assert student_run.stop_reason == "completed" and student_run.steps == 200

    val_examples = _validation_examples(tmp_path / "student")
    store = open_teacher_store(out / "validation", examples=val_examples)
    seed_all(7)
    fresh = build_gpt_model(STUDENT_CFG, ParallelConfig())
    student = _load(student_run.nemo_path, STUDENT_CFG)
    teacher = _load(teacher_nemo, TEACHER_CFG)
    kl_start, kl_end = _val_kl(fresh, val_examples, store), _val_kl(student, val_examples, store)

    records = _eval_records(tmp_path / "student")
    s_teacher, s_student = _score(teacher, records), _score(student, records)
    s_fresh = _score(fresh, records)
    print(
        f"KL {kl_start:.3f} -> {kl_end:.3f}; score teacher {s_teacher:.3f}, student "
        f"{s_student:.3f}, fresh student {s_fresh:.3f}"
    )
    assert kl_end < 0.3 * kl_start, (kl_start, kl_end)
    assert s_teacher > 0.7, s_teacher
    assert s_student >= 0.75 * s_teacher, (s_student, s_teacher)
    assert s_student > s_fresh + 0.3, (s_student, s_fresh)


@pytest.mark.slow
def test_on_policy_student_reaches_the_offline_score(teacher_nemo, tmp_path):
    sft_nemo = _sft(tmp_path / "sft", STUDENT_CFG, DATA, steps=40)
    records = _eval_records(tmp_path / "sft")
    assert len(records) == 128
    scores, shares = {}, {}
    for fraction in (0.0, 0.5):
        sink = InMemorySink()
        run = train_kd(
            KDRunConfig(
                run_dir=str(tmp_path / f"kd-{fraction}"),
                teacher=TeacherSourceConfig(restore_from_path=teacher_nemo, top_k=16),
                knowledge_distillation=dataclasses.replace(
                    KD,
                    on_policy=fraction,
                    on_policy_sampling=SamplingConfig(temperature=0.5),
                    on_policy_length=LengthConfig(max_length=32),
                ),
                restore_from_path=sft_nemo,
                data=DATA,
                trainer=_steps(100),
                optim=OPTIM,
                sched=SCHED,
                resume=False,
            ),
            sinks=[sink],
        )
        assert run.steps == 100 and run.nemo_path is not None
        shares[fraction] = sum(sink.series("on_policy") or [0.0]) / 100
        scores[fraction] = _scores(_load(run.nemo_path, STUDENT_CFG), records)
    s_sft = _score(_load(sft_nemo, STUDENT_CFG), records)
    (off, off_se), (on, on_se) = (_mean_and_error(scores[f]) for f in (0.0, 0.5))
    diff, diff_se = _mean_and_error([a - b for a, b in zip(scores[0.5], scores[0.0], strict=True)])
    print(
        f"score SFT start {s_sft:.3f}; λ=0 {off:.3f} ± {off_se:.3f}, λ=0.5 {on:.3f} ± {on_se:.3f}"
        f" (on-policy share {shares[0.5]:.2f}); difference {diff:+.3f} ± {diff_se:.3f}"
    )
    assert shares[0.0] == 0.0 and 0.4 <= shares[0.5] <= 0.6, shares
    assert min(off, on) > s_sft + 0.1, (s_sft, off, on)  # both distilled well past the start
    assert on >= off - 2 * diff_se, (on, off, diff_se)


def _eval_records(run_dir) -> list:
    """The held-out records a run's synthetic data wrote (prompt and reference answer)."""
    path = next((run_dir / "data").glob("synthetic-*/sft_eval.jsonl"))
    return load_records(path, kind="sft").records


def _validation_examples(run_dir):
    from align_core.trainer.build import load_datasets

    base = RunConfig(
        algorithm="sft",
        run_dir=str(run_dir),
        model=STUDENT_CFG,
        data=DataConfig(synthetic=SyntheticConfig(num_train=512, num_validation=128, seed=1)),
    )
    return load_datasets(base, TOKENIZER, STUDENT_CFG.seq_length).val

"""``train_kd`` end to end: online teacher (metrics, checkpoint, resume), NeMo-Aligner JSONL;
config errors."""

from __future__ import annotations

import json

import pytest
from _kd_helpers import (
    STUDENT_CFG,
    TEACHER_CFG,
    TOKENIZER,
    VOCAB,
    build,
    nemo_kd_lines,
    synthetic_examples,
)

from align_core.nemo import TokenizerSpec, write_tiny_nemo
from align_core.trainer import DataConfig, InMemorySink, SyntheticConfig, TrainerConfig
from align_kd import (
    KDRunConfig,
    KnowledgeDistillationConfig,
    TeacherPassConfig,
    TeacherSourceConfig,
    open_teacher_store,
    run_teacher_pass,
    train_kd,
)

DATA = DataConfig(
    micro_batch_size=4,
    global_batch_size=8,
    synthetic=SyntheticConfig(num_train=32, num_validation=8, seed=2),
)


def test_online_run_logs_kd_metrics_and_resumes(dist_ctx, tmp_path):
    teacher = write_tiny_nemo(
        tmp_path / "teacher.nemo", TEACHER_CFG, tokenizer=TokenizerSpec("byte-level"), seed=3
    )

    def run(steps: int, sink: InMemorySink):
        return train_kd(
            KDRunConfig(
                run_dir=str(tmp_path / "run"),
                teacher=TeacherSourceConfig(restore_from_path=str(teacher), top_k=8),
                knowledge_distillation=KnowledgeDistillationConfig(tail=True, top_k=6),
                model=STUDENT_CFG,
                data=DATA,
                trainer=TrainerConfig(max_epochs=9, max_steps=steps, val_check_interval=2),
                export_nemo=False,
            ),
            sinks=[sink],
        )

    first = InMemorySink()
    result = run(2, first)
    assert result.steps == 2 and result.stop_reason == "completed"
    assert first.plan is not None and first.plan.algorithm == "kd"
    for metrics in (result.last_train_metrics, result.last_val_metrics):
        assert {"loss", "kd_loss", "sft_loss", "top1_agreement"} <= metrics.keys()
        assert metrics["loss"] == pytest.approx(metrics["kd_loss"])  # sft_loss_weight 0
    second = InMemorySink()
    resumed = run(3, second)
    assert second.plan.resumed_from is not None and second.plan.start_step == 2
    assert resumed.steps == 3 and [s for s, _ in second.train] == [3]


def test_run_config_errors(tmp_path):
    with pytest.raises(ValueError, match="exactly one teacher source"):
        TeacherSourceConfig()
    with pytest.raises(ValueError, match="exactly one teacher source"):
        TeacherSourceConfig(directory="a", restore_from_path="b.nemo")
    with pytest.raises(ValueError, match="packing"):
        KDRunConfig(
            run_dir=str(tmp_path),
            teacher=TeacherSourceConfig(directory="a"),
            data=DataConfig(packing=True),
        )


def test_offline_run_from_nemo_aligner_jsonl(dist_ctx, tmp_path):
    examples, _ = synthetic_examples(tmp_path / "data", num_train=16)
    cfg = TeacherPassConfig(output_dir=str(tmp_path / "store"), top_k=4, dtype="fp32")
    run_teacher_pass(
        build(TEACHER_CFG, seed=3), examples, cfg, vocab_size=VOCAB, pad_id=TOKENIZER.pad_id
    )
    lines = nemo_kd_lines(
        examples, open_teacher_store(tmp_path / "store"), batch_size=4, eos_id=TOKENIZER.eos_id
    )
    jsonl = tmp_path / "topk.jsonl"
    jsonl.write_text("".join(json.dumps(line) + "\n" for line in lines))
    result = train_kd(
        KDRunConfig(
            run_dir=str(tmp_path / "run"),
            teacher=TeacherSourceConfig(nemo_jsonl=(str(jsonl),)),
            model=STUDENT_CFG,
            data=DataConfig(micro_batch_size=4, global_batch_size=8),
            trainer=TrainerConfig(max_steps=1, val_check_interval=0),
            export_nemo=False,
        )
    )
    assert result.steps == 1
    assert result.last_train_metrics["kd_loss"] > 0
    assert 0 <= result.last_train_metrics["top1_agreement"] <= 1

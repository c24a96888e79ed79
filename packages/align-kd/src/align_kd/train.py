"""Entry points the ``align`` CLI calls: ``align kd teacher`` and ``align run kd``.

`run_teacher` computes the teacher pass of a run's data (training and validation splits) and
`train_kd` distils a student, offline from those stores, offline from imported NeMo-Aligner KD
JSONL, or online from a teacher ``.nemo`` loaded into the same job (optionally on-policy: the
student samples a fraction of the batches' responses itself, `align_kd.on_policy`). Both take one
typed config (the CLI converts its Hydra tree with ``OmegaConf.to_object``) and reuse
align-core's pieces: model and tokenizer resolution, data preprocessing (so the teacher pass and
the student see the same token ids), the trainer loop, checkpoints, resume and ``.nemo`` export.

Data. The teacher pass and the student tokenize the same files with the same settings; the
stores record a fingerprint of the token ids and training refuses stores made from other data.
Set ``data.seq_length`` explicitly when teacher and student have different ``seq_length``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from align_core.config import ModelConfig, ParallelConfig
from align_core.optim import OptimizerConfig, SchedulerConfig
from align_core.trainer import DataConfig, RunConfig, RunResult, TrainerConfig
from align_core.trainer.metrics import MetricsSink
from align_kd.config import KnowledgeDistillationConfig, TeacherPassConfig
from align_kd.teacher import TeacherPassResult

__all__ = [
    "KDRunConfig",
    "KDTeacherRunConfig",
    "TeacherPlacement",
    "TeacherSourceConfig",
    "run_teacher",
    "train_kd",
]

TeacherPlacement = Literal["device", "host"]
"""Where an online teacher's weights live between scoring passes (`TeacherSourceConfig`)."""

SPLITS = ("train", "validation")


@dataclass
class TeacherSourceConfig:
    """Where the teacher's top-k come from: exactly one of the three sources.

    Attributes:
        directory: Offline: the output of ``align kd teacher`` (``train/`` and, when the run has
            validation data, ``validation/``).
        nemo_jsonl: Offline: NeMo-Aligner ``compute_topk_logits.py`` output for training; the
            examples come from these files (``data.train_files`` must be empty).
        nemo_jsonl_validation: NeMo-Aligner output for validation (with ``nemo_jsonl``).
        restore_from_path: Online: the teacher ``.nemo``, loaded once into this job, frozen.
        top_k: Online: tokens per position computed from the teacher.
        placement: Online: where the teacher's weights live between its scoring passes.
            ``device`` (default): resident next to the student, a second model on the same
            ranks. ``host``: in host memory (pinned on CUDA), copied to the device for each
            scoring pass and released after it (`align_kd.online.HostWeights`), so the
            student's training and on-policy generation have the teacher's device memory; each
            training step then pays one host-to-device copy of the teacher shard.
    """

    directory: str | None = None
    nemo_jsonl: tuple[str, ...] = ()
    nemo_jsonl_validation: tuple[str, ...] = ()
    restore_from_path: str | None = None
    top_k: int = 100
    placement: TeacherPlacement = "device"

    def __post_init__(self) -> None:
        given = [
            name
            for name, value in (
                ("directory", self.directory),
                ("nemo_jsonl", self.nemo_jsonl),
                ("restore_from_path", self.restore_from_path),
            )
            if value
        ]
        if len(given) != 1:
            raise ValueError(
                "set exactly one teacher source: teacher.directory (align kd teacher output), "
                "teacher.nemo_jsonl (NeMo-Aligner KD JSONL) or teacher.restore_from_path "
                f"(online teacher .nemo); got {given or 'none'}"
            )
        if self.nemo_jsonl_validation and not self.nemo_jsonl:
            raise ValueError("teacher.nemo_jsonl_validation needs teacher.nemo_jsonl")
        if self.top_k < 1:
            raise ValueError(f"teacher.top_k must be >= 1, got {self.top_k}")
        if self.placement not in get_args(TeacherPlacement):
            raise ValueError(
                f"teacher.placement must be one of {', '.join(get_args(TeacherPlacement))}, "
                f"got {self.placement!r}"
            )
        if self.placement != "device" and not self.online:
            raise ValueError(
                "teacher.placement applies to the online teacher (teacher.restore_from_path); "
                "offline top-k need no teacher weights"
            )

    @property
    def online(self) -> bool:
        """Whether the teacher runs in the training job."""
        return self.restore_from_path is not None


@dataclass
class KDRunConfig:
    """``align run kd``: one student distillation run, fully typed.

    Attributes:
        run_dir: Checkpoints, the tokenized-data cache, imports and ``final.nemo``.
        teacher: The teacher source (offline stores, NeMo-Aligner JSONL, or online ``.nemo``).
        knowledge_distillation: ``model.knowledge_distillation`` (loss knobs).
        model: Student architecture; None takes it from ``restore_from_path`` (or align-core's
            tiny default when nothing is restored).
        parallel: Tensor/pipeline layout of student (and online teacher).
        trainer: Loop settings.
        data: Files (SFT format), batch sizes, ``seq_length``; packing is not supported.
        optim: Optimizer.
        sched: Learning-rate schedule.
        restore_from_path: Student ``.nemo`` (weights and tokenizer); None trains a fresh
            ``model`` with the byte tokenizer.
        resume: Continue from the newest checkpoint in ``run_dir``.
        export_nemo: Write ``run_dir/final.nemo`` when the run completes; None: unless the
            student was restored from a Hugging Face directory.
        export_hf: Write ``run_dir/final_hf/`` when the run completes; None: when the student
            was restored from a Hugging Face directory.
        seed: Seed of initialisation and everything not seeded elsewhere.
    """

    run_dir: str
    teacher: TeacherSourceConfig
    knowledge_distillation: KnowledgeDistillationConfig = field(
        default_factory=KnowledgeDistillationConfig
    )
    model: ModelConfig | None = None
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimizerConfig = field(default_factory=OptimizerConfig)
    sched: SchedulerConfig = field(default_factory=SchedulerConfig)
    restore_from_path: str | None = None
    resume: bool = True
    export_nemo: bool | None = None
    export_hf: bool | None = None
    seed: int = 1234

    def __post_init__(self) -> None:
        if self.data.packing:
            raise ValueError("model.data.packing is not supported for knowledge distillation")
        if self.teacher.nemo_jsonl and self.data.train_files:
            raise ValueError(
                "teacher.nemo_jsonl brings its own examples: leave model.data.train_files empty"
            )
        if self.knowledge_distillation.on_policy > 0 and not self.teacher.online:
            source = "teacher.directory" if self.teacher.directory else "teacher.nemo_jsonl"
            raise ValueError(
                f"model.knowledge_distillation.on_policy={self.knowledge_distillation.on_policy} "
                "needs the online teacher (model.knowledge_distillation.teacher."
                f"restore_from_path) to score the student's samples; {source} holds top-k for "
                "the dataset's responses only"
            )


@dataclass
class KDTeacherRunConfig:
    """``align kd teacher``: the teacher pass over a run's data.

    Attributes:
        restore_from_path: The teacher ``.nemo``.
        output: Output directory, top_k, dtype and batching (``train/`` and ``validation/``
            are written under ``output.output_dir``).
        data: The student run's data settings (same files, ``seq_length``, ``over_long``), so
            the teacher sees exactly the student's token ids.
        parallel: Tensor/pipeline layout of the teacher (data parallel is the rest).
        tokenizer_from: A ``.nemo`` whose tokenizer to use (the student's, when it differs from
            the teacher's); None uses the teacher's.
        seed: Seed.
    """

    restore_from_path: str
    output: TeacherPassConfig
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    tokenizer_from: str | None = None
    seed: int = 1234


def _base_run(run_dir: str, **kwargs: Any) -> RunConfig:
    """An align-core SFT run description: KD data is SFT data (prompt + completion)."""
    return RunConfig(
        algorithm="sft", run_dir=run_dir, resume=False, export_nemo=False, export_hf=False, **kwargs
    )


def run_teacher(config: KDTeacherRunConfig) -> dict[str, TeacherPassResult]:
    """Run the teacher pass over the training and validation data (call on every rank).

    Resumable: rerunning the same command continues every split where it stopped.

    Returns:
        ``{"train": result, "validation": result}`` (validation only with validation data).

    Raises:
        ValueError: When the output directory holds a pass over other data or settings.
    """
    from align_core.parallel import init_distributed
    from align_core.pretrained import open_pretrained
    from align_core.trainer.build import (
        build_policy,
        load_datasets,
        on_main_then_all,
        resolve_model_source,
    )
    from align_kd.online import freeze
    from align_kd.teacher import TeacherGroups, run_teacher_pass

    init_distributed(config.parallel, seed=config.seed)
    out = Path(config.output.output_dir)
    on_main_then_all(lambda: out.mkdir(parents=True, exist_ok=True))
    base = _base_run(
        str(out),
        parallel=config.parallel,
        data=config.data,
        restore_from_path=config.restore_from_path,
    )
    source = resolve_model_source(base)
    tokenizer = source.tokenizer
    if config.tokenizer_from is not None:
        from align_core.trainer.build import tokenizer_from_spec

        with open_pretrained(config.tokenizer_from) as ckpt:
            tokenizer = tokenizer_from_spec(ckpt.tokenizer)
    seq_length = config.data.seq_length or source.model.seq_length
    datasets = load_datasets(base, tokenizer, seq_length)
    teacher = freeze(build_policy(source, config.parallel))
    groups = TeacherGroups.from_model(teacher)
    results = {}
    for split, examples in zip(SPLITS, (datasets.train, datasets.val), strict=True):
        if split == "validation" and not examples:
            continue
        cfg = dataclasses.replace(config.output, output_dir=str(out / split))
        results[split] = run_teacher_pass(
            teacher,
            examples,
            cfg,
            vocab_size=_teacher_vocab(source),
            pad_id=tokenizer.pad_id,
            groups=groups,
        )
    return results


def _teacher_vocab(source: Any) -> int:
    return int(source.tokenizer.vocab_size)


def _offline_examples(
    run: KDRunConfig, base: RunConfig, tokenizer: Any, seq_length: int
) -> tuple[Sequence[Any], Sequence[Any], int | None]:
    """Training and validation `KDExample` sequences, and the teacher's vocabulary size."""
    import torch.distributed as dist

    from align_core.trainer.build import load_datasets, on_main_then_all
    from align_data import TeacherTopKReader
    from align_kd.data import TeacherExamples, import_nemo_kd_jsonl, nemo_kd_examples
    from align_kd.teacher import open_teacher_store, teacher_vocab_size

    src = run.teacher
    if src.nemo_jsonl:
        root = Path(run.run_dir) / "teacher_import"
        main = not dist.is_initialized() or dist.get_rank() == 0
        splits = {"train": src.nemo_jsonl, "validation": src.nemo_jsonl_validation}
        paired: dict[str, Sequence[Any]] = {"train": [], "validation": []}
        for split, paths in splits.items():
            if not paths:
                continue
            # Rank 0 writes the store; the others read it once it is complete.
            imported = on_main_then_all(
                lambda p=paths, s=split: import_nemo_kd_jsonl(p, root / s) if main else None
            )
            if imported is None:
                imported = TeacherExamples(nemo_kd_examples(paths), TeacherTopKReader(root / split))
            paired[split] = imported
        return paired["train"], paired["validation"], None
    assert src.directory is not None
    datasets = load_datasets(base, tokenizer, seq_length)
    root = Path(src.directory)
    train = TeacherExamples(
        datasets.train, open_teacher_store(root / "train", examples=datasets.train)
    )
    val = []
    if len(datasets.val):
        if not (root / "validation").exists():
            raise ValueError(
                f"{root}: no validation/ teacher store but the run has validation data; run "
                "align kd teacher with the same model.data"
            )
        val_store = open_teacher_store(root / "validation", examples=datasets.val)
        val = TeacherExamples(datasets.val, val_store)
    return train, val, teacher_vocab_size(root / "train")


def train_kd(run: KDRunConfig, sinks: Sequence[MetricsSink] = ()) -> RunResult:
    """Distil a student (call on every rank; see the module docstring).

    Args:
        run: The run configuration.
        sinks: Metric receivers (global rank 0 only): ``loss``, ``kd_loss``, ``sft_loss``,
            ``top1_agreement`` (on-policy runs: ``on_policy``, ``generated_length_mean``)
            plus the trainer's own (``grad_norm``, ``lr``, ...).

    Returns:
        How the run ended.

    Raises:
        ValueError: Different vocabularies without ``cross_tokenizer``, stores from other data,
            inconsistent batch sizes, before any training.
        align_core.trainer.NonFiniteError: A NaN/inf loss or gradient (``nonfinite="stop"``).
    """
    from align_core.parallel import init_distributed
    from align_core.trainer.build import (
        ModelSource,
        build_policy,
        load_datasets,
        on_main_then_all,
        resolve_model_source,
    )
    from align_core.trainer.loop import ParallelGroups
    from align_kd.forward import tensor_group_of
    from align_kd.online import OnlineTeacher, freeze
    from align_kd.step import KDStep, check_vocabularies

    ctx = init_distributed(run.parallel, seed=run.seed)
    run_dir = Path(run.run_dir)
    on_main_then_all(lambda: run_dir.mkdir(parents=True, exist_ok=True))
    base = _base_run(
        run.run_dir,
        model=run.model,
        parallel=run.parallel,
        data=run.data,
        restore_from_path=run.restore_from_path,
        seed=run.seed,
    )
    source = resolve_model_source(base)
    student_vocab = int(source.tokenizer.vocab_size)
    seq_length = run.data.seq_length or source.model.seq_length
    kd = run.knowledge_distillation
    policy = build_policy(source, run.parallel)
    step = KDStep(
        kd,
        vocab_size=student_vocab,
        data_group=ParallelGroups.from_megatron(ctx.device).data,
        tensor_group=tensor_group_of(policy),
    )
    teacher = None
    if run.teacher.online:
        teacher_base = _base_run(
            run.run_dir, parallel=run.parallel, restore_from_path=run.teacher.restore_from_path
        )
        teacher_source: ModelSource = resolve_model_source(teacher_base)
        teacher_vocab = int(teacher_source.tokenizer.vocab_size)
        check_vocabularies(
            teacher_vocab_size=teacher_vocab,
            student_vocab_size=student_vocab,
            cross_tokenizer=kd.cross_tokenizer,
        )
        if student_vocab > teacher_vocab:
            raise ValueError(
                f"online distillation feeds the student's token ids to the teacher, but the "
                f"student's vocabulary ({student_vocab}) is larger than the teacher's "
                f"({teacher_vocab}); run the teacher pass offline instead"
            )
        kd.effective_top_k(run.teacher.top_k)
        model = freeze(build_policy(teacher_source, run.parallel))
        teacher = OnlineTeacher(
            model,
            top_k=run.teacher.top_k,
            vocab_size=teacher_vocab,
            group=tensor_group_of(model),
            on_host=run.teacher.placement == "host",
        )
        datasets = load_datasets(base, source.tokenizer, seq_length)
        train, val = datasets.train, datasets.val
    else:
        train, val, teacher_vocab_or_none = _offline_examples(
            run, base, source.tokenizer, seq_length
        )
        check_vocabularies(
            teacher_vocab_size=teacher_vocab_or_none,
            student_vocab_size=student_vocab,
            cross_tokenizer=kd.cross_tokenizer,
        )
    from align_core.trainer.session import Recipe, run_session
    from align_data import CollateConfig
    from align_kd.forward import logits_forward

    recipe = Recipe(
        algorithm="kd",
        source=source,
        policy=policy,
        step=step,
        train=train,
        val=val,
        forward_fn=logits_forward,
        collate=CollateConfig(
            pad_id=source.tokenizer.pad_id, pad_to_multiple_of=run.data.pad_to_multiple_of or 1
        ),
        data_state={
            "train_samples": len(train),
            "global_batch_size": run.data.global_batch_size,
            "seed": run.data.seed,
            "teacher": "online" if teacher is not None else "offline",
        },
        resume_needs="resume needs the same data, global batch size and teacher source",
        batch_source=_batch_source(run, teacher, policy, source.tokenizer, train, seq_length),
    )
    return run_session(run, recipe, ctx, sinks)


def _batch_source(
    run: KDRunConfig,
    teacher: Any,
    policy: Any,
    tokenizer: Any,
    train: Sequence[Any],
    seq_length: int,
) -> Any:
    """The ``Recipe.batch_source`` hook: None (offline), online teacher, or on-policy."""
    from align_kd.online import OnlineTeacherData

    if teacher is None:
        return None
    kd = run.knowledge_distillation
    if kd.on_policy == 0:
        return lambda data: OnlineTeacherData(data, teacher)
    import torch

    from align_core.generation import make_generator
    from align_core.trainer.loop import ParallelGroups
    from align_kd.on_policy import on_policy_length, on_policy_source

    return on_policy_source(
        teacher,
        make_generator(policy, tokenizer, seq_length),
        fraction=kd.on_policy,
        seed=run.seed,
        sampling=kd.on_policy_sampling,
        length=on_policy_length(kd.on_policy_length, train, seq_length),
        micro_batch_size=kd.on_policy_micro_batch_size,
        group=ParallelGroups.from_megatron(torch.device("cpu")).data,
    )

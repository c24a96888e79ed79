"""The trees of ``align run spin``, ``align run kd``, ``align kd teacher`` and ``align generate``.

Built from the pieces of `align_cli.config.schema` (launch keys, NeMo's flat ``model.*`` keys,
``exp_manager``, ``pretrained_checkpoint``) around the typed dataclasses of align-core
(`SPINConfig`, `SPINTrainerConfig`, `GenerateConfig`) and align-kd
(`KnowledgeDistillationConfig`, `TeacherSourceConfig`, `TeacherPassConfig`), under
NeMo-Aligner's names::

    align run spin     trainer.spin.*               SPINTrainerConfig (max_iterations, ...)
                       model.spin.*                 SPINConfig (sampling_params, length_params...)
                       model.data.train_ds.{file_path,max_seq_length}, validation_ds.file_path
    align run kd       trainer.knowledge_distillation.*          TrainerConfig
                       model.knowledge_distillation.*            KnowledgeDistillationConfig
                       model.knowledge_distillation.teacher.*    TeacherSourceConfig
                       model.data.data_prefix, model.data.*      DataConfig
    align kd teacher   output, top_k, dtype, ...    TeacherPassConfig (output_dir is ``output``)
                       model.data.*, model.micro_batch_size, model.<parallel>
    align generate     sampling_params.*, length_params.*, micro_batch_size, seq_length, ...

Defaults are read from those dataclasses (`align_cli.config.structured.flat_fields`); none is
written here.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from typing import Any

from align_cli.config.schema import (
    DATA_RENAMES,
    NOT_FOR_SFT_DATA,
    RUN_SECTIONS,
    PretrainedSection,
    data_config,
    data_section,
    file_list,
    launch_fields,
    model_fields,
    model_for,
    normalize_data_prefix,
    spec_of,
    training_fields,
)
from align_cli.config.structured import FieldSpec, extract, flat_fields, typed_section
from align_core.algorithms.spin import SPINConfig
from align_core.config import ModelConfig, ParallelConfig
from align_core.generation import GenerateConfig
from align_core.trainer import DataConfig, ReferenceConfig, TrainerConfig
from align_core.trainer.spin import SPINRunConfig, SPINTrainerConfig
from align_kd.config import KnowledgeDistillationConfig, TeacherPassConfig
from align_kd.train import KDRunConfig, KDTeacherRunConfig, TeacherSourceConfig

__all__ = [
    "RUN_CONFIGS",
    "TREES",
    "data_files",
    "generate_tree",
    "kd_teacher_tree",
    "kd_tree",
    "spin_tree",
]

_ELSEWHERE_SPIN = ("seq_length", *NOT_FOR_SFT_DATA)


def _tree(
    name: str, doc: str, trainer: list[FieldSpec], model: list[FieldSpec], rest: list[FieldSpec]
) -> type:
    trainer_cls = typed_section(
        f"{name}TrainerSection", "``trainer``: launch and the loop.", trainer
    )
    model_cls = typed_section(
        f"{name}ModelSection",
        "``model``: batch sizes, parallel layout, architecture and algorithm settings.",
        model,
    )
    return typed_section(
        f"{name}Tree",
        doc,
        [
            FieldSpec("trainer", trainer_cls, factory=trainer_cls),
            FieldSpec("model", model_cls, factory=model_cls),
            *rest,
        ],
    )


# ------------------------------------------------------------------------------------ spin


@cache
def spin_tree() -> type:
    """``align run spin``: NeMo-Aligner's gpt_spin.yaml names."""
    train_ds = typed_section(
        "SpinTrainDsSection",
        "``model.data.train_ds``: the SFT training data.",
        [
            FieldSpec("file_path", Any, None, doc="SFT file(s): prompt/completion, messages, ..."),
            spec_of(DataConfig, "seq_length", "max_seq_length", "prompt + answer limit in tokens"),
        ],
    )
    validation_ds = typed_section(
        "SpinValidationDsSection",
        "``model.data.validation_ds``: held-out SFT data (validation NLL and generations).",
        [FieldSpec("file_path", Any, None, doc="SFT file(s)")],
    )
    data = typed_section(
        "SpinDataSection",
        "``model.data``: SFT files (NeMo's train_ds / validation_ds) and tokenization.",
        [
            FieldSpec("train_ds", train_ds, factory=train_ds),
            FieldSpec("validation_ds", validation_ds, factory=validation_ds),
            *flat_fields(
                DataConfig,
                rename=DATA_RENAMES,
                exclude=(
                    "train_files",
                    "validation_files",
                    "micro_batch_size",
                    "global_batch_size",
                    *_ELSEWHERE_SPIN,
                ),
            ),
        ],
    )
    return _tree(
        "SPIN",
        "The ``align run spin`` configuration tree.",
        [
            *launch_fields(),
            FieldSpec("spin", SPINTrainerConfig, factory=SPINTrainerConfig, doc="the iterations"),
        ],
        [
            *model_fields(),
            FieldSpec("spin", SPINConfig, factory=SPINConfig),
            FieldSpec("data", data, factory=data),
            FieldSpec("reference", ReferenceConfig, factory=ReferenceConfig),
        ],
        list(RUN_SECTIONS),
    )


def _spin_config(tree: Any, run_dir: str, base_model: ModelConfig | None) -> SPINRunConfig:
    data = tree.model.data
    train = file_list(data.train_ds.file_path, "model.data.train_ds.file_path")
    val = file_list(data.validation_ds.file_path, "model.data.validation_ds.file_path")
    return SPINRunConfig(
        run_dir=run_dir,
        trainer=tree.trainer.spin,
        reference=tree.model.reference,
        data=data_config(tree, train, val, seq_length=data.train_ds.max_seq_length),
        spin=tree.model.spin,
        **training_fields(tree, base_model),
    )


# -------------------------------------------------------------------------------------- kd

_KD_DATA = data_section("KDDataSection", exclude=NOT_FOR_SFT_DATA)


@cache
def kd_tree() -> type:
    """``align run kd``: NeMo-Aligner's gpt_knowledge_distillation.yaml names."""
    teacher = typed_section(
        "KDTeacherSection",
        "``model.knowledge_distillation.teacher``: where the teacher's top-k come from (one).",
        [
            spec_of(TeacherSourceConfig, "directory", doc="output of `align kd teacher`"),
            FieldSpec(
                "nemo_jsonl", Any, None, doc="NeMo-Aligner compute_topk_logits.py JSONL file(s)"
            ),
            FieldSpec("nemo_jsonl_validation", Any, None, doc="NeMo-Aligner JSONL for validation"),
            spec_of(TeacherSourceConfig, "restore_from_path", doc="online: the teacher .nemo"),
            spec_of(TeacherSourceConfig, "top_k", doc="online: tokens per position"),
            spec_of(
                TeacherSourceConfig,
                "placement",
                doc="online: teacher weights on the device, or on the host between passes",
            ),
        ],
    )
    kd = typed_section(
        "KnowledgeDistillationSection",
        "``model.knowledge_distillation``: the loss (align-kd's KnowledgeDistillationConfig).",
        [
            *flat_fields(KnowledgeDistillationConfig),
            FieldSpec("teacher", teacher, factory=teacher),
        ],
    )
    return _tree(
        "KD",
        "The ``align run kd`` configuration tree.",
        [
            *launch_fields(),
            FieldSpec(
                "knowledge_distillation", TrainerConfig, factory=TrainerConfig, doc="the loop"
            ),
        ],
        [
            *model_fields(),
            FieldSpec("knowledge_distillation", kd, factory=kd),
            FieldSpec("data", _KD_DATA, factory=_KD_DATA),
        ],
        list(RUN_SECTIONS),
    )


def _kd_config(tree: Any, run_dir: str, base_model: ModelConfig | None) -> KDRunConfig:
    section = tree.model.knowledge_distillation
    key = "model.knowledge_distillation.teacher"
    t = section.teacher
    teacher = _construct(
        TeacherSourceConfig,
        key,
        directory=t.directory,
        nemo_jsonl=file_list(t.nemo_jsonl, f"{key}.nemo_jsonl"),
        nemo_jsonl_validation=file_list(t.nemo_jsonl_validation, f"{key}.nemo_jsonl_validation"),
        restore_from_path=t.restore_from_path,
        top_k=t.top_k,
        placement=t.placement,
    )
    kd = extract(KnowledgeDistillationConfig, section, "model.knowledge_distillation")
    train, val = normalize_data_prefix(tree.model.data.data_prefix)
    return _construct(
        KDRunConfig,
        "model",
        run_dir=run_dir,
        teacher=teacher,
        knowledge_distillation=kd,
        trainer=tree.trainer.knowledge_distillation,
        data=data_config(tree, train, val),
        **training_fields(tree, base_model),
    )


def _construct(cls: Callable[..., Any], key: str, **kwargs: Any) -> Any:
    from align_cli.errors import ConfigError

    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:
        text = str(exc)
        raise ConfigError(text if text.startswith("model.") else f"{key}: {text}", key=key) from exc


# ------------------------------------------------------------------------------ kd teacher


@cache
def kd_teacher_tree() -> type:
    """``align kd teacher``: NeMo-Aligner's compute_topk_logits.yaml names where they exist."""
    pass_fields = flat_fields(
        TeacherPassConfig, rename={"output_dir": "output"}, exclude=("micro_batch_size",)
    )
    return _tree(
        "KDTeacher",
        "The ``align kd teacher`` configuration tree.",
        launch_fields(precision=False),
        [
            spec_of(TeacherPassConfig, "micro_batch_size", doc="examples per teacher forward"),
            spec_of(KDTeacherRunConfig, "seed"),
            *flat_fields(ParallelConfig),
            FieldSpec("data", _KD_DATA, factory=_KD_DATA),
        ],
        [
            *[
                FieldSpec(f.name, str | None, None, doc="output directory (required)")
                if f.name == "output"
                else f
                for f in pass_fields
            ],
            spec_of(
                KDTeacherRunConfig,
                "tokenizer_from",
                doc="a .nemo whose tokenizer to use (the student's)",
            ),
            FieldSpec("pretrained_checkpoint", PretrainedSection, factory=PretrainedSection),
        ],
    )


def _kd_teacher_config(
    tree: Any, run_dir: str, base_model: ModelConfig | None
) -> KDTeacherRunConfig:
    from align_cli.errors import ConfigError

    restore = tree.pretrained_checkpoint.restore_from_path
    if restore is None:
        raise ConfigError(
            "pretrained_checkpoint.restore_from_path: the teacher .nemo is required (--restore)",
            key="pretrained_checkpoint.restore_from_path",
        )
    output = _construct(
        TeacherPassConfig,
        "output",
        output_dir=run_dir,
        micro_batch_size=tree.model.micro_batch_size,
        **{
            name: getattr(tree, name)
            for name in (
                "top_k",
                "dtype",
                "micro_batches_per_call",
                "num_parts",
                "keep_input_ids",
                "shard_positions",
                "durable",
            )
        },
    )
    train, val = normalize_data_prefix(tree.model.data.data_prefix)
    return KDTeacherRunConfig(
        restore_from_path=restore,
        output=output,
        data=data_config(tree, train, val, batch=False),
        parallel=extract(ParallelConfig, tree.model, "model"),
        tokenizer_from=tree.tokenizer_from,
        seed=tree.model.seed,
    )


# -------------------------------------------------------------------------------- generate

_GENERATE_OWN = (
    "sampling_params",
    "length_params",
    "micro_batch_size",
    "seq_length",
    "seed",
    "add_bos",
    "chat_template",
)


@cache
def generate_tree() -> type:
    """``align generate``: the prompts, the model and `GenerateConfig`'s settings."""
    own = [f for f in flat_fields(GenerateConfig) if f.name in _GENERATE_OWN]
    return _tree(
        "Generate",
        "The ``align generate`` configuration tree.",
        launch_fields(),
        model_fields(batch=False, seed=False, optim=False),  # the seed is top-level
        [
            FieldSpec("prompts_file", str | None, None, doc="JSONL prompts (the argument)"),
            FieldSpec("output_file", str | None, None, doc="completions JSONL (--out)"),
            *own,
            FieldSpec("pretrained_checkpoint", PretrainedSection, factory=PretrainedSection),
        ],
    )


def _generate_config(tree: Any, run_dir: str, base_model: ModelConfig | None) -> GenerateConfig:
    from align_cli.errors import ConfigError

    for key in ("prompts_file", "output_file"):
        if getattr(tree, key) is None:
            raise ConfigError(f"{key}: required", key=key)
    return _construct(
        GenerateConfig,
        "generate",
        prompts_file=tree.prompts_file,
        output_file=tree.output_file,
        restore_from_path=tree.pretrained_checkpoint.restore_from_path,
        model=model_for(tree, base_model),
        parallel=extract(ParallelConfig, tree.model, "model"),
        **{name: getattr(tree, name) for name in _GENERATE_OWN},
    )


def data_files(algorithm: str, tree: Any) -> tuple[str, ...]:
    """The data files named by a tree (empty: the synthetic task)."""
    if algorithm == "spin":
        data = tree.model.data
        return file_list(data.train_ds.file_path, "model.data.train_ds.file_path") + file_list(
            data.validation_ds.file_path, "model.data.validation_ds.file_path"
        )
    if algorithm == "generate":
        return (tree.prompts_file,) if tree.prompts_file else ()
    train, val = normalize_data_prefix(tree.model.data.data_prefix)
    if algorithm == "kd":  # NeMo-Aligner KD JSONL brings its own examples
        teacher = tree.model.knowledge_distillation.teacher
        key = "model.knowledge_distillation.teacher.nemo_jsonl"
        train += file_list(teacher.nemo_jsonl, key)
    return train + val


TREES: dict[str, Callable[[], type]] = {
    "spin": spin_tree,
    "kd": kd_tree,
    "kd_teacher": kd_teacher_tree,
    "generate": generate_tree,
}
"""Tree name -> its class factory."""

RUN_CONFIGS: dict[str, Callable[[Any, str, ModelConfig | None], Any]] = {
    "spin": _spin_config,
    "kd": _kd_config,
    "kd_teacher": _kd_teacher_config,
    "generate": _generate_config,
}
"""Tree name -> the typed configuration its tree converts to."""

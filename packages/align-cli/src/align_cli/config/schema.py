"""The configuration tree of ``align run``, with NeMo-Aligner's key names.

The tree is made of the typed dataclasses that live in align-core (`DPOConfig`, `KTOConfig`,
`SFTConfig`, `TrainerConfig`, `ReferenceConfig`, `ParallelConfig`, `ModelConfig`, `DataConfig`)
nested in a few CLI sections that only arrange them under NeMo-Aligner's names::

    trainer.devices / num_nodes / precision        launch (same as --nproc-per-node / --nnodes)
    trainer.<algo>.*                               TrainerConfig (max_steps, val_check_interval...)
    model.micro_batch_size, model.global_batch_size, model.seed
    model.tensor_model_parallel_size, ...          ParallelConfig (flat, as in NeMo)
    model.num_layers, model.encoder_seq_length ... ModelConfig (flat; unset = from the checkpoint)
    model.<algo>.*                                 DPOConfig / KTOConfig / SFTConfig
    model.data.data_prefix, model.data.*           DataConfig
    model.reference.*                              ReferenceConfig
    exp_manager.*                                  run directory, resume, loggers
    pretrained_checkpoint.restore_from_path        the initial policy

Each algorithm (``dpo``, ``kto``, ``sft``) gets its own tree: a KTO run has ``model.kto`` and
``trainer.kto`` and no ``model.dpo``, so a key for another algorithm fails instead of being
silently ignored. The trees of ``spin``, ``kd`` (``model.knowledge_distillation``), the teacher
pass (``kd_teacher``) and ``generate`` are built from the same pieces in
`align_cli.config.trees`. Defaults are never written here; they are read from the source
dataclasses.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from collections.abc import Mapping
from functools import cache
from typing import Any, Literal

from align_cli.config.structured import FieldSpec, build, extract, flat_fields, typed_section
from align_cli.errors import ConfigError
from align_core.algorithms import REGISTRY
from align_core.config import ModelConfig, ParallelConfig
from align_core.lora import LoraConfig
from align_core.optim import OptimizerConfig, SchedulerConfig
from align_core.trainer import DataConfig, ReferenceConfig, RunConfig, TrainerConfig

__all__ = [
    "ALGORITHMS",
    "ALGORITHM_SECTIONS",
    "MODEL_RENAMES",
    "NOT_FOR_SFT_DATA",
    "RUN_SECTIONS",
    "TreeAlgorithm",
    "data_config",
    "data_section",
    "default_of",
    "file_list",
    "launch_fields",
    "model_fields",
    "model_for",
    "model_overrides",
    "normalize_data_prefix",
    "scheduler",
    "section_of",
    "spec_of",
    "to_run_config",
    "training_fields",
    "tree_class",
    "typed_tree",
]

TreeAlgorithm = Literal["dpo", "kto", "sft", "spin", "kd", "kd_teacher", "generate"]
ALGORITHMS: dict[str, type] = {
    spec.name: spec.config_class
    for spec in REGISTRY.values()
    if spec.shared_loop and not spec.is_preset and spec.config_class is not None
}
"""The preference and SFT trees made by this module (the others: `align_cli.config.trees`).

Read from align-core's algorithm registry: the algorithms of the shared training loop."""

ALGORITHM_SECTIONS: dict[str, str] = {
    spec.name: spec.section for spec in REGISTRY.values() if not spec.is_preset
}
"""Training tree -> the name of its ``trainer.<section>`` and ``model.<section>`` (NeMo's)."""

NOT_FOR_SFT_DATA = ("packing", "pack_size", "default_chosen_reward", "default_rejected_reward")
"""`DataConfig` fields that SPIN and distillation (SFT data, no packing) have no use for."""


def section_of(algorithm: str) -> str:
    """The ``trainer.<section>`` / ``model.<section>`` name of a training tree."""
    return ALGORITHM_SECTIONS[algorithm]


MODEL_RENAMES = {"seq_length": "encoder_seq_length"}
"""`ModelConfig` field -> NeMo key under ``model.``."""

DATA_RENAMES = {"pad_to_multiple_of": "pad_length_to_multiple_of"}
"""`DataConfig` field -> NeMo key under ``model.data.``."""

_DATA_ELSEWHERE = ("train_files", "validation_files", "micro_batch_size", "global_batch_size")
PRECISIONS = {
    "32": "fp32",
    "fp32": "fp32",
    "32-true": "fp32",
    "bf16": "bf16",
    "bf16-mixed": "bf16",
    "16": "fp16",
    "fp16": "fp16",
    "16-mixed": "fp16",
}


def default_of(cls: type, name: str) -> Any:
    """The default of field ``name`` of dataclass ``cls`` (its one home)."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            if f.default_factory is not dataclasses.MISSING:
                return f.default_factory()
            return f.default
    raise KeyError(name)


def spec_of(cls: type, name: str, key: str | None = None, doc: str = "") -> FieldSpec:
    """A field with the same type and default as ``cls.name``, under key ``key``."""
    hint = typing.get_type_hints(cls)[name]
    return FieldSpec(key or name, hint, default_of(cls, name), doc=doc)


_ExpCheckpoint = typed_section(
    "CheckpointCallbackParams",
    "``exp_manager.checkpoint_callback_params``: what is written at the end.",
    [
        spec_of(
            RunConfig,
            "export_nemo",
            "save_nemo_on_train_end",
            "write run_dir/final.nemo at the end (LoRA merged); null: unless restored from a "
            "Hugging Face directory",
        ),
        spec_of(
            RunConfig,
            "export_hf",
            "save_hf_on_train_end",
            "write run_dir/final_hf/, a Hugging Face directory, at the end (LoRA merged); "
            "null: when restored from a Hugging Face directory",
        ),
    ],
)

ExpManagerSection = typed_section(
    "ExpManagerSection",
    "``exp_manager``: where the run directory is and what it holds.",
    [
        FieldSpec(
            "explicit_log_dir",
            str | None,
            None,
            doc="run directory; default <exp_dir>/<algorithm>-<timestamp>",
        ),
        FieldSpec("exp_dir", str, "runs", doc="parent of new run directories"),
        FieldSpec("name", str | None, None, doc="run name; default <algorithm>-<timestamp>"),
        spec_of(
            RunConfig,
            "resume",
            "resume_if_exists",
            "continue from the newest checkpoint in the run directory",
        ),
        FieldSpec(
            "create_tensorboard_logger",
            bool,
            True,
            doc="write TensorBoard events (when tensorboard is installed)",
        ),
        FieldSpec("create_plots", bool, True, doc="write PNG charts at the end of the run"),
        FieldSpec(
            "checkpoint_callback_params",
            _ExpCheckpoint,
            factory=_ExpCheckpoint,
            doc="final export",
        ),
    ],
)

PretrainedSection = typed_section(
    "PretrainedCheckpointSection",
    "``pretrained_checkpoint``: the initial policy.",
    [
        spec_of(
            RunConfig,
            "restore_from_path",
            doc=".nemo file or directory; unset trains a fresh tiny model",
        )
    ],
)


def data_section(name: str = "DataSection", exclude: tuple[str, ...] = ()) -> type:
    """``model.data`` with ``data_prefix`` and the `DataConfig` fields (less ``exclude``)."""
    return typed_section(
        name,
        "``model.data``: files and how they become batches (align-core's DataConfig).",
        [
            FieldSpec(
                "data_prefix",
                Any,
                None,
                doc="train file(s), or {train: [...], validation: [...], test: [...]}",
            ),
            *flat_fields(DataConfig, rename=DATA_RENAMES, exclude=_DATA_ELSEWHERE + exclude),
        ],
    )


DataSection = data_section()


SCHEDULER_NAMES = {
    "CosineAnnealing": "cosine",
    "cosine": "cosine",
    "WarmupAnnealing": "linear",
    "LinearAnnealing": "linear",
    "linear": "linear",
    "Constant": "constant",
    "ConstantLR": "constant",
    "WarmupHoldPolicy": "constant",
    "constant": "constant",
}
"""NeMo scheduler names (``model.optim.sched.name``) -> `SchedulerConfig.style`."""

SchedSection = typed_section(
    "SchedSection",
    "``model.optim.sched``: the learning-rate schedule (align-core's SchedulerConfig).",
    [
        FieldSpec(
            "name",
            str | None,
            None,
            doc="NeMo scheduler name (CosineAnnealing, WarmupAnnealing, Constant); sets style",
        ),
        *flat_fields(SchedulerConfig),
    ],
)

OptimSection = typed_section(
    "OptimSection",
    "``model.optim``: Adam(W) settings (align-core's OptimizerConfig) and the schedule.",
    [*flat_fields(OptimizerConfig), FieldSpec("sched", SchedSection, factory=SchedSection)],
)


LORA_RENAMES = {"rank": "adapter_dim", "dropout": "adapter_dropout"}
"""`LoraConfig` field -> NeMo key under ``model.peft.lora_tuning``."""

LORA_TARGETS = {
    "attention_qkv": ("linear_qkv",),
    "attention_dense": ("linear_proj",),
    "mlp_fc1": ("linear_fc1",),
    "mlp_fc2": ("linear_fc2",),
    "attention": ("linear_qkv", "linear_proj"),
    "mlp": ("linear_fc1", "linear_fc2"),
    "all": ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"),
}
"""NeMo's LoRA target names -> megatron's linear names (which are accepted as they are)."""

LoraSection = typed_section(
    "LoraTuningSection",
    "``model.peft.lora_tuning``: adapter shape (align-core's LoraConfig, NeMo's names).",
    [
        *flat_fields(LoraConfig, rename=LORA_RENAMES, exclude=("target_modules",)),
        FieldSpec(
            "target_modules",
            list[str],
            list(default_of(LoraConfig, "target_modules")),
            doc="linear_qkv, linear_proj, linear_fc1, linear_fc2, or NeMo's names "
            "(attention_qkv, attention_dense, mlp_fc1, mlp_fc2, attention, mlp, all)",
        ),
    ],
)

PeftSection = typed_section(
    "PeftSection",
    "``model.peft``: parameter-efficient fine-tuning.",
    [
        FieldSpec(
            "peft_scheme",
            Literal["none", "lora"],
            "none",
            doc="none (full fine-tuning) or lora",
        ),
        FieldSpec("lora_tuning", LoraSection, factory=LoraSection),
    ],
)


def launch_fields(*, precision: bool = True) -> list[FieldSpec]:
    """``trainer.devices``, ``trainer.num_nodes`` (and ``trainer.precision``)."""
    fields = [
        FieldSpec("devices", int | None, None, doc="processes per node (= --nproc-per-node)"),
        FieldSpec("num_nodes", int, 1, doc="nodes (= --nnodes)"),
    ]
    if precision:
        fields.append(
            FieldSpec(
                "precision",
                str | None,
                None,
                doc="NeMo precision (bf16, bf16-mixed, 16, 32); sets model.dtype",
            )
        )
    return fields


def model_fields(*, batch: bool = True, seed: bool = True, optim: bool = True) -> list[FieldSpec]:
    """NeMo's flat ``model.*`` keys: batch sizes and seed, parallel layout, architecture, optim."""
    fields = []
    if batch:
        fields += [
            spec_of(DataConfig, "micro_batch_size"),
            spec_of(DataConfig, "global_batch_size"),
        ]
    if seed:
        fields.append(spec_of(RunConfig, "seed"))
    fields += [
        *flat_fields(ParallelConfig),
        *flat_fields(ModelConfig, optional=True, rename=MODEL_RENAMES),
    ]
    if optim:
        fields.append(FieldSpec("optim", OptimSection, factory=OptimSection))
    return fields


RUN_SECTIONS = [
    FieldSpec("exp_manager", ExpManagerSection, factory=ExpManagerSection),
    FieldSpec("pretrained_checkpoint", PretrainedSection, factory=PretrainedSection),
]
"""The top-level sections every training tree ends with."""


@cache
def tree_class(algorithm: TreeAlgorithm) -> type:
    """The typed configuration tree of ``algorithm`` (``dpo`` also serves IPO and RPO)."""
    if algorithm not in ALGORITHMS:
        from align_cli.config.trees import TREES

        if algorithm in TREES:
            return TREES[algorithm]()
        names = ", ".join([*ALGORITHMS, *TREES])
        raise ConfigError(f"unknown algorithm {algorithm!r}; one of {names}")
    name = algorithm.upper()
    trainer = typed_section(
        f"{name}TrainerSection",
        "``trainer``: launch settings and the loop of this algorithm.",
        [
            *launch_fields(),
            FieldSpec(algorithm, TrainerConfig, factory=TrainerConfig, doc="the trainer loop"),
        ],
    )
    model = typed_section(
        f"{name}ModelSection",
        "``model``: batch sizes, parallel layout, architecture and algorithm settings.",
        [
            *model_fields(),
            FieldSpec("peft", PeftSection, factory=PeftSection),
            FieldSpec(algorithm, ALGORITHMS[algorithm], factory=ALGORITHMS[algorithm]),
            FieldSpec("data", DataSection, factory=DataSection),
            FieldSpec("reference", ReferenceConfig, factory=ReferenceConfig),
        ],
    )
    return typed_section(
        f"{name}Tree",
        f"The ``align run {algorithm}`` configuration tree.",
        [
            FieldSpec("trainer", trainer, factory=trainer),
            FieldSpec("model", model, factory=model),
            *RUN_SECTIONS,
        ],
    )


def file_list(value: Any, key: str) -> tuple[str, ...]:
    """One path or a list of paths (None: none) as a tuple.

    Raises:
        ConfigError: Anything else, naming ``key``.
    """
    return _file_list(value, key)


def _file_list(value: Any, key: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ConfigError(f"{key}: expected a file path or a list of paths, got {value!r}", key=key)


def normalize_data_prefix(value: Any) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``model.data.data_prefix`` in any of NeMo's shapes -> (train files, validation files).

    Accepted: one path, a list of paths (all training), or a mapping with ``train``,
    ``validation`` and ``test`` (``test`` is accepted and not used by training).

    Raises:
        ConfigError: Another shape, or an unknown split name (the closest is suggested).
    """
    key = "model.data.data_prefix"
    if not isinstance(value, Mapping):
        return _file_list(value, key), ()
    splits = ("train", "validation", "test")
    for name in value:
        if name not in splits:
            match = difflib.get_close_matches(str(name), splits, n=1)
            hint = f"; did you mean {match[0]!r}?" if match else ""
            raise ConfigError(
                f"{key}.{name}: unknown split (train, validation or test){hint}",
                key=f"{key}.{name}",
            )
    return (
        _file_list(value.get("train"), f"{key}.train"),
        _file_list(value.get("validation"), f"{key}.validation"),
    )


def _dtype(tree: Any) -> str | None:
    precision = tree.trainer.precision
    if precision is None:
        return tree.model.dtype
    if str(precision) not in PRECISIONS:
        raise ConfigError(
            f"trainer.precision: {precision!r} is not one of {', '.join(PRECISIONS)}",
            key="trainer.precision",
        )
    dtype = PRECISIONS[str(precision)]
    if tree.model.dtype is not None and tree.model.dtype != dtype:
        raise ConfigError(
            f"trainer.precision={precision} contradicts model.dtype={tree.model.dtype}",
            key="trainer.precision",
        )
    return dtype


def model_overrides(tree: Any) -> dict[str, Any]:
    """The architecture keys set in the tree, as `ModelConfig` field names."""
    out = {}
    for f in dataclasses.fields(ModelConfig):
        value = getattr(tree.model, MODEL_RENAMES.get(f.name, f.name))
        if value is not None:
            out[f.name] = value
    dtype = _dtype(tree)
    if dtype is not None:
        out["dtype"] = dtype
    return out


def model_for(tree: Any, base_model: ModelConfig | None) -> ModelConfig | None:
    """The architecture of a run: the checkpoint's, changed by the ``model.*`` keys.

    Without a restored model it is `ModelConfig`'s defaults with the ``model.*`` keys applied;
    None lets align-core decide (the checkpoint's architecture, or its tiny default).

    Raises:
        ConfigError: ``model.*`` keys change a restored model whose architecture was not given.
    """
    changes = model_overrides(tree)
    restore = tree.pretrained_checkpoint.restore_from_path
    if restore is None:
        if changes and "vocab_size" not in changes:
            # A fresh model uses the byte tokenizer; its vocabulary has to fit.
            from align_data import ByteTokenizer

            changes["vocab_size"] = ByteTokenizer().vocab_size
        return _model_config(changes) if changes else None  # None: the trainer's tiny default
    if changes:
        if base_model is None:
            raise ConfigError(
                f"model.{next(iter(changes))}: changing a restored model needs its architecture "
                "(base_model)",
                key="model",
            )
        return base_model.replace(**changes)
    return None  # the trainer reads the architecture from the checkpoint


def data_config(
    tree: Any,
    train_files: tuple[str, ...],
    validation_files: tuple[str, ...],
    *,
    batch: bool = True,
    **changes: Any,
) -> DataConfig:
    """`DataConfig` from ``model.data`` (the fields its section has), the files and batch sizes.

    Raises:
        ConfigError: A value `DataConfig` rejects.
    """
    section = tree.model.data
    kwargs = {
        f.name: getattr(section, DATA_RENAMES.get(f.name, f.name))
        for f in dataclasses.fields(DataConfig)
        if f.name not in _DATA_ELSEWHERE and hasattr(section, DATA_RENAMES.get(f.name, f.name))
    }
    if batch:
        kwargs["micro_batch_size"] = tree.model.micro_batch_size
        kwargs["global_batch_size"] = tree.model.global_batch_size
    try:
        return DataConfig(
            train_files=train_files,
            validation_files=validation_files,
            **{**kwargs, **changes},
        )
    except ValueError as exc:
        text = str(exc)
        micro, gbs = kwargs.get("micro_batch_size"), kwargs.get("global_batch_size")
        if batch and isinstance(micro, int) and isinstance(gbs, int) and micro > 0 and gbs % micro:
            from align_core.trainer.planner import multiple_hint

            text += f"; {multiple_hint(gbs, micro)}"
        raise ConfigError(text, key="model.data") from exc


def to_run_config(
    algorithm: TreeAlgorithm,
    tree: Any,
    run_dir: str,
    *,
    base_model: ModelConfig | None = None,
) -> Any:
    """The typed run configuration of a typed tree (align-core's, or align-kd's for ``kd``).

    Args:
        algorithm: ``dpo``, ``kto``, ``sft``, ``spin``, ``kd``, ``kd_teacher`` or ``generate``.
        tree: An instance of ``tree_class(algorithm)``.
        run_dir: The resolved run directory.
        base_model: The architecture read from ``pretrained_checkpoint.restore_from_path``,
            needed only when ``model.*`` keys change a restored model. Without a restored model
            the architecture is `ModelConfig`'s defaults with the ``model.*`` keys applied.

    Raises:
        ConfigError: A value the typed configs reject, naming the key.
    """
    if algorithm not in ALGORITHMS:
        from align_cli.config.trees import RUN_CONFIGS

        return RUN_CONFIGS[algorithm](tree, run_dir, base_model)
    common = training_fields(tree, base_model)
    train_files, validation_files = normalize_data_prefix(tree.model.data.data_prefix)
    kwargs: dict[str, Any] = {algorithm: getattr(tree.model, algorithm)}
    return RunConfig(
        algorithm=algorithm,
        run_dir=run_dir,
        trainer=getattr(tree.trainer, algorithm),
        reference=tree.model.reference,
        data=data_config(tree, train_files, validation_files),
        peft=_lora(tree.model.peft),
        **common,
        **kwargs,
    )


def training_fields(tree: Any, base_model: ModelConfig | None) -> dict[str, Any]:
    """The fields every training run configuration takes from the same keys of the tree.

    ``model``, ``parallel``, ``optim``, ``sched``, ``restore_from_path``, ``resume``,
    ``export_nemo``, ``export_hf`` and ``seed``: shared by align-core's `RunConfig` and
    `SPINRunConfig` and align-kd's `KDRunConfig`.
    """
    return {
        "model": model_for(tree, base_model),
        "parallel": extract(ParallelConfig, tree.model, "model"),
        "optim": extract(OptimizerConfig, tree.model.optim, "model.optim"),
        "sched": scheduler(tree.model.optim.sched),
        "restore_from_path": tree.pretrained_checkpoint.restore_from_path,
        "resume": tree.exp_manager.resume_if_exists,
        "export_nemo": tree.exp_manager.checkpoint_callback_params.save_nemo_on_train_end,
        "export_hf": tree.exp_manager.checkpoint_callback_params.save_hf_on_train_end,
        "seed": tree.model.seed,
    }


def scheduler(section: Any) -> SchedulerConfig:
    """`SchedulerConfig` from ``model.optim.sched`` (NeMo's ``name`` sets ``style``)."""
    key = "model.optim.sched"
    if section.name is not None:
        if section.name not in SCHEDULER_NAMES:
            names = ", ".join(SCHEDULER_NAMES)
            raise ConfigError(f"{key}.name: {section.name!r} is not one of {names}", key=key)
        style = SCHEDULER_NAMES[section.name]
        if section.style != default_of(SchedulerConfig, "style") and section.style != style:
            raise ConfigError(
                f"{key}.name={section.name} contradicts {key}.style={section.style}", key=key
            )
        section.style = style
    return extract(SchedulerConfig, section, key)


def _lora(section: Any) -> LoraConfig | None:
    if section.peft_scheme == "none":
        return None
    key = "model.peft.lora_tuning"
    targets: list[str] = []
    for name in section.lora_tuning.target_modules:
        for target in LORA_TARGETS.get(name, (name,)):
            if target not in targets:
                targets.append(target)
    tuning = section.lora_tuning
    tuning.target_modules = tuple(targets)
    return extract(LoraConfig, tuning, key, rename=LORA_RENAMES)


def _model_config(changes: dict[str, Any]) -> ModelConfig:
    try:
        return ModelConfig(**changes)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"model: {exc}", key="model") from exc


def typed_tree(algorithm: TreeAlgorithm, plain: Any) -> Any:
    """Convert what ``OmegaConf.to_object`` returned into the typed tree (checking choices)."""
    return build(tree_class(algorithm), plain)

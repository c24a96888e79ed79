"""The entry point the ``align`` CLI calls: one typed run configuration in, a `RunResult` out.

The CLI converts its Hydra tree into the dataclasses below (``OmegaConf.to_object``) and calls
`train`. Every default lives in a dataclass field; nothing here reads a dict.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from align_core.algorithms.dpo import DPOConfig
from align_core.algorithms.kto import KTOConfig
from align_core.algorithms.sft import SFTConfig
from align_core.config import ModelConfig, ParallelConfig
from align_core.lora import LoraConfig
from align_core.optim import OptimizerConfig, SchedulerConfig
from align_core.trainer.config import ReferenceConfig, TrainerConfig
from align_core.trainer.metrics import MetricsSink

if TYPE_CHECKING:
    from align_core.trainer.loop import StepPlan

__all__ = [
    "Algorithm",
    "DataConfig",
    "RunConfig",
    "RunPlan",
    "RunResult",
    "StopReason",
    "SyntheticConfig",
    "sft_view",
    "train",
]

Algorithm = str
"""An algorithm name of `align_core.algorithms.REGISTRY` (``RunConfig.algorithm``: one trained
by the shared loop; ``dpo`` covers the DPO family, ``DPOConfig.preference_loss`` picks the loss)."""

StopReason = Literal["completed", "max_time", "sigterm", "sigint", "nonfinite"]


@dataclass
class SyntheticConfig:
    """The built-in synthetic task (align-data's generator) used when no data files are given.

    Attributes:
        num_train: Training records.
        num_validation: Held-out records.
        seed: Generator seed (the same seed gives the same files).
    """

    num_train: int = 1024
    num_validation: int = 128
    seed: int = 0


@dataclass
class DataConfig:
    """``model.data`` plus the batch sizes (``model.micro_batch_size``/``global_batch_size``).

    Attributes:
        train_files: Training JSONL/Parquet files (``model.data.data_prefix.train``); empty uses
            the synthetic task.
        validation_files: Held-out files; empty with synthetic data uses its held-out split,
            empty with real data disables validation.
        format: Record format name, or None to detect it per file.
        micro_batch_size: Examples (pairs for DPO) per micro-batch per data-parallel rank.
        global_batch_size: Examples per optimizer step over all data-parallel ranks; must be a
            multiple of ``micro_batch_size × data-parallel size``.
        seq_length: Longest tokenized example; None uses the model's ``seq_length``.
        pad_to_multiple_of: Pad each batch's length up to a multiple of this (None: no rounding).
        packing: Pack several examples per row (block-diagonal causal attention, per-sequence
            positions); DPO and SFT only.
        pack_size: Tokens per packed row; None uses ``seq_length`` (2 × for DPO pairs).
        over_long: Examples longer than ``seq_length``: ``truncate`` (prompt from the left, then
            the response from the right) or ``drop``. Both are counted and reported.
        strict: Stop at the first malformed record (file:line: field: reason); False skips and
            reports them.
        default_chosen_reward: RPO ground-truth reward of chosen responses without one.
        default_rejected_reward: RPO ground-truth reward of rejected responses without one.
        shuffle: Shuffle training examples each epoch (seeded; validation is never shuffled).
        seed: Seed of the training sampler.
        synthetic: The synthetic task used when ``train_files`` is empty.
    """

    train_files: tuple[str, ...] = ()
    validation_files: tuple[str, ...] = ()
    format: str | None = None
    micro_batch_size: int = 1
    global_batch_size: int = 64
    seq_length: int | None = None
    pad_to_multiple_of: int | None = None
    packing: bool = False
    pack_size: int | None = None
    over_long: Literal["truncate", "drop"] = "truncate"
    strict: bool = True
    default_chosen_reward: float = 1.0
    default_rejected_reward: float = 0.0
    shuffle: bool = True
    seed: int = 1234
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)

    def __post_init__(self) -> None:
        if self.micro_batch_size < 1:
            raise ValueError("model.micro_batch_size must be >= 1")
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(
                f"model.global_batch_size {self.global_batch_size} is not a multiple of "
                f"model.micro_batch_size {self.micro_batch_size}"
            )


@dataclass
class RunConfig:
    """Everything one training run needs, fully typed.

    Attributes:
        algorithm: ``dpo`` (with IPO/RPO via ``dpo.preference_loss``), ``kto`` or ``sft``.
        run_dir: Directory for checkpoints, the reference-log-prob cache, the exported ``.nemo``.
        model: Architecture; None takes it from ``restore_from_path``, or the tiny default
            `ModelConfig` when nothing is restored.
        parallel: Tensor/pipeline layout (data parallel is the rest of the world).
        trainer: Loop settings (steps, epochs, validation, saving, clipping, limits).
        reference: Reference-policy strategy.
        data: Files, batch sizes, packing.
        dpo: DPO-family settings (used when ``algorithm == "dpo"``).
        kto: KTO settings (used when ``algorithm == "kto"``).
        sft: SFT settings (used when ``algorithm == "sft"``).
        optim: Optimizer settings (``model.optim``).
        sched: Learning-rate schedule (``model.optim.sched``).
        peft: LoRA settings (``model.peft``, `align_core.lora.LoraConfig`); None is full
            fine-tuning.
        restore_from_path: ``.nemo`` file (or directory), or Hugging Face directory, with the
            initial policy and tokenizer; None builds a freshly initialised ``model`` with
            align-data's byte-level tokenizer.
        resume: Continue from the newest complete checkpoint in ``run_dir`` when there is one.
        export_nemo: Write the final policy to ``run_dir/final.nemo`` (LoRA merged); None:
            unless the model was restored from a Hugging Face directory.
        export_hf: Write the final policy to ``run_dir/final_hf/`` (a Hugging Face directory,
            LoRA merged); None: when the model was restored from a Hugging Face directory.
        seed: Seed of the model initialisation, dropout and everything not seeded elsewhere.
    """

    algorithm: Algorithm
    run_dir: str
    model: ModelConfig | None = None
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    data: DataConfig = field(default_factory=DataConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    kto: KTOConfig = field(default_factory=KTOConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    optim: OptimizerConfig = field(default_factory=OptimizerConfig)
    sched: SchedulerConfig = field(default_factory=SchedulerConfig)
    peft: LoraConfig | None = None
    restore_from_path: str | None = None
    resume: bool = True
    export_nemo: bool | None = None
    export_hf: bool | None = None
    seed: int = 1234

    def __post_init__(self) -> None:
        from align_core.algorithms.registry import get_algorithm

        spec = get_algorithm(self.algorithm)
        if not spec.shared_loop or spec.is_preset:
            raise ValueError(
                f"RunConfig.algorithm {self.algorithm!r} is not trained by the shared loop "
                f"(presets run as their base algorithm: {spec.base})"
            )


@dataclass(frozen=True)
class RunPlan:
    """The resolved plan, given to sinks before the first step (and printed by ``--dry-run``).

    Attributes:
        algorithm: The algorithm.
        run_dir: The run directory.
        world_size: Processes.
        tensor_model_parallel_size: TP.
        pipeline_model_parallel_size: PP.
        data_parallel_size: DP.
        micro_batch_size: Examples per micro-batch per DP rank.
        global_batch_size: Examples per optimizer step.
        accumulation_steps: Micro-batches per DP rank per step.
        train_samples: Training examples (pairs for DPO) after validation and filtering.
        val_samples: Held-out examples used per validation.
        steps_per_epoch: Optimizer steps per epoch.
        max_steps: Total optimizer steps of the run.
        start_step: Steps already done (non-zero when resuming).
        val_check_interval: Validate every this many steps (0: never).
        save_interval: Save every this many steps (0: only at the end).
        reference_strategy: The resolved reference strategy (``none`` for SFT).
        resumed_from: Checkpoint directory resumed from, if any.
        resume_note: One line when the resumed run's length differs from the original's
            (`align_core.trainer.resume_length_note`), else None.
    """

    algorithm: Algorithm
    run_dir: str
    world_size: int
    tensor_model_parallel_size: int
    pipeline_model_parallel_size: int
    data_parallel_size: int
    micro_batch_size: int
    global_batch_size: int
    accumulation_steps: int
    train_samples: int
    val_samples: int
    steps_per_epoch: int
    max_steps: int
    start_step: int
    val_check_interval: int
    save_interval: int
    reference_strategy: str
    resumed_from: str | None
    resume_note: str | None = None

    @property
    def steps(self) -> StepPlan:
        """The step accounting the trainer follows (`align_core.trainer.loop.StepPlan`)."""
        from align_core.trainer.loop import StepPlan

        return StepPlan(
            steps_per_epoch=self.steps_per_epoch,
            max_steps=self.max_steps,
            val_check_interval=self.val_check_interval,
            val_batches=self.val_samples // self.global_batch_size,
            save_interval=self.save_interval,
        )


@dataclass(frozen=True)
class RunResult:
    """How a run ended.

    Attributes:
        run_dir: The run directory.
        stop_reason: ``completed`` (max steps/epochs), ``max_time``, ``sigterm``, ``sigint``
            (Ctrl-C) or
            ``nonfinite`` (a NaN/inf loss or gradient with ``trainer.nonfinite="stop"``).
        steps: Optimizer steps completed (including those of resumed runs).
        consumed_samples: Training examples consumed.
        skipped_steps: Steps skipped because of a non-finite loss or gradient.
        last_train_metrics: The last training metrics (empty if no step ran).
        last_val_metrics: The last validation metrics (empty if none ran).
        checkpoint: The last checkpoint written, if any.
        nemo_path: The exported ``.nemo``, if any.
        reference_strategy: The resolved reference strategy.
        hf_path: The exported Hugging Face directory, if any.
    """

    run_dir: str
    stop_reason: StopReason
    steps: int
    consumed_samples: int
    skipped_steps: int
    last_train_metrics: dict[str, float]
    last_val_metrics: dict[str, float]
    checkpoint: str | None
    nemo_path: str | None
    reference_strategy: str
    hf_path: str | None = None


def sft_view(run: Any) -> RunConfig:
    """A SPIN or distillation run as an SFT `RunConfig`, for the shared builders.

    Both read SFT data and resolve their model as an SFT run would, so the model source, the
    tokenizer and the datasets come from this view.

    Args:
        run: A config with ``run_dir``, ``model``, ``parallel``, ``data``, ``restore_from_path``,
            ``resume``, ``export_nemo``, ``export_hf`` and ``seed`` (`SPINRunConfig`,
            align-kd's `KDRunConfig`).
    """
    return RunConfig(
        algorithm="sft",
        run_dir=run.run_dir,
        model=run.model,
        parallel=run.parallel,
        data=run.data,
        restore_from_path=run.restore_from_path,
        resume=run.resume,
        export_nemo=run.export_nemo,
        export_hf=run.export_hf,
        seed=run.seed,
    )


def train(run: RunConfig, sinks: Sequence[MetricsSink] = ()) -> RunResult:
    """Train one run, on this process's share of the world (call it on every rank).

    Initialises torch.distributed and megatron's groups from the launcher's environment (a plain
    single process works too), builds or restores the policy, tokenizes the data, resolves the
    reference strategy (computing the reference cache for ``precompute``), resumes from
    ``run_dir`` when asked and possible, and runs the trainer loop until max steps/epochs, the
    wall-clock limit or SIGTERM; then saves a checkpoint and exports ``run_dir/final.nemo``
    (when ``run.export_nemo`` and the run completed). Metrics go to ``sinks`` on global rank 0
    only; ``sink.finish`` is called however the run ends.

    Args:
        run: The run configuration.
        sinks: Metric receivers (rank 0 only).

    Returns:
        How the run ended (on every rank).

    Raises:
        align_core.trainer.NonFiniteError: A NaN/inf loss or gradient with
            ``trainer.nonfinite="stop"``; the message names the step.
        align_data.DataError: A malformed record (strict mode), before any training.
        ValueError: An inconsistent configuration (batch sizes vs parallel layout, a reference
            strategy that cannot apply, ...), before any training.
    """
    from align_core.trainer.session import run_training

    return run_training(run, sinks)

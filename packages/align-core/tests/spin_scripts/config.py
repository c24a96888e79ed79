"""The SPIN run configuration shared by the data-parallel test and its one-process reference."""

from __future__ import annotations

from align_core import ModelConfig
from align_core.algorithms.spin import SPINConfig
from align_core.generation import LengthConfig, SamplingConfig
from align_core.optim import OptimizerConfig, SchedulerConfig
from align_core.trainer import DataConfig, SyntheticConfig
from align_core.trainer.spin import SPINRunConfig, SPINTrainerConfig


def spin_config(run_dir: str, *, micro_batch_size: int, rollout_micro_batch_size: int):
    """One iteration, one epoch of 16 prompts in global batches of 8; validation at the end."""
    return SPINRunConfig(
        run_dir=run_dir,
        model=ModelConfig(vocab_size=259, seq_length=64),
        trainer=SPINTrainerConfig(
            max_iterations=1, max_epochs=1, val_check_interval=2, save_interval=0
        ),
        data=DataConfig(
            micro_batch_size=micro_batch_size,
            global_batch_size=8,
            synthetic=SyntheticConfig(num_train=16, num_validation=8),
        ),
        spin=SPINConfig(
            ref_policy_kl_penalty=0.3,
            rollout_micro_batch_size=rollout_micro_batch_size,
            sampling_params=SamplingConfig(temperature=0.9, top_k=50),
            length_params=LengthConfig(max_length=16),
            val_generations=3,
        ),
        optim=OptimizerConfig(lr=1e-3, weight_decay=0.0),
        sched=SchedulerConfig(style="constant"),
        export_nemo=False,
    )

"""The trainer loop shared by every algorithm, and the entry point the CLI calls (`train`).

``train(RunConfig(...), sinks=[...]) -> RunResult`` runs a whole training run; `Trainer` is the
loop itself for callers that assemble their own model, optimizer, data and reference.
"""

from align_core.trainer.config import ReferenceConfig, TrainerConfig
from align_core.trainer.data import TrainData
from align_core.trainer.loop import (
    BatchSource,
    NonFiniteError,
    ParallelGroups,
    StepPlan,
    Trainer,
    TrainerState,
    plan_steps,
    resume_length_note,
)
from align_core.trainer.metrics import InMemorySink, MetricsSink, Split, peak_memory_bytes
from align_core.trainer.run import (
    Algorithm,
    DataConfig,
    RunConfig,
    RunPlan,
    RunResult,
    StopReason,
    SyntheticConfig,
    sft_view,
    train,
)
from align_core.trainer.signals import StopRequest, parse_max_time

__all__ = [
    "Algorithm",
    "BatchSource",
    "DataConfig",
    "InMemorySink",
    "MetricsSink",
    "NonFiniteError",
    "ParallelGroups",
    "ReferenceConfig",
    "RunConfig",
    "RunPlan",
    "RunResult",
    "Split",
    "StepPlan",
    "StopReason",
    "StopRequest",
    "SyntheticConfig",
    "TrainData",
    "Trainer",
    "TrainerConfig",
    "TrainerState",
    "parse_max_time",
    "peak_memory_bytes",
    "plan_steps",
    "resume_length_note",
    "sft_view",
    "train",
]

"""The trainer loop shared by every algorithm, and the entry point the CLI calls (`train`)."""

from align_core.trainer.config import ReferenceConfig, TrainerConfig
from align_core.trainer.metrics import InMemorySink, MetricsSink, Split, peak_memory_bytes
from align_core.trainer.run import (
    Algorithm,
    DataConfig,
    RunConfig,
    RunPlan,
    RunResult,
    StopReason,
    SyntheticConfig,
    train,
)

__all__ = [
    "Algorithm",
    "DataConfig",
    "InMemorySink",
    "MetricsSink",
    "ReferenceConfig",
    "RunConfig",
    "RunPlan",
    "RunResult",
    "Split",
    "StopReason",
    "SyntheticConfig",
    "TrainerConfig",
    "peak_memory_bytes",
    "train",
]

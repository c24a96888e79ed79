"""megatron-core models, parallelism, checkpoints, trainer and algorithms for align."""

from align_core.config import (
    ModelConfig,
    ParallelConfig,
    padded_vocab_size,
    to_transformer_config,
    torch_dtype,
)
from align_core.cpu_shims import apply_cpu_shims, cpu_shims_applied
from align_core.model import build_gpt_model, te_available, unwrap_model
from align_core.parallel import (
    DistributedContext,
    destroy_distributed,
    free_port,
    init_distributed,
)

__all__ = [
    "DistributedContext",
    "ModelConfig",
    "ParallelConfig",
    "apply_cpu_shims",
    "build_gpt_model",
    "cpu_shims_applied",
    "destroy_distributed",
    "free_port",
    "init_distributed",
    "padded_vocab_size",
    "te_available",
    "to_transformer_config",
    "torch_dtype",
    "unwrap_model",
]

"""megatron-core models, parallelism, checkpoints, trainer and algorithms for align."""

from align_core.checkpoint import Checkpointer, LoadedCheckpoint
from align_core.config import (
    ModelConfig,
    ParallelConfig,
    padded_vocab_size,
    to_transformer_config,
    torch_dtype,
)
from align_core.cpu_shims import apply_cpu_shims, cpu_shims_applied
from align_core.device import module_device, to_device
from align_core.logprobs import (
    LogProbConfig,
    causal_attention_mask,
    final_hidden_states,
    forward_token_logps,
    output_weight,
    token_logps_from_hidden,
    token_logps_from_logits,
)
from align_core.model import build_gpt_model, te_available, unwrap_model
from align_core.optim import (
    OptimizerConfig,
    SchedulerConfig,
    build_optimizer,
    learning_rate,
    set_learning_rate,
)
from align_core.parallel import (
    DistributedContext,
    destroy_distributed,
    free_port,
    init_distributed,
)
from align_core.rng import capture_rng_state, restore_rng_state, seed_all
from align_core.schedule import (
    ForwardFn,
    LossFn,
    broadcast_from_last_stage,
    concat_outputs,
    forward_backward,
)
from align_core.training import DDPConfig, wrap_ddp

__all__ = [
    "Checkpointer",
    "DDPConfig",
    "DistributedContext",
    "ForwardFn",
    "LoadedCheckpoint",
    "LogProbConfig",
    "LossFn",
    "ModelConfig",
    "OptimizerConfig",
    "ParallelConfig",
    "SchedulerConfig",
    "apply_cpu_shims",
    "broadcast_from_last_stage",
    "build_gpt_model",
    "build_optimizer",
    "capture_rng_state",
    "causal_attention_mask",
    "concat_outputs",
    "cpu_shims_applied",
    "destroy_distributed",
    "final_hidden_states",
    "forward_backward",
    "forward_token_logps",
    "free_port",
    "init_distributed",
    "learning_rate",
    "module_device",
    "output_weight",
    "padded_vocab_size",
    "restore_rng_state",
    "seed_all",
    "set_learning_rate",
    "te_available",
    "to_device",
    "to_transformer_config",
    "token_logps_from_hidden",
    "token_logps_from_logits",
    "torch_dtype",
    "unwrap_model",
    "wrap_ddp",
]

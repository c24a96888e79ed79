"""megatron-core models, parallelism, checkpoints, trainer and algorithms for align."""

from typing import TYPE_CHECKING

from align_core._lazy import lazy_exports

if TYPE_CHECKING:
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

_EXPORTS = {
    "Checkpointer": "align_core.checkpoint",
    "LoadedCheckpoint": "align_core.checkpoint",
    "ModelConfig": "align_core.config",
    "ParallelConfig": "align_core.config",
    "padded_vocab_size": "align_core.config",
    "to_transformer_config": "align_core.config",
    "torch_dtype": "align_core.config",
    "apply_cpu_shims": "align_core.cpu_shims",
    "cpu_shims_applied": "align_core.cpu_shims",
    "module_device": "align_core.device",
    "to_device": "align_core.device",
    "LogProbConfig": "align_core.logprobs",
    "causal_attention_mask": "align_core.logprobs",
    "final_hidden_states": "align_core.logprobs",
    "forward_token_logps": "align_core.logprobs",
    "output_weight": "align_core.logprobs",
    "token_logps_from_hidden": "align_core.logprobs",
    "token_logps_from_logits": "align_core.logprobs",
    "build_gpt_model": "align_core.model",
    "te_available": "align_core.model",
    "unwrap_model": "align_core.model",
    "OptimizerConfig": "align_core.optim",
    "SchedulerConfig": "align_core.optim",
    "build_optimizer": "align_core.optim",
    "learning_rate": "align_core.optim",
    "set_learning_rate": "align_core.optim",
    "DistributedContext": "align_core.parallel",
    "destroy_distributed": "align_core.parallel",
    "free_port": "align_core.parallel",
    "init_distributed": "align_core.parallel",
    "capture_rng_state": "align_core.rng",
    "restore_rng_state": "align_core.rng",
    "seed_all": "align_core.rng",
    "ForwardFn": "align_core.schedule",
    "LossFn": "align_core.schedule",
    "broadcast_from_last_stage": "align_core.schedule",
    "concat_outputs": "align_core.schedule",
    "forward_backward": "align_core.schedule",
    "DDPConfig": "align_core.training",
    "wrap_ddp": "align_core.training",
}

__getattr__ = lazy_exports(__name__, _EXPORTS)

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

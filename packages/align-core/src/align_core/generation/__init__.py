"""Batched text generation for megatron-core GPT models (KV cache, sampling, TP/PP, CPU).

Start with `Generator` and `SamplingConfig` / `LengthConfig`; the functions in `sampling` and
`stopping` are the pure pieces it is made of. Built on it: `rollout` (one response per prompt,
sharded over data parallelism, a seed per example), the generations files of `files`, the
optimizer-state offload of `offload` (room for the KV cache while a trainer generates), and
``align generate`` (`jsonl`: `GenerateConfig`, `generate_jsonl`). See the Generation section of
``packages/align-core/README.md``.
"""

from align_core.generation.config import LengthConfig, SamplingConfig
from align_core.generation.files import (
    GenerationRow,
    decode_rows,
    read_generations,
    write_generations,
    write_jsonl_atomically,
)
from align_core.generation.generator import GenerationResult, Generator, TextDecoder
from align_core.generation.jsonl import (
    GenerateConfig,
    GenerateResult,
    generate_jsonl,
    read_prompts,
)
from align_core.generation.kv_cache import KVCache
from align_core.generation.offload import (
    OffloadedState,
    inner_optimizers,
    offload_optimizer_state,
    optimizer_state_offloaded,
    restore_optimizer_state,
)
from align_core.generation.pipeline import GenerationGroups, ModelParallelStage, causal_mask
from align_core.generation.prompts import PaddingSide, right_pad, unpad_prompts
from align_core.generation.rollout import (
    VALIDATION_STREAM,
    RolloutResult,
    generation_length,
    generation_seeds,
    make_generator,
    rollout,
)
from align_core.generation.sampling import (
    apply_repetition_penalty,
    apply_temperature,
    block_tokens,
    choose_tokens,
    derive_seeds,
    mask_padded_vocab,
    sample_from_logprobs,
    sample_uniforms,
    sampling_logprobs,
    token_presence,
    top_k_filter,
    top_p_filter,
)
from align_core.generation.stopping import (
    end_string_window,
    first_end_string,
    new_end_string,
    trim_at_end_string,
)

__all__ = [
    "VALIDATION_STREAM",
    "GenerateConfig",
    "GenerateResult",
    "GenerationGroups",
    "GenerationResult",
    "GenerationRow",
    "Generator",
    "KVCache",
    "LengthConfig",
    "ModelParallelStage",
    "OffloadedState",
    "PaddingSide",
    "RolloutResult",
    "SamplingConfig",
    "TextDecoder",
    "apply_repetition_penalty",
    "apply_temperature",
    "block_tokens",
    "causal_mask",
    "choose_tokens",
    "decode_rows",
    "derive_seeds",
    "end_string_window",
    "first_end_string",
    "generate_jsonl",
    "generation_length",
    "generation_seeds",
    "inner_optimizers",
    "make_generator",
    "mask_padded_vocab",
    "new_end_string",
    "offload_optimizer_state",
    "optimizer_state_offloaded",
    "read_generations",
    "read_prompts",
    "restore_optimizer_state",
    "right_pad",
    "rollout",
    "sample_from_logprobs",
    "sample_uniforms",
    "sampling_logprobs",
    "token_presence",
    "top_k_filter",
    "top_p_filter",
    "trim_at_end_string",
    "unpad_prompts",
    "write_generations",
    "write_jsonl_atomically",
]

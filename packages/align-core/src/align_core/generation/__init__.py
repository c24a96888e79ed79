"""Batched text generation for megatron-core GPT models (KV cache, sampling, TP/PP, CPU).

Start with `Generator` and `SamplingConfig` / `LengthConfig`; the functions in `sampling` and
`stopping` are the pure pieces it is made of. See the Generation section of
``packages/align-core/README.md``.
"""

from align_core.generation.config import LengthConfig, SamplingConfig
from align_core.generation.generator import GenerationResult, Generator, TextDecoder
from align_core.generation.kv_cache import KVCache
from align_core.generation.pipeline import GenerationGroups, ModelParallelStage, causal_mask
from align_core.generation.prompts import PaddingSide, right_pad, unpad_prompts
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
    "GenerationGroups",
    "GenerationResult",
    "Generator",
    "KVCache",
    "LengthConfig",
    "ModelParallelStage",
    "PaddingSide",
    "SamplingConfig",
    "TextDecoder",
    "apply_repetition_penalty",
    "apply_temperature",
    "block_tokens",
    "causal_mask",
    "choose_tokens",
    "derive_seeds",
    "end_string_window",
    "first_end_string",
    "mask_padded_vocab",
    "new_end_string",
    "right_pad",
    "sample_from_logprobs",
    "sample_uniforms",
    "sampling_logprobs",
    "token_presence",
    "top_k_filter",
    "top_p_filter",
    "trim_at_end_string",
    "unpad_prompts",
]

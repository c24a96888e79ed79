"""Build a megatron-core `GPTModel` from a `ModelConfig`.

The Transformer Engine layer spec is used when transformer-engine imports and CUDA is present;
megatron's local spec otherwise. `align_core.spec_keys` maps state dicts between the two.

Llama 3.1 RoPE scaling: megatron-core 0.16.1's ``RotaryEmbedding`` applies it only with fixed
values (low/high frequency factors 1 and 4, original context 8192). `build_gpt_model` therefore
builds the unscaled rotary embedding and sets its inverse frequencies to
`llama3_scaled_inv_freq` of the `ModelConfig`'s own values.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, cast

import torch

from align_core.config import ModelConfig, ParallelConfig, padded_vocab_size, to_transformer_config
from align_core.cpu_shims import tensor_cuda_is_identity

if TYPE_CHECKING:
    from megatron.core.models.gpt import GPTModel

__all__ = ["build_gpt_model", "llama3_scaled_inv_freq", "te_available", "unwrap_model"]


def te_available() -> bool:
    """True when Transformer Engine imports and CUDA is present."""
    if not torch.cuda.is_available():
        return False
    try:
        # Optional GPU extra, absent from the CPU environment the type checker runs in.
        import transformer_engine  # noqa: F401  # pyright: ignore[reportMissingImports]
    except Exception:  # an installed but broken TE (missing CUDA libraries) counts as absent
        return False
    return True


def _layer_spec(model: ModelConfig, use_te: bool):
    from megatron.core.models.gpt import gpt_layer_specs

    if use_te:
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(
            qk_layernorm=model.qk_layernorm
        )
    return gpt_layer_specs.get_gpt_layer_local_spec(
        qk_layernorm=model.qk_layernorm, normalization=model.normalization
    )


def llama3_scaled_inv_freq(
    inv_freq: torch.Tensor,
    *,
    factor: float,
    low_freq_factor: float,
    high_freq_factor: float,
    original_max_position_embeddings: int,
) -> torch.Tensor:
    """Llama 3.1's RoPE frequency scaling (Hugging Face ``rope_type: "llama3"``).

    With wavelength ``λ = 2π / f`` of each inverse frequency ``f``, ``L`` the original
    context, ``λ_lo = L / low_freq_factor`` and ``λ_hi = L / high_freq_factor``:

    - ``λ < λ_hi`` (high frequencies): ``f`` unchanged;
    - ``λ > λ_lo`` (low frequencies): ``f / factor``;
    - otherwise ``(1 − s)·f/factor + s·f`` with ``s = (L/λ − low_freq_factor) /
      (high_freq_factor − low_freq_factor)``.

    Pure; the same arithmetic (float32 in, float32 out) as transformers'
    ``_compute_llama3_parameters``.

    Args:
        inv_freq: Unscaled inverse frequencies, ``1 / base^(2i/d)``.
        factor: Stretch of the low frequencies.
        low_freq_factor: Where the low-frequency band starts (as a divisor of ``L``).
        high_freq_factor: Where the high-frequency band starts (as a divisor of ``L``).
        original_max_position_embeddings: ``L``.

    Returns:
        The scaled inverse frequencies (same shape and dtype).
    """
    low_freq_wavelen = original_max_position_embeddings / low_freq_factor
    high_freq_wavelen = original_max_position_embeddings / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (original_max_position_embeddings / wavelen - low_freq_factor) / (
        high_freq_factor - low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(medium, smoothed, scaled)


def _scale_rope(gpt: torch.nn.Module, model: ModelConfig) -> None:
    """Give ``gpt``'s rotary embedding the Llama 3.1 scaling of ``model``.

    Must run before any forward: ``RotaryEmbedding.forward`` caches its results per instance.
    """
    rotary = getattr(gpt, "rotary_pos_emb", None)
    if not model.rope_scaling or rotary is None:
        return
    rotary.inv_freq = llama3_scaled_inv_freq(
        rotary.inv_freq,
        factor=model.rope_scaling_factor,
        low_freq_factor=model.rope_scaling_low_freq_factor,
        high_freq_factor=model.rope_scaling_high_freq_factor,
        original_max_position_embeddings=model.rope_scaling_original_max_position_embeddings,
    )


def _initialised_layout(parallel: ParallelConfig | None) -> ParallelConfig:
    """``parallel``, checked against megatron's initialised parallel state (or read from it)."""
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    cp = parallel_state.get_context_parallel_world_size()
    if parallel is None:
        return ParallelConfig(
            tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, context_parallel_size=cp
        )
    sizes = {
        "tensor_model_parallel_size": tp,
        "pipeline_model_parallel_size": pp,
        "context_parallel_size": cp,
    }
    wrong = {k: (getattr(parallel, k), v) for k, v in sizes.items() if getattr(parallel, k) != v}
    if wrong:
        detail = ", ".join(
            f"{k}={given} but initialised with {v}" for k, (given, v) in wrong.items()
        )
        raise ValueError(f"parallel config does not match init_distributed: {detail}")
    return parallel


def build_gpt_model(
    model: ModelConfig,
    parallel: ParallelConfig | None = None,
    *,
    pre_process: bool | None = None,
    post_process: bool | None = None,
    use_te: bool | None = None,
    device: torch.device | str | None = None,
) -> torch.nn.Module:
    """Build this rank's part of a GPT model.

    Must run after `align_core.parallel.init_distributed`. Weights are initialised on the CPU from
    megatron's RNG tracker, so the same seed gives the same full weights at any TP size.

    Args:
        model: Architecture.
        parallel: Parallel layout; must match the one given to ``init_distributed``. None reads
            the tensor/pipeline/context sizes from megatron's initialised parallel state
            (sequence parallelism off).
        pre_process: Whether this stage holds the embedding; default: first pipeline stage.
        post_process: Whether this stage holds the output layer; default: last pipeline stage.
        use_te: Force the Transformer Engine spec on or off; default: `te_available()`.
        device: Where to move the model; default CUDA's current device when present, else CPU.

    Returns:
        The `GPTModel`, wrapped in megatron's ``Float16Module`` for bf16/fp16.

    Raises:
        ValueError: When ``parallel`` disagrees with the initialised parallel state.
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.module import Float16Module

    parallel = _initialised_layout(parallel)
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage()
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage()
    use_te = te_available() if use_te is None else use_te
    config = to_transformer_config(model, parallel)
    vocab_size = padded_vocab_size(
        model.vocab_size, model.make_vocab_size_divisible_by, parallel.tensor_model_parallel_size
    )
    with tensor_cuda_is_identity():  # tied embeddings on a pipeline's last stage, on CPU
        gpt = GPTModel(
            config=config,
            transformer_layer_spec=_layer_spec(model, use_te),
            vocab_size=vocab_size,
            max_sequence_length=model.seq_length,
            pre_process=pre_process,
            post_process=post_process,
            parallel_output=True,
            share_embeddings_and_output_weights=model.share_embeddings_and_output_weights,
            position_embedding_type=model.position_embedding_type,
            rotary_percent=model.rotary_percent,
            # megatron annotates ``rotary_base: int`` but uses it as a float (RoPE base).
            rotary_base=_rotary_base(model.rotary_base),  # pyright: ignore[reportArgumentType]
        )
    _scale_rope(gpt, model)
    if device is None:
        device = (
            torch.device("cuda", torch.cuda.current_device())
            if torch.cuda.is_available()
            else "cpu"
        )
    gpt = gpt.to(device)
    if config.bf16 or config.fp16:
        gpt = Float16Module(config, gpt)
    return gpt


def _rotary_base(base: float) -> int | float:
    """The ``rotary_base`` argument of GPTModel: an int where the base is integral."""
    return int(base) if float(base).is_integer() else float(base)


def unwrap_model(module: torch.nn.Module) -> GPTModel:
    """Strip DDP / Float16Module wrappers down to the `GPTModel`.

    ``module`` is a model from `build_gpt_model`, possibly wrapped: the innermost module is the
    `GPTModel` (not checked at run time).
    """
    while hasattr(module, "module"):
        module = cast("torch.nn.Module", module.module)
    return cast("GPTModel", module)

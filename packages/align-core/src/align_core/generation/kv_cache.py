"""The key/value cache of one generation call, on megatron-core's static inference context.

megatron's attention layers (local spec and Transformer Engine spec alike) fill and read
``StaticInferenceContext.key_value_memory_dict`` themselves when the context is passed to
``GPTModel.forward``; rotary embeddings are sliced at the context's offset, and after the first
(prefill) forward the layers switch to unmasked attention over the cached keys. That is exactly
right for the generator's layout: prompts right-padded, the batch advanced one column at a time,
every sample's column equal to its position (see `align_core.generation.generator`). So the cache
is megatron's, and this class only keeps the offset bookkeeping in one place.
"""

from __future__ import annotations

import torch

__all__ = ["KVCache"]


class KVCache:
    """Key/value cache for one batch of ``batch_size`` rows and at most ``max_length`` columns.

    The first `inputs` call covers columns ``[0, t)`` (prefill, causal mask); every later call
    covers the columns not cached yet (one per decoding step) and needs no mask.

    Args:
        batch_size: Rows of the batch.
        max_length: Columns (prompt plus response) the cache must hold.
    """

    def __init__(self, batch_size: int, max_length: int) -> None:
        from megatron.core.inference.contexts import StaticInferenceContext

        self.context = StaticInferenceContext(batch_size, max_length)
        self.max_length = max_length

    @property
    def length(self) -> int:
        """Columns whose keys and values are cached."""
        return self.context.sequence_len_offset

    def advance(self, columns: int) -> None:
        """Record that the last forward cached ``columns`` more columns."""
        if self.length + columns > self.max_length:
            raise ValueError(f"cache holds {self.max_length} columns, asked for more")
        self.context.sequence_len_offset += columns
        self.context.enable_decode_mode()

    def memory_bytes(self) -> int:
        """Bytes held by the cached keys and values on this rank."""
        return sum(
            t.numel() * t.element_size()
            for kv in self.context.key_value_memory_dict.values()
            for t in kv
            if isinstance(t, torch.Tensor)
        )

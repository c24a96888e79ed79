"""Packed micro-batches: several sequences per row computing exactly what padding computes.

align-data's `PackedBatch` lays sequences side by side in rows with per-sequence position ids
and a block-diagonal causal mask. Here it becomes a model batch whose ``segment_ids`` number
the sequences as the padded batch would (``[chosen_0..b-1, rejected_0..b-1]`` for pairs), so the
algorithms' losses are unchanged.

The forward (`packed_forward`) runs megatron's local attention with the explicit
``[P, 1, S, S]`` block-diagonal mask. megatron's GPT computes rotary embeddings for positions
``0..S-1`` of the row and ignores ``position_ids``; inside `packed_forward` the model's rotary
module instead returns, for every token, the rotation of its own ``position_ids`` entry, so each
packed sequence is rotated exactly as if it were alone in a row. (Learned absolute position
embeddings read ``position_ids`` already.)

Transformer Engine layers take packed sequences through ``PackedSeqParams`` (the ``thd``
format) instead; that path is not implemented, and `packed_forward` says so.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, cast

import torch
from torch import Tensor

from align_core.algorithms._common import IGNORE_INDEX, ModelBatch
from align_core.model import unwrap_model
from align_core.schedule import ForwardFn

if TYPE_CHECKING:
    from megatron.core.transformer.transformer_layer import TransformerLayer

__all__ = [
    "pack_attention_mask",
    "packed_forward",
    "packed_model_batch",
    "rope_from_position_ids",
]


def pack_attention_mask(pack_segments: Tensor) -> Tensor:
    """Block-diagonal causal mask ``[P, 1, S, S]`` (True = masked) from in-row segment ids."""
    s = pack_segments.shape[-1]
    causal = torch.ones(s, s, dtype=torch.bool, device=pack_segments.device).tril()
    same = pack_segments[:, :, None] == pack_segments[:, None, :]
    return ~(same & causal)[:, None]


def packed_model_batch(batch: object) -> ModelBatch:
    """The model batch of an align-data `PackedBatch`.

    Args:
        batch: A `align_data.PackedBatch` (from ``collate_packed_preference`` or
            ``collate_packed_sft``).

    Returns:
        tokens, labels, position ids, the block-diagonal ``attention_mask``,
        ``pack_segments`` (in-row segment ids), ``segment_ids`` (sequence numbers in padded-batch
        order, -1 where nothing is scored), ``seq_token_counts`` and ``lengths``.
    """
    labels: Tensor = batch.labels  # type: ignore[attr-defined]
    seq_pack: Tensor = batch.seq_pack  # type: ignore[attr-defined]
    seq_start: Tensor = batch.seq_start  # type: ignore[attr-defined]
    seq_length: Tensor = batch.seq_length  # type: ignore[attr-defined]
    segments = torch.full_like(labels, -1)
    for i, (p, start, n) in enumerate(
        zip(seq_pack.tolist(), seq_start.tolist(), seq_length.tolist(), strict=True)
    ):
        segments[p, start : start + n] = i
    segments = torch.where(labels != IGNORE_INDEX, segments, torch.full_like(segments, -1))
    n = seq_length.numel()
    counts = torch.zeros(n, dtype=torch.float32).index_add(
        0, segments[segments >= 0], torch.ones(int((segments >= 0).sum()))
    )
    pack_segments: Tensor = batch.segment_ids  # type: ignore[attr-defined]
    return {
        "tokens": batch.input_ids,  # type: ignore[attr-defined]
        "labels": labels,
        "position_ids": batch.position_ids,  # type: ignore[attr-defined]
        "attention_mask": pack_attention_mask(pack_segments),
        "pack_segments": pack_segments,
        "segment_ids": segments,
        "seq_token_counts": counts,
        "lengths": seq_length,
    }


def pad_packed_model_batch(batch: ModelBatch, rows: int, length: int, *, pad_id: int) -> ModelBatch:
    """Pad a packed model batch to ``rows × length`` (pipeline parallelism needs one shape).

    Padding positions form their own segment, are never scored and attend only to padding.
    """
    p, s = batch["tokens"].shape
    if rows < p or length < s:
        raise ValueError(f"cannot pad a packed batch of {p}×{s} to {rows}×{length}")
    if (rows, length) == (p, s):
        return batch
    pad = (0, length - s, 0, rows - p)
    out = dict(batch)
    f = torch.nn.functional.pad
    out["tokens"] = f(batch["tokens"], pad, value=pad_id)
    out["labels"] = f(batch["labels"], pad, value=IGNORE_INDEX)
    out["segment_ids"] = f(batch["segment_ids"], pad, value=-1)
    out["position_ids"] = f(batch["position_ids"], pad, value=0)
    out["pack_segments"] = f(batch["pack_segments"], pad, value=-1)
    out["attention_mask"] = pack_attention_mask(out["pack_segments"])
    return out


@contextlib.contextmanager
def rope_from_position_ids(model: torch.nn.Module, position_ids: Tensor) -> Iterator[None]:
    """Rotate token ``(b, t)`` by ``position_ids[b, t]`` instead of ``t`` within the context.

    A no-op for models without RoPE.
    """
    gpt = unwrap_model(model)
    rotary = getattr(gpt, "rotary_pos_emb", None)
    if rotary is None or gpt.position_embedding_type != "rope":
        yield
        return
    original = rotary.forward
    top = int(position_ids.max()) + 1

    def per_token(*args: object, **kwargs: object) -> Tensor:
        table = original(top)  # [top, 1, 1, D]
        freqs = table[:, 0, 0, :][position_ids.to(table.device)]  # [B, S, D]
        return freqs.transpose(0, 1).unsqueeze(2).contiguous()  # [S, B, 1, D]

    rotary.forward = per_token
    try:
        yield
    finally:
        rotary.forward = original


def packed_forward(forward_fn: ForwardFn) -> ForwardFn:
    """Wrap a forward so packed batches (with ``pack_segments``) rotate per sequence.

    Raises:
        NotImplementedError: For Transformer Engine layers (packing goes through
            ``PackedSeqParams`` there, which is not implemented).
    """

    def forward(model: torch.nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
        if "pack_segments" not in batch:
            return forward_fn(model, batch)
        gpt = unwrap_model(model)
        first = cast("TransformerLayer", gpt.decoder.layers[0])
        if "TE" in type(first.self_attention.core_attention).__name__:
            raise NotImplementedError(
                "sequence packing with Transformer Engine attention (thd / PackedSeqParams) "
                "is not implemented; set model.data.packing=false"
            )
        with rope_from_position_ids(gpt, batch["position_ids"]):
            return forward_fn(model, batch)

    return forward

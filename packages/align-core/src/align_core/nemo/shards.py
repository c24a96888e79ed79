"""Tensor- and pipeline-parallel layout of GPT state dicts: split, merge, renumber, gather.

Megatron splits each tensor-parallel parameter along one dimension:

* column-parallel (``linear_qkv``, ``linear_fc1``, ``word_embeddings``, ``output_layer``):
  weight and bias along dim 0. A gated ``linear_fc1`` (SwiGLU, GeGLU, ...) stacks two
  projections ``[gate; up]``; each rank holds ``[gate_r; up_r]``, so the halves are split
  separately and merging interleaves them back.
* row-parallel (``linear_proj``, ``linear_fc2``): weight along dim 1; the bias is replicated.
* everything else (norms, position embeddings, TE's fused ``layer_norm_weight``) is replicated.

LoRA adapters (``<linear>_lora.lora_a`` / ``lora_b``, see `align_core.lora`) follow their base
layer: on a column-parallel layer A is replicated and B split like the base weight; on a
row-parallel layer A is split along its input (dim 1) and B replicated.

Pipeline stages number their layers from 0; `merge_pipeline_stages` renumbers them globally in
stage order. All functions here are pure except `gather_state_dict`, which communicates.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar, cast

import torch

if TYPE_CHECKING:
    import torch.distributed as dist

__all__ = [
    "Partition",
    "gather_state_dict",
    "is_extra_state",
    "layer_index",
    "merge_pipeline_stages",
    "merge_tensor",
    "merge_tensor_parallel",
    "partition_of",
    "renumber_layers",
    "split_tensor",
    "split_tensor_parallel",
]

_COLUMN = ("linear_qkv", "linear_fc1")
_ROW = ("linear_proj", "linear_fc2")
_LAYER = re.compile(r"(^|\.)layers\.(\d+)\.")
_LORA_SUFFIX = "_lora"

_V = TypeVar("_V")  # a state dict's values: tensors, or tensors and other entries (extra state)


@dataclass(frozen=True)
class Partition:
    """How one parameter is split over tensor-parallel ranks.

    Attributes:
        dim: The split dimension; None for a replicated parameter.
        gated: The tensor stacks two halves along ``dim`` that are split separately.
    """

    dim: int | None = None
    gated: bool = False


def is_extra_state(key: str) -> bool:
    """True for the ``_extra_state`` entries (Transformer Engine / fp8 metadata)."""
    return key.endswith("_extra_state")


def partition_of(key: str, *, gated: bool) -> Partition:
    """The tensor-parallel partition of a GPT state-dict entry (local or TE key names).

    Args:
        key: State-dict key, with or without a prefix.
        gated: Whether the MLP is gated (``linear_fc1`` holds ``[gate; up]``).
    """
    parts = key.split(".")
    if len(parts) < 2:
        return Partition()
    module, param = parts[-2], parts[-1]
    if module.endswith(_LORA_SUFFIX):
        base = module[: -len(_LORA_SUFFIX)]
        if base in _COLUMN and param == "lora_b":
            return Partition(0, gated and base == "linear_fc1")
        if base in _ROW and param == "lora_a":
            return Partition(1)
        return Partition()
    if module in ("word_embeddings", "output_layer") and param == "weight":
        return Partition(0)
    if module in _COLUMN and param in ("weight", "bias"):
        return Partition(0, gated and module == "linear_fc1")
    if module in _ROW and param == "weight":
        return Partition(1)
    return Partition()


def split_tensor(tensor: torch.Tensor, part: Partition, rank: int, size: int) -> torch.Tensor:
    """This rank's shard of a full tensor (a view where possible).

    Raises:
        ValueError: When the split dimension is not divisible by ``size``.
    """
    if part.dim is None or size == 1:
        return tensor
    halves = tensor.chunk(2, part.dim) if part.gated else (tensor,)
    pieces = []
    for half in halves:
        if half.shape[part.dim] % size:
            raise ValueError(
                f"dimension {part.dim} of shape {tuple(tensor.shape)} is not divisible by "
                f"tensor-parallel size {size}"
            )
        pieces.append(half.chunk(size, part.dim)[rank])
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, part.dim)


def merge_tensor(shards: Sequence[torch.Tensor], part: Partition) -> torch.Tensor:
    """The full tensor from the shards of all tensor-parallel ranks, in rank order."""
    if part.dim is None or len(shards) == 1:
        return shards[0]
    if part.gated:
        halves = [shard.chunk(2, part.dim) for shard in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], part.dim)
    return torch.cat(list(shards), part.dim)


def split_tensor_parallel(
    state_dict: Mapping[str, torch.Tensor], rank: int, size: int, *, gated: bool
) -> dict[str, torch.Tensor]:
    """Split a full state dict into tensor-parallel rank ``rank`` of ``size``."""
    return {
        k: v
        if not isinstance(v, torch.Tensor)
        else split_tensor(v, partition_of(k, gated=gated), rank, size)
        for k, v in state_dict.items()
    }


def merge_tensor_parallel(
    shards: Sequence[Mapping[str, _V]], *, gated: bool
) -> dict[str, _V | torch.Tensor]:
    """Merge the state dicts of all tensor-parallel ranks (in rank order) into full tensors.

    ``_extra_state`` entries are taken from rank 0.

    Raises:
        ValueError: When the ranks do not hold the same keys.
    """
    keys = list(shards[0])
    for rank, shard in enumerate(shards[1:], start=1):
        if set(shard) != set(keys):
            diff = sorted(set(shard) ^ set(keys))
            raise ValueError(f"tensor-parallel rank {rank} holds different keys: {diff[:5]}")
    merged: dict[str, _V | torch.Tensor] = {}
    for key in keys:
        values = [shard[key] for shard in shards]
        if not isinstance(values[0], torch.Tensor):
            merged[key] = values[0]
        else:  # every rank holds the same entry: tensors on all when on rank 0
            tensors = cast("list[torch.Tensor]", values)
            merged[key] = merge_tensor(tensors, partition_of(key, gated=gated))
    return merged


def layer_index(key: str) -> int | None:
    """The transformer layer number in a key (``decoder.layers.3.…`` → 3), else None."""
    match = _LAYER.search(key)
    return None if match is None else int(match.group(2))


def renumber_layers(state_dict: Mapping[str, _V], offset: int) -> dict[str, _V]:
    """Add ``offset`` to every transformer layer number."""

    def shift(key: str) -> str:
        return _LAYER.sub(lambda m: f"{m.group(1)}layers.{int(m.group(2)) + offset}.", key, 1)

    return {shift(k): v for k, v in state_dict.items()}


def merge_pipeline_stages(
    stages: Sequence[Mapping[str, _V]], *, share_embeddings: bool
) -> dict[str, _V]:
    """Merge per-stage state dicts (stage order, stage-local layer numbers) into one.

    Each stage's layers are shifted by the number of layers in the stages before it, so uneven
    splits work too. With tied embeddings the last stage's copy of the output weight is dropped.
    """
    merged: dict[str, _V] = {}
    offset = 0
    for stage, state in enumerate(stages):
        indices = {i for i in map(layer_index, state) if i is not None}
        for key, value in renumber_layers(state, offset).items():
            if (
                share_embeddings
                and key.endswith("output_layer.weight")
                and len(stages) > 1
                and stage == len(stages) - 1
            ):
                continue
            if key in merged and layer_index(key) is None:
                continue  # replicated across stages (e.g. shared embedding); keep the first
            merged[key] = value
        offset += len(indices)
    return merged


def _to_cpu(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu") if isinstance(v, torch.Tensor) else v for k, v in state.items()}


def gather_state_dict(
    local: Mapping[str, torch.Tensor],
    *,
    gated: bool,
    share_embeddings: bool,
    tp_group: dist.ProcessGroup | None = None,
    pp_group: dist.ProcessGroup | None = None,
) -> dict[str, torch.Tensor] | None:
    """Gather a model's local shards from all tensor and pipeline ranks into one full dict.

    Collective over ``tp_group`` then (on tensor rank 0 only) over ``pp_group``. Call it on
    every rank of one data-parallel replica. Tensors travel as pickled CPU objects; a CPU
    tensor that needs no merging is the model's own (not a copy), so write the result before
    the model changes.

    Args:
        local: This rank's state dict (stage-local layer numbers, tensor shards).
        gated: Whether the MLP is gated.
        share_embeddings: Whether the output layer is tied to the input embedding.
        tp_group: Tensor-parallel process group (None: no tensor parallelism).
        pp_group: Pipeline-parallel process group (None: no pipeline parallelism).

    Returns:
        The full state dict on the first rank of both groups, None elsewhere.
    """
    import torch.distributed as dist

    state = _to_cpu(local)
    if tp_group is not None and dist.get_world_size(tp_group) > 1:
        gathered = _gather_objects(state, tp_group)
        if gathered is None:
            return None
        state = merge_tensor_parallel(gathered, gated=gated)
    if pp_group is not None and dist.get_world_size(pp_group) > 1:
        stages = _gather_objects(state, pp_group)
        if stages is None:
            return None
        state = merge_pipeline_stages(stages, share_embeddings=share_embeddings)
    return state


def _gather_objects(
    state: dict[str, torch.Tensor], group: dist.ProcessGroup
) -> list[dict[str, torch.Tensor]] | None:
    import torch.distributed as dist

    size = dist.get_world_size(group)
    dst = dist.get_global_rank(group, 0)
    out: list[Any] | None = [None] * size if dist.get_rank(group) == 0 else None
    dist.gather_object(state, out, dst=dst, group=group)
    return out

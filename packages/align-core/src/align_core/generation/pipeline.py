"""One forward step of a (tensor- and pipeline-parallel) GPT model during generation.

Each pipeline stage runs its layers on the columns it is given. Stages other than the first
receive the previous stage's hidden states ``[S, B, H]`` with ``torch.distributed.recv`` and hand
them to the model with ``set_input_tensor``; stages other than the last send theirs on. The last
stage returns the logits of the last column, gathered over the tensor-parallel group by megatron's
output layer (``runtime_gather_output=True``). The chosen tokens go back to every rank with
`ModelParallelStage.broadcast_from_last`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from align_core.generation.kv_cache import KVCache
from align_core.model import unwrap_model

__all__ = ["GenerationGroups", "ModelParallelStage", "causal_mask"]


@dataclass(frozen=True)
class GenerationGroups:
    """The process groups generation communicates over (None: a group of one).

    Attributes:
        tensor: Tensor-parallel group (ranks holding shards of the same layers).
        pipeline: Pipeline-parallel group (this rank's stage and the other stages, in order).
    """

    tensor: dist.ProcessGroup | None = None
    pipeline: dist.ProcessGroup | None = None

    @classmethod
    def from_parallel_state(cls) -> GenerationGroups:
        """The groups megatron's ``parallel_state`` set up (call after ``init_distributed``)."""
        from align_core.parallel import megatron_pipeline_group, megatron_tensor_group

        tp = megatron_tensor_group()
        pp = megatron_pipeline_group()
        return cls(
            tensor=tp if dist.get_world_size(tp) > 1 else None,
            pipeline=pp if dist.get_world_size(pp) > 1 else None,
        )


def causal_mask(columns: int, device: torch.device) -> torch.Tensor:
    """Megatron's boolean attention mask ``[1, 1, S, S]``, True where attention is forbidden."""
    ones = torch.ones(1, 1, columns, columns, dtype=torch.bool, device=device)
    return torch.triu(ones, diagonal=1)


def _ranks(group: dist.ProcessGroup | None) -> list[int]:
    if group is None:
        return [dist.get_rank() if dist.is_initialized() else 0]
    return dist.get_process_group_ranks(group)


class ModelParallelStage:
    """This rank's place in the tensor/pipeline layout and the communication of one step.

    Args:
        model: This stage's model (possibly wrapped in ``Float16Module``).
        groups: Tensor- and pipeline-parallel groups.
    """

    def __init__(self, model: torch.nn.Module, groups: GenerationGroups) -> None:
        self.model = model
        self.groups = groups
        inner = unwrap_model(model)
        self._inner = inner
        self._hidden_size = inner.config.hidden_size
        self._dtype = inner.config.pipeline_dtype or inner.config.params_dtype
        self._pp_ranks = _ranks(groups.pipeline)
        self._tp_ranks = _ranks(groups.tensor)
        me = self._pp_ranks.index(dist.get_rank()) if groups.pipeline is not None else 0
        self.is_first = me == 0
        self.is_last = me == len(self._pp_ranks) - 1
        self._prev = self._pp_ranks[me - 1] if not self.is_first else None
        self._next = self._pp_ranks[me + 1] if not self.is_last else None
        self.device = next(model.parameters()).device

    def forward(
        self, tokens: torch.Tensor, start: int, end: int, cache: KVCache | None
    ) -> torch.Tensor | None:
        """Run columns ``[start, end)`` of ``tokens`` through this stage.

        Args:
            tokens: ``[B, T]`` right-padded tokens (column = position for every row).
            start: First column to run (``cache.length`` with a cache, else 0).
            end: One past the last column; the logits returned predict column ``end``.
            cache: The call's KV cache, or None to recompute the whole prefix.

        Returns:
            On the last stage ``[B, V_padded]`` float logits of column ``end - 1``; else None.
        """
        ids = tokens[:, start:end]
        batch, columns = ids.shape
        positions = torch.arange(start, end, device=tokens.device).expand(batch, columns)
        mask = causal_mask(columns, tokens.device) if start == 0 else None
        if not self.is_first:
            hidden = torch.empty(
                columns, batch, self._hidden_size, dtype=self._dtype, device=self.device
            )
            dist.recv(hidden, src=self._prev, group=self.groups.pipeline)
            self._inner.set_input_tensor(hidden)
        kwargs: dict[str, object] = {"runtime_gather_output": True}
        if cache is not None:
            kwargs["inference_context"] = cache.context
        out = self.model(ids, positions, mask, **kwargs)
        if cache is not None:
            cache.advance(columns)
        if not self.is_last:
            dist.send(out.contiguous(), dst=self._next, group=self.groups.pipeline)
            return None
        return out[:, -1, :].float()

    def broadcast_from_last(self, tensor: torch.Tensor) -> torch.Tensor:
        """Give every rank the last stage's ``tensor`` (from its tensor-parallel rank 0).

        Every tensor-parallel rank of the last stage computes the same values from the same
        gathered logits and generators; broadcasting rank 0's copy makes that certain.
        """
        if self.is_last and self.groups.tensor is not None:
            dist.broadcast(tensor, src=self._tp_ranks[0], group=self.groups.tensor)
        if self.groups.pipeline is not None:
            dist.broadcast(tensor, src=self._pp_ranks[-1], group=self.groups.pipeline)
        return tensor

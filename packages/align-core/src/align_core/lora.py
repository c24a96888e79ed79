"""LoRA adapters on megatron's attention and MLP linears, tensor-parallel aware.

For a base linear ``y = W x`` the adapted layer computes ``y = W x + (α/r) · B A dropout(x)``
(Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models"). ``B`` starts at zero,
so an adapted model equals its base model until training moves ``B``.

Tensor parallelism follows the base layer:

* column-parallel (``linear_qkv``, ``linear_fc1``; input replicated, output split): ``A`` is
  replicated, ``B`` is split along its output like ``W``. The rank-``r`` activation ``A x`` goes
  through megatron's ``copy_to_tensor_model_parallel_region`` (identity forward, all-reduce
  backward), so ``A``'s gradient sums every rank's output shard.
* row-parallel (``linear_proj``, ``linear_fc2``; input split, output all-reduced): ``A`` is split
  along its input, ``A_r x_r`` is summed with ``reduce_from_tensor_model_parallel_region`` and
  the replicated ``B`` maps it to the full output.

``A`` is drawn for the full (unsplit) shape from a generator seeded by the layer number and
then sliced, so the same seed gives the same adapters at every tensor-parallel size.

Each adapter is a sibling module of its base linear (``self_attention.linear_qkv_lora``, ...),
applied through a forward hook on the base linear; it has its own ``sharded_state_dict`` so
megatron distributed checkpoints save it at any layout. With Transformer Engine's fused
``LayerNormColumnParallelLinear`` the adapter applies the fused norm to its input itself.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn.functional as F

from align_core.nemo.archive import atomic_output
from align_core.nemo.shards import (
    gather_state_dict,
    partition_of,
    renumber_layers,
    split_tensor,
)

if TYPE_CHECKING:
    from megatron.core.transformer.transformer_layer import TransformerLayer

__all__ = [
    "LoraAdapter",
    "LoraConfig",
    "add_lora",
    "load_lora",
    "lora_adapters",
    "lora_disabled",
    "lora_parameters",
    "lora_state_dict",
    "merge_lora",
    "save_lora",
]

_COLUMN = ("linear_qkv", "linear_fc1")
_ROW = ("linear_proj", "linear_fc2")
_PARENT = {"linear_qkv": "self_attention", "linear_proj": "self_attention"}
SUFFIX = "_lora"


@dataclass(frozen=True)
class LoraConfig:
    """Which linears get adapters, and their shape.

    Attributes:
        rank: Inner dimension ``r`` of ``B A``.
        alpha: Scale numerator: the update is multiplied by ``alpha / rank``.
        dropout: Dropout probability on the adapter input.
        target_modules: Any of ``linear_qkv``, ``linear_proj``, ``linear_fc1``, ``linear_fc2``.
        seed: Seed of ``A``'s initialisation.
    """

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
    seed: int = 1234

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"rank must be positive, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        unknown = set(self.target_modules) - set(_COLUMN + _ROW)
        if unknown:
            raise ValueError(f"unknown target_modules {sorted(unknown)}; use {_COLUMN + _ROW}")

    @property
    def scale(self) -> float:
        """``alpha / rank``."""
        return self.alpha / self.rank


def _fused_norm_input(base: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Apply the layer norm Transformer Engine fuses into ``base`` (identity for plain linears)."""
    weight = getattr(base, "layer_norm_weight", None)
    if weight is None:
        return x
    if getattr(base, "zero_centered_gamma", False):
        weight = weight + 1
    eps = float(getattr(base, "eps", 1e-5))
    if getattr(base, "normalization", "LayerNorm") == "RMSNorm":
        rms = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
        return (x.float() * rms).to(x.dtype) * weight
    return F.layer_norm(x, (x.shape[-1],), weight, getattr(base, "layer_norm_bias", None), eps)


class LoraAdapter(torch.nn.Module):
    """The low-rank update of one tensor-parallel linear (its local shard).

    Attributes:
        lora_a: ``[r, in]`` (column-parallel base) or ``[r, in / TP]`` (row-parallel base).
        lora_b: ``[out / TP, r]`` (column-parallel base) or ``[out, r]`` (row-parallel base).
        parallel_mode: ``"column"`` or ``"row"``.
        enabled: When False the hook leaves the base output unchanged.
    """

    def __init__(
        self,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        *,
        parallel_mode: str,
        scale: float,
        dropout: float,
        gated: bool,
        tp_group: dist.ProcessGroup | None,
    ) -> None:
        super().__init__()
        self.lora_a = torch.nn.Parameter(lora_a)
        self.lora_b = torch.nn.Parameter(lora_b)
        self.parallel_mode = parallel_mode
        self.scale = scale
        self.dropout = dropout
        self.gated = gated
        self.enabled = True
        self.tp_group = tp_group
        self._hook: torch.utils.hooks.RemovableHandle | None = None

    def extra_repr(self) -> str:
        """Shapes, mode and scale."""
        return (
            f"mode={self.parallel_mode}, a={tuple(self.lora_a.shape)}, "
            f"b={tuple(self.lora_b.shape)}, scale={self.scale}, dropout={self.dropout}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The update ``scale · B A dropout(x)`` for the base layer's (local) input ``x``."""
        from megatron.core import tensor_parallel

        if self.dropout and self.training:
            if self.parallel_mode == "row":  # input differs per rank: model-parallel RNG
                # megatron's getter is unannotated; it initialises the tracker it returns.
                tracker = tensor_parallel.get_cuda_rng_tracker()
                with tracker.fork():  # pyright: ignore[reportOptionalMemberAccess]
                    x = F.dropout(x, self.dropout)
            else:
                x = F.dropout(x, self.dropout)
        h = F.linear(x, self.lora_a)
        if self.parallel_mode == "column":
            h = tensor_parallel.copy_to_tensor_model_parallel_region(h, group=self.tp_group)
        else:
            h = tensor_parallel.reduce_from_tensor_model_parallel_region(h, group=self.tp_group)
        return F.linear(h, self.lora_b) * self.scale

    def delta_weight(self) -> torch.Tensor:
        """``scale · B A`` for this rank's shard of the base weight."""
        return (self.lora_b.float() @ self.lora_a.float()) * self.scale

    def sharded_state_dict(
        self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None
    ) -> dict:
        """Megatron distributed-checkpoint entries: B split like the base (column), A (row)."""
        from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        axis = {"lora_b": 0} if self.parallel_mode == "column" else {"lora_a": 1}
        state = self.state_dict(prefix="", keep_vars=True)
        sharded = make_sharded_tensors_for_checkpoint(
            state, prefix, axis, sharded_offsets, tp_group=self.tp_group
        )
        if self.gated and self.parallel_mode == "column":
            key = f"{prefix}lora_b"
            sharded[key] = apply_swiglu_sharded_factory(sharded[key], sharded_offsets)
        return sharded


# A megatron linear returns ``(output, bias)`` (bias may be None); a plain linear a tensor.
_LinearOutput = torch.Tensor | tuple[torch.Tensor, *tuple[object, ...]]


def _hook(adapter: LoraAdapter):
    def hook(module: torch.nn.Module, args: tuple, output: _LinearOutput) -> _LinearOutput:
        if not adapter.enabled:
            return output
        delta = adapter(_fused_norm_input(module, args[0]))
        if isinstance(output, tuple):
            return (output[0] + delta.to(output[0].dtype), *output[1:])
        return output + delta.to(output.dtype)

    return hook


def _gated(base: torch.nn.Module) -> bool:
    return bool(getattr(getattr(base, "config", None), "gated_linear_unit", False))


def _layers(model: torch.nn.Module) -> Sequence[TransformerLayer]:
    from align_core.model import unwrap_model

    decoder = getattr(unwrap_model(model), "decoder", None)
    return [] if decoder is None else list(decoder.layers)


def _tp() -> tuple[int, int, dist.ProcessGroup | None]:
    from megatron.core import parallel_state

    from align_core.parallel import megatron_tensor_group

    if not parallel_state.model_parallel_is_initialized():
        return 0, 1, None
    return (
        parallel_state.get_tensor_model_parallel_rank(),
        parallel_state.get_tensor_model_parallel_world_size(),
        megatron_tensor_group(),
    )


def add_lora(model: torch.nn.Module, config: LoraConfig) -> list[str]:
    """Add adapters to every transformer layer of this rank's model and freeze everything else.

    Args:
        model: A `GPTModel` (or a wrapper with ``.module``) built with megatron's TP groups.
        config: Ranks, scale, dropout, targets, seed.

    Returns:
        Names of the adapter modules added (stage-local, e.g.
        ``decoder.layers.0.self_attention.linear_qkv_lora``).

    Raises:
        ValueError: When adapters are already present.
        NotImplementedError: With sequence parallelism (the adapter would need the gathered
            sequence).
    """
    if lora_adapters(model):
        raise ValueError("the model already has LoRA adapters")
    tp_rank, tp_size, tp_group = _tp()
    for param in model.parameters():
        param.requires_grad_(False)
    added = []
    for i, layer in enumerate(_layers(model)):
        number = int(layer.layer_number)
        for t, target in enumerate(config.target_modules):
            parent = getattr(layer, _PARENT.get(target, "mlp"))
            base = getattr(parent, target)
            if getattr(getattr(base, "config", None), "sequence_parallel", False):
                raise NotImplementedError("LoRA with sequence parallelism is not supported")
            weight = base.weight
            column = target in _COLUMN
            out_rows, in_cols = weight.shape
            in_full = in_cols if column else in_cols * tp_size
            gen = torch.Generator().manual_seed(config.seed * 1_000_003 + number * 17 + t)
            bound = 1.0 / math.sqrt(in_full)
            a_full = torch.empty(config.rank, in_full).uniform_(-bound, bound, generator=gen)
            a = a_full if column else a_full.chunk(tp_size, 1)[tp_rank]
            b = torch.zeros(out_rows, config.rank)
            adapter = LoraAdapter(
                a.to(weight.dtype).to(weight.device).contiguous(),
                b.to(weight.dtype).to(weight.device),
                parallel_mode="column" if column else "row",
                scale=config.scale,
                dropout=config.dropout,
                gated=target == "linear_fc1" and _gated(base),
                tp_group=tp_group,
            )
            parent.add_module(target + SUFFIX, adapter)
            adapter._hook = base.register_forward_hook(_hook(adapter))
            added.append(f"decoder.layers.{i}.{_PARENT.get(target, 'mlp')}.{target}{SUFFIX}")
    return added


def lora_adapters(model: torch.nn.Module) -> dict[str, LoraAdapter]:
    """The adapters of a model, by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraAdapter)}


def lora_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The adapter parameters (what the optimiser trains in a LoRA run)."""
    return [p for m in lora_adapters(model).values() for p in (m.lora_a, m.lora_b)]


@contextlib.contextmanager
def lora_disabled(model: torch.nn.Module) -> Iterator[None]:
    """Run the base model: every adapter is bypassed inside the block (the LoRA reference policy).

    The previous on/off state of each adapter is restored on exit, also after an exception.
    """
    adapters = list(lora_adapters(model).values())
    before = [a.enabled for a in adapters]
    for adapter in adapters:
        adapter.enabled = False
    try:
        yield
    finally:
        for adapter, state in zip(adapters, before, strict=True):
            adapter.enabled = state


def merge_lora(model: torch.nn.Module) -> int:
    """Fold every adapter into its base weight (``W += scale · B A``) and remove the adapters.

    Purely local: each rank updates its own shard. Base parameters stay frozen.

    Returns:
        The number of adapters merged.
    """
    count = 0
    for name, adapter in lora_adapters(model).items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        base = getattr(parent, child[: -len(SUFFIX)])
        with torch.no_grad():
            base.weight.add_(adapter.delta_weight().to(base.weight.dtype))
        if adapter._hook is not None:
            adapter._hook.remove()
        delattr(parent, child)
        count += 1
    return count


def _strip_wrappers(name: str) -> str:
    while name.startswith("module."):
        name = name[len("module.") :]
    return name


def lora_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """This rank's adapter tensors, keyed like the model's state dict (stage-local layers)."""
    out: dict[str, torch.Tensor] = {}
    for name, adapter in lora_adapters(model).items():
        key = _strip_wrappers(name)
        out[f"{key}.lora_a"] = adapter.lora_a.detach()
        out[f"{key}.lora_b"] = adapter.lora_b.detach()
    return out


def _first_layer(model: torch.nn.Module) -> int:
    layers = _layers(model)
    return int(layers[0].layer_number) - 1 if layers else 0


def save_lora(
    model: torch.nn.Module,
    path: str | os.PathLike[str],
    config: LoraConfig,
    *,
    pp_group: dist.ProcessGroup | None = None,
) -> Path:
    """Save the adapters only, as full (unsplit) tensors, from global rank 0. Collective.

    The file is ``torch.save({"config": {...}, "state_dict": {...}})`` with global layer
    numbers, written to a temporary name and renamed; `load_lora` reads it at any TP/PP layout.

    Args:
        model: This rank's model with adapters.
        path: Destination file.
        config: The adapters' configuration (stored alongside).
        pp_group: Pipeline group; default megatron's.

    Returns:
        ``path`` as a `Path`.
    """
    from megatron.core import parallel_state

    from align_core.parallel import megatron_pipeline_group, megatron_tensor_group

    path = Path(path)
    local = lora_state_dict(model)
    gated = any(a.gated for a in lora_adapters(model).values())
    tp_group: dist.ProcessGroup | None = None
    writer = True
    if parallel_state.model_parallel_is_initialized():
        tp_group = megatron_tensor_group()
        pp_group = pp_group or megatron_pipeline_group()
        writer = parallel_state.get_data_parallel_rank(with_context_parallel=True) == 0
    full = None
    if writer:
        full = gather_state_dict(
            local, gated=gated, share_embeddings=False, tp_group=tp_group, pp_group=pp_group
        )
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        assert full is not None
        with atomic_output(path) as tmp:
            torch.save({"config": asdict(config), "state_dict": full}, tmp)
    if dist.is_initialized():
        dist.barrier()
    return path


def load_lora(model: torch.nn.Module, path: str | os.PathLike[str]) -> LoraConfig:
    """Load adapters saved by `save_lora` into a model that already has matching adapters.

    Each rank cuts its tensor-parallel shard and its pipeline stage's layers out of the full
    tensors, so the saving and loading layouts may differ.

    Returns:
        The `LoraConfig` stored in the file.

    Raises:
        ValueError: When the file's adapters do not match the model's (names and shapes).
    """
    payload = torch.load(Path(path), map_location="cpu", weights_only=True)
    full = payload["state_dict"]
    tp_rank, tp_size, _ = _tp()
    adapters = lora_adapters(model)
    local = lora_state_dict(model)
    shifted = renumber_layers(local, _first_layer(model))
    gated = any(a.gated for a in adapters.values())
    missing = sorted(set(shifted) - set(full))
    if missing:
        raise ValueError(f"{path}: no saved adapter for {missing[:4]}")
    with torch.no_grad():
        for tensor, global_key in zip(local.values(), shifted, strict=True):
            piece = split_tensor(
                full[global_key], partition_of(global_key, gated=gated), tp_rank, tp_size
            )
            if piece.shape != tensor.shape:
                raise ValueError(
                    f"{path}: {global_key} has shard shape {tuple(piece.shape)}, "
                    f"the model {tuple(tensor.shape)}"
                )
            tensor.copy_(piece)
    stored = dict(payload["config"])
    stored["target_modules"] = tuple(stored["target_modules"])
    return LoraConfig(**stored)

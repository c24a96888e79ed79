"""Write NeMo 1.x `.nemo` files.

`write_nemo` packs a full state dict (one process). `save_nemo` exports a (possibly tensor- and
pipeline-parallel) model: either gathering every shard onto global rank 0 and writing a single
``model_weights.ckpt``, or writing a ``model_weights/`` megatron distributed checkpoint from all
ranks (``distributed=True``), which any layout can load back.

The archive holds ``./model_config.yaml`` (with NeMo's ``target`` and mcore flags),
the weights and the tokenizer artifacts (``./<uuid4hex>_<basename>``, referenced from the config
as ``nemo:<uuid4hex>_<basename>``). Keys are stored under NeMo's ``model.`` prefix in a fixed
order, and archive members carry no timestamps or owners, so the same weights, config and
artifacts always give the same bytes. Every file is written under a temporary name and renamed.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import yaml

from align_core.config import ModelConfig
from align_core.disk_full import EXPORT_INTACT, DiskFullError, disk_full_guard
from align_core.nemo.archive import write_archive
from align_core.nemo.config_map import nemo_config_from_model
from align_core.nemo.shards import gather_state_dict
from align_core.nemo.tokenizer import TokenizerSpec, tokenizer_to_nemo
from align_core.nemo.weights import DIST_DIR, NEMO_PREFIX, WEIGHTS_FILE
from align_core.spec_keys import detect_spec

if TYPE_CHECKING:
    from megatron.core.transformer.module import MegatronModule

__all__ = ["canonical_order", "gather_full_state", "save_nemo", "write_nemo"]

CONFIG_FILE = "model_config.yaml"
_NUMBER = re.compile(r"(\d+)")


def canonical_order(state: Mapping[str, object]) -> dict[str, object]:
    """The state dict sorted by key, numbers compared as numbers (``layers.2`` < ``layers.10``)."""

    def natural(key: str) -> list[object]:
        return [int(p) if p.isdigit() else p for p in _NUMBER.split(key)]

    return {k: state[k] for k in sorted(state, key=natural)}


def _check_no_adapters(keys: object) -> None:
    adapters = [k for k in keys if "_lora." in k]  # type: ignore[attr-defined]
    if adapters:
        raise ValueError(
            f"the model still holds LoRA adapters ({adapters[0]}, ...); call "
            "align_core.lora.merge_lora(model) before exporting it to .nemo"
        )


def _stage_config(
    staging: Path,
    model_config: ModelConfig,
    tokenizer: TokenizerSpec | None,
    *,
    transformer_engine: bool,
    dist_ckpt_format: str | None,
) -> None:
    section = None if tokenizer is None else tokenizer_to_nemo(tokenizer, staging)
    cfg = nemo_config_from_model(
        model_config,
        tokenizer=section,
        transformer_engine=transformer_engine,
        dist_ckpt_format=dist_ckpt_format,
    )
    (staging / CONFIG_FILE).write_text(
        yaml.safe_dump(cfg, sort_keys=False, default_flow_style=False), encoding="utf-8"
    )


def write_nemo(
    path: str | os.PathLike[str],
    state_dict: Mapping[str, object],
    model_config: ModelConfig,
    *,
    tokenizer: TokenizerSpec | None = None,
) -> Path:
    """Write a single-file `.nemo` from a full (unsplit, unprefixed) megatron state dict.

    Args:
        path: Destination; written to a temporary file and renamed.
        state_dict: Full state dict with megatron key names (local or TE spec).
        model_config: Architecture, written as NeMo config keys.
        tokenizer: Tokenizer whose files become artifacts.

    Returns:
        ``path`` as a `Path`.

    Raises:
        ValueError: When the state dict still holds LoRA adapter parameters.
        DiskFullError: No space left (nothing at ``path`` was replaced).
    """
    _check_no_adapters(state_dict)
    weights = {
        NEMO_PREFIX + k: (
            v.detach().to("cpu").contiguous().clone() if isinstance(v, torch.Tensor) else v
        )
        for k, v in canonical_order(state_dict).items()
    }
    needed = sum(v.numel() * v.element_size() for v in weights.values() if torch.is_tensor(v))
    with (
        disk_full_guard(
            Path(path).name, Path(path).parent, intact=EXPORT_INTACT, needed=lambda: needed
        ),
        tempfile.TemporaryDirectory(prefix="nemo-write-") as tmp,
    ):
        staging = Path(tmp)
        torch.save(weights, staging / WEIGHTS_FILE)
        _stage_config(
            staging,
            model_config,
            tokenizer,
            transformer_engine=detect_spec(state_dict) == "te",
            dist_ckpt_format=None,
        )
        return write_archive(staging, path)


def _parallel_groups() -> tuple[dist.ProcessGroup | None, dist.ProcessGroup | None, bool]:
    """Megatron's TP and PP groups, and whether this rank belongs to the writing replica."""
    from megatron.core import parallel_state

    from align_core.parallel import megatron_pipeline_group, megatron_tensor_group

    if not parallel_state.model_parallel_is_initialized():
        return None, None, True
    first_replica = parallel_state.get_data_parallel_rank(with_context_parallel=True) == 0
    return (
        megatron_tensor_group(),
        megatron_pipeline_group(),
        first_replica,
    )


def gather_full_state(
    module: torch.nn.Module, model_config: ModelConfig
) -> dict[str, torch.Tensor] | None:
    """The model's full state dict (unsplit, global layer numbers) on global rank 0.

    Collective: every rank calls it (the first data-parallel replica gathers).

    Returns:
        The full state dict on global rank 0, None on every other rank.
    """
    tp_group, pp_group, writer = _parallel_groups()
    full = None
    if writer:
        full = gather_state_dict(
            module.state_dict(),
            gated=model_config.gated,
            share_embeddings=model_config.share_embeddings_and_output_weights,
            tp_group=tp_group,
            pp_group=pp_group,
        )
    rank = dist.get_rank() if dist.is_initialized() else 0
    return full if rank == 0 else None


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_nemo(
    model: torch.nn.Module,
    path: str | os.PathLike[str],
    model_config: ModelConfig,
    *,
    tokenizer: TokenizerSpec | None = None,
    distributed: bool = False,
) -> Path:
    """Export this model to a `.nemo` file. Collective: every rank calls it.

    Args:
        model: This rank's `GPTModel` (or a wrapper with ``.module``), without unmerged LoRA
            adapters.
        path: Destination `.nemo` (on a filesystem all ranks share when ``distributed``).
        model_config: The model's architecture.
        tokenizer: Tokenizer whose files become artifacts.
        distributed: Write a ``model_weights/`` distributed checkpoint from all ranks instead
            of gathering a single ``model_weights.ckpt`` onto rank 0.

    Returns:
        ``path`` as a `Path` (on every rank, after the file is complete).

    Raises:
        ValueError: When the model holds LoRA adapters (merge them first).
    """
    from align_core.model import unwrap_model

    module = unwrap_model(model)
    _check_no_adapters(module.state_dict())
    path = Path(path)
    rank = dist.get_rank() if dist.is_initialized() else 0
    if not distributed:
        full = gather_full_state(module, model_config)
        full_disk: list[str | None] = [None]
        if full is not None:
            try:
                write_nemo(path, full, model_config, tokenizer=tokenizer)
            except DiskFullError as exc:
                if not dist.is_initialized():
                    raise
                full_disk[0] = str(exc)
        if dist.is_initialized():  # every rank fails with rank 0's message
            dist.broadcast_object_list(full_disk, src=0)
            if full_disk[0] is not None:
                raise DiskFullError(full_disk[0])
        return path
    return _save_distributed(module, path, model_config, tokenizer, rank)


def _save_distributed(
    module: MegatronModule,
    path: Path,
    model_config: ModelConfig,
    tokenizer: TokenizerSpec | None,
    rank: int,
) -> Path:
    from megatron.core import dist_checkpointing

    names = [f".{path.name}.staging-{uuid.uuid4().hex}"]
    if dist.is_initialized():
        dist.broadcast_object_list(names, src=0)
    staging = path.parent / names[0]
    if rank == 0:
        (staging / DIST_DIR).mkdir(parents=True)
    _barrier()
    try:
        dist_checkpointing.save(
            module.sharded_state_dict(prefix=NEMO_PREFIX), str(staging / DIST_DIR)
        )
        _barrier()
        if rank == 0:
            spec = detect_spec(module.state_dict())
            _stage_config(
                staging,
                model_config,
                tokenizer,
                transformer_engine=spec == "te",
                dist_ckpt_format="torch_dist",
            )
            write_archive(staging, path)
        _barrier()
    finally:
        if rank == 0:
            shutil.rmtree(staging, ignore_errors=True)
    return path

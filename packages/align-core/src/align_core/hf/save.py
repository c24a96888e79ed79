"""Write a model as a Hugging Face directory that ``transformers`` loads.

The output holds ``model.safetensors`` (or ``model-0000k-of-0000n.safetensors`` shards and
``model.safetensors.index.json`` once the weights exceed the shard size), ``config.json``,
``generation_config.json`` and the tokenizer files. A model imported from a Hugging Face
directory keeps that directory's ``config.json`` (architecture name and every value), its dtype,
its generation config and its tokenizer files, so an unchanged model goes back tensor for tensor
identical. The directory is written under a temporary name next to the destination and renamed.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from align_core.config import ModelConfig, torch_dtype
from align_core.disk_full import EXPORT_INTACT, DiskFullError, disk_full_guard
from align_core.hf.checkpoint import CONFIG_FILE, HFCheckpoint
from align_core.hf.config import hf_config_from_model
from align_core.hf.errors import HFFormatError
from align_core.hf.names import split_qkv, weight_mappings
from align_core.hf.safetensors_files import INDEX_FILE, SINGLE_FILE
from align_core.nemo.tokenizer import TokenizerSpec

__all__ = ["DEFAULT_MAX_SHARD_BYTES", "TOKENIZER_FILES", "hf_state_dict", "save_hf", "write_hf"]

DEFAULT_MAX_SHARD_BYTES = 5 * 2**30
"""Shard size above which the weights are split over several files (transformers' default)."""

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
)
"""Tokenizer files copied from the source directory when present."""

GENERATION_CONFIG = "generation_config.json"


def hf_state_dict(
    full: Mapping[str, torch.Tensor], model: ModelConfig, *, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Hugging Face tensors from a full megatron state dict (local-spec names).

    Args:
        full: Unsplit state dict, global layer numbers, no LoRA adapters.
        model: The architecture.
        dtype: The dtype of the output tensors.

    Returns:
        Tensor name → contiguous CPU tensor, in model order.

    Raises:
        HFFormatError: When a parameter has no Hugging Face name or a mapped one is missing.
    """
    head_dim = model.kv_channels or model.hidden_size // model.num_attention_heads
    groups = model.num_query_groups or model.num_attention_heads
    try:
        mappings = weight_mappings(model)
    except ValueError as exc:
        raise HFFormatError(f"cannot write a Hugging Face checkpoint: {exc}") from exc
    mapped = {m.megatron for m in mappings}
    if model.share_embeddings_and_output_weights:
        mapped.add("output_layer.weight")  # the tied copy a pipeline's last stage holds
    extra = sorted(k for k in full if k not in mapped and not k.endswith("_extra_state"))
    if extra:
        raise HFFormatError(f"model parameters without a Hugging Face name: {extra[:8]}")
    out: dict[str, torch.Tensor] = {}
    for mapping in mappings:
        if mapping.megatron not in full:
            raise HFFormatError(f"the model has no {mapping.megatron}")
        tensor = full[mapping.megatron]
        if mapping.kind == "qkv":
            pieces = split_qkv(
                tensor, groups=groups, heads=model.num_attention_heads, head_dim=head_dim
            )
        elif mapping.kind == "gated":
            pieces = tensor.chunk(2, dim=0)
        else:
            pieces = (tensor,)
        for name, piece in zip(mapping.hf, pieces, strict=True):
            out[name] = piece.detach().to("cpu", dtype).contiguous()
    return out


def _shards(
    tensors: Mapping[str, torch.Tensor], max_shard_bytes: int
) -> list[dict[str, torch.Tensor]]:
    """Consecutive groups of tensors, each at most ``max_shard_bytes`` (or one tensor)."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    return shards


def _write_weights(
    staging: Path, tensors: Mapping[str, torch.Tensor], max_shard_bytes: int
) -> None:
    from safetensors.torch import save_file

    shards = _shards(tensors, max_shard_bytes)
    if len(shards) == 1:
        save_file(dict(shards[0]), str(staging / SINGLE_FILE), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(dict(shard), str(staging / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (staging / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def _copy_tokenizer(
    staging: Path, source: HFCheckpoint | None, tokenizer: TokenizerSpec | None
) -> None:
    """Tokenizer files: the source directory's, else a Hugging Face ``tokenizer.json`` spec's.

    A `.nemo` holds only the ``tokenizer.json`` of a Hugging Face tokenizer (no
    ``tokenizer_config.json`` or chat template), so only that file is written for one.
    """
    if source is not None:
        for name in TOKENIZER_FILES:
            if (source.source / name).is_file():
                shutil.copyfile(source.source / name, staging / name)
        return
    if tokenizer is None or tokenizer.library != "huggingface" or tokenizer.model is None:
        return
    if "model" in tokenizer.contents:
        (staging / "tokenizer.json").write_bytes(tokenizer.contents["model"])
        return
    model = Path(tokenizer.model)
    if model.is_dir():
        for name in TOKENIZER_FILES:
            if (model / name).is_file():
                shutil.copyfile(model / name, staging / name)
    elif model.suffix == ".json":  # a .nemo artifact is named <uuid>_tokenizer.json
        shutil.copyfile(model, staging / "tokenizer.json")


def _generation_config(config: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"_from_model_config": True}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if config.get(key) is not None:
            out[key] = config[key]
    return out


def _replace_dir(staging: Path, out: Path) -> None:
    """Move ``staging`` to ``out``, replacing an existing directory only once it is complete."""
    if not out.exists():
        os.replace(staging, out)
        return
    if not out.is_dir():
        raise FileExistsError(f"{out}: exists and is not a directory")
    old = out.parent / f".{out.name}.old-{uuid.uuid4().hex}"
    os.replace(out, old)
    os.replace(staging, out)
    shutil.rmtree(old, ignore_errors=True)


def write_hf(
    out_dir: str | os.PathLike[str],
    full: Mapping[str, torch.Tensor],
    model: ModelConfig,
    *,
    source: HFCheckpoint | None = None,
    tokenizer: TokenizerSpec | None = None,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Write a full megatron state dict as a Hugging Face directory (one process).

    Args:
        out_dir: Destination directory (replaced if it exists).
        full: Unsplit state dict (local or TE names), global layer numbers, no LoRA adapters.
        model: The architecture.
        source: The Hugging Face checkpoint the model was imported from: its ``config.json``,
            dtype, generation config and tokenizer files are kept.
        tokenizer: For a model not from Hugging Face, a ``huggingface`` tokenizer description
            whose ``tokenizer.json`` (and the files next to it) are copied.
        dtype: Dtype of the written weights (default: the source's, else ``model.dtype``).
        max_shard_bytes: Largest shard before the weights are split over several files.

    Returns:
        ``out_dir`` as a `Path`.

    Raises:
        HFFormatError: When the model cannot be written as a supported architecture, or
            differs from the source's ``config.json``.
        ValueError: When the state dict still holds LoRA adapters.
        DiskFullError: No space left (the staging directory is removed, ``out_dir`` kept).
    """
    from align_core.spec_keys import convert_spec

    adapters = [k for k in full if "_lora." in k]
    if adapters:
        raise ValueError(
            f"the model still holds LoRA adapters ({adapters[0]}, ...); call "
            "align_core.lora.merge_lora(model) before exporting it"
        )
    if dtype is None:
        dtype = source.torch_dtype if source is not None else torch_dtype(model.dtype)
    tensors = hf_state_dict(convert_spec(full, "local"), model, dtype=dtype)
    config = hf_config_from_model(
        model, dtype=dtype, base=None if source is None else source.config
    )
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.staging-{uuid.uuid4().hex}"
    needed = sum(t.numel() * t.element_size() for t in tensors.values())
    guard = disk_full_guard(
        f"{out.name}/",
        out.parent,
        intact=EXPORT_INTACT,
        needed=lambda: needed,
        cleanup=lambda: shutil.rmtree(staging, ignore_errors=True),
    )
    with guard:
        staging.mkdir()
        _write_staged(staging, out, tensors, config, source, tokenizer, max_shard_bytes)
    return out


def _write_staged(
    staging: Path,
    out: Path,
    tensors: Mapping[str, torch.Tensor],
    config: dict[str, Any],
    source: HFCheckpoint | None,
    tokenizer: TokenizerSpec | None,
    max_shard_bytes: int,
) -> None:
    """Fill ``staging`` and move it to ``out``; ``staging`` is removed whatever happens."""
    try:
        _write_weights(staging, tensors, max_shard_bytes)
        _write_json(staging / CONFIG_FILE, config)
        generation = None if source is None else source.source / GENERATION_CONFIG
        if generation is not None and generation.is_file():
            shutil.copyfile(generation, staging / GENERATION_CONFIG)
        else:
            _write_json(staging / GENERATION_CONFIG, _generation_config(config))
        _copy_tokenizer(staging, source, tokenizer)
        _replace_dir(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def save_hf(
    model: torch.nn.Module,
    out_dir: str | os.PathLike[str],
    model_config: ModelConfig,
    *,
    source: HFCheckpoint | None = None,
    tokenizer: TokenizerSpec | None = None,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Export this (possibly tensor- and pipeline-parallel) model as a Hugging Face directory.

    Collective: every rank calls it; the shards are gathered onto global rank 0, which writes.
    See `write_hf` for the arguments.

    Returns:
        ``out_dir`` as a `Path` (on every rank, after the directory is complete).
    """
    from align_core.model import unwrap_model
    from align_core.nemo.writer import gather_full_state

    full = gather_full_state(unwrap_model(model), model_config)
    error: list[str | None] = [None, None]  # [format error, disk full]
    if full is not None:
        try:
            write_hf(
                out_dir,
                full,
                model_config,
                source=source,
                tokenizer=tokenizer,
                dtype=dtype,
                max_shard_bytes=max_shard_bytes,
            )
        except DiskFullError as exc:
            error[1] = str(exc)
            if not dist.is_initialized():
                raise
        except (HFFormatError, ValueError, OSError) as exc:
            error[0] = str(exc)
            if not dist.is_initialized():
                raise
    if dist.is_initialized():
        dist.broadcast_object_list(error, src=0)
        if error[1] is not None:
            raise DiskFullError(error[1])
        if error[0] is not None:
            raise HFFormatError(error[0])
    return Path(out_dir)

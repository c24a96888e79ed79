"""Checks of a run's checkpoint before it is loaded: complete on disk, same architecture.

`check_checkpoint_files` finds a damaged checkpoint (a ``.distcp`` shard deleted or
truncated, a missing ``common.pt``) from its metadata alone, before megatron reads a tensor;
`Checkpointer` uses it to fall back to the newest intact step. `check_resume_model` compares the
architecture a checkpoint recorded (its ``extra_state["model"]``, the trainer's model summary)
and whether it holds LoRA adapters with the run about to resume from it, so that a changed
``model.num_layers`` or an added LoRA is one line naming the key and both values, not a
megatron traceback. `read_checkpoint_summary` reads what that needs without running a pickle.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from align_core.model import unwrap_model
from align_core.safe_load import UnsafeCheckpointError, load_weights_only, read_dcp_metadata

__all__ = [
    "ARCHITECTURE_KEYS",
    "CheckpointSummary",
    "DamagedCheckpointError",
    "check_checkpoint_files",
    "check_resume_model",
    "module_summary",
    "read_checkpoint_summary",
]

ARCHITECTURE_KEYS: tuple[str, ...] = (
    "num_layers",
    "hidden_size",
    "ffn_hidden_size",
    "num_attention_heads",
    "num_query_groups",
    "kv_channels",
    "vocab_size",
    "make_vocab_size_divisible_by",
    "position_embedding_type",
    "normalization",
    "activation",
    "bias",
    "qkv_bias",
    "qk_layernorm",
    "share_embeddings_and_output_weights",
)
"""Model-summary keys that shape the weights: a resumed run must keep them."""

_CONFIG_KEY = {"vocab_size": "the tokenizer's vocab_size"}
_LORA_MARK = "_lora."
_REQUIRED = (".metadata", "common.pt", "metadata.json")
_MODULE_KEYS = (
    "num_layers",
    "hidden_size",
    "ffn_hidden_size",
    "num_attention_heads",
    "num_query_groups",
    "kv_channels",
)


class DamagedCheckpointError(ValueError):
    """A checkpoint's files are missing or shorter than its metadata records (named)."""


def check_checkpoint_files(path: str | os.PathLike[str]) -> Any:
    """Check that every file a distributed checkpoint's metadata names is there, whole.

    Each ``.distcp`` file must hold every byte range the metadata gives it (offset + length),
    and ``.metadata``, ``common.pt`` and ``metadata.json`` must exist. Nothing is unpickled
    beyond the metadata (read with the restricted unpickler).

    Args:
        path: A ``step_*`` checkpoint directory.

    Returns:
        The checkpoint's metadata.

    Raises:
        DamagedCheckpointError: The first missing or truncated file, named with what is wrong.
        UnsafeCheckpointError: The metadata names a class it may not (a hostile file, not a
            damaged one).
    """
    root = Path(path)
    for name in _REQUIRED:
        if not (root / name).is_file():
            raise DamagedCheckpointError(f"{name} is missing")
    try:
        metadata = read_dcp_metadata(root, origin=f"{root.name}/.metadata")
    except UnsafeCheckpointError:
        raise
    except ValueError as exc:
        raise DamagedCheckpointError(str(exc)) from exc
    needed: dict[str, int] = {}
    for info in metadata.storage_data.values():
        relative = str(info.relative_path)
        needed[relative] = max(needed.get(relative, 0), int(info.offset) + int(info.length))
    for relative, size in sorted(needed.items()):
        file = root / relative
        if not file.is_file():
            raise DamagedCheckpointError(f"{relative} is missing")
        have = file.stat().st_size
        if have < size:
            raise DamagedCheckpointError(f"{relative} is truncated ({have} of {size} bytes)")
    return metadata


@dataclass(frozen=True)
class CheckpointSummary:
    """What a checkpoint recorded about the model it holds.

    Attributes:
        model: The trainer's model summary (``extra_state["model"]``); empty when not recorded.
        lora: Whether its weights include LoRA adapters.
    """

    model: dict[str, Any]
    lora: bool


def read_checkpoint_summary(path: str | os.PathLike[str]) -> CheckpointSummary:
    """Read a checkpoint's model summary and whether it holds LoRA adapters (no code runs).

    Raises:
        ValueError: ``common.pt`` or ``.metadata`` cannot be read (named).
    """
    root = Path(path)
    common = load_weights_only(root / "common.pt", origin=f"{root}/common.pt")
    extra = common.get("common", {}).get("extra_state", {}) if isinstance(common, dict) else {}
    model = extra.get("model", {}) if isinstance(extra, dict) else {}
    metadata = read_dcp_metadata(root)
    lora = any(_LORA_MARK in key for key in metadata.state_dict_metadata)
    return CheckpointSummary(model=dict(model) if isinstance(model, dict) else {}, lora=lora)


def module_summary(model: torch.nn.Module) -> tuple[dict[str, Any], bool]:
    """The architecture of a built model (from its megatron config) and whether it has LoRA.

    Args:
        model: A `GPTModel` chunk, DDP-wrapped or not.

    Returns:
        The shape-giving `ARCHITECTURE_KEYS` its config holds, and whether it has adapters.
    """
    policy = unwrap_model(model)
    config = getattr(policy, "config", None)
    summary = {k: getattr(config, k) for k in _MODULE_KEYS if hasattr(config, k)}
    lora = any(_LORA_MARK in name for name, _ in policy.named_parameters())
    return summary, lora


def _resolved(summary: Mapping[str, Any]) -> dict[str, Any]:
    """``num_query_groups``/``kv_channels`` of None replaced by the values they stand for."""
    out = dict(summary)
    heads, hidden = out.get("num_attention_heads"), out.get("hidden_size")
    if out.get("num_query_groups") is None and heads is not None:
        out["num_query_groups"] = heads
    if out.get("kv_channels") is None and heads and hidden:
        out["kv_channels"] = hidden // heads
    return out


def check_resume_model(
    saved: CheckpointSummary, model: Mapping[str, Any], *, lora: bool, path: str | os.PathLike[str]
) -> None:
    """Refuse to resume from a checkpoint of another architecture, or with LoRA added/removed.

    Args:
        saved: `read_checkpoint_summary` of the checkpoint.
        model: This run's model summary (``dataclasses.asdict`` of its `ModelConfig`).
        lora: Whether this run trains LoRA adapters.
        path: The checkpoint, named in the error.

    Raises:
        ValueError: Naming the first key that differs, the checkpoint's value and this run's.
    """
    if saved.lora != lora:
        have, want = ("lora", "none") if saved.lora else ("none", "lora")
        raise ValueError(
            f"cannot resume from {path}: model.peft.peft_scheme is {have} in the checkpoint, "
            f"{want} in this run (a run keeps its adapters; start a new run with --restore to "
            "change them)"
        )
    then, now = _resolved(saved.model), _resolved(model)
    for key in ARCHITECTURE_KEYS:
        if key in then and key in now and then[key] != now[key]:
            name = _CONFIG_KEY.get(key, f"model.{key}")
            raise ValueError(
                f"cannot resume from {path}: {name} is {then[key]!r} in the checkpoint, "
                f"{now[key]!r} in this run (resuming needs the same architecture)"
            )

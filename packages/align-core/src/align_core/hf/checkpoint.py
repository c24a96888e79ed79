"""Open a Hugging Face causal-LM directory and load it into a model at any TP/PP layout.

Typical use::

    with open_hf("SmolLM2-135M-Instruct/") as ckpt:
        cfg = ckpt.model_config_for(tensor_parallel_size=2)
        model = build_gpt_model(cfg, ParallelConfig(tensor_model_parallel_size=2))
        load_hf_weights(model, ckpt)

`open_hf` reads ``config.json`` and the safetensors headers and checks every stored shape
against the config before anything is allocated; `load_hf_weights` reads, for each parameter of
this rank, only the rows or columns it holds (fusing q/k/v and gate/up on the way, see
`align_core.hf.names`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from align_core.config import ModelConfig, padded_vocab_size
from align_core.hf.config import checkpoint_dtype, model_config_from_hf
from align_core.hf.errors import HFFormatError
from align_core.hf.names import WeightMapping, fuse_qkv, weight_mappings
from align_core.hf.safetensors_files import SafetensorsFiles
from align_core.nemo.shards import layer_index, partition_of
from align_core.nemo.tokenizer import TokenizerSpec

__all__ = [
    "CONFIG_FILE",
    "HFCheckpoint",
    "expected_shapes",
    "is_hf_checkpoint",
    "load_hf_weights",
    "open_hf",
    "read_rank_slice",
]

CONFIG_FILE = "config.json"
_IGNORED = ("rotary_emb.inv_freq",)  # buffers some old checkpoints saved


@dataclass(frozen=True)
class HFCheckpoint:
    """An opened Hugging Face directory (valid inside `open_hf`'s block).

    Attributes:
        source: The directory.
        config: ``config.json`` as a dict.
        model_config: The architecture (fp32, the checkpoint's vocabulary, no padding).
        tokenizer: ``tokenizer.json`` (library ``huggingface``; `align_data.HFTokenizer` reads
            ``tokenizer_config.json`` and the chat template next to it) or ``tokenizer.model``
            (``sentencepiece``); None when the directory has neither.
        torch_dtype: The dtype the weights are stored in.
        tensors: The open safetensors files.
    """

    source: Path
    config: dict[str, Any]
    model_config: ModelConfig
    tokenizer: TokenizerSpec | None
    torch_dtype: torch.dtype
    tensors: SafetensorsFiles

    @property
    def weight_files(self) -> tuple[Path, ...]:
        """The safetensors files."""
        return self.tensors.files

    def model_config_for(self, tensor_parallel_size: int) -> ModelConfig:
        """`model_config` with vocabulary padding that splits over this many TP ranks unpadded.

        Raises:
            HFFormatError: When the key/value heads or the vocabulary cannot be split evenly
                over the ranks (megatron would pad the vocabulary, and padded rows would change
                the log-probabilities).
        """
        cfg = self.model_config
        groups = cfg.num_query_groups or cfg.num_attention_heads
        if groups % tensor_parallel_size:
            raise HFFormatError(
                f"{self.source / CONFIG_FILE}: num_key_value_heads={groups} cannot be split "
                f"evenly over {tensor_parallel_size} tensor-parallel ranks"
            )
        rows = cfg.vocab_size
        if rows % tensor_parallel_size:
            raise HFFormatError(
                f"{self.source / CONFIG_FILE}: vocab_size={rows} cannot be split evenly over "
                f"{tensor_parallel_size} tensor-parallel ranks"
            )
        divisor = math.gcd(128, rows // tensor_parallel_size)
        assert padded_vocab_size(rows, divisor, tensor_parallel_size) == rows
        return cfg.replace(make_vocab_size_divisible_by=divisor)


def is_hf_checkpoint(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a directory holding a ``config.json``."""
    return (Path(path) / CONFIG_FILE).is_file()


def _read_config(root: Path) -> dict[str, Any]:
    path = root / CONFIG_FILE
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise HFFormatError(f"{path}: not readable JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise HFFormatError(f"{path}: not a JSON object")
    return config


def _tokenizer(root: Path) -> TokenizerSpec | None:
    if (root / "tokenizer.json").is_file():
        return TokenizerSpec(library="huggingface", model=root / "tokenizer.json")
    if (root / "tokenizer.model").is_file():
        return TokenizerSpec(library="sentencepiece", model=root / "tokenizer.model")
    return None


def expected_shapes(model: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The shape of every Hugging Face tensor of a model of architecture ``model``."""
    hidden, ffn, vocab = model.hidden_size, model.ffn_hidden_size, model.vocab_size
    head_dim = model.kv_channels or hidden // model.num_attention_heads
    q_rows = model.num_attention_heads * head_dim
    kv_rows = (model.num_query_groups or model.num_attention_heads) * head_dim
    by_suffix = {
        "embed_tokens.weight": (vocab, hidden),
        "lm_head.weight": (vocab, hidden),
        "q_proj.weight": (q_rows, hidden),
        "q_proj.bias": (q_rows,),
        "k_proj.weight": (kv_rows, hidden),
        "k_proj.bias": (kv_rows,),
        "v_proj.weight": (kv_rows, hidden),
        "v_proj.bias": (kv_rows,),
        "o_proj.weight": (hidden, q_rows),
        "o_proj.bias": (hidden,),
        "gate_proj.weight": (ffn, hidden),
        "gate_proj.bias": (ffn,),
        "up_proj.weight": (ffn, hidden),
        "up_proj.bias": (ffn,),
        "down_proj.weight": (hidden, ffn),
        "down_proj.bias": (hidden,),
        "q_norm.weight": (head_dim,),
        "k_norm.weight": (head_dim,),
        "layernorm.weight": (hidden,),
        "norm.weight": (hidden,),
    }
    out = {}
    for mapping in weight_mappings(model):
        for name in mapping.hf:
            suffix = next(s for s in by_suffix if name.endswith(s))
            out[name] = by_suffix[suffix]
    return out


def _check_layers(config: ModelConfig, names: set[str], origin: Path) -> None:
    """The stored layer count agrees with ``num_hidden_layers`` (before any list is built)."""
    stored = {i for i in map(layer_index, names) if i is not None}
    count = max(stored) + 1 if stored else 0
    if count != config.num_layers:
        raise HFFormatError(
            f"{origin / CONFIG_FILE}: num_hidden_layers={config.num_layers} but the weights "
            f"hold {count} layers"
        )


def _check_shapes(config: ModelConfig, tensors: SafetensorsFiles, origin: Path) -> None:
    """Every stored tensor the model uses has the shape ``config.json`` implies."""
    names = tensors.names()
    for name, shape in expected_shapes(config).items():
        if name not in names:
            continue  # reported by load_hf_weights (strict), which knows what it needs
        stored = tensors.shape(name)
        if stored != shape:
            raise HFFormatError(
                f"{origin}: {name} has shape {list(stored)} but config.json implies {list(shape)}"
            )
        tensors.dtype(name)


@contextlib.contextmanager
def open_hf(path: str | os.PathLike[str]) -> Iterator[HFCheckpoint]:
    """Open a Hugging Face causal-LM directory.

    Args:
        path: Directory with ``config.json``, ``model.safetensors`` (or shards and
            ``model.safetensors.index.json``) and tokenizer files.

    Yields:
        The `HFCheckpoint`; its safetensors files are closed when the block ends.

    Raises:
        FileNotFoundError: When ``path`` is not a directory.
        HFFormatError: For an unsupported architecture, a config value the model cannot
            express, missing or unreadable safetensors files, or stored shapes that disagree
            with the config (the message names the file and key).
    """
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such Hugging Face directory")
    config = _read_config(root)
    origin = str(root / CONFIG_FILE)
    model_config = model_config_from_hf(config, origin=origin)
    dtype = checkpoint_dtype(config, origin=origin)
    with contextlib.ExitStack() as stack:
        tensors = SafetensorsFiles(root, stack)
        _check_layers(model_config, tensors.names(), root)
        _check_shapes(model_config, tensors, root)
        yield HFCheckpoint(
            source=root,
            config=config,
            model_config=model_config,
            tokenizer=_tokenizer(root),
            torch_dtype=dtype,
            tensors=tensors,
        )


def _tensor_parallel(tp_rank: int | None, tp_size: int | None) -> tuple[int, int]:
    from megatron.core import parallel_state

    rank, size = 0, 1
    if parallel_state.model_parallel_is_initialized():
        rank = parallel_state.get_tensor_model_parallel_rank()
        size = parallel_state.get_tensor_model_parallel_world_size()
    return (rank if tp_rank is None else tp_rank), (size if tp_size is None else tp_size)


def _rank_range(length: int, rank: int, size: int, what: str) -> tuple[int, int]:
    if length % size:
        raise HFFormatError(
            f"{what}: {length} cannot be split evenly over {size} tensor-parallel ranks"
        )
    step = length // size
    return rank * step, (rank + 1) * step


def read_rank_slice(
    mapping: WeightMapping,
    key: str,
    tensors: SafetensorsFiles,
    model: ModelConfig,
    *,
    rank: int,
    size: int,
) -> torch.Tensor:
    """This tensor-parallel rank's piece of megatron parameter ``key`` (``mapping.megatron``).

    Reads only the rows (columns for row-parallel weights) the rank holds.
    """
    if mapping.kind == "qkv":
        groups = model.num_query_groups or model.num_attention_heads
        head_dim = model.kv_channels or model.hidden_size // model.num_attention_heads
        q_rows = model.num_attention_heads // groups * head_dim
        first, last = _rank_range(groups, rank, size, f"{mapping.megatron} (query groups)")
        q, k, v = mapping.hf
        return fuse_qkv(
            tensors.read(q, dim=0, start=first * q_rows, stop=last * q_rows),
            tensors.read(k, dim=0, start=first * head_dim, stop=last * head_dim),
            tensors.read(v, dim=0, start=first * head_dim, stop=last * head_dim),
            groups=last - first,
        )
    if mapping.kind == "gated":
        halves = []
        for name in mapping.hf:
            start, stop = _rank_range(tensors.shape(name)[0], rank, size, name)
            halves.append(tensors.read(name, dim=0, start=start, stop=stop))
        return torch.cat(halves, dim=0)
    (name,) = mapping.hf
    dim = partition_of(key, gated=model.gated).dim
    if dim is None or size == 1:
        return tensors.read(name)
    start, stop = _rank_range(tensors.shape(name)[dim], rank, size, name)
    return tensors.read(name, dim=dim, start=start, stop=stop)


def _global_key(local_key: str, offset: int) -> str:
    index = layer_index(local_key)
    if index is None:
        return local_key
    return local_key.replace(f"layers.{index}.", f"layers.{index + offset}.", 1)


def load_hf_weights(
    model: torch.nn.Module,
    ckpt: HFCheckpoint,
    *,
    tp_rank: int | None = None,
    tp_size: int | None = None,
    strict: bool = True,
) -> None:
    """Load the checkpoint's weights into this rank's part of ``model``.

    Each parameter is read as this rank's slice, converted to the parameter's dtype and copied
    in; Transformer Engine and local key names both work; LoRA adapters (if already added) are
    left alone. Not collective: each rank reads its own slices.

    Args:
        model: This rank's `GPTModel` (or a wrapper with ``.module``).
        ckpt: From `open_hf`.
        tp_rank: Tensor-parallel rank; default: megatron's parallel state (0 if uninitialised).
        tp_size: Tensor-parallel size; default: megatron's parallel state.
        strict: Raise when the checkpoint and the model do not hold the same parameters.

    Raises:
        HFFormatError: For missing, unexpected or wrongly shaped tensors (named).
    """
    from align_core.model import unwrap_model
    from align_core.nemo.weights import layer_offset
    from align_core.spec_keys import te_to_local

    module = unwrap_model(model)
    rank, size = _tensor_parallel(tp_rank, tp_size)
    target = {
        k: v
        for k, v in module.state_dict().items()
        if "_lora." not in k and not k.endswith("_extra_state")
    }
    local_names = list(te_to_local(dict.fromkeys(target)))
    mappings = {m.megatron: m for m in weight_mappings(ckpt.model_config)}
    offset = layer_offset(module)
    stored = ckpt.tensors.names()
    state: dict[str, torch.Tensor] = {}
    missing: list[str] = []
    for key, local in zip(target, local_names, strict=True):
        mapping = mappings.get(_global_key(local, offset))
        if mapping is None and local == "output_layer.weight":
            mapping = WeightMapping(local, ("model.embed_tokens.weight",))  # tied, last stage
        if mapping is None or not all(name in stored for name in mapping.hf):
            missing.append(key if mapping is None else ", ".join(mapping.hf))
            continue
        piece = read_rank_slice(
            mapping, local, ckpt.tensors, ckpt.model_config, rank=rank, size=size
        )
        if piece.shape != target[key].shape:
            raise HFFormatError(
                f"{ckpt.source}: {', '.join(mapping.hf)}: rank {rank}'s slice has shape "
                f"{list(piece.shape)} but the model's {key} has {list(target[key].shape)} (build "
                "the model from HFCheckpoint.model_config_for(tensor_parallel_size))"
            )
        state[key] = piece.to(target[key].dtype)
    expected = {name for m in mappings.values() for name in m.hf}
    unexpected = sorted(n for n in stored - expected if not n.endswith(_IGNORED))
    if strict and (missing or unexpected):
        raise HFFormatError(
            f"{ckpt.source}: checkpoint does not match the model: missing {missing[:8]}"
            f"{' ...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
            f"{' ...' if len(unexpected) > 8 else ''}"
        )
    module.load_state_dict(state, strict=False)

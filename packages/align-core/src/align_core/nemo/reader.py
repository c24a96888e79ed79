"""Open a `.nemo` and load its weights into a model built at any tensor/pipeline layout.

Typical use::

    with open_nemo("model.nemo") as ckpt:
        cfg = ckpt.model_config_for(tensor_parallel_size=2)
        model = build_gpt_model(cfg, ParallelConfig(tensor_model_parallel_size=2))
        load_nemo_weights(model, ckpt)
        tokenizer_spec = ckpt.tokenizer   # files valid until the block ends (or .detached())

Each process extracts its own copy of the archive into a temporary directory (removed when the
block ends); pass ``workdir`` to extract somewhere else and keep the files.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from align_core.config import ModelConfig, padded_vocab_size
from align_core.nemo.archive import extract_nemo
from align_core.nemo.config_map import NemoGptConfig, unwrap_model_section
from align_core.nemo.errors import NemoFormatError, UnsupportedNemoConfigError
from align_core.nemo.shapes import check_weight_shapes, stored_shapes
from align_core.nemo.tokenizer import TokenizerSpec, tokenizer_from_nemo
from align_core.nemo.weights import (
    WeightsLayout,
    detect_weights,
    embedding_rows,
    layer_offset,
    load_distributed_into,
    read_full_state_dict,
    shard_for_model,
)
from align_core.spec_keys import convert_spec, detect_spec

__all__ = ["NemoCheckpoint", "load_nemo_weights", "open_nemo", "read_nemo_config"]

CONFIG_FILE = "model_config.yaml"


@dataclass(frozen=True)
class NemoCheckpoint:
    """An opened (extracted) `.nemo`.

    Attributes:
        source: The `.nemo` file (or directory) it came from.
        root: Directory holding the extracted members.
        config: ``model_config.yaml`` as a dict (``model:`` unwrapped).
        nemo: The architecture keys, typed.
        model_config: The architecture as a `ModelConfig`. ``vocab_size`` is the checkpoint's
            embedding row count (the padded vocabulary), so a model built from it has exactly the
            saved embedding shape.
        tokenizer: The tokenizer description with resolved artifact paths, or None.
        weights: Where the weights are and the layout they were saved with.
    """

    source: Path
    root: Path
    config: dict[str, Any]
    nemo: NemoGptConfig
    model_config: ModelConfig
    tokenizer: TokenizerSpec | None
    weights: WeightsLayout

    def model_config_for(self, tensor_parallel_size: int) -> ModelConfig:
        """`model_config` with vocabulary padding that reproduces the saved rows at this TP size.

        Megatron pads the vocabulary to a multiple of ``make_vocab_size_divisible_by × TP``; when
        the saved row count is not such a multiple at the new TP size, the divisor is lowered to
        the largest one that keeps the row count unchanged.

        Raises:
            NemoFormatError: When the saved rows cannot be split over ``tensor_parallel_size``.
        """
        cfg = self.model_config
        rows = cfg.vocab_size
        if rows % tensor_parallel_size:
            raise NemoFormatError(
                f"{self.source}: {rows} vocabulary rows cannot be split over "
                f"{tensor_parallel_size} tensor-parallel ranks"
            )
        divisor = cfg.make_vocab_size_divisible_by
        if padded_vocab_size(rows, divisor, tensor_parallel_size) != rows:
            divisor = math.gcd(divisor, rows // tensor_parallel_size)
        return cfg.replace(make_vocab_size_divisible_by=divisor)

    def full_state_dict(self) -> dict[str, object]:
        """The full, unprefixed state dict of a single-file or TP/PP-sharded checkpoint.

        Tensors are memory-mapped from the extracted files.

        Raises:
            NemoFormatError: For a distributed checkpoint, or unreadable/inconsistent shards.
        """
        return read_full_state_dict(
            self.weights,
            gated=self.model_config.gated,
            share_embeddings=self.model_config.share_embeddings_and_output_weights,
            origin=str(self.source),
        )


def read_nemo_config(root: Path, *, origin: str = "<nemo>") -> dict[str, Any]:
    """Read and unwrap ``model_config.yaml`` from an extracted archive with ``yaml.safe_load``.

    Raises:
        NemoFormatError: When the file is missing or not valid YAML.
    """
    path = root / CONFIG_FILE
    if not path.is_file():
        raise NemoFormatError(f"{origin}: missing {CONFIG_FILE}")
    try:
        cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise NemoFormatError(f"{origin}: {CONFIG_FILE} is not valid YAML ({exc})") from exc
    return unwrap_model_section(cfg, origin=origin)


def _describe(source: Path, root: Path, vocab_size: int | None) -> NemoCheckpoint:
    origin = str(source)
    config = read_nemo_config(root, origin=origin)
    nemo = NemoGptConfig.from_dict(config, origin=origin)
    tokenizer = tokenizer_from_nemo(config.get("tokenizer"), root, origin=origin)
    weights = detect_weights(root, origin=origin)
    rows = embedding_rows(weights, origin=origin)
    if rows is None:
        if vocab_size is None:
            raise NemoFormatError(
                f"{origin}: no word-embedding weight found, so the vocabulary size is unknown"
            )
        rows = padded_vocab_size(
            vocab_size, nemo.make_vocab_size_divisible_by, nemo.tensor_model_parallel_size
        )
    try:
        model_config = nemo.to_model_config(rows)
    except UnsupportedNemoConfigError:
        raise
    except ValueError as exc:
        raise NemoFormatError(f"{origin}: {CONFIG_FILE}: {exc}") from exc
    check_weight_shapes(model_config, stored_shapes(weights, origin=origin), origin=origin)
    return NemoCheckpoint(
        source=source,
        root=root,
        config=config,
        nemo=nemo,
        model_config=model_config,
        tokenizer=tokenizer,
        weights=weights,
    )


@contextlib.contextmanager
def open_nemo(
    path: str | os.PathLike[str],
    *,
    workdir: str | os.PathLike[str] | None = None,
    vocab_size: int | None = None,
) -> Iterator[NemoCheckpoint]:
    """Extract and describe a `.nemo` file (or an already extracted directory).

    Args:
        path: The `.nemo` file, or a directory holding its extracted members.
        workdir: Extract here and keep the files; default: a temporary directory removed on
            exit.
        vocab_size: Tokenizer vocabulary size, used only when the weights hold no embedding
            (pipeline stages without one).

    Yields:
        The `NemoCheckpoint`.

    Raises:
        FileNotFoundError: When ``path`` does not exist.
        NemoFormatError: For an unsafe, truncated or incomplete archive (the message names
            the member or key).
        UnsupportedNemoConfigError: For an architecture this package cannot build.
    """
    source = Path(path)
    if not source.exists():
        raise FileNotFoundError(f"{source}: no such .nemo file")
    if source.is_dir():
        yield _describe(source, source, vocab_size)
        return
    if workdir is not None:
        yield _describe(source, extract_nemo(source, workdir), vocab_size)
        return
    tmp = Path(tempfile.mkdtemp(prefix="nemo-"))
    try:
        yield _describe(source, extract_nemo(source, tmp), vocab_size)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _tensor_parallel() -> tuple[int, int]:
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return 0, 1
    return (
        parallel_state.get_tensor_model_parallel_rank(),
        parallel_state.get_tensor_model_parallel_world_size(),
    )


def _is_adapter(key: str) -> bool:
    return "_lora." in key


def load_nemo_weights(
    model: torch.nn.Module,
    ckpt: NemoCheckpoint,
    *,
    tp_rank: int | None = None,
    tp_size: int | None = None,
    strict: bool = True,
) -> None:
    """Load the checkpoint's weights into this rank's part of ``model``.

    Works whatever layout the weights were saved with: full tensors are cut into this rank's
    tensor-parallel shard and this pipeline stage's layers; Transformer Engine and local key
    names are converted to the model's own; ``_extra_state`` entries are ignored where they do
    not apply; LoRA adapter parameters (if already added) are left alone. A distributed
    checkpoint is loaded by megatron (collective: every rank must call this).

    Args:
        model: The `GPTModel` (or a wrapper with ``.module``) of this rank.
        ckpt: From `open_nemo`.
        tp_rank: Tensor-parallel rank; default: megatron's parallel state (0 if uninitialised).
        tp_size: Tensor-parallel size; default: megatron's parallel state.
        strict: Raise when the checkpoint and the model do not hold the same parameters.

    Raises:
        NemoFormatError: For missing, unexpected or wrongly shaped parameters (named).
    """
    from align_core.model import unwrap_model

    module = unwrap_model(model)
    origin = str(ckpt.source)
    if ckpt.weights.kind == "distributed":
        missing, unexpected = load_distributed_into(module, ckpt.weights.files[0][0], origin=origin)
        missing = [k for k in missing if not _is_adapter(k)]
    else:
        rank, size = _tensor_parallel()
        rank = rank if tp_rank is None else tp_rank
        size = size if tp_size is None else tp_size
        target = {k: v for k, v in module.state_dict().items() if not _is_adapter(k)}
        full = ckpt.full_state_dict()
        spec = detect_spec(target)
        if spec is not None:
            full = convert_spec(full, spec)
        state, missing, unexpected = shard_for_model(
            full,
            target,
            tp_rank=rank,
            tp_size=size,
            layer_offset=layer_offset(module),
            gated=ckpt.model_config.gated,
            origin=origin,
        )
        result = module.load_state_dict(state, strict=False)
        unexpected = unexpected + list(result.unexpected_keys)
    if strict and (missing or unexpected):
        raise NemoFormatError(
            f"{origin}: checkpoint does not match the model: missing {missing[:8]}"
            f"{' ...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
            f"{' ...' if len(unexpected) > 8 else ''}"
        )

"""One entry point for a pretrained model: a `.nemo` or a Hugging Face directory.

Everywhere a run names a model to start from (``restore_from_path``, a KD teacher, ``align
generate``), the path may be a NeMo 1.x `.nemo` file, its extracted directory, or a Hugging
Face causal-LM directory (``config.json`` + safetensors). `checkpoint_format` tells which;
`open_pretrained` opens either as a `PretrainedCheckpoint`; `load_pretrained_weights` loads
its weights into this rank's part of a model at any tensor/pipeline layout.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Literal, Protocol

import torch

from align_core.config import ModelConfig
from align_core.nemo.tokenizer import TokenizerSpec

__all__ = [
    "CheckpointFormat",
    "PretrainedCheckpoint",
    "checkpoint_format",
    "load_pretrained_weights",
    "open_pretrained",
]

CheckpointFormat = Literal["nemo", "hf"]
_HF_CONFIG = "config.json"
_NEMO_CONFIG = "model_config.yaml"


class PretrainedCheckpoint(Protocol):
    """What `open_pretrained` gives for either format."""

    @property
    def source(self) -> Path:
        """The file or directory it was opened from."""
        ...

    @property
    def model_config(self) -> ModelConfig:
        """The architecture, with the checkpoint's vocabulary rows."""
        ...

    @property
    def tokenizer(self) -> TokenizerSpec | None:
        """The tokenizer description (files valid while the checkpoint is open)."""
        ...

    def model_config_for(self, tensor_parallel_size: int) -> ModelConfig:
        """`model_config` with vocabulary padding that splits over this many TP ranks."""
        ...


def checkpoint_format(path: str | os.PathLike[str]) -> CheckpointFormat:
    """Which format a checkpoint path holds.

    ``"hf"`` for a directory holding ``config.json`` (and no ``model_config.yaml``), else
    ``"nemo"`` (a `.nemo` file or an extracted one).

    Raises:
        FileNotFoundError: When ``path`` does not exist.
    """
    source = Path(path)
    if not source.exists():
        raise FileNotFoundError(f"{source}: no such file or directory")
    hf = source.is_dir() and (source / _HF_CONFIG).is_file()
    return "hf" if hf and not (source / _NEMO_CONFIG).is_file() else "nemo"


@contextlib.contextmanager
def open_pretrained(path: str | os.PathLike[str]) -> Iterator[PretrainedCheckpoint]:
    """Open a `.nemo` (`align_core.nemo.open_nemo`) or an HF directory (`align_core.hf.open_hf`).

    Raises:
        FileNotFoundError: When ``path`` does not exist.
        NemoFormatError, HFFormatError: For an unreadable or unsupported checkpoint (the message
            names the file and the key).
    """
    if checkpoint_format(path) == "hf":
        from align_core.hf import open_hf

        with open_hf(path) as checkpoint:
            yield checkpoint
        return
    from align_core.nemo import open_nemo

    with open_nemo(path) as checkpoint:
        yield checkpoint


def load_pretrained_weights(
    model: torch.nn.Module, checkpoint: PretrainedCheckpoint, *, strict: bool = True
) -> None:
    """Load ``checkpoint``'s weights into this rank's part of ``model``.

    Collective for a distributed `.nemo`: every rank calls it.

    Raises:
        NemoFormatError, HFFormatError: For missing, unexpected or wrongly shaped weights.
    """
    from align_core.nemo import NemoCheckpoint, load_nemo_weights

    if isinstance(checkpoint, NemoCheckpoint):
        load_nemo_weights(model, checkpoint, strict=strict)
        return
    from align_core.hf import HFCheckpoint, load_hf_weights

    if not isinstance(checkpoint, HFCheckpoint):
        raise TypeError(f"not a pretrained checkpoint: {type(checkpoint).__name__}")
    load_hf_weights(model, checkpoint, strict=strict)

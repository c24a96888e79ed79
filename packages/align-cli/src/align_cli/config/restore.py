"""The architecture of the model named by ``pretrained_checkpoint.restore_from_path``."""

from __future__ import annotations

from typing import Any

from align_cli.config.schema import model_overrides
from align_cli.errors import ConfigError

__all__ = ["base_model_for", "read_model_config"]


def read_model_config(path: str, tensor_parallel_size: int = 1) -> Any:
    """The `align_core.ModelConfig` of a ``.nemo`` (file or directory) or a Hugging Face directory.

    The vocabulary is the checkpoint's embedding rows, padded so that they split over
    ``tensor_parallel_size`` ranks as saved (align-core's ``model_config_for``).

    Raises:
        ConfigError: The path cannot be read as a NeMo GPT or Hugging Face checkpoint.
    """
    from align_core.pretrained import open_pretrained

    try:
        with open_pretrained(path) as checkpoint:
            return checkpoint.model_config_for(tensor_parallel_size)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"pretrained_checkpoint.restore_from_path: {exc}",
            key="pretrained_checkpoint.restore_from_path",
        ) from exc


def base_model_for(tree: Any) -> Any:
    """The restored model's architecture when ``model.*`` keys change it, else None.

    None lets the trainer take the architecture from the checkpoint unchanged (or use the
    default tiny model when nothing is restored).
    """
    if not hasattr(tree.model, "num_layers"):
        return None  # a tree without architecture keys (the teacher pass)
    path = tree.pretrained_checkpoint.restore_from_path
    if path is None or not model_overrides(tree):
        return None
    return read_model_config(path, tree.model.tensor_model_parallel_size)

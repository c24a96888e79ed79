"""Hugging Face causal-LM directories in and out (Llama, Mistral, Qwen2, Qwen3).

`open_hf` reads ``config.json`` and the safetensors headers; `load_hf_weights` loads the slices
a tensor/pipeline-parallel rank holds; `save_hf` writes a directory ``transformers`` loads.
`align_core.pretrained` puts these behind the same seam as `.nemo` files.
"""

from align_core.hf.checkpoint import (
    CONFIG_FILE,
    HFCheckpoint,
    expected_shapes,
    is_hf_checkpoint,
    load_hf_weights,
    open_hf,
)
from align_core.hf.config import (
    ARCHITECTURES,
    checkpoint_dtype,
    hf_config_from_model,
    model_config_from_hf,
)
from align_core.hf.errors import HFFormatError
from align_core.hf.names import WeightMapping, fuse_qkv, hf_names, split_qkv, weight_mappings
from align_core.hf.save import DEFAULT_MAX_SHARD_BYTES, hf_state_dict, save_hf, write_hf

__all__ = [
    "ARCHITECTURES",
    "CONFIG_FILE",
    "DEFAULT_MAX_SHARD_BYTES",
    "HFCheckpoint",
    "HFFormatError",
    "WeightMapping",
    "checkpoint_dtype",
    "expected_shapes",
    "fuse_qkv",
    "hf_config_from_model",
    "hf_names",
    "hf_state_dict",
    "is_hf_checkpoint",
    "load_hf_weights",
    "model_config_from_hf",
    "open_hf",
    "save_hf",
    "split_qkv",
    "weight_mappings",
    "write_hf",
]

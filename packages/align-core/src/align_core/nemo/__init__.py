"""NeMo 1.x `.nemo` checkpoints: read, load into any TP/PP layout, write, and tiny test files.

See `align_core.nemo.reader` for loading, `align_core.nemo.writer` for export and
`align_core.nemo.tiny` for random-initialised files.
"""

from align_core.nemo.archive import atomic_output, extract_nemo, list_members, write_archive
from align_core.nemo.config_map import (
    NEMO_GPT_TARGET,
    NemoGptConfig,
    model_config_from_nemo,
    nemo_config_from_model,
    unwrap_model_section,
)
from align_core.nemo.errors import NemoFormatError, UnsupportedNemoConfigError
from align_core.nemo.reader import (
    NemoCheckpoint,
    load_nemo_weights,
    open_nemo,
    read_nemo_config,
)
from align_core.nemo.shards import (
    Partition,
    gather_state_dict,
    merge_pipeline_stages,
    merge_tensor_parallel,
    partition_of,
    split_tensor_parallel,
)
from align_core.nemo.tiny import random_state_dict, write_tiny_nemo
from align_core.nemo.tokenizer import (
    TokenizerSpec,
    build_tokenizer,
    tokenizer_from_nemo,
    tokenizer_to_nemo,
    write_byte_bpe_files,
)
from align_core.nemo.weights import WeightsLayout, detect_weights, strip_prefix
from align_core.nemo.writer import save_nemo, write_nemo

__all__ = [
    "NEMO_GPT_TARGET",
    "NemoCheckpoint",
    "NemoFormatError",
    "NemoGptConfig",
    "Partition",
    "TokenizerSpec",
    "UnsupportedNemoConfigError",
    "WeightsLayout",
    "atomic_output",
    "build_tokenizer",
    "detect_weights",
    "extract_nemo",
    "gather_state_dict",
    "list_members",
    "load_nemo_weights",
    "merge_pipeline_stages",
    "merge_tensor_parallel",
    "model_config_from_nemo",
    "nemo_config_from_model",
    "open_nemo",
    "partition_of",
    "random_state_dict",
    "read_nemo_config",
    "save_nemo",
    "split_tensor_parallel",
    "strip_prefix",
    "tokenizer_from_nemo",
    "tokenizer_to_nemo",
    "unwrap_model_section",
    "write_archive",
    "write_byte_bpe_files",
    "write_nemo",
    "write_tiny_nemo",
]

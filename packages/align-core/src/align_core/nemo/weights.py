"""Weights inside an extracted `.nemo`: find them, read them, fit them to a model.

Layouts (NeMo 1.x):

* ``model_weights.ckpt`` — one ``torch.save``-d state dict;
* ``mp_rank_XX/model_weights.ckpt`` — one file per tensor-parallel rank (no pipeline);
* ``tp_rank_XX_pp_rank_XXX/model_weights.ckpt`` — one file per (tensor, pipeline) rank;
* ``model_weights/`` — a megatron-core distributed checkpoint (``torch_dist``).

The first three are read with ``torch.load(weights_only=True)`` (memory-mapped) and merged into
one full state dict (`read_full_state_dict`); `shard_for_model` then cuts the piece a model
built at any tensor/pipeline layout needs. Distributed checkpoints are loaded straight into the
model's ``sharded_state_dict`` by megatron (`load_distributed_into`).

NeMo's ``MegatronGPTModel`` keeps the megatron model as ``self.model``, so its keys start with
``model.`` (``model.module.`` with ``megatron_amp_O2``); `strip_prefix` removes any such prefix.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch

from align_core.nemo.errors import NemoFormatError
from align_core.nemo.shards import (
    is_extra_state,
    layer_index,
    merge_pipeline_stages,
    merge_tensor_parallel,
    partition_of,
    split_tensor,
)
from align_core.safe_load import (
    UnsafeCheckpointError,
    load_weights_only,
    read_dcp_metadata,
    verify_distributed_checkpoint,
)

if TYPE_CHECKING:
    from megatron.core.transformer.module import MegatronModule

__all__ = [
    "NEMO_PREFIX",
    "WeightsLayout",
    "detect_weights",
    "embedding_rows",
    "layer_offset",
    "load_distributed_into",
    "read_checkpoint_file",
    "read_full_state_dict",
    "shard_for_model",
    "stored_tensors",
    "strip_prefix",
]

NEMO_PREFIX = "model."
WEIGHTS_FILE = "model_weights.ckpt"
DIST_DIR = "model_weights"
_ROOTS = ("embedding.", "decoder.", "output_layer.")
_MP_DIR = re.compile(r"^mp_rank_(\d{2})$")
_TP_PP_DIR = re.compile(r"^tp_rank_(\d{2})_pp_rank_(\d{3})$")
_EMBEDDING = "embedding.word_embeddings.weight"


@dataclass(frozen=True)
class WeightsLayout:
    """Where the weights of an extracted `.nemo` are.

    Attributes:
        kind: ``"single"``, ``"tp"`` (``mp_rank_XX``), ``"tp_pp"`` (``tp_rank_XX_pp_rank_XXX``)
            or ``"distributed"`` (``model_weights/``).
        tensor_parallel: Tensor-parallel size the weights were saved with (1 for single and
            distributed).
        pipeline_parallel: Pipeline-parallel size the weights were saved with.
        files: For the legacy layouts, ``files[pp][tp]``; for ``"distributed"`` the directory.
    """

    kind: Literal["single", "tp", "tp_pp", "distributed"]
    tensor_parallel: int
    pipeline_parallel: int
    files: tuple[tuple[Path, ...], ...]


def _contiguous(found: set[int], what: str, origin: str) -> int:
    size = max(found) + 1
    missing = sorted(set(range(size)) - found)
    if missing:
        raise NemoFormatError(f"{origin}: {what} {missing} missing (found {sorted(found)})")
    return size


def detect_weights(root: Path, *, origin: str = "<nemo>") -> WeightsLayout:
    """Find the weights in an extracted archive.

    Raises:
        NemoFormatError: When there are no weights, or shard files are missing (named).
    """
    if (root / WEIGHTS_FILE).is_file():
        return WeightsLayout("single", 1, 1, ((root / WEIGHTS_FILE,),))
    if (root / DIST_DIR).is_dir():
        if not any((root / DIST_DIR).iterdir()):
            raise NemoFormatError(f"{origin}: {DIST_DIR}/ is empty")
        return WeightsLayout("distributed", 1, 1, ((root / DIST_DIR,),))
    mp = {int(m.group(1)) for p in root.iterdir() if p.is_dir() and (m := _MP_DIR.match(p.name))}
    tp_pp = {
        (int(m.group(1)), int(m.group(2)))
        for p in root.iterdir()
        if p.is_dir() and (m := _TP_PP_DIR.match(p.name))
    }
    if mp:
        tp = _contiguous(mp, "tensor-parallel shard directories mp_rank_", origin)
        files = tuple(root / f"mp_rank_{r:02d}" / WEIGHTS_FILE for r in range(tp))
        grid: tuple[tuple[Path, ...], ...] = (files,)
        kind: Literal["tp", "tp_pp"] = "tp"
        pp = 1
    elif tp_pp:
        tp = _contiguous({t for t, _ in tp_pp}, "tensor ranks", origin)
        pp = _contiguous({p for _, p in tp_pp}, "pipeline ranks", origin)
        grid = tuple(
            tuple(root / f"tp_rank_{t:02d}_pp_rank_{p:03d}" / WEIGHTS_FILE for t in range(tp))
            for p in range(pp)
        )
        kind = "tp_pp"
    else:
        raise NemoFormatError(
            f"{origin}: no weights found (expected {WEIGHTS_FILE}, {DIST_DIR}/, "
            "mp_rank_XX/ or tp_rank_XX_pp_rank_XXX/)"
        )
    for row in grid:
        for path in row:
            if not path.is_file():
                raise NemoFormatError(f"{origin}: missing {path.relative_to(root)}")
    return WeightsLayout(kind, tp, pp, grid)


def read_checkpoint_file(path: Path, *, origin: str = "<nemo>") -> dict[str, object]:
    """``torch.load(weights_only=True, mmap=True)`` a state-dict file.

    ``io.BytesIO`` and ``bytes`` are allowed as well, because Transformer Engine stores its
    ``_extra_state`` that way (`align_core.safe_load.SAFE_GLOBALS`).

    Raises:
        UnsafeCheckpointError: When the file's pickle names a class that is not allowed.
        NemoFormatError: When the file is corrupt or does not hold a dict.
    """
    try:
        state = load_weights_only(path, origin=f"{origin}: {path.name}", mmap=True)
    except UnsafeCheckpointError:
        raise
    except ValueError as exc:
        raise NemoFormatError(str(exc)) from exc
    if not isinstance(state, dict):
        raise NemoFormatError(f"{origin}: {path.name} holds a {type(state).__name__}, not a dict")
    if "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    return state


def strip_prefix(state: Mapping[str, object], *, origin: str = "<nemo>") -> dict[str, object]:
    """Remove the wrapper prefix (``model.``, ``model.module.``, ...) common to all keys.

    Raises:
        NemoFormatError: For pre-mcore NeMo keys (``model.language_model.…``), which this
            package does not read, or keys with different prefixes.
    """
    prefixes: set[str] = set()
    out: dict[str, object] = {}
    for key, value in state.items():
        if "language_model." in key:
            raise NemoFormatError(
                f"{origin}: key {key!r} uses the pre-mcore NeMo layout (mcore_gpt=False), "
                "which is not supported; convert the checkpoint to mcore first"
            )
        cut = min(
            (i for root in _ROOTS if (i := _root_position(key, root)) is not None), default=None
        )
        if cut is None:
            raise NemoFormatError(f"{origin}: unexpected weight {key!r}")
        prefixes.add(key[:cut])
        out[key[cut:]] = value
    if len(prefixes) > 1:
        raise NemoFormatError(f"{origin}: keys have different prefixes {sorted(prefixes)}")
    return out


def _root_position(key: str, root: str) -> int | None:
    if key.startswith(root):
        return 0
    i = key.find("." + root)
    return None if i < 0 else i + 1


def read_full_state_dict(
    layout: WeightsLayout, *, gated: bool, share_embeddings: bool, origin: str = "<nemo>"
) -> dict[str, object]:
    """Read legacy weights (single file or TP/PP shards) into one full, unprefixed state dict.

    Raises:
        NemoFormatError: For a distributed-checkpoint layout (load it with
            `load_distributed_into`), unreadable files, or shards that do not fit together.
    """
    if layout.kind == "distributed":
        raise NemoFormatError(f"{origin}: weights are a distributed checkpoint")
    stages: list[dict[str, object]] = []
    for row in layout.files:
        shards = [strip_prefix(read_checkpoint_file(p, origin=origin), origin=origin) for p in row]
        try:
            stages.append(
                merge_tensor_parallel(shards, gated=gated) if len(shards) > 1 else shards[0]
            )
        except ValueError as exc:
            raise NemoFormatError(f"{origin}: {exc}") from exc
    if len(stages) == 1:
        return stages[0]
    return merge_pipeline_stages(stages, share_embeddings=share_embeddings)


def embedding_rows(layout: WeightsLayout, *, origin: str = "<nemo>") -> int | None:
    """Rows of the (padded) word embedding across all tensor ranks, None if not found."""
    if layout.kind == "distributed":
        for key, shape in stored_tensors(layout.files[0][0], origin=origin).items():
            if key.endswith(_EMBEDDING) and shape:
                return int(shape[0])
        return None
    rows = 0
    for path in layout.files[0]:
        state = read_checkpoint_file(path, origin=origin)
        shapes = [
            v.shape
            for k, v in state.items()
            if k.endswith(_EMBEDDING) and isinstance(v, torch.Tensor)
        ]
        if not shapes:
            return None
        rows += int(shapes[0][0])
    return rows


def layer_offset(model: torch.nn.Module) -> int:
    """Global number of the first transformer layer of this pipeline stage (0 without layers)."""
    decoder = getattr(model, "decoder", None)
    layers = getattr(decoder, "layers", None)
    if layers is None or len(layers) == 0:
        return 0
    return int(layers[0].layer_number) - 1


def _owner(key: str) -> str:
    """Which part of the pipeline holds a key: its layer, the first or the last stage."""
    if layer_index(key) is not None:
        return "layers"
    return "first" if key.startswith("embedding.") else "last"


def shard_for_model(
    full: Mapping[str, object],
    target: Mapping[str, torch.Tensor],
    *,
    tp_rank: int,
    tp_size: int,
    layer_offset: int,
    gated: bool,
    origin: str = "<nemo>",
) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """Cut the entries a model shard needs out of a full state dict.

    Args:
        full: Full state dict (global layer numbers, unsplit tensors, target's key names).
        target: The model's own state dict (stage-local layer numbers, shards): keys and shapes.
        tp_rank: This process's tensor-parallel rank.
        tp_size: Tensor-parallel size.
        layer_offset: Global number of this stage's first layer.
        gated: Whether the MLP is gated.
        origin: Name of the source, for error messages.

    Returns:
        ``(state, missing, unexpected)``: the shard to load; target keys the checkpoint lacks
        (``_extra_state`` excluded); checkpoint keys in this stage's range the model lacks.

    Raises:
        NemoFormatError: When a slice has the wrong shape (the message names the key; a
            vocabulary-size mismatch says how to fix it).
    """
    state: dict[str, torch.Tensor] = {}
    missing: list[str] = []
    used: set[str] = set()
    for key, ref in target.items():
        if is_extra_state(key):
            continue
        index = layer_index(key)
        source = key
        if index is not None:
            source = key.replace(f"layers.{index}.", f"layers.{index + layer_offset}.", 1)
        if source not in full and key == "output_layer.weight" and _EMBEDDING in full:
            source = _EMBEDDING  # tied embeddings on the last pipeline stage
        if source not in full:
            missing.append(key)
            continue
        used.add(source)
        tensor = full[source]
        if not isinstance(tensor, torch.Tensor):
            raise NemoFormatError(f"{origin}: {source} is a {type(tensor).__name__}, not a tensor")
        try:
            piece = split_tensor(tensor, partition_of(key, gated=gated), tp_rank, tp_size)
        except ValueError as exc:
            raise NemoFormatError(f"{origin}: {source}: {exc}") from exc
        if piece.shape != ref.shape:
            hint = ""
            if key.endswith(("word_embeddings.weight", "output_layer.weight")):
                hint = (
                    f"; the checkpoint has {tensor.shape[0]} vocabulary rows but the model was "
                    f"built with {ref.shape[0] * tp_size} (vocab_size / "
                    "make_vocab_size_divisible_by / tensor-parallel padding differ; build the "
                    "model from NemoCheckpoint.model_config_for(tensor_parallel_size))"
                )
            raise NemoFormatError(
                f"{origin}: {source}: shard shape {tuple(piece.shape)} does not match the "
                f"model's {tuple(ref.shape)}{hint}"
            )
        state[key] = piece
    owners = {_owner(k) for k in target if not is_extra_state(k)}
    layer_range = {i + layer_offset for i in (layer_index(k) for k in target) if i is not None}
    unexpected = [
        k
        for k in full
        if k not in used
        and not is_extra_state(k)
        and (layer_index(k) in layer_range if layer_index(k) is not None else _owner(k) in owners)
    ]
    return state, missing, unexpected


def stored_tensors(directory: Path, *, origin: str = "<nemo>") -> dict[str, tuple[int, ...]]:
    """Keys and global shapes in a ``torch_dist`` checkpoint (objects get an empty shape).

    Reads the checkpoint's ``.metadata`` with the restricted unpickler of
    `align_core.safe_load.read_dcp_metadata` (megatron-core 0.16.1's ``load_tensors_metadata``
    fails with torch >= 2.10 metadata, and torch's own reader runs any pickle). Sharded objects
    are stored as ``<key>/shard_...``; they are listed under ``<key>``.

    Raises:
        UnsafeCheckpointError: When the metadata names a class that is not allowed.
        NemoFormatError: When the metadata cannot be read.
    """
    try:
        metadata = read_dcp_metadata(directory, origin=f"{origin}: {DIST_DIR}/.metadata")
    except UnsafeCheckpointError:
        raise
    except ValueError as exc:
        raise NemoFormatError(str(exc)) from exc
    out: dict[str, tuple[int, ...]] = {}
    for key, entry in metadata.state_dict_metadata.items():
        size = getattr(entry, "size", None)
        out[key.split("/", 1)[0]] = tuple(size) if size is not None else ()
    return out


def load_distributed_into(
    model: MegatronModule, directory: Path, *, origin: str = "<nemo>"
) -> tuple[list[str], list[str]]:
    """Load a megatron distributed checkpoint into ``model`` at its current TP/PP layout.

    The checkpoint's key prefix (``model.`` for NeMo, none for plain megatron) is detected from
    its metadata. Entries the checkpoint lacks are not requested (and reported as missing unless
    they are ``_extra_state``). Collective: every rank calls it. Every pickle in the checkpoint
    is checked first (`align_core.safe_load.verify_distributed_checkpoint`).

    Returns:
        ``(missing, unexpected)`` model keys (``_extra_state`` excluded).

    Raises:
        UnsafeCheckpointError: When a file of the checkpoint holds a pickle that is not allowed.
        NemoFormatError: When the checkpoint cannot be read or loaded.
    """
    from megatron.core import dist_checkpointing

    try:
        verify_distributed_checkpoint(directory, origin=f"{origin}: {DIST_DIR}")
    except UnsafeCheckpointError:
        raise
    except ValueError as exc:
        raise NemoFormatError(str(exc)) from exc
    stored = stored_tensors(directory, origin=origin)
    prefix = NEMO_PREFIX if any(k.startswith(NEMO_PREFIX) for k in stored) else ""
    sharded = model.sharded_state_dict(prefix=prefix)
    request = {}
    absent = []
    for name, entry in sharded.items():
        if getattr(entry, "key", None) in stored:
            request[name] = entry
        else:
            absent.append(name[len(prefix) :])
    try:
        loaded = dist_checkpointing.load(request, str(directory))
    except Exception as exc:
        raise NemoFormatError(f"{origin}: cannot load {DIST_DIR}/ ({exc})") from exc
    assert isinstance(loaded, dict)  # the default ``strict`` returns the state dict alone
    state = {k[len(prefix) :]: v for k, v in loaded.items()}
    result = model.load_state_dict(state, strict=False)
    missing = {k for k in [*result.missing_keys, *absent] if not is_extra_state(k)}
    return sorted(missing), [k for k in result.unexpected_keys if not is_extra_state(k)]

"""Read checkpoint files without running code from them.

Checkpoints travel between machines (``.nemo`` archives, ``checkpoints/step_*`` directories), so
every pickle in them is untrusted. Three readers would otherwise execute arbitrary pickles:

* torch's distributed-checkpoint ``.metadata`` is read with plain ``pickle.load``;
* sharded objects inside ``.distcp`` files (``_extra_state``, RNG states) are read by torch's
  load planner with ``torch.load(weights_only=False)``;
* ``common.pt`` is read by megatron with ``torch.load`` (weights-only by default since torch 2.6,
  unless the environment turns that off).

`verify_distributed_checkpoint` reads all of them first with restricted unpicklers: the
``.metadata`` with `read_dcp_metadata`, which admits only the classes torch writes there, and
every byte object and ``.pt`` file with ``torch.load(weights_only=True)``. Anything else is
refused with `UnsafeCheckpointError` naming the file and the class, before megatron reads a
byte. A pickle the restricted unpickler accepts names only harmless globals, so the unrestricted
reader that megatron then runs on the same bytes constructs the same plain objects.
"""

from __future__ import annotations

import io
import os
import pickle
import re
from pathlib import Path
from typing import IO, Any

import torch

__all__ = [
    "SAFE_GLOBALS",
    "UnsafeCheckpointError",
    "load_weights_only",
    "read_dcp_metadata",
    "verify_distributed_checkpoint",
]

# Admitted by every weights-only load: Transformer Engine keeps its ``_extra_state`` in a
# ``BytesIO`` (an empty one pickles ``builtins.bytes``).
SAFE_GLOBALS: tuple[type, ...] = (io.BytesIO, bytes)

_METADATA_FILE = ".metadata"
_DCP = "torch.distributed.checkpoint"
# What torch writes into a distributed checkpoint's ``.metadata`` (checked against torch 2.4-2.15
# and the checkpoints megatron-core 0.16 saves).
_METADATA_CLASSES: dict[str, frozenset[str]] = {
    f"{_DCP}.metadata": frozenset(
        {
            "BytesStorageMetadata",
            "ChunkStorageMetadata",
            "Metadata",
            "MetadataIndex",
            "StorageMeta",
            "TensorProperties",
            "TensorStorageMetadata",
            "_MEM_FORMAT_ENCODING",
        }
    ),
    f"{_DCP}.planner": frozenset(
        {"SavePlan", "TensorWriteData", "WriteItem", "WriteItemType", "BytesIOWriteData"}
    ),
    f"{_DCP}.filesystem": frozenset({"_StorageInfo"}),
    "torch.serialization": frozenset({"_get_layout"}),
    "torch": frozenset({"Size"}),
    "collections": frozenset({"OrderedDict"}),
    "builtins": frozenset({"set", "frozenset", "tuple", "list", "dict", "slice"}),
}
_GLOBAL_IN_MESSAGE = re.compile(r"GLOBAL ([\w.]+)")


class UnsafeCheckpointError(ValueError):
    """A checkpoint file holds a pickle that would construct or call something not allowed.

    The message names the file and the class; nothing from the file has run.
    """


def _is_torch_dtype(module: str, name: str) -> bool:
    return module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles a ``.metadata`` file, admitting only the classes torch writes there."""

    def __init__(self, file: IO[bytes], origin: str) -> None:
        super().__init__(file)
        self._origin = origin

    def find_class(self, module: str, name: str) -> Any:
        if name in _METADATA_CLASSES.get(module, ()) or _is_torch_dtype(module, name):
            return super().find_class(module, name)
        raise UnsafeCheckpointError(
            f"{self._origin}: refusing to load {module}.{name} (a distributed-checkpoint "
            "metadata file holds only torch.distributed.checkpoint classes)"
        )


def read_dcp_metadata(directory: str | os.PathLike[str], *, origin: str | None = None) -> Any:
    """Read a distributed checkpoint's ``.metadata`` with the restricted unpickler.

    Args:
        directory: The checkpoint directory.
        origin: How to name the file in messages; default its path.

    Returns:
        The ``torch.distributed.checkpoint.metadata.Metadata``.

    Raises:
        UnsafeCheckpointError: The file names a class outside the allowlist.
        ValueError: The file is missing, truncated or not a metadata pickle.
    """
    path = Path(directory) / _METADATA_FILE
    name = origin or str(path)
    from torch.distributed.checkpoint.metadata import Metadata

    try:
        with path.open("rb") as handle:
            metadata = _MetadataUnpickler(handle, name).load()
    except UnsafeCheckpointError:
        raise
    except FileNotFoundError as exc:
        raise ValueError(f"{name}: no such file") from exc
    except Exception as exc:  # truncated or garbage: EOFError, UnpicklingError, TypeError...
        raise ValueError(f"{name}: not a distributed-checkpoint metadata file ({exc})") from exc
    if not isinstance(metadata, Metadata):
        raise ValueError(f"{name}: holds a {type(metadata).__name__}, not checkpoint metadata")
    return metadata


def load_weights_only(source: str | os.PathLike[str] | IO[bytes], *, origin: str, **kwargs) -> Any:
    """``torch.load(weights_only=True)`` with `SAFE_GLOBALS` admitted, on the CPU.

    Args:
        source: A file path or a binary buffer.
        origin: How to name the source in messages.
        **kwargs: Passed to ``torch.load`` (``mmap=True``, ...).

    Raises:
        UnsafeCheckpointError: The pickle names a global the weights-only unpickler refuses.
        ValueError: The file is corrupt or truncated.
    """
    try:
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            return torch.load(source, map_location="cpu", weights_only=True, **kwargs)
    except pickle.UnpicklingError as exc:
        found = _GLOBAL_IN_MESSAGE.search(str(exc))
        if found is not None:
            name = found.group(1) if "." in found.group(1) else f"builtins.{found.group(1)}"
            raise UnsafeCheckpointError(
                f"{origin}: refusing to load {name} (only tensors and plain data are read "
                "from checkpoints)"
            ) from None
        raise ValueError(f"{origin}: cannot be read ({_first_line(exc)})") from exc
    except Exception as exc:  # RuntimeError / EOFError / ... from a damaged file
        raise ValueError(f"{origin}: cannot be read ({_first_line(exc)})") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _byte_items(directory: Path, metadata: Any, origin: str) -> list[tuple[str, Path, int, int]]:
    """``(key, file, offset, length)`` of every pickled object in the ``.distcp`` files."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    items = []
    for index, info in metadata.storage_data.items():
        entry = metadata.state_dict_metadata.get(index.fqn)
        if not isinstance(entry, BytesStorageMetadata):
            continue
        relative = str(info.relative_path)
        if Path(relative).name != relative or relative in ("", ".", ".."):
            raise UnsafeCheckpointError(
                f"{origin}/{_METADATA_FILE}: {index.fqn} points outside the checkpoint "
                f"({relative!r})"
            )
        if getattr(info, "transform_descriptors", None):
            raise ValueError(
                f"{origin}/{relative}: {index.fqn} is stored with transforms "
                f"{list(info.transform_descriptors)}, which align does not read"
            )
        items.append((index.fqn, directory / relative, int(info.offset), int(info.length)))
    return items


def verify_distributed_checkpoint(
    directory: str | os.PathLike[str], *, origin: str | None = None
) -> Any:
    """Check that loading a distributed checkpoint runs no code from it; return its metadata.

    Reads ``.metadata`` with `read_dcp_metadata`, then every pickled object inside the
    ``.distcp`` files and every ``*.pt`` file (``common.pt``, ...) with `load_weights_only`.

    Args:
        directory: The checkpoint directory (``model_weights/`` of a ``.nemo``, ``step_*``).
        origin: How to name the directory in messages; default its path.

    Returns:
        The checkpoint's metadata.

    Raises:
        UnsafeCheckpointError: A file would construct or call something not allowed (named).
        ValueError: A file is missing, truncated or corrupt (named).
    """
    root = Path(directory)
    name = origin or str(root)
    metadata = read_dcp_metadata(root, origin=f"{name}/{_METADATA_FILE}")
    import megatron.core  # noqa: F401  (registers megatron's own safe globals: numpy RNG states)

    for key, path, offset, length in _byte_items(root, metadata, name):
        where = f"{name}/{path.name}: {key}"
        try:
            with path.open("rb") as handle:
                handle.seek(offset)
                data = handle.read(length)
        except OSError as exc:
            raise ValueError(f"{where}: cannot be read ({exc.strerror or exc})") from exc
        if len(data) != length:
            raise ValueError(f"{where}: truncated ({len(data)} of {length} bytes)")
        load_weights_only(io.BytesIO(data), origin=where)
    for path in sorted(root.glob("*.pt")):
        load_weights_only(path, origin=f"{name}/{path.name}")
    return metadata

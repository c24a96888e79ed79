"""The safetensors files of a Hugging Face directory, read tensor by tensor.

A directory holds either ``model.safetensors`` or shards named by
``model.safetensors.index.json`` (``weight_map``: tensor name → file). Every file is opened
with ``safetensors.safe_open`` (memory-mapped; only the header is parsed), and `read` returns
one tensor or a row/column range of it, so a rank reads only the slices it needs and no file is
ever held in memory whole.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import torch

from align_core.hf.errors import HFFormatError

__all__ = ["INDEX_FILE", "SINGLE_FILE", "SafetensorsFiles"]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def _indexed(root: Path) -> dict[str, Path] | None:
    """Tensor name → file from the index; None for a single ``model.safetensors``."""
    index = root / INDEX_FILE
    if index.is_file():
        try:
            data = json.loads(index.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise HFFormatError(f"{index}: not valid JSON ({exc})") from exc
        mapping = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(mapping, dict) or not mapping:
            raise HFFormatError(f"{index}: no weight_map")
        out = {}
        for name, file in mapping.items():
            path = root / str(file)
            if Path(str(file)).name != str(file):
                raise HFFormatError(f"{index}: weight_map[{name!r}] = {file!r} is not a file name")
            out[name] = path
        missing = sorted({p.name for p in out.values() if not p.is_file()})
        if missing:
            raise HFFormatError(f"{index}: names {missing}, which are missing from {root}")
        return out
    if not (root / SINGLE_FILE).is_file():
        raise HFFormatError(f"{root}: no {SINGLE_FILE} and no {INDEX_FILE}")
    return None


def _open(path: Path, stack: contextlib.ExitStack) -> Any:
    from safetensors import safe_open

    try:
        return stack.enter_context(safe_open(str(path), framework="pt"))
    except Exception as exc:  # safetensors raises its own SafetensorError, OSError, ...
        raise HFFormatError(f"{path}: not a readable safetensors file ({exc})") from exc


class SafetensorsFiles:
    """Open safetensors files of one checkpoint (state: the open handles).

    Args:
        root: The Hugging Face directory.
        stack: Closes the files when it unwinds.

    Raises:
        HFFormatError: For a missing or unreadable file, or an index naming a tensor its file
            does not hold.
    """

    def __init__(self, root: Path, stack: contextlib.ExitStack) -> None:
        indexed = _indexed(root)
        if indexed is None:
            single = root / SINGLE_FILE
            self._handles = {single: _open(single, stack)}
            self._map = dict.fromkeys(self._handles[single].keys(), single)
            return
        self._map = indexed
        self._handles = {path: _open(path, stack) for path in sorted(set(indexed.values()))}
        for path, handle in self._handles.items():
            held = set(handle.keys())
            for name in (n for n, p in self._map.items() if p == path and n not in held):
                raise HFFormatError(f"{root / INDEX_FILE}: {name} is not in {path.name}")

    @property
    def files(self) -> tuple[Path, ...]:
        """The safetensors files, sorted."""
        return tuple(self._handles)

    def names(self) -> set[str]:
        """Every stored tensor name."""
        return set(self._map)

    def _slice(self, name: str) -> Any:
        if name not in self._map:
            raise KeyError(name)
        return self._handles[self._map[name]].get_slice(name)

    def shape(self, name: str) -> tuple[int, ...]:
        """The stored shape of tensor ``name``."""
        return tuple(int(d) for d in self._slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        """The stored dtype of tensor ``name``.

        Raises:
            HFFormatError: For a dtype other than F32, BF16 or F16.
        """
        code = self._slice(name).get_dtype()
        if code not in _DTYPES:
            raise HFFormatError(
                f"{self._map[name]}: {name} is stored as {code} (supported: F32, BF16, F16)"
            )
        return _DTYPES[code]

    def read(
        self, name: str, *, dim: int | None = None, start: int = 0, stop: int | None = None
    ) -> torch.Tensor:
        """Tensor ``name``, or its range ``start:stop`` along ``dim`` (0 or 1).

        Raises:
            HFFormatError: When the file cannot deliver the tensor (truncated data).
        """
        piece = self._slice(name)
        try:
            if dim is None:
                return piece[:]
            index = (slice(start, stop),) if dim == 0 else (slice(None), slice(start, stop))
            return piece[index]
        except Exception as exc:
            raise HFFormatError(f"{self._map[name]}: cannot read {name} ({exc})") from exc

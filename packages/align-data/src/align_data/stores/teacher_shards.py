"""Teacher top-k shards for distillation: binary, memory-mapped, appendable and resumable.

A store directory holds:

- ``meta.json``: ``top_k``, ``dtype`` (``fp32``, ``fp16`` or ``bf16``), ``start_index``,
  ``vocab_size``, whether input ids are kept, the shard size and ``ids_dtype``.
- ``shard-NNNNN.logits`` (``[positions, K]`` in ``dtype``; bf16 as raw 16-bit words),
  ``shard-NNNNN.ids`` (``[positions, K]`` in ``ids_dtype``), ``shard-NNNNN.lse``
  (``[positions]`` float32) and optionally ``shard-NNNNN.tokens`` (``[positions]`` int32, the
  input ids the teacher saw).
- ``index.bin``: one int64 triple ``(shard, first_position, num_positions)`` per sample, in
  sample order. It is the commit log: a sample exists once its index entry is written, which
  happens after its data. Reopening a store truncates data written after the last committed
  entry (an interrupted run), so a rerun continues exactly where the last one stopped — samples
  are appended in order, and appending any index but the next one is an error.

Logits are stored sorted in descending order per position (with their ids), as cross-tokenizer
distillation requires.

Ids are stored as ``uint16`` when the store's ``vocab_size`` is known and at most 65,536 (every id
then fits in 16 bits), and as ``int32`` otherwise; at K=100 with bf16 logits that is 408 instead
of 608 bytes per position. The reader returns ``int32`` ids either way. Stores of format version 1
(written before ``ids_dtype`` existed) hold ``int32`` ids; they stay readable, and a writer
resuming one keeps appending ``int32`` ids with version 1, so one store never mixes the two.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

__all__ = ["TeacherDType", "TeacherSample", "TeacherTopKReader", "TeacherTopKWriter"]

TeacherDType = Literal["fp32", "fp16", "bf16"]

_VERSION = 2
_READABLE_VERSIONS = (1, 2)
_UINT16_MAX_VOCAB = 1 << 16  # ids 0..65,535
_IDS_NUMPY_DTYPE: dict[str, Any] = {"uint16": np.uint16, "int32": np.int32}
_NUMPY_DTYPE: dict[str, Any] = {"fp32": np.float32, "fp16": np.float16, "bf16": np.int16}
_TORCH_DTYPE = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_ENTRY = 3  # int64 words per index entry


@dataclass(frozen=True)
class TeacherSample:
    """The teacher's top-k at every input position of one sample.

    Attributes:
        logits: ``[L, K]`` in the store's dtype, descending per row.
        ids: ``[L, K]`` int32 token ids of ``logits``.
        logsumexp: ``[L]`` float32 log-sum-exp over the teacher's full vocabulary.
        input_ids: ``[L]`` int32 input ids the teacher saw, or None if not kept.
    """

    logits: torch.Tensor
    ids: torch.Tensor
    logsumexp: torch.Tensor
    input_ids: torch.Tensor | None = None

    @property
    def num_positions(self) -> int:
        """L, the number of input positions."""
        return int(self.logits.shape[0])


def _as_numpy(x: Any, dtype: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu")
        if x.dtype in (torch.bfloat16, torch.float16):
            x = x.float()
        x = x.numpy()
    return np.asarray(x, dtype=dtype)


def _shard_name(k: int, part: str) -> str:
    return f"shard-{k:05d}.{part}"


def _ids_dtype_for(vocab_size: int | None) -> str:
    """``uint16`` when every id below ``vocab_size`` fits in 16 bits, else ``int32``."""
    return "uint16" if vocab_size is not None and vocab_size <= _UINT16_MAX_VOCAB else "int32"


def _stored_ids_dtype(meta: dict[str, Any], where: Path) -> str:
    """The ids dtype a store's ``meta.json`` records (version 1 stores: ``int32``)."""
    if meta.get("version") == 1:
        return "int32"
    name = meta.get("ids_dtype")
    if name not in _IDS_NUMPY_DTYPE:
        raise ValueError(
            f"{where / 'meta.json'}: ids_dtype must be one of {sorted(_IDS_NUMPY_DTYPE)}, "
            f"got {name!r}"
        )
    return str(name)


class TeacherTopKWriter:
    """Appends samples to a teacher top-k store, resuming an existing one.

    Args:
        directory: The store (created if missing).
        top_k: K, values per position.
        dtype: Storage dtype of the logits.
        start_index: Sample index of the store's first sample (one store per index range lets
            several processes write side by side; :class:`TeacherTopKReader` merges them).
        vocab_size: If given, ids are checked to be below it, and ids are stored in 16 bits
            when it is at most 65,536 (32 bits otherwise, and when it is None).
        with_input_ids: Keep the input ids of each sample (lets collate check alignment).
        shard_positions: Positions per shard file before a new shard is started.
        durable: fsync data and index after every sample (slower; survives power loss).

    Raises:
        ValueError: When an existing store was created with other parameters.
    """

    def __init__(
        self,
        directory: str | Path,
        *,
        top_k: int,
        dtype: TeacherDType = "bf16",
        start_index: int = 0,
        vocab_size: int | None = None,
        with_input_ids: bool = False,
        shard_positions: int = 1 << 24,
        durable: bool = False,
    ) -> None:
        if dtype not in _NUMPY_DTYPE:
            raise ValueError(f"dtype must be one of fp32, fp16, bf16, got {dtype!r}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        if vocab_size is not None and vocab_size < 1:
            raise ValueError(f"{directory}: vocab_size must be positive, got {vocab_size}")
        meta: dict[str, Any] = {
            "top_k": int(top_k),
            "dtype": dtype,
            "start_index": int(start_index),
            "vocab_size": vocab_size,
            "with_input_ids": bool(with_input_ids),
            "shard_positions": int(shard_positions),
        }
        meta_path = self.directory / "meta.json"
        if meta_path.exists():
            old = json.loads(meta_path.read_text())
            if old.get("version") not in _READABLE_VERSIONS:
                raise ValueError(f"{meta_path}: unknown teacher store version {old.get('version')}")
            different = {k: (old.get(k), v) for k, v in meta.items() if old.get(k) != v}
            if different:
                raise ValueError(
                    f"{self.directory}: existing teacher store has other parameters "
                    f"(existing, requested): {different}"
                )
            # Resuming keeps the store's own id width (version 1 stores: int32).
            ids_dtype = _stored_ids_dtype(old, self.directory)
        else:
            ids_dtype = _ids_dtype_for(vocab_size)
            meta = {"version": _VERSION, **meta, "ids_dtype": ids_dtype}
            tmp = meta_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(meta, indent=1))
            tmp.replace(meta_path)
        self.top_k = int(top_k)
        self.dtype: TeacherDType = dtype
        self.start_index = int(start_index)
        self.vocab_size = vocab_size
        self.with_input_ids = with_input_ids
        self.shard_positions = int(shard_positions)
        self.durable = durable
        self.ids_dtype = ids_dtype
        self._parts = ["logits", "ids", "lse"] + (["tokens"] if with_input_ids else [])
        self._itemsize = {
            "logits": self.top_k * 2 if dtype != "fp32" else self.top_k * 4,
            "ids": self.top_k * np.dtype(_IDS_NUMPY_DTYPE[ids_dtype]).itemsize,
            "lse": 4,
            "tokens": 4,
        }
        self._recover()

    def _recover(self) -> None:
        """Truncates everything written after the last committed index entry."""
        index_path = self.directory / "index.bin"
        size = index_path.stat().st_size if index_path.exists() else 0
        entry_bytes = _ENTRY * 8
        with open(index_path, "ab") as f:
            f.truncate(size - size % entry_bytes)
        entries = np.fromfile(index_path, dtype=np.int64).reshape(-1, _ENTRY)
        self._count = len(entries)
        self._shard = int(entries[-1, 0]) if len(entries) else 0
        self._shard_fill = int(entries[-1, 1] + entries[-1, 2]) if len(entries) else 0
        for path in self.directory.glob("shard-*.*"):
            k = int(path.name[6:11])
            if k > self._shard:
                path.unlink()
            elif k == self._shard:
                with open(path, "r+b") as f:
                    f.truncate(self._shard_fill * self._itemsize[path.suffix[1:]])
        self._index = open(index_path, "ab")  # noqa: SIM115 - kept open for appends
        self._files: dict[str, Any] = {}
        self._open_shard()

    def _open_shard(self) -> None:
        for f in self._files.values():
            f.close()
        self._files = {
            part: open(self.directory / _shard_name(self._shard, part), "ab")  # noqa: SIM115
            for part in self._parts
        }

    @property
    def next_index(self) -> int:
        """The sample index the next :meth:`append` must write."""
        return self.start_index + self._count

    @property
    def num_samples(self) -> int:
        """Samples committed so far."""
        return self._count

    def append(
        self,
        index: int,
        logits: torch.Tensor | np.ndarray,
        ids: torch.Tensor | np.ndarray,
        logsumexp: torch.Tensor | np.ndarray,
        input_ids: torch.Tensor | np.ndarray | None = None,
    ) -> None:
        """Stores sample ``index`` and commits it.

        Args:
            index: Must equal :attr:`next_index` (no duplicates, no gaps).
            logits: ``[L, K]`` teacher top-k logits at each input position (any order; they are
                sorted descending together with ``ids``).
            ids: ``[L, K]`` their token ids.
            logsumexp: ``[L]`` log-sum-exp of the teacher's full-vocabulary logits.
            input_ids: ``[L]`` the input ids (required iff the store keeps them).

        Raises:
            ValueError: For a wrong index, shape, id range, non-finite value, or a log-sum-exp
                below the largest logit.
        """
        if index != self.next_index:
            what = "is already stored" if index < self.next_index else "would leave a gap"
            raise ValueError(
                f"{self.directory}: sample {index} {what}; the next sample to write is "
                f"{self.next_index} (resume from writer.next_index)"
            )
        lg = _as_numpy(logits, np.float32)
        ix = _as_numpy(ids, np.int64)
        lse = _as_numpy(logsumexp, np.float32)
        n = lg.shape[0] if lg.ndim == 2 else -1
        if lg.shape != (n, self.top_k) or ix.shape != lg.shape or n < 1:
            raise ValueError(
                f"sample {index}: logits and ids must be [L, {self.top_k}], got "
                f"{list(lg.shape)} and {list(ix.shape)}"
            )
        if lse.shape != (n,):
            raise ValueError(f"sample {index}: logsumexp must be [{n}], got {list(lse.shape)}")
        if not (np.isfinite(lg).all() and np.isfinite(lse).all()):
            raise ValueError(f"sample {index}: logits and logsumexp must be finite")
        if ix.min() < 0 or (self.vocab_size is not None and ix.max() >= self.vocab_size):
            raise ValueError(f"sample {index}: ids must lie in [0, {self.vocab_size})")
        top = lg.max(axis=1)
        if (lse < top - 1e-2 * np.maximum(1.0, np.abs(top))).any():
            raise ValueError(f"sample {index}: logsumexp is below the largest top-k logit")
        if (input_ids is None) == self.with_input_ids:
            need = "needs" if self.with_input_ids else "does not keep"
            raise ValueError(f"sample {index}: this store {need} input_ids")
        order = np.argsort(-lg, axis=1, kind="stable")
        lg = np.take_along_axis(lg, order, axis=1)
        ix = np.take_along_axis(ix, order, axis=1).astype(_IDS_NUMPY_DTYPE[self.ids_dtype])
        if self.dtype == "bf16":
            stored = torch.from_numpy(lg).to(torch.bfloat16).view(torch.int16).numpy()
        else:
            stored = lg.astype(_NUMPY_DTYPE[self.dtype])
        if self._shard_fill > 0 and self._shard_fill + n > self.shard_positions:
            self._shard += 1
            self._shard_fill = 0
            self._open_shard()
        data = {"logits": stored, "ids": ix, "lse": lse}
        if input_ids is not None:
            tokens = _as_numpy(input_ids, np.int32)
            if tokens.shape != (n,):
                raise ValueError(f"sample {index}: input_ids must be [{n}]")
            data["tokens"] = tokens
        for part, values in data.items():
            f = self._files[part]
            f.write(np.ascontiguousarray(values).tobytes())
            f.flush()
            if self.durable:
                os.fsync(f.fileno())
        entry = np.asarray([self._shard, self._shard_fill, n], dtype=np.int64)
        self._index.write(entry.tobytes())
        self._index.flush()
        if self.durable:
            os.fsync(self._index.fileno())
        self._shard_fill += n
        self._count += 1

    def close(self) -> None:
        """Closes the files (every appended sample is already committed)."""
        for f in self._files.values():
            f.close()
        self._index.close()

    def __enter__(self) -> TeacherTopKWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Store:
    """One store directory, opened read-only."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.meta = json.loads((directory / "meta.json").read_text())
        if self.meta.get("version") not in _READABLE_VERSIONS:
            raise ValueError(
                f"{directory}: unknown teacher store version {self.meta.get('version')}"
            )
        self.ids_dtype = _stored_ids_dtype(self.meta, directory)
        size = (directory / "index.bin").stat().st_size
        entries = size // (_ENTRY * 8)
        self.index = np.fromfile(directory / "index.bin", dtype=np.int64, count=entries * _ENTRY)
        self.index = self.index.reshape(-1, _ENTRY)
        self.start = int(self.meta["start_index"])
        self.stop = self.start + len(self.index)
        self._maps: dict[tuple[int, str], np.ndarray] = {}

    def array(self, shard: int, part: str) -> np.ndarray:
        key = (shard, part)
        if key not in self._maps:
            k = int(self.meta["top_k"])
            dtype = {
                "logits": _NUMPY_DTYPE[self.meta["dtype"]],
                "ids": _IDS_NUMPY_DTYPE[self.ids_dtype],
                "lse": np.float32,
                "tokens": np.int32,
            }[part]
            path = self.directory / _shard_name(shard, part)
            flat = (
                np.memmap(path, dtype=dtype, mode="c")
                if path.stat().st_size
                else np.zeros(0, dtype)
            )
            self._maps[key] = flat.reshape(-1, k) if part in ("logits", "ids") else flat
        return self._maps[key]


class TeacherTopKReader:
    """Random access to one or several teacher stores (merged by sample index).

    Args:
        directories: One store directory or several covering disjoint index ranges.

    Raises:
        ValueError: When stores overlap or disagree on ``top_k``/``dtype``.
    """

    def __init__(self, directories: str | Path | Sequence[str | Path]) -> None:
        if isinstance(directories, str | Path):
            directories = [directories]
        self._dirs = [Path(d) for d in directories]
        self._open()

    def _open(self) -> None:
        stores = sorted((_Store(d) for d in self._dirs), key=lambda s: s.start)
        if not stores:
            raise ValueError("TeacherTopKReader needs at least one store")
        for a, b in itertools.pairwise(stores):
            if b.start < a.stop:
                raise ValueError(
                    f"teacher stores overlap: {a.directory} holds [{a.start}, {a.stop}) and "
                    f"{b.directory} starts at {b.start}"
                )
        kinds = {(s.meta["top_k"], s.meta["dtype"]) for s in stores}
        if len(kinds) > 1:
            raise ValueError(f"teacher stores disagree on (top_k, dtype): {sorted(kinds)}")
        self._stores = stores
        self.top_k, self.dtype = int(stores[0].meta["top_k"]), stores[0].meta["dtype"]

    def __getstate__(self) -> dict[str, Any]:
        return {"_dirs": self._dirs}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._dirs = state["_dirs"]
        self._open()

    def __len__(self) -> int:
        return sum(len(s.index) for s in self._stores)

    def indices(self) -> list[range]:
        """The sample index ranges held, one per store."""
        return [range(s.start, s.stop) for s in self._stores]

    def __contains__(self, index: object) -> bool:
        return isinstance(index, int) and any(s.start <= index < s.stop for s in self._stores)

    def __getitem__(self, index: int) -> TeacherSample:
        for store in self._stores:
            if store.start <= index < store.stop:
                shard, first, n = (int(v) for v in store.index[index - store.start])
                logits = torch.from_numpy(store.array(shard, "logits")[first : first + n])
                if self.dtype == "bf16":
                    logits = logits.view(torch.bfloat16)
                tokens = None
                if store.meta["with_input_ids"]:
                    tokens = torch.from_numpy(store.array(shard, "tokens")[first : first + n])
                ids = store.array(shard, "ids")[first : first + n]
                if ids.dtype != np.int32:  # 16-bit ids: widened, callers always get int32
                    ids = ids.astype(np.int32)
                return TeacherSample(
                    logits,
                    torch.from_numpy(ids),
                    torch.from_numpy(store.array(shard, "lse")[first : first + n]),
                    tokens,
                )
        ranges = ", ".join(f"[{r.start}, {r.stop})" for r in self.indices())
        raise IndexError(f"sample {index} is not in the teacher stores (they hold {ranges})")

"""Tokenized, memory-mapped datasets: shards of ragged int32 arrays plus per-example scalars.

A dataset directory holds ``meta.json`` (kind, fingerprint, source files, shard list, summary)
and one sub-directory per shard. Each ragged field is stored as ``<field>.npy`` (all values,
concatenated) and ``<field>.offsets.npy`` (int64, ``n + 1`` entries); each scalar field as
``<field>.npy`` with one entry per example. Arrays are opened with ``np.load(mmap_mode="r")``, so
opening a dataset reads no token data and worker processes share pages.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, overload

import numpy as np

from align_data.records import Kind, Source
from align_data.summary import PreprocessSummary
from align_data.tokenize import Example, PreferenceExample, SFTExample, UnpairedExample

__all__ = ["DATASET_FORMAT_VERSION", "TokenizedDataset", "write_shard"]

DATASET_FORMAT_VERSION = 1

_RAGGED: dict[Kind, tuple[str, ...]] = {
    "preference": ("prompt_ids", "chosen_ids", "rejected_ids"),
    "unpaired": ("prompt_ids", "completion_ids"),
    "sft": ("prompt_ids", "completion_ids", "prompt_loss_mask"),
}
_SCALARS: dict[Kind, dict[str, Any]] = {
    "preference": {"chosen_reward": np.float64, "rejected_reward": np.float64},
    "unpaired": {"desirable": np.uint8},
    "sft": {"has_prompt_loss": np.uint8},
}
_COMMON = {"source_file": np.int32, "source_line": np.int64}


def _kind_of(example: Example) -> Kind:
    if isinstance(example, PreferenceExample):
        return "preference"
    if isinstance(example, UnpairedExample):
        return "unpaired"
    return "sft"


def _ragged_values(example: Example, name: str) -> np.ndarray:
    if name == "prompt_loss_mask":
        assert isinstance(example, SFTExample)
        if example.prompt_loss_mask is None:
            return np.zeros(len(example.prompt_ids), dtype=np.uint8)
        return example.prompt_loss_mask
    return getattr(example, name)


def _scalar_value(example: Example, name: str) -> float | int:
    if name in ("chosen_reward", "rejected_reward"):
        value = getattr(example, name)
        return np.nan if value is None else value
    if name == "desirable":
        return int(example.desirable)  # type: ignore[union-attr]
    assert isinstance(example, SFTExample)
    return int(example.prompt_loss_mask is not None)


def write_shard(
    directory: str | Path,
    kind: Kind,
    examples: Sequence[Example],
    sources: Sequence[tuple[int, int]],
) -> int:
    """Writes examples as one shard.

    Args:
        directory: Shard directory to create.
        kind: The examples' kind.
        examples: The examples (all of ``kind``).
        sources: ``(file_index, line)`` of each example.

    Returns:
        The number of examples written.
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    for example in examples:
        if _kind_of(example) != kind:
            raise ValueError(f"expected {kind} examples, got {type(example).__name__}")
    for name in _RAGGED[kind]:
        pieces = [_ragged_values(e, name) for e in examples]
        dtype = np.uint8 if name == "prompt_loss_mask" else np.int32
        offsets = np.zeros(len(pieces) + 1, dtype=np.int64)
        np.cumsum([len(p) for p in pieces], out=offsets[1:])
        values = np.concatenate(pieces).astype(dtype) if pieces else np.zeros(0, dtype)
        np.save(out / f"{name}.npy", values)
        np.save(out / f"{name}.offsets.npy", offsets)
    for name, dtype in _SCALARS[kind].items():
        np.save(out / f"{name}.npy", np.asarray([_scalar_value(e, name) for e in examples], dtype))
    np.save(out / "source_file.npy", np.asarray([s[0] for s in sources], _COMMON["source_file"]))
    np.save(out / "source_line.npy", np.asarray([s[1] for s in sources], _COMMON["source_line"]))
    return len(examples)


@dataclass(frozen=True)
class _Shard:
    ragged: dict[str, tuple[np.ndarray, np.ndarray]]
    scalars: dict[str, np.ndarray]


class TokenizedDataset(Sequence[Example]):
    """A preprocessed dataset, memory-mapped from disk (random access, picklable).

    Items are :class:`~align_data.PreferenceExample`, :class:`~align_data.UnpairedExample` or
    :class:`~align_data.SFTExample` whose ``index`` is their position in the dataset.

    Args:
        directory: A directory written by :func:`align_data.preprocess`.

    Attributes:
        directory: The dataset directory.
        kind: ``preference``, ``unpaired`` or ``sft``.
        fingerprint: Hash of sources, tokenizer and settings.
        sources: The source files, in order.
        summary: The preprocessing summary.
        reused: True when :func:`align_data.preprocess` found this dataset already built.
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        meta = json.loads((self.directory / "meta.json").read_text())
        if meta.get("version") != DATASET_FORMAT_VERSION:
            raise ValueError(
                f"{self.directory}: dataset format version {meta.get('version')} is not "
                f"{DATASET_FORMAT_VERSION}; preprocess again"
            )
        self.kind: Kind = meta["kind"]
        self.fingerprint: str = meta["fingerprint"]
        self.sources: list[str] = meta["sources"]
        self.summary = PreprocessSummary.from_dict(meta["summary"])
        self.reused = False
        self._shard_names: list[str] = meta["shards"]
        counts = np.asarray(meta["shard_sizes"], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(counts)])
        self._shards: list[_Shard | None] = [None] * len(self._shard_names)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_shards"] = [None] * len(self._shard_names)
        return state

    def _shard(self, k: int) -> _Shard:
        shard = self._shards[k]
        if shard is None:
            root = self.directory / self._shard_names[k]

            def load(name: str) -> np.ndarray:
                return np.load(root / name, mmap_mode="r")

            ragged = {n: (load(f"{n}.npy"), load(f"{n}.offsets.npy")) for n in _RAGGED[self.kind]}
            names = [*_SCALARS[self.kind], *_COMMON]
            shard = _Shard(ragged, {n: load(f"{n}.npy") for n in names})
            self._shards[k] = shard
        return shard

    def __len__(self) -> int:
        return int(self._starts[-1])

    def _locate(self, index: int) -> tuple[_Shard, int]:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for a dataset of {n} examples")
        index %= n
        k = int(np.searchsorted(self._starts, index, side="right") - 1)
        return self._shard(k), index - int(self._starts[k])

    @overload
    def __getitem__(self, index: int) -> Example: ...

    @overload
    def __getitem__(self, index: slice) -> list[Example]: ...

    def __getitem__(self, index: int | slice) -> Example | list[Example]:
        """The example at ``index`` (a list of them for a slice)."""
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        shard, i = self._locate(index)
        index %= len(self)

        def ragged(name: str) -> np.ndarray:
            values, offsets = shard.ragged[name]
            return values[offsets[i] : offsets[i + 1]]

        if self.kind == "preference":
            c = float(shard.scalars["chosen_reward"][i])
            r = float(shard.scalars["rejected_reward"][i])
            return PreferenceExample(
                ragged("prompt_ids"),
                ragged("chosen_ids"),
                ragged("rejected_ids"),
                None if np.isnan(c) else c,
                None if np.isnan(r) else r,
                index,
            )
        if self.kind == "unpaired":
            desirable = bool(shard.scalars["desirable"][i])
            return UnpairedExample(ragged("prompt_ids"), ragged("completion_ids"), desirable, index)
        mask = ragged("prompt_loss_mask") if shard.scalars["has_prompt_loss"][i] else None
        return SFTExample(ragged("prompt_ids"), ragged("completion_ids"), mask, index)

    def source(self, index: int) -> Source:
        """The file and line an example came from."""
        shard, i = self._locate(index)
        path = self.sources[int(shard.scalars["source_file"][i])]
        return Source(path, int(shard.scalars["source_line"][i]))

    def _field_lengths(self, name: str) -> np.ndarray:
        parts = [np.diff(self._shard(k).ragged[name][1]) for k in range(len(self._shards))]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def sequence_lengths(self) -> np.ndarray:
        """Tokens per sequence.

        Returns:
            ``[N]`` (prompt + completion), or ``[N, 2]`` for preference data (prompt + chosen,
            prompt + rejected).
        """
        prompt = self._field_lengths("prompt_ids")
        if self.kind == "preference":
            chosen = self._field_lengths("chosen_ids")
            rejected = self._field_lengths("rejected_ids")
            return np.stack([prompt + chosen, prompt + rejected], axis=1)
        return prompt + self._field_lengths("completion_ids")

    def __repr__(self) -> str:
        return f"TokenizedDataset({str(self.directory)!r}, kind={self.kind!r}, n={len(self)})"

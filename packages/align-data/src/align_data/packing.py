"""Sequence packing: several sequences per row, computing exactly what the padded batch computes.

Capacity is counted in input positions: a sequence of ``L`` tokens occupies ``L - 1`` positions
(inputs ``seq[:-1]``, shifted labels ``seq[1:]``, as in :mod:`align_data.batches`). A preference
pair is one item of ``(L_chosen - 1) + (L_rejected - 1)`` positions, so chosen and rejected always
share a pack (chosen first, rejected right after it).

Inside a pack every sequence gets its own position ids (restarting at 0) and attends only to
itself: :meth:`PackedBatch.attention_mask` is block-diagonal causal, and ``cu_seqlens`` gives the
same segmentation for variable-length attention kernels (Transformer Engine's ``thd`` format).
:func:`unpack` maps any per-position tensor of a packed batch back to the padded layout of the
corresponding :func:`~align_data.collate_sft` / :func:`~align_data.collate_preference` batch.

Bin packing: ``first_fit_decreasing`` (longest first, tightest) or ``first_fit_shuffle`` (seeded
random order, keeps lengths mixed within packs); first fit uses a max segment tree, so planning
is O(n log n).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, TypeVar

import numpy as np
import torch

from align_data.batches import IGNORE_INDEX, _Movable
from align_data.collate import CollateConfig, Row, padded_length, sequence_row
from align_data.tokenize import PreferenceExample, SFTExample

__all__ = [
    "PackedBatch",
    "PackingAlgorithm",
    "PackingPlan",
    "collate_packed_preference",
    "collate_packed_sft",
    "pack_preference",
    "pack_sft",
    "packing_lengths",
    "plan_packs",
    "unpack",
]

PackingAlgorithm = Literal["first_fit_decreasing", "first_fit_shuffle"]

_E = TypeVar("_E", SFTExample, PreferenceExample)


@dataclass(frozen=True)
class PackingPlan:
    """Which items go into which pack.

    Attributes:
        packs: Item indices of each pack, in placement order.
        capacity: Positions per pack.
        total_length: Positions over all items.
    """

    packs: tuple[tuple[int, ...], ...]
    capacity: int
    total_length: int

    @property
    def num_packs(self) -> int:
        """Number of packs."""
        return len(self.packs)

    @property
    def efficiency(self) -> float:
        """Real positions / available positions (1.0 = no padding)."""
        return self.total_length / (self.num_packs * self.capacity) if self.packs else 0.0


def _first_fit(order: np.ndarray, lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """First fit in the given order, with a max segment tree over the bins' free space."""
    n = len(order)
    size = 1
    while size < max(n, 1):
        size *= 2
    tree = [capacity] * (2 * size)
    bins: list[list[int]] = []
    for item in order.tolist():
        need = int(lengths[item])
        node = 1
        while node < size:
            node = 2 * node if tree[2 * node] >= need else 2 * node + 1
        b = node - size
        if b == len(bins):
            bins.append([])
        bins[b].append(item)
        tree[node] -= need
        node //= 2
        while node:
            left, right = tree[2 * node], tree[2 * node + 1]
            tree[node] = left if left > right else right
            node //= 2
    return bins


def plan_packs(
    lengths: Sequence[int] | np.ndarray,
    capacity: int,
    *,
    algorithm: PackingAlgorithm = "first_fit_decreasing",
    seed: int = 0,
) -> PackingPlan:
    """Bin-packs items of the given lengths into packs of ``capacity`` positions.

    Args:
        lengths: Positions per item (see :func:`packing_lengths`).
        capacity: Positions per pack.
        algorithm: ``first_fit_decreasing`` or ``first_fit_shuffle``.
        seed: Order of ``first_fit_shuffle``.

    Returns:
        The plan.

    Raises:
        ValueError: When an item is longer than ``capacity``.
    """
    sizes = np.asarray(lengths, dtype=np.int64).reshape(-1)
    if sizes.size and sizes.max() > capacity:
        item = int(sizes.argmax())
        raise ValueError(
            f"item {item} needs {int(sizes[item])} positions, more than the pack capacity "
            f"{capacity}"
        )
    if algorithm == "first_fit_decreasing":
        order = np.argsort(-sizes, kind="stable")
    elif algorithm == "first_fit_shuffle":
        order = np.random.default_rng(seed).permutation(len(sizes))
    else:
        raise ValueError(f"unknown packing algorithm {algorithm!r}")
    bins = _first_fit(order, sizes, capacity)
    return PackingPlan(tuple(tuple(b) for b in bins), capacity, int(sizes.sum()))


def packing_lengths(sequence_lengths: np.ndarray) -> np.ndarray:
    """Positions per packing item from token lengths.

    Args:
        sequence_lengths: ``[N]`` tokens per sequence, or ``[N, 2]`` (chosen, rejected) for
            preference pairs, as returned by ``TokenizedDataset.sequence_lengths()``.

    Returns:
        ``[N]``: ``L - 1``, or ``(L_c - 1) + (L_r - 1)`` per pair.
    """
    lengths = np.asarray(sequence_lengths, dtype=np.int64)
    return (lengths - 1).sum(axis=1) if lengths.ndim == 2 else lengths - 1


@dataclass(frozen=True)
class PackedBatch(_Movable):
    """Packs of sequences, ``P`` rows of ``S`` positions.

    Sequences are numbered in the row order of the equivalent padded batch
    (``[chosen_0..B-1, rejected_0..B-1]`` for preference data).

    Attributes:
        input_ids: ``[P, S]`` int64, padded with the pad id.
        labels: ``[P, S]`` int64 shifted labels, -100 on prompt targets and padding.
        position_ids: ``[P, S]`` int64, restarting at 0 for every sequence (and the padding).
        segment_ids: ``[P, S]`` int64, the sequence's number within its pack, -1 on padding.
        cu_seqlens: ``[M + 1]`` int32 cumulative segment boundaries over the flattened ``P * S``
            positions; each pack's padding tail is a segment of its own.
        max_seqlen: Longest segment.
        seq_pack: ``[N]`` pack of each sequence.
        seq_start: ``[N]`` first position of each sequence in its pack.
        seq_length: ``[N]`` positions of each sequence.
        sample_indices: ``[B]`` dataset index per example (per pair for preference data).
        chosen_rewards: ``[B]`` float32 (preference data only, else None).
        rejected_rewards: ``[B]`` float32 (preference data only, else None).
        rewards_given: ``[B]`` bool (preference data only, else None).
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    segment_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    seq_pack: torch.Tensor
    seq_start: torch.Tensor
    seq_length: torch.Tensor
    sample_indices: torch.Tensor
    chosen_rewards: torch.Tensor | None = None
    rejected_rewards: torch.Tensor | None = None
    rewards_given: torch.Tensor | None = None

    @property
    def num_real_positions(self) -> int:
        """Positions holding a sequence (not padding)."""
        return int(self.seq_length.sum())

    @property
    def efficiency(self) -> float:
        """Real positions / all positions of the batch."""
        return self.num_real_positions / self.input_ids.numel()

    def attention_mask(self) -> torch.Tensor:
        """The block-diagonal causal mask (Megatron's convention, True = masked).

        Returns:
            ``[P, 1, S, S]`` bool, True where query ``q`` must not attend key ``k``: ``k`` is
            after ``q`` or in another sequence. Padding attends only to padding.
        """
        seg = self.segment_ids
        s = seg.shape[1]
        causal = torch.ones(s, s, dtype=torch.bool, device=seg.device).tril()
        same = seg[:, :, None] == seg[:, None, :]
        return ~(same & causal)[:, None]


def unpack(
    values: torch.Tensor, batch: PackedBatch, *, fill_value: float, length: int | None = None
) -> torch.Tensor:
    """Maps a per-position tensor of a packed batch to the padded layout.

    Args:
        values: ``[P, S, ...]`` (inputs, labels, logits, per-token log-probs, ...).
        batch: The packed batch it belongs to.
        fill_value: Value of padding positions in the result.
        length: Padded length ``T`` (default: the longest sequence).

    Returns:
        ``[N, T, ...]``: row ``i`` holds sequence ``i`` left-aligned, then ``fill_value``.
    """
    lengths = batch.seq_length.tolist()
    t = max(lengths) if length is None else length
    out = values.new_full((len(lengths), t, *values.shape[2:]), fill_value)
    for i, (p, start, n) in enumerate(
        zip(batch.seq_pack.tolist(), batch.seq_start.tolist(), lengths, strict=True)
    ):
        out[i, :n] = values[p, start : start + n]
    return out


def _build(
    groups: Sequence[Sequence[tuple[int, Row]]], num_rows: int, config: CollateConfig
) -> dict[str, torch.Tensor | int]:
    """Lays out rows pack by pack; ``groups[p]`` lists ``(row_number, row)`` in pack order."""
    fills = [sum(len(row[0]) for _, row in group) for group in groups]
    s = padded_length(max(fills), config)
    p = len(groups)
    input_ids = np.full((p, s), config.pad_id, dtype=np.int64)
    labels = np.full((p, s), IGNORE_INDEX, dtype=np.int64)
    positions = np.zeros((p, s), dtype=np.int64)
    segments = np.full((p, s), -1, dtype=np.int64)
    seq_pack = np.zeros(num_rows, dtype=np.int64)
    seq_start = np.zeros(num_rows, dtype=np.int64)
    seq_length = np.zeros(num_rows, dtype=np.int64)
    bounds = [0]
    for k, group in enumerate(groups):
        offset = 0
        for segment, (row_number, (ids, lab)) in enumerate(group):
            n = len(ids)
            input_ids[k, offset : offset + n] = ids
            labels[k, offset : offset + n] = lab
            positions[k, offset : offset + n] = np.arange(n)
            segments[k, offset : offset + n] = segment
            seq_pack[row_number], seq_start[row_number], seq_length[row_number] = k, offset, n
            offset += n
            bounds.append(k * s + offset)
        if offset < s:
            positions[k, offset:] = np.arange(s - offset)
            bounds.append((k + 1) * s)
    cu = np.asarray(bounds, dtype=np.int32)
    return {
        "input_ids": torch.from_numpy(input_ids),
        "labels": torch.from_numpy(labels),
        "position_ids": torch.from_numpy(positions),
        "segment_ids": torch.from_numpy(segments),
        "cu_seqlens": torch.from_numpy(cu),
        "max_seqlen": int(np.diff(cu).max()),
        "seq_pack": torch.from_numpy(seq_pack),
        "seq_start": torch.from_numpy(seq_start),
        "seq_length": torch.from_numpy(seq_length),
    }


def _sft_packed(
    packs: Sequence[Sequence[tuple[int, SFTExample]]],
    order: list[SFTExample],
    config: CollateConfig,
) -> PackedBatch:
    groups = [
        [(j, sequence_row(e.prompt_ids, e.completion_ids, e.prompt_loss_mask)) for j, e in pack]
        for pack in packs
    ]
    fields = _build(groups, len(order), config)
    indices = torch.tensor([e.index for e in order], dtype=torch.int64)
    return PackedBatch(**fields, sample_indices=indices)  # type: ignore[arg-type]


def _preference_packed(
    packs: Sequence[Sequence[tuple[int, PreferenceExample]]],
    order: list[PreferenceExample],
    config: CollateConfig,
) -> PackedBatch:
    b = len(order)
    groups = []
    for pack in packs:
        group: list[tuple[int, Row]] = []
        for j, e in pack:
            group.append((j, sequence_row(e.prompt_ids, e.chosen_ids)))
            group.append((b + j, sequence_row(e.prompt_ids, e.rejected_ids)))
        groups.append(group)
    fields = _build(groups, 2 * b, config)
    given = [e.chosen_reward is not None and e.rejected_reward is not None for e in order]
    chosen = [
        config.default_chosen_reward if e.chosen_reward is None else e.chosen_reward for e in order
    ]
    rejected = [
        config.default_rejected_reward if e.rejected_reward is None else e.rejected_reward
        for e in order
    ]
    return PackedBatch(
        **fields,  # type: ignore[arg-type]
        sample_indices=torch.tensor([e.index for e in order], dtype=torch.int64),
        chosen_rewards=torch.tensor(chosen, dtype=torch.float32),
        rejected_rewards=torch.tensor(rejected, dtype=torch.float32),
        rewards_given=torch.tensor(given, dtype=torch.bool),
    )


def _numbered(
    packs: Sequence[Sequence[object]],
) -> tuple[list[list[tuple[int, object]]], list[object]]:
    numbered, order = [], []
    for pack in packs:
        if not pack:
            raise ValueError("a pack must hold at least one example")
        group = []
        for e in pack:
            group.append((len(order), e))
            order.append(e)
        numbered.append(group)
    return numbered, order


def _planned(
    examples: Sequence[_E],
    sizes: Sequence[int],
    capacity: int,
    algorithm: PackingAlgorithm,
    seed: int,
) -> list[list[tuple[int, _E]]]:
    """Plans packs of ``sizes`` (one per example); each pack lists ``(number, example)``."""
    plan = plan_packs(sizes, capacity, algorithm=algorithm, seed=seed)
    return [[(j, examples[j]) for j in pack] for pack in plan.packs]


def pack_sft(packs: Sequence[Sequence[SFTExample]], config: CollateConfig) -> PackedBatch:
    """Builds a packed batch from pre-planned packs (e.g. from :func:`plan_packs` over a dataset).

    Sequences are numbered in the order the packs list them.
    """
    numbered, order = _numbered(packs)
    return _sft_packed(numbered, order, config)  # type: ignore[arg-type]


def pack_preference(
    packs: Sequence[Sequence[PreferenceExample]], config: CollateConfig
) -> PackedBatch:
    """Builds a packed preference batch from pre-planned packs of pairs.

    Pairs are numbered in the order the packs list them; each pair's chosen sequence is followed
    by its rejected sequence in the same pack.
    """
    numbered, order = _numbered(packs)
    return _preference_packed(numbered, order, config)  # type: ignore[arg-type]


def collate_packed_sft(
    examples: Sequence[SFTExample],
    config: CollateConfig,
    *,
    capacity: int,
    algorithm: PackingAlgorithm = "first_fit_decreasing",
    seed: int = 0,
) -> PackedBatch:
    """Packs a micro-batch of SFT examples; :func:`unpack` gives :func:`collate_sft`'s layout."""
    rows_len = [len(e.prompt_ids) + len(e.completion_ids) - 1 for e in examples]
    packs = _planned(examples, rows_len, capacity, algorithm, seed)
    return _sft_packed(packs, list(examples), config)


def collate_packed_preference(
    examples: Sequence[PreferenceExample],
    config: CollateConfig,
    *,
    capacity: int,
    algorithm: PackingAlgorithm = "first_fit_decreasing",
    seed: int = 0,
) -> PackedBatch:
    """Packs a micro-batch of pairs, keeping each pair in one pack.

    :func:`unpack` gives :func:`collate_preference`'s ``[chosen..., rejected...]`` layout.
    """
    p = [len(e.prompt_ids) for e in examples]
    sizes = [
        (pl + len(e.chosen_ids) - 1) + (pl + len(e.rejected_ids) - 1)
        for pl, e in zip(p, examples, strict=True)
    ]
    packs = _planned(examples, sizes, capacity, algorithm, seed)
    return _preference_packed(packs, list(examples), config)

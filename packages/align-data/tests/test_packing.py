"""Packing: bin packing by hand, round trips to the padded layout, and identical model outputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from align_data import (
    CollateConfig,
    PreferenceExample,
    SFTExample,
    causal_attention_mask,
    collate_packed_preference,
    collate_packed_sft,
    collate_preference,
    collate_sft,
    pack_preference,
    pack_sft,
    packing_lengths,
    plan_packs,
    unpack,
)

PAD, BOS, EOS = 0, 1, 2
CFG = CollateConfig(pad_id=PAD)


def test_first_fit_decreasing_by_hand():
    # Longest first: 7 -> pack 0 (3 left); 5 -> pack 1 (5 left); 4 -> pack 1 (1 left);
    # 3 -> pack 0 (0 left); 2 -> new pack 2.
    plan = plan_packs([5, 3, 7, 2, 4], 10)
    assert plan.packs == ((2, 1), (0, 4), (3,))
    assert plan.num_packs == 3
    assert plan.efficiency == pytest.approx(21 / 30)


def test_first_fit_shuffle_is_seeded_and_complete():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 50, size=500)
    a = plan_packs(lengths, 64, algorithm="first_fit_shuffle", seed=3)
    b = plan_packs(lengths, 64, algorithm="first_fit_shuffle", seed=3)
    c = plan_packs(lengths, 64, algorithm="first_fit_shuffle", seed=4)
    assert a.packs == b.packs and a.packs != c.packs
    for plan in (a, plan_packs(lengths, 64)):
        placed = sorted(i for pack in plan.packs for i in pack)
        assert placed == list(range(500))
        assert max(int(lengths[list(p)].sum()) for p in plan.packs) <= 64
    # On these lengths decreasing first fit stays close to the volume lower bound.
    bound = int(np.ceil(lengths.sum() / 64))
    assert bound <= plan_packs(lengths, 64).num_packs <= 11 / 9 * bound + 1


def test_item_longer_than_capacity():
    with pytest.raises(ValueError, match="item 1 needs 9 positions, more than the pack capacity 8"):
        plan_packs([3, 9], 8)
    with pytest.raises(ValueError, match="unknown packing algorithm"):
        plan_packs([3], 8, algorithm="best_fit")  # type: ignore[arg-type]


def test_packing_lengths():
    assert packing_lengths(np.array([3, 5])).tolist() == [2, 4]
    assert packing_lengths(np.array([[3, 4], [2, 9]])).tolist() == [5, 9]


def sft_examples(seed: int, n: int) -> list[SFTExample]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        p = rng.integers(3, 50, size=rng.integers(1, 6)).astype(np.int32)
        c = rng.integers(3, 50, size=rng.integers(1, 8)).astype(np.int32)
        out.append(SFTExample(np.concatenate([[BOS], p]).astype(np.int32), c, index=i))
    return out


def pref_examples(seed: int, n: int) -> list[PreferenceExample]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        p = np.concatenate([[BOS], rng.integers(3, 50, size=rng.integers(1, 6))]).astype(np.int32)
        c = rng.integers(3, 50, size=rng.integers(1, 8)).astype(np.int32)
        r = rng.integers(3, 50, size=rng.integers(1, 8)).astype(np.int32)
        reward = None if i % 2 else float(i)
        out.append(PreferenceExample(p, c, r, reward, reward and -reward, index=10 + i))
    return out


def test_cu_seqlens_segments_and_positions_by_hand():
    examples = [
        SFTExample(np.array([BOS, 5], np.int32), np.array([6, EOS], np.int32)),  # 3 positions
        SFTExample(np.array([BOS], np.int32), np.array([7, EOS], np.int32)),  # 2 positions
        SFTExample(np.array([BOS, 8], np.int32), np.array([EOS], np.int32)),  # 2 positions
    ]
    packed = collate_packed_sft(examples, CFG, capacity=5)
    # FFD: 3 -> pack 0; 2 -> pack 0 (full); 2 -> pack 1. Pack length 5.
    assert packed.input_ids.tolist() == [[BOS, 5, 6, BOS, 7], [BOS, 8, PAD, PAD, PAD]]
    assert packed.labels.tolist() == [[-100, 6, EOS, 7, EOS], [-100, EOS, -100, -100, -100]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]]
    assert packed.segment_ids.tolist() == [[0, 0, 0, 1, 1], [0, 0, -1, -1, -1]]
    assert packed.cu_seqlens.tolist() == [0, 3, 5, 7, 10]
    assert packed.cu_seqlens.dtype == torch.int32
    assert packed.max_seqlen == 3
    assert packed.efficiency == pytest.approx(7 / 10)
    mask = packed.attention_mask()
    assert mask.shape == (2, 1, 5, 5)
    assert mask[0, 0].tolist() == [
        [False, True, True, True, True],
        [False, False, True, True, True],
        [False, False, False, True, True],
        [True, True, True, False, True],
        [True, True, True, False, False],
    ]


def test_sft_unpack_gives_the_padded_batch():
    examples = sft_examples(0, 13)
    padded = collate_sft(examples, CFG)
    packed = collate_packed_sft(examples, CFG, capacity=16)
    t = padded.input_ids.shape[1]
    assert torch.equal(unpack(packed.input_ids, packed, fill_value=PAD, length=t), padded.input_ids)
    assert torch.equal(unpack(packed.labels, packed, fill_value=-100, length=t), padded.labels)
    real = padded.attention_mask
    pos = unpack(packed.position_ids, packed, fill_value=0, length=t)
    assert torch.equal(pos[real], padded.position_ids[real])
    assert torch.equal(packed.seq_length, padded.lengths)
    assert packed.sample_indices.tolist() == list(range(13))
    assert packed.input_ids.shape[1] <= 16


def test_preference_pairs_stay_together_and_unpack():
    examples = pref_examples(1, 11)
    padded = collate_preference(examples, CFG)
    packed = collate_packed_preference(
        examples, CFG, capacity=32, algorithm="first_fit_shuffle", seed=5
    )
    b = len(examples)
    for j in range(b):
        # Same pack, and the rejected sequence starts where the chosen one ends.
        assert packed.seq_pack[j] == packed.seq_pack[b + j]
        assert packed.seq_start[b + j] == packed.seq_start[j] + packed.seq_length[j]
    t = padded.input_ids.shape[1]
    assert torch.equal(unpack(packed.input_ids, packed, fill_value=PAD, length=t), padded.input_ids)
    assert torch.equal(unpack(packed.labels, packed, fill_value=-100, length=t), padded.labels)
    assert torch.equal(packed.chosen_rewards, padded.chosen_rewards)
    assert torch.equal(packed.rejected_rewards, padded.rejected_rewards)
    assert torch.equal(packed.rewards_given, padded.rewards_given)
    assert torch.equal(packed.sample_indices, padded.sample_indices)


class TinyAttention(torch.nn.Module):
    """Embedding + position embedding + one masked attention layer + output head."""

    def __init__(self, vocab: int = 64, dim: int = 16) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.emb = torch.nn.Parameter(torch.randn(vocab, dim, generator=g, dtype=torch.float64))
        self.pos = torch.nn.Parameter(torch.randn(64, dim, generator=g, dtype=torch.float64))
        self.qkv = torch.nn.Parameter(torch.randn(dim, 3 * dim, generator=g, dtype=torch.float64))
        self.out = torch.nn.Parameter(torch.randn(dim, vocab, generator=g, dtype=torch.float64))

    def forward(self, ids, positions, masked):
        h = self.emb[ids] + self.pos[positions]
        q, k, v = (h @ self.qkv).chunk(3, dim=-1)
        scores = q @ k.transpose(-1, -2) / 4.0
        scores = scores.masked_fill(masked[:, 0], float("-inf"))
        return (scores.softmax(-1) @ v + h) @ self.out


def test_packed_model_output_equals_padded_output():
    model = TinyAttention()
    examples = pref_examples(2, 9)
    padded = collate_preference(examples, CollateConfig(pad_id=PAD, pad_to_multiple_of=4))
    packed = collate_packed_preference(examples, CFG, capacity=40)
    dense = model(
        padded.input_ids, padded.position_ids, causal_attention_mask(padded.attention_mask)
    )
    sparse = model(packed.input_ids, packed.position_ids, packed.attention_mask())
    back = unpack(sparse, packed, fill_value=0.0, length=padded.input_ids.shape[1])
    real = padded.attention_mask
    assert torch.allclose(back[real], dense[real], atol=1e-10, rtol=0)

    # The per-token log-probs of the labels agree too (what a DPO step consumes).
    def logps(logits, labels):
        mask = labels != -100
        lp = logits.log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
        return (lp * mask).sum(-1)

    packed_labels = unpack(packed.labels, packed, fill_value=-100, length=back.shape[1])
    assert torch.allclose(logps(back, packed_labels), logps(dense, padded.labels), atol=1e-10)


def test_pre_planned_packs_from_dataset_lengths():
    examples = sft_examples(3, 20)
    lengths = np.array([len(e.prompt_ids) + len(e.completion_ids) for e in examples])
    plan = plan_packs(packing_lengths(lengths), 24)
    packed = pack_sft([[examples[i] for i in pack] for pack in plan.packs], CFG)
    assert packed.input_ids.shape[0] == plan.num_packs
    order = [i for pack in plan.packs for i in pack]
    assert packed.sample_indices.tolist() == order
    assert packed.efficiency == pytest.approx(plan.efficiency * 24 / packed.input_ids.shape[1])
    pairs = pref_examples(4, 6)
    by_pack = pack_preference([pairs[:2], pairs[2:]], CFG)
    assert by_pack.seq_pack.tolist() == [0, 0, 1, 1, 1, 1] * 2
    with pytest.raises(ValueError, match="at least one example"):
        pack_sft([[]], CFG)

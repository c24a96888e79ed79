"""Collate functions: layouts, labels, padding, rewards, KTO pairing and distillation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from align_data import (
    CollateConfig,
    PreferenceExample,
    SFTExample,
    TeacherSample,
    UnpairedExample,
    causal_attention_mask,
    collate_distillation,
    collate_kto,
    collate_preference,
    collate_sft,
    split_pairs,
)

PAD, BOS, EOS = 0, 1, 2
CFG = CollateConfig(pad_id=PAD)


def a(*xs: int) -> np.ndarray:
    return np.array(xs, dtype=np.int32)


def test_preference_layout_labels_and_rewards():
    examples = [
        PreferenceExample(a(BOS, 10), a(11, 12, EOS), a(13, EOS), 0.5, -0.5, index=7),
        PreferenceExample(a(BOS, 20, 21), a(22, EOS), a(23, 24, 25, EOS), index=9),
    ]
    batch = collate_preference(examples, CFG)
    # Rows: chosen_0, chosen_1, rejected_0, rejected_1. Longest: rejected_1 with 7 tokens.
    assert batch.input_ids.tolist() == [
        [BOS, 10, 11, 12, PAD, PAD],
        [BOS, 20, 21, 22, PAD, PAD],
        [BOS, 10, 13, PAD, PAD, PAD],
        [BOS, 20, 21, 23, 24, 25],
    ]
    assert batch.labels.tolist() == [
        [-100, 11, 12, EOS, -100, -100],
        [-100, -100, 22, EOS, -100, -100],
        [-100, 13, EOS, -100, -100, -100],
        [-100, -100, 23, 24, 25, EOS],
    ]
    assert batch.lengths.tolist() == [4, 4, 3, 6]
    assert batch.attention_mask.tolist()[2] == [True, True, True, False, False, False]
    assert batch.position_ids.tolist()[0] == [0, 1, 2, 3, 4, 5]
    assert batch.chosen_rewards.tolist() == [0.5, 1.0]  # second pair: default 1.0
    assert batch.rejected_rewards.tolist() == [-0.5, 0.0]
    assert batch.rewards_given.tolist() == [True, False]
    assert batch.sample_indices.tolist() == [7, 9]
    assert batch.num_pairs == 2
    chosen, rejected = split_pairs(batch.labels)
    assert torch.equal(chosen, batch.labels[:2]) and torch.equal(rejected, batch.labels[2:])
    assert batch.loss_mask.sum().item() == 3 + 2 + 2 + 4
    assert batch.input_ids.dtype == torch.int64


def test_padding_to_a_multiple_and_a_fixed_length():
    ex = [PreferenceExample(a(BOS, 10), a(11, EOS), a(12, EOS))]
    assert collate_preference(
        ex, CollateConfig(pad_id=PAD, pad_to_multiple_of=8)
    ).input_ids.shape == (2, 8)
    fixed = collate_preference(ex, CollateConfig(pad_id=PAD, pad_to_length=5, pad_to_multiple_of=4))
    assert fixed.input_ids.shape == (2, 8)
    with pytest.raises(ValueError, match="more than pad_to_length=2"):
        collate_preference(ex, CollateConfig(pad_id=PAD, pad_to_length=2))


def test_causal_attention_mask():
    mask = causal_attention_mask(torch.tensor([[True, True, False]]))
    assert mask.shape == (1, 1, 3, 3)
    # True = masked: the future and the padding key.
    assert mask[0, 0].tolist() == [
        [False, True, True],
        [False, False, True],
        [False, False, True],
    ]


def test_kto_mismatched_pairs_shift_by_one():
    examples = [
        UnpairedExample(a(BOS, 10), a(11, EOS), True, index=0),
        UnpairedExample(a(BOS, 20), a(21, 22, EOS), False, index=1),
        UnpairedExample(a(BOS, 30, 31), a(32, EOS), True, index=2),
    ]
    batch = collate_kto(examples, CFG)
    assert batch.kl_completion_indices.tolist() == [1, 2, 0]
    assert batch.desirable.tolist() == [True, False, True]
    assert batch.input_ids.shape == (6, 4)
    # KL rows: prompt_i + completion_(i+1 mod 3).
    assert batch.input_ids[3].tolist() == [BOS, 10, 21, 22]
    assert batch.labels[3].tolist() == [-100, 21, 22, EOS]
    assert batch.input_ids[4].tolist() == [BOS, 20, 32, PAD]
    assert batch.labels[4].tolist() == [-100, 32, EOS, -100]
    assert batch.input_ids[5].tolist() == [BOS, 30, 31, 11]
    assert batch.labels[5].tolist() == [-100, -100, 11, EOS]
    # Samples first, unchanged.
    assert batch.labels[1].tolist() == [-100, 21, 22, EOS]
    assert batch.num_samples == 3


def test_kto_two_samples_swap_and_kl_truncation():
    examples = [
        UnpairedExample(a(BOS, 10, 11), a(12, EOS), True),
        UnpairedExample(a(BOS, 20), a(21, 22, 23, 24, EOS), False),
    ]
    batch = collate_kto(examples, CollateConfig(pad_id=PAD, kl_max_length=5))
    assert batch.kl_completion_indices.tolist() == [1, 0]
    # KL row 0: prompt (3 tokens) + completion_1 cut to 5 - 3 = 2 tokens.
    assert batch.input_ids[2, :4].tolist() == [BOS, 10, 11, 21]
    assert batch.labels[2].tolist()[:4] == [-100, -100, 21, 22]
    assert batch.lengths[2].item() == 4


def test_kto_batch_of_one_is_an_error():
    with pytest.raises(ValueError, match="at least 2 examples per micro-batch"):
        collate_kto([UnpairedExample(a(BOS, 1), a(3, EOS), True)], CFG)


def test_sft_with_trained_prompt_tokens():
    ex = SFTExample(a(BOS, 10, 11, 12), a(13, EOS), np.array([0, 0, 1, 0], np.uint8), index=4)
    batch = collate_sft([ex, SFTExample(a(BOS, 5), a(6, EOS))], CFG)
    assert batch.input_ids.tolist() == [[BOS, 10, 11, 12, 13], [BOS, 5, 6, PAD, PAD]]
    assert batch.labels.tolist() == [[-100, 11, -100, 13, EOS], [-100, 6, EOS, -100, -100]]
    assert batch.sample_indices.tolist() == [4, -1]


def teacher(n: int, k: int, offset: float, tokens=None) -> TeacherSample:
    logits = torch.arange(n * k, dtype=torch.float32).reshape(n, k).flip(1) + offset
    ids = torch.arange(n * k, dtype=torch.int32).reshape(n, k)
    return TeacherSample(logits, ids, logits[:, 0] + 1.0, tokens)


def test_distillation_aligns_teacher_to_label_positions():
    examples = [SFTExample(a(BOS, 10), a(11, 12, EOS)), SFTExample(a(BOS, 20), a(21, EOS))]
    # Input positions: 4 and 3.
    t0 = teacher(4, 2, 0.0, tokens=torch.tensor([BOS, 10, 11, 12], dtype=torch.int32))
    t1 = teacher(3, 2, 100.0)
    batch = collate_distillation(
        examples, [t0, t1], CollateConfig(pad_id=PAD, pad_to_multiple_of=4)
    )
    assert batch.teacher_logits.shape == (2, 4, 2)
    assert torch.equal(batch.teacher_logits[0], t0.logits)
    assert torch.equal(batch.teacher_logits[1, :3], t1.logits)
    assert batch.teacher_logits[1, 3].tolist() == [0.0, 0.0]
    assert torch.equal(batch.teacher_ids[1, :3], t1.ids.long())
    assert batch.teacher_logsumexp[1].tolist() == [102.0, 104.0, 106.0, 0.0]
    assert batch.labels[0].tolist() == [-100, 11, 12, EOS]


def test_distillation_mismatches_are_errors():
    examples = [SFTExample(a(BOS, 10), a(11, EOS), index=8)]
    # 4 tokens -> 3 input positions.
    with pytest.raises(ValueError, match="example 8: the teacher has 4 positions but the exam"):
        collate_distillation(examples, [teacher(4, 2, 0.0)], CFG)
    bad_tokens = teacher(3, 2, 0.0, tokens=torch.tensor([BOS, 10, 99], dtype=torch.int32))
    with pytest.raises(ValueError, match="other input ids"):
        collate_distillation(examples, [bad_tokens], CFG)


def test_batches_move_and_empty_lists_fail():
    batch = collate_sft([SFTExample(a(BOS, 1), a(3, EOS))], CFG)
    moved = batch.to("cpu")
    assert torch.equal(moved.input_ids, batch.input_ids)
    with pytest.raises(ValueError, match="empty list"):
        collate_preference([], CFG)

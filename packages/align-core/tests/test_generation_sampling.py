"""Pure pieces of generation: logits processing, sampling, end strings, prompt layout, configs.

No model and no process group: every expected value is worked out by hand in the test.
"""

import math

import pytest
import torch

from align_core.generation import (
    LengthConfig,
    SamplingConfig,
    apply_repetition_penalty,
    block_tokens,
    choose_tokens,
    derive_seeds,
    first_end_string,
    mask_padded_vocab,
    new_end_string,
    right_pad,
    sample_from_logprobs,
    sample_uniforms,
    sampling_logprobs,
    token_presence,
    top_k_filter,
    top_p_filter,
    trim_at_end_string,
    unpad_prompts,
)

INF = float("inf")


def test_repetition_penalty_matches_hand_computation():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0]])
    presence = torch.tensor([[True, True, False, False, True]])
    out = apply_repetition_penalty(logits, presence, 2.0)
    # seen & positive: 2 / 2 = 1; seen & negative: -1 * 2 = -2, -2 * 2 = -4; unseen unchanged
    torch.testing.assert_close(out, torch.tensor([[1.0, -2.0, 0.5, 3.0, -4.0]]))
    # the distribution moves as the formula says: token 0 drops from first to third place
    probs = torch.softmax(out, -1)[0]
    expected = torch.tensor([1.0, -2.0, 0.5, 3.0, -4.0]).exp()
    torch.testing.assert_close(probs, expected / expected.sum())
    assert apply_repetition_penalty(logits, presence, 1.0) is logits


def test_repetition_penalty_below_one_encourages_repeats():
    out = apply_repetition_penalty(torch.tensor([[1.0, -1.0]]), torch.tensor([[True, True]]), 0.5)
    torch.testing.assert_close(out, torch.tensor([[2.0, -0.5]]))


def test_token_presence_ignores_padding_and_counts_duplicates_once():
    tokens = torch.tensor([[3, 1, 3, 0], [2, 2, 4, 4]])
    valid = torch.tensor([[True, True, True, False], [True, True, False, False]])
    out = token_presence(tokens, valid, 5)
    assert out.tolist() == [
        [False, True, False, True, False],
        [False, False, True, False, False],
    ]


def test_mask_padded_vocab_and_block_tokens():
    logits = torch.zeros(2, 6)
    masked = mask_padded_vocab(logits, 4)
    assert masked[:, 4:].eq(-INF).all() and masked[:, :4].eq(0).all()
    assert mask_padded_vocab(logits, 6) is logits
    blocked = block_tokens(logits, [1, 3], torch.tensor([True, False]))
    assert blocked[0].tolist() == [0, -INF, 0, -INF, 0, 0]
    assert blocked[1].tolist() == [0.0] * 6


def test_top_k_keeps_exactly_k():
    logits = torch.tensor([[0.1, 3.0, 2.0, -1.0, 2.5]])
    out = top_k_filter(logits, 2)
    assert out[0].tolist() == [-INF, 3.0, -INF, -INF, 2.5]
    assert top_k_filter(logits, 0) is logits


def test_top_p_keeps_smallest_nucleus():
    probs = torch.tensor([[0.5, 0.05, 0.3, 0.15]])
    logits = probs.log()
    # descending: 0.5, 0.3, 0.15, 0.05; mass before each: 0, 0.5, 0.8, 0.95
    assert top_p_filter(logits, 0.8)[0].isfinite().tolist() == [True, False, True, False]
    assert top_p_filter(logits, 0.81)[0].isfinite().tolist() == [True, False, True, True]
    assert top_p_filter(logits, 0.1)[0].isfinite().tolist() == [True, False, False, False]
    assert top_p_filter(logits, 1.0) is logits


def test_sampling_logprobs_applies_temperature_then_filters():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    cfg = SamplingConfig(temperature=0.5, top_k=2)
    out = sampling_logprobs(logits, cfg)
    # z / T = [4, 2, 0, -2]; top-2 keeps [4, 2]; log-softmax over those two
    lse = math.log(math.exp(4) + math.exp(2))
    torch.testing.assert_close(out[0, :2], torch.tensor([4 - lse, 2 - lse]))
    assert out[0, 2:].eq(-INF).all()
    greedy = sampling_logprobs(logits, SamplingConfig(use_greedy=True, temperature=0.5))
    torch.testing.assert_close(greedy, torch.log_softmax(logits, -1))


def test_inverse_cdf_sampling_hits_the_right_bins():
    probs = torch.tensor([[0.2, 0.0, 0.5, 0.3]])
    logprobs = probs.log().expand(7, 4)
    u = torch.tensor([0.0, 0.1999, 0.2001, 0.69, 0.7001, 0.9999, 1.0 - 1e-16], dtype=torch.float64)
    # cumulative: [0.2, 0.2, 0.7, 1.0]; id 1 has probability 0 and is never returned
    assert sample_from_logprobs(logprobs, u).tolist() == [0, 0, 2, 2, 3, 3, 3]


def test_inverse_cdf_never_returns_excluded_ids():
    logprobs = torch.full((1, 8), -INF)
    logprobs[0, 5] = 0.0
    u = torch.linspace(0, 1 - 1e-12, 50, dtype=torch.float64)
    out = sample_from_logprobs(logprobs.expand(50, 8), u)
    assert out.eq(5).all()


def test_sampling_frequencies_follow_the_distribution():
    probs = torch.tensor([0.1, 0.6, 0.3])
    n = 1000
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n  # a uniform grid: exact frequencies
    out = sample_from_logprobs(probs.log().expand(n, 3), u)
    assert torch.bincount(out, minlength=3).tolist() == [100, 600, 300]


def test_top_k_one_equals_greedy():
    torch.manual_seed(0)
    logits = torch.randn(16, 50)
    u = torch.rand(16, dtype=torch.float64)
    sampled, lp = choose_tokens(logits, SamplingConfig(top_k=1, temperature=0.7), u)
    greedy, _ = choose_tokens(logits, SamplingConfig(use_greedy=True), None)
    assert torch.equal(sampled, logits.argmax(-1)) and torch.equal(greedy, sampled)
    assert lp.eq(0).all()  # the only token left has probability 1


def test_choose_tokens_needs_uniforms_when_sampling():
    with pytest.raises(ValueError, match="uniforms"):
        choose_tokens(torch.zeros(1, 3), SamplingConfig(), None)


def test_uniforms_depend_only_on_each_rows_seed():
    a = sample_uniforms([11, 22, 33], 5, "cpu")
    b = sample_uniforms([33], 5, "cpu")
    assert torch.equal(a[2], b[0]) and not torch.equal(a[0], a[1])
    assert a.min() >= 0 and a.max() < 1
    assert derive_seeds(7, 4) == derive_seeds(7, 4)
    assert len(set(derive_seeds(7, 4))) == 4 and derive_seeds(7, 4) != derive_seeds(8, 4)


def test_end_string_detection():
    ends = ("\nUser", "</s>")
    assert first_end_string("hello</s>x\nUser", ends) == 5
    assert first_end_string("hello", ends) is None
    assert first_end_string("a</s>bc</s>", ends, min_end=6) == 7
    # only occurrences the newest token completes count
    assert new_end_string("abc</s", "abc</s>", ends)
    assert new_end_string("abc", "abc</s>xy", ends)  # one token may carry the string and more
    assert not new_end_string("a</s>b", "a</s>bc", ends)
    assert trim_at_end_string("answer\nUser: more", ends) == "answer"
    assert trim_at_end_string("answer", ends) == "answer"


def test_unpad_and_right_pad_round_trip():
    right = torch.tensor([[5, 6, 7], [8, 0, 0]])
    left = torch.tensor([[5, 6, 7], [0, 0, 8]])
    assert unpad_prompts(right, [3, 1], "right") == [[5, 6, 7], [8]]
    assert unpad_prompts(left, torch.tensor([3, 1]), "left") == [[5, 6, 7], [8]]
    tokens, lengths = right_pad([[5, 6, 7], [8]], 4, 9, "cpu")
    assert tokens.tolist() == [[5, 6, 7, 9], [8, 9, 9, 9]] and lengths.tolist() == [3, 1]
    with pytest.raises(ValueError, match="length 0"):
        unpad_prompts(right, [3, 0], "right")
    with pytest.raises(ValueError, match="padding_side"):
        unpad_prompts(right, [3, 1], "middle")


def test_configs_reject_bad_values():
    with pytest.raises(ValueError, match="temperature"):
        SamplingConfig(temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0.0)
    with pytest.raises(ValueError, match="top_k"):
        SamplingConfig(top_k=-1)
    with pytest.raises(TypeError, match="end_strings"):
        SamplingConfig(end_strings="</s>")
    with pytest.raises(ValueError, match="min_length"):
        LengthConfig(max_length=4, min_length=5)
    assert SamplingConfig(end_strings=["a"]).end_strings == ("a",)

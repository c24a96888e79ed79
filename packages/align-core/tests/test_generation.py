"""The generator on a tiny megatron-core GPT (2 layers, hidden 64, fp32, one CPU process).

Expected values come from plain full forwards of the model (no cache, one sequence at a time) or
from an unconstrained greedy run, never from the generator's own code path under test.
"""

import pytest
import torch

from align_core import ModelConfig, build_gpt_model
from align_core.generation import Generator, LengthConfig, SamplingConfig

VOCAB = 200  # padded to 256 by megatron's rule: ids 200..255 must never be generated
EOS = 199
PROMPTS = [[5, 17, 42, 8, 99], [7, 3], [11, 12, 13, 14, 15, 16, 17, 18]]
GREEDY = SamplingConfig(use_greedy=True)
SHORT = LengthConfig(max_length=10)


def _build(dist_ctx, **changes):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=VOCAB, seq_length=64, init_method_std=0.2, **changes)
    return build_gpt_model(cfg).eval()


@pytest.fixture(scope="module")
def model(dist_ctx):
    return _build(dist_ctx)


def _gen(model, **kwargs):
    return Generator(model, vocab_size=VOCAB, eos_ids=EOS, **kwargs)


class LetterDecoder:
    """Token id -> one letter; EOS decodes to nothing (as align_data tokenizers do)."""

    def decode(self, ids):
        return "".join(chr(ord("a") + i % 26) for i in ids if i != EOS)


def _full_logprobs(model, sequence):
    """Next-token log-probs of one unpadded sequence from one plain forward (padded ids masked)."""
    n = len(sequence)
    ids = torch.tensor([sequence])
    mask = torch.triu(torch.ones(1, 1, n, n, dtype=torch.bool), 1)
    with torch.no_grad():
        logits = model(ids, torch.arange(n)[None], mask)[0].float()
    logits[:, VOCAB:] = float("-inf")
    return logits


@pytest.mark.parametrize("position_embedding_type", ["rope", "learned_absolute"])
def test_greedy_with_cache_equals_without_cache(dist_ctx, position_embedding_type):
    model = _build(dist_ctx, position_embedding_type=position_embedding_type)
    cached = _gen(model).generate(PROMPTS, GREEDY, SHORT)
    plain = _gen(model, use_kv_cache=False).generate(PROMPTS, GREEDY, SHORT)
    assert torch.equal(cached.tokens, plain.tokens)
    assert torch.equal(cached.response_lengths, plain.response_lengths)
    torch.testing.assert_close(cached.logprobs, plain.logprobs, atol=1e-4, rtol=1e-4)


def test_greedy_tokens_and_logprobs_match_plain_forwards(model):
    out = _gen(model).generate(PROMPTS, GREEDY, SHORT)
    assert out.prompt_lengths.tolist() == [len(p) for p in PROMPTS]
    for b, (prompt, response) in enumerate(zip(PROMPTS, out.responses(), strict=True)):
        assert out.sequences()[b] == prompt + response
        logits = _full_logprobs(model, prompt + response)
        steps = logits[len(prompt) - 1 : len(prompt) + len(response) - 1]
        assert steps.argmax(-1).tolist() == response
        expected = torch.log_softmax(steps, -1).gather(1, torch.tensor(response)[:, None])[:, 0]
        n = len(response)
        torch.testing.assert_close(out.logprobs[b, :n], expected, atol=1e-4, rtol=1e-4)
        assert out.logprobs[b, n:].eq(0).all()


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_padded_batches_equal_each_prompt_alone(model, padding_side):
    gen = _gen(model)
    alone = [gen.generate([p], GREEDY, SHORT).responses()[0] for p in PROMPTS]
    width = max(len(p) for p in PROMPTS) + 2
    padded = torch.full((len(PROMPTS), width), 3)
    for i, p in enumerate(PROMPTS):
        if padding_side == "right":
            padded[i, : len(p)] = torch.tensor(p)
        else:
            padded[i, width - len(p) :] = torch.tensor(p)
    lengths = torch.tensor([len(p) for p in PROMPTS])
    batched = gen.generate(padded, GREEDY, SHORT, prompt_lengths=lengths, padding_side=padding_side)
    assert batched.responses() == alone


def test_sampling_is_reproducible_and_depends_on_the_seed(model):
    gen = _gen(model)
    cfg = SamplingConfig(temperature=1.3, top_p=0.95)
    a = gen.generate(PROMPTS, cfg, SHORT, seed=3)
    b = gen.generate(PROMPTS, cfg, SHORT, seed=3)
    c = gen.generate(PROMPTS, cfg, SHORT, seed=4)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.logprobs, b.logprobs)
    assert not torch.equal(a.tokens, c.tokens)
    greedy = gen.generate(PROMPTS, GREEDY, SHORT)
    assert a.responses() != greedy.responses()


def test_per_sample_seeds_make_outputs_independent_of_the_batch(model):
    gen = _gen(model)
    cfg = SamplingConfig(temperature=1.5)
    batch = gen.generate(PROMPTS, cfg, SHORT, seed=[10, 20, 30])
    reordered = gen.generate(PROMPTS[::-1], cfg, SHORT, seed=[30, 20, 10])
    seeds = [10, 20, 30]
    alone = [gen.generate([p], cfg, SHORT, seed=[s]) for p, s in zip(PROMPTS, seeds, strict=True)]
    assert batch.responses() == reordered.responses()[::-1]
    assert batch.responses() == [r.responses()[0] for r in alone]


def test_sampled_logprobs_are_under_the_sampling_distribution(model):
    cfg = SamplingConfig(temperature=0.7, top_k=5)
    out = _gen(model).generate(PROMPTS[:1], cfg, LengthConfig(max_length=3), seed=1)
    prompt, response = PROMPTS[0], out.responses()[0]
    z = _full_logprobs(model, prompt + response)[len(prompt) - 1 : len(prompt) + 2] / 0.7
    top = z.topk(5, -1)
    for k, token in enumerate(response):
        assert token in top.indices[k].tolist()  # drawn from the top 5
        position = top.indices[k].tolist().index(token)
        expected = torch.log_softmax(top.values[k], -1)[position]
        torch.testing.assert_close(out.logprobs[0, k], expected, atol=1e-4, rtol=1e-4)


def test_top_k_one_equals_greedy(model):
    gen = _gen(model)
    sampled = gen.generate(PROMPTS, SamplingConfig(top_k=1, temperature=2.0), SHORT, seed=9)
    greedy = gen.generate(PROMPTS, GREEDY, SHORT)
    assert torch.equal(sampled.tokens, greedy.tokens)


def test_padded_vocabulary_is_never_generated(dist_ctx):
    model = _build(dist_ctx)
    with torch.no_grad():  # make the padding rows of the output layer win every argmax
        model.output_layer.weight[VOCAB:] = model.output_layer.weight[:VOCAB].abs().max() * 50
    out = _gen(model).generate(PROMPTS, SamplingConfig(), SHORT, seed=0)
    greedy = _gen(model).generate(PROMPTS, GREEDY, SHORT)
    assert out.tokens.max() < VOCAB and greedy.tokens.max() < VOCAB


def test_eos_stops_each_sample_at_its_first_eos(model):
    free = _gen(model).generate(PROMPTS, GREEDY, SHORT).responses()
    eos = free[0][3]  # a token greedy decoding emits: made the EOS, sample 0 stops there
    out = Generator(model, vocab_size=VOCAB, eos_ids=[eos], pad_id=0).generate(
        PROMPTS, GREEDY, SHORT
    )
    for b, response in enumerate(free):
        stops = eos in response
        expected = response.index(eos) + 1 if stops else len(response)
        assert out.response_lengths[b] == expected
        assert out.responses()[b] == response[:expected]
        assert bool(out.finished[b]) == stops
        end = len(PROMPTS[b]) + expected
        assert out.tokens[b, end:].eq(0).all()  # padded after the response
    assert out.response_lengths[0] == 4 and out.finished[0]


def test_min_length_blocks_eos(model):
    free = _gen(model).generate(PROMPTS[:1], GREEDY, SHORT).responses()[0]
    eos = free[1]
    gen = Generator(model, vocab_size=VOCAB, eos_ids=eos)
    early = gen.generate(PROMPTS[:1], GREEDY, SHORT)
    assert early.response_lengths.tolist() == [free.index(eos) + 1]
    held = gen.generate(PROMPTS[:1], GREEDY, LengthConfig(max_length=10, min_length=6))
    response = held.responses()[0]
    assert len(response) >= 6 and eos not in response[:5]
    assert response[: free.index(eos)] == free[: free.index(eos)]  # same until the first EOS


def test_end_strings_stop_and_trim(model):
    decoder = LetterDecoder()
    free = _gen(model).generate(PROMPTS, GREEDY, SHORT).responses()
    texts = [decoder.decode(r) for r in free]
    end = texts[0][4:6]
    out = _gen(model, decoder=decoder).generate(
        PROMPTS, SamplingConfig(use_greedy=True, end_strings=(end,)), SHORT
    )
    for b, text in enumerate(texts):
        at = text.find(end)
        expected = at + len(end) if at >= 0 else len(text)  # one letter per token
        assert out.response_lengths[b] == expected
        assert bool(out.finished[b]) == (at >= 0)
        assert out.texts[b] == (text[:at] if at >= 0 else text)
    assert out.response_lengths[0] <= 6 and out.finished[0]


def test_repetition_penalty_on_the_first_token(model):
    prompt = PROMPTS[0]
    z = _full_logprobs(model, prompt)[-1]
    seen = torch.zeros_like(z, dtype=torch.bool)
    seen[prompt] = True
    expected = torch.where(seen & (z > 0), z / 3.0, torch.where(seen, z * 3.0, z))
    cfg = SamplingConfig(use_greedy=True, repetition_penalty=3.0)
    out = _gen(model).generate([prompt], cfg, LengthConfig(max_length=1))
    assert out.responses()[0] == [int(expected.argmax())]
    torch.testing.assert_close(out.logprobs[0, 0], torch.log_softmax(expected, -1).max())


def test_length_limits_and_errors(model):
    gen = _gen(model, max_sequence_length=12)
    out = gen.generate(PROMPTS, GREEDY, LengthConfig(max_length=50))
    assert out.tokens.size(1) == 12  # the longest prompt (8) + what fits (4)
    assert (
        out.response_lengths.max() == 4 and (out.prompt_lengths + out.response_lengths).max() == 12
    )
    with pytest.raises(ValueError, match="no room"):
        gen.generate([list(range(12))], GREEDY, SHORT)
    with pytest.raises(ValueError, match="decoder"):
        gen.generate(PROMPTS, SamplingConfig(end_strings=("x",)), SHORT)
    with pytest.raises(ValueError, match="empty"):
        gen.generate([[1], []], GREEDY, SHORT)
    with pytest.raises(ValueError, match="seeds"):
        gen.generate(PROMPTS, SamplingConfig(), SHORT, seed=[1, 2])


def test_sequence_parallel_models_are_rejected(model):
    model.config.sequence_parallel = True  # the local spec cannot build one; flip the flag
    try:
        with pytest.raises(ValueError, match="sequence parallelism"):
            _gen(model)
    finally:
        model.config.sequence_parallel = False


def test_training_mode_is_restored(model):
    model.train()
    _gen(model).generate(PROMPTS[:1], GREEDY, LengthConfig(max_length=2))
    assert model.training
    model.eval()

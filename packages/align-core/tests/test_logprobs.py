import pytest
import torch

from align_core import (
    LogProbConfig,
    ModelConfig,
    build_gpt_model,
    causal_attention_mask,
    final_hidden_states,
    forward_token_logps,
    output_weight,
    seed_all,
)
from align_core.logprobs import mask_padded_vocab_

VOCAB = 200  # padded to 256 by make_vocab_size_divisible_by=128


def _batch(vocab=VOCAB, batch=2, seq=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (batch, seq), generator=g)
    labels = torch.roll(tokens, -1, dims=1)
    labels[:, -1] = -100
    labels[0, :4] = -100  # an unscored prompt
    return {"tokens": tokens, "labels": labels}


def _naive_logps(model, batch, vocab_size):
    """log_softmax over the first `vocab_size` logits, gathered at the labels (float64)."""
    tokens, labels = batch["tokens"], batch["labels"]
    seq = tokens.shape[1]
    pos = torch.arange(seq).expand_as(tokens)
    logits = model(tokens, pos, causal_attention_mask(seq))[..., :vocab_size].double()
    logps = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    return torch.where(labels == -100, torch.zeros_like(logps), logps)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("fused", [True, False])
def test_logps_match_naive_log_softmax(dist_ctx, tied, fused):
    seed_all(7)
    model = build_gpt_model(ModelConfig(vocab_size=VOCAB, share_embeddings_and_output_weights=tied))
    batch = _batch()
    weights = torch.linspace(0.5, 1.5, batch["tokens"].numel()).view_as(batch["tokens"])

    _naive_logps(model, batch, VOCAB).mul(weights).sum().backward()
    expected_grads = _grads(model)
    model.zero_grad()
    with torch.no_grad():
        expected = _naive_logps(model, batch, VOCAB)

    got = forward_token_logps(model, batch, vocab_size=VOCAB, config=LogProbConfig(fused=fused))
    assert got.shape == batch["labels"].shape and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, atol=2e-6, rtol=1e-6)
    assert torch.all(got[batch["labels"] == -100] == 0)
    got.mul(weights).sum().backward()
    grads = _grads(model)
    assert grads.keys() == expected_grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(g, expected_grads[name], atol=2e-5, rtol=1e-4, msg=name)


def test_without_vocab_size_padding_takes_part_in_softmax(dist_ctx):
    seed_all(8)
    model = build_gpt_model(ModelConfig(vocab_size=VOCAB))
    batch = _batch()
    with torch.no_grad():
        padded = _naive_logps(model, batch, 256)
        real = _naive_logps(model, batch, VOCAB)
        for fused in (True, False):
            got = forward_token_logps(model, batch, config=LogProbConfig(fused=fused))
            torch.testing.assert_close(got.double(), padded, atol=2e-6, rtol=1e-6)
    # A random model puts real mass on the padding, so excluding it matters.
    assert (real - padded).abs().max() > 1e-3


def test_logps_do_not_depend_on_the_amount_of_padding(dist_ctx):
    """The same real weights padded to 256 or to 200 rows give the same log-probs."""
    seed_all(9)
    wide = build_gpt_model(ModelConfig(vocab_size=VOCAB, make_vocab_size_divisible_by=128))
    narrow = build_gpt_model(ModelConfig(vocab_size=VOCAB, make_vocab_size_divisible_by=8))
    state = {
        k: (v[:VOCAB] if isinstance(v, torch.Tensor) and v.dim() == 2 and v.shape[0] == 256 else v)
        for k, v in wide.state_dict().items()
    }
    narrow.load_state_dict(state)
    batch = _batch()
    with torch.no_grad():
        for fused in (True, False):
            cfg = LogProbConfig(fused=fused)
            torch.testing.assert_close(
                forward_token_logps(wide, batch, vocab_size=VOCAB, config=cfg),
                forward_token_logps(narrow, batch, vocab_size=VOCAB, config=cfg),
                atol=1e-6,
                rtol=1e-6,
            )


def test_final_hidden_states_times_output_weight_are_the_logits(dist_ctx):
    seed_all(10)
    model = build_gpt_model(ModelConfig()).eval()
    batch = _batch(vocab=256)
    seq = batch["tokens"].shape[1]
    with torch.no_grad():
        hidden = final_hidden_states(model, batch)
        logits = model(
            batch["tokens"], torch.arange(seq).expand(2, seq), causal_attention_mask(seq)
        )
    assert hidden.shape == (seq, 2, 64)
    torch.testing.assert_close(
        (hidden @ output_weight(model).t()).transpose(0, 1), logits, atol=1e-5, rtol=1e-5
    )
    assert model.post_process  # restored after the bypass


def test_small_chunks_and_custom_ignore_index(dist_ctx):
    seed_all(11)
    model = build_gpt_model(ModelConfig())
    batch = _batch(vocab=256)
    batch["labels"] = torch.where(batch["labels"] == -100, -1, batch["labels"])
    cfg = LogProbConfig(fused=True, chunk_size=5, ignore_index=-1)
    with torch.no_grad():
        got = forward_token_logps(model, batch, vocab_size=256, config=cfg)
        ref_batch = dict(batch, labels=torch.where(batch["labels"] == -1, -100, batch["labels"]))
        expected = _naive_logps(model, ref_batch, 256)
    torch.testing.assert_close(got.double(), expected, atol=2e-6, rtol=1e-6)


def test_mask_padded_vocab_only_touches_padding():
    logits = torch.zeros(2, 3, 8)
    mask_padded_vocab_(logits, vocab_size=13, vocab_start=8)  # shard [8, 16): 5 real
    assert torch.all(logits[..., :5] == 0)
    assert torch.all(logits[..., 5:] == torch.finfo(torch.float32).min)
    untouched = torch.zeros(4)
    mask_padded_vocab_(untouched, vocab_size=13, vocab_start=0)
    assert torch.all(untouched == 0)


def test_bf16_model_log_probs_follow_the_fp32_ones(dist_ctx):
    """bf16 weights (Float16Module): both paths return float32 log-probs close to fp32's."""
    seed_all(12)
    fp32 = build_gpt_model(ModelConfig(num_layers=1))
    bf16 = build_gpt_model(ModelConfig(num_layers=1, dtype="bf16"))
    bf16.module.load_state_dict(fp32.state_dict())
    batch = _batch(vocab=256, seq=8)
    with torch.no_grad():
        expected = forward_token_logps(fp32, batch, vocab_size=256)
        for fused in (True, False):
            got = forward_token_logps(
                bf16, batch, vocab_size=256, config=LogProbConfig(fused=fused)
            )
            assert got.dtype == torch.float32
            torch.testing.assert_close(got, expected, atol=0.1, rtol=0.02)

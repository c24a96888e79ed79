import functools

import torch

from align_core import (
    ModelConfig,
    broadcast_from_last_stage,
    build_gpt_model,
    concat_outputs,
    forward_backward,
    forward_token_logps,
    seed_all,
    wrap_ddp,
)

FORWARD = functools.partial(forward_token_logps, vocab_size=256)


def _data(n=4, seq=10, seed=3):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 256, (n, seq), generator=g)
    labels = torch.roll(tokens, -1, dims=1)
    labels[:, -1] = -100
    labels[1, :6] = -100  # uneven token counts per example
    return tokens, labels


def _split(tokens, labels, micro):
    return [
        {"tokens": tokens[i : i + micro], "labels": labels[i : i + micro]}
        for i in range(0, len(tokens), micro)
    ]


def _global_mean_loss(global_batch):
    """Mean over the global batch of each sequence's negative summed log-prob."""

    def loss_fn(batch, logps):
        seq = logps.sum(-1)
        return -seq.sum() / global_batch, {"logps": seq.detach()}

    return loss_fn


def _main_grads(ddp):
    return {n: p.main_grad.clone() for n, p in ddp.module.named_parameters()}


def _fresh_ddp():
    seed_all(21)
    return wrap_ddp(build_gpt_model(ModelConfig()))


def test_accumulation_equals_one_big_micro_batch_and_plain_autograd(dist_ctx):
    tokens, labels = _data()
    loss_fn = _global_mean_loss(4)

    # Independent reference: plain autograd on the whole batch, no schedule, no DDP.
    seed_all(21)
    plain = build_gpt_model(ModelConfig())
    logps = FORWARD(plain, {"tokens": tokens, "labels": labels})
    (-logps.sum(-1).mean()).backward()
    reference = {n: p.grad for n, p in plain.named_parameters()}

    results = {}
    for micro in (1, 2, 4):
        model = _fresh_ddp()
        model.zero_grad_buffer()
        outputs = forward_backward(model, _split(tokens, labels, micro), FORWARD, loss_fn)
        assert len(outputs) == 4 // micro
        joined = concat_outputs(outputs)
        torch.testing.assert_close(joined["logps"], logps.sum(-1).detach(), atol=1e-5, rtol=1e-6)
        # The unscaled per-micro-batch losses sum to the global-batch loss.
        torch.testing.assert_close(
            joined["loss"].sum(), -logps.sum(-1).mean().detach(), atol=1e-5, rtol=1e-6
        )
        results[micro] = _main_grads(model)

    for micro, grads in results.items():
        for name, g in grads.items():
            torch.testing.assert_close(
                g, reference[name], atol=1e-6, rtol=1e-5, msg=f"micro {micro}: {name}"
            )


def test_forward_only_returns_logps_and_leaves_gradients_alone(dist_ctx):
    tokens, labels = _data(seed=4)
    model = _fresh_ddp()
    model.zero_grad_buffer()
    with torch.no_grad():
        expected = FORWARD(model, {"tokens": tokens, "labels": labels}).sum(-1)

    def reference_pass(batch, logps):
        assert not logps.requires_grad
        return None, {"logps": logps.sum(-1)}

    outputs = forward_backward(
        model, _split(tokens, labels, 2), FORWARD, reference_pass, forward_only=True
    )
    got = concat_outputs(outputs)
    assert set(got) == {"logps"}
    torch.testing.assert_close(got["logps"], expected, atol=1e-5, rtol=1e-6)
    assert all(torch.all(p.main_grad == 0) for p in model.module.parameters())


def test_broadcast_without_pipeline_is_identity():
    data = {"a": torch.arange(3)}
    assert broadcast_from_last_stage(data, group=None)["a"] is data["a"]
    assert concat_outputs([]) == {}
    stacked = concat_outputs([{"s": torch.tensor(1.0)}, {"s": torch.tensor(2.0)}])
    torch.testing.assert_close(stacked["s"], torch.tensor([1.0, 2.0]))

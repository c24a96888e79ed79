"""Reference-policy strategies: the same batch gives the same losses under every strategy."""

import math

import pytest
import torch
from _core_scripts import load_tiny

from align_core.algorithms import DPOConfig
from align_core.algorithms.dpo import DPOStep
from align_core.lora import LoraConfig, add_lora, lora_disabled
from align_core.reference import (
    AdapterReference,
    ModelReference,
    SwapReference,
    precompute_reference,
    reference_forward,
)
from align_core.schedule import forward_backward

T = load_tiny()

PAIRS = T.preference_examples(32)
STEP = DPOStep(DPOConfig(ref_policy_kl_penalty=0.5))


def _epochs(source, steps):
    def epochs():
        yield (source.train_micro_batches(k * source.global_batch_size) for k in range(steps))

    return epochs


def _references(policy, source, tmp_path, forward=T.FORWARD):
    copy = T.fresh_model()
    copy.load_state_dict(policy.state_dict())
    lora_policy = T.fresh_model()
    add_lora(lora_policy, LoraConfig(rank=4, alpha=8.0))
    return {
        "swap": SwapReference(policy, forward),
        "model": ModelReference(copy, forward),
        "precompute": precompute_reference(
            policy,
            forward,
            root=tmp_path / "cache",
            key={"test": "strategies"},
            splits={"train": (len(PAIRS), _epochs(source, 2))},
            writer=True,
        ),
        "adapters": AdapterReference(lora_policy, forward, lora_disabled),
    }, lora_policy


def _loss(model, micro_batches, reference):
    for mb, ref in zip(micro_batches, reference.logps(micro_batches, split="train"), strict=True):
        mb["ref_logps"] = ref
    g = sum(int(mb["sample_index"].numel()) for mb in micro_batches)
    outputs = forward_backward(
        model, micro_batches, T.FORWARD, STEP.loss_fn(torch.tensor(float(g))), forward_only=True
    )
    sums = {k: sum(float(o[k]) for o in outputs) for k in outputs[0]}
    return STEP.finalize_metrics(sums)


def test_every_strategy_gives_the_same_losses_and_ln2_at_step_0(dist_ctx, tmp_path):
    policy = T.fresh_model()
    source = T.data(PAIRS, [], STEP, mbs=4, gbs=8)
    refs, lora_policy = _references(policy, source, tmp_path)
    batch = source.train_micro_batches(0)

    for name, ref in refs.items():
        model = lora_policy if name == "adapters" else policy
        metrics = _loss(model, [dict(mb) for mb in batch], ref)
        # Policy and reference log-probs are bitwise equal: every margin is exactly 0.
        assert metrics["rewards_margin"] == 0.0 and metrics["acc"] == 0.0, name
        assert metrics["loss"] == pytest.approx(math.log(2), abs=1e-7), name

    # Train the policy (swap reference); every strategy still holds the initial weights.
    trainer = T.trainer(policy, STEP, source, reference=refs["swap"], lr=5e-3)
    for _ in range(2):
        trainer.train_step()
    second = source.train_micro_batches(8)
    values = {n: r.logps(second, split="train") for n, r in refs.items()}
    for name, got in values.items():
        for a, b in zip(values["swap"], got, strict=True):
            assert torch.equal(a, b), name
    # Under megatron DDP the policy is parked in its gradient buffer (no host round trip),
    # which is zero again after the pass.
    assert all(SwapReference._device_stash(p) is not None for p in policy.parameters())
    assert all(not p.main_grad.any() for p in policy.parameters())
    losses = {n: _loss(policy, [dict(mb) for mb in second], r)["loss"] for n, r in refs.items()}
    assert len(set(losses.values())) == 1, losses
    assert losses["swap"] != pytest.approx(math.log(2), abs=1e-3)  # the policy did move


def test_swap_restores_the_policy_even_when_the_forward_fails(dist_ctx):
    policy = T.fresh_model()
    ref = SwapReference(policy, T.FORWARD)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.01)  # the live weights now differ from the reference snapshot
    live = {n: p.detach().clone() for n, p in policy.named_parameters()}
    batch = T.data(PAIRS, [], STEP, mbs=4, gbs=8).train_micro_batches(0)
    ref.logps(batch, split="train")
    for n, p in policy.named_parameters():
        assert torch.equal(p, live[n])

    def boom(model, mb):
        raise RuntimeError("forward failed")

    failing = SwapReference.__new__(SwapReference)
    failing.__dict__.update(ref.__dict__, _forward_fn=boom)
    with pytest.raises(RuntimeError, match="forward failed"):
        failing.logps(batch, split="train")
    for n, p in policy.named_parameters():
        assert torch.equal(p, live[n])
    # Inside the context the reference (initial) weights are live.
    with ref.swapped_in():
        assert not torch.equal(next(policy.parameters()), next(iter(live.values())))


def test_precompute_cache_is_reused_and_keyed(dist_ctx, tmp_path, capsys):
    policy = T.fresh_model()
    said = []
    source = T.data(PAIRS, [], STEP, mbs=4, gbs=8)
    calls = []

    def counting(model, batch):
        calls.append(1)
        return T.FORWARD(model, batch)

    def build(key):
        return precompute_reference(
            policy,
            counting,
            root=tmp_path,
            key=key,
            splits={"train": (len(PAIRS), _epochs(source, 4))},
            writer=True,
            progress=True,
            status=said.append,
            steps={"train": 4},
        )

    first = build({"model": "a"})
    assert len(calls) == 8  # 4 steps × 2 micro-batches: one pass over the 32 pairs
    # Announced once, with its own progress (all 32 rows computed).
    assert len(said) == 1 and said[0].startswith("precomputing reference log-probs")
    assert "reference log-probs (train): 100.0% (4/4 steps)" in capsys.readouterr().err
    batch = source.train_micro_batches(16)
    online = reference_forward(policy, batch, T.FORWARD)
    for a, b in zip(first.logps(batch, split="train"), online, strict=True):
        assert torch.equal(a, b)
    calls.clear()
    again = build({"model": "a"})
    assert calls == [] and again.state() == first.state()  # nothing recomputed
    assert len(said) == 1 and capsys.readouterr().err == ""  # a full cache: nothing to say
    other = build({"model": "b"})
    assert len(calls) == 8 and other.state() != first.state()  # another key, another cache


def test_larger_reference_forward_batches_give_the_same_log_probs(dist_ctx):
    # log_prob_forward_micro_batch_size = 2 training micro-batches per reference forward.
    policy = T.fresh_model()
    batch = T.data(PAIRS, [], STEP, mbs=2, gbs=8).train_micro_batches(0)
    one = reference_forward(policy, batch, T.FORWARD)
    two = reference_forward(policy, batch, T.FORWARD, merge=2)
    assert [t.shape for t in one] == [t.shape for t in two] == [torch.Size([4])] * 4
    for a, b in zip(one, two, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_micro_batches_padded_to_their_own_length_merge_and_score_the_same(dist_ctx):
    # Without pipeline parallelism each micro-batch is padded only to its own longest row; a
    # merged reference forward pads the shorter ones itself. Per-sequence log-probs must equal
    # those of the step-wide padding (padding is unscored and attention is causal).
    policy = T.fresh_model()
    own = T.data(PAIRS, [], STEP, mbs=2, gbs=8, uniform_length=False).train_micro_batches(0)
    step = T.data(PAIRS, [], STEP, mbs=2, gbs=8).train_micro_batches(0)
    lengths = [b["tokens"].shape[-1] for b in own]
    assert len(set(lengths)) > 1, lengths  # the synthetic pairs differ in length
    assert [b["tokens"].shape[-1] for b in step] == [max(lengths)] * 4
    for a, b in zip(own, step, strict=True):
        n = a["tokens"].shape[-1]
        assert torch.equal(a["tokens"], b["tokens"][:, :n])
        assert (b["labels"][:, n:] == -100).all()  # what the step-wide padding adds is unscored
    want = reference_forward(policy, step, T.FORWARD)
    for merge in (1, 2):
        got = reference_forward(policy, own, T.FORWARD, merge=merge)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)

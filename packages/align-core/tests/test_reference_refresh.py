"""Refreshing a reference: soft and hard updates, swap = model, and resume through a checkpoint.

Expected weights are computed here from the two weight sets in float64 (α·p + (1 − α)·r) and
compared with what each strategy holds afterwards (`weights()`), never with the strategy's own
arithmetic.
"""

import pytest
import torch
from _core_scripts import load_tiny

from align_core import Checkpointer
from align_core.algorithms import DPOConfig
from align_core.algorithms.dpo import DPOStep
from align_core.lora import LoraConfig, add_lora, lora_disabled
from align_core.reference import (
    AdapterReference,
    ModelReference,
    PrecomputedReference,
    RefreshableReference,
    SwapReference,
    TrainOnlyReference,
    model_fingerprint,
    refreshable_reference,
)

T = load_tiny()

pytestmark = pytest.mark.usefixtures("one_thread")

PAIRS = T.preference_examples(8)
STEP = DPOStep(DPOConfig(ref_policy_kl_penalty=0.5))


def _weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def _held(reference) -> dict[str, torch.Tensor]:
    with reference.weights() as module:
        return _weights(module)


def _move(policy: torch.nn.Module, seed: int) -> None:
    """Change every policy weight by a seeded random step (stands in for training)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _expected(alpha: float, policy: dict, reference: dict) -> dict[str, torch.Tensor]:
    return {
        n: (alpha * policy[n].double() + (1.0 - alpha) * reference[n].double()).to(policy[n].dtype)
        for n in policy
    }


def _references(seed: int = 1234):
    """A swap and a model reference over two policies with the same initial weights."""
    swap_policy, model_policy = T.fresh_model(seed), T.fresh_model(seed)
    second = T.fresh_model(seed + 7)  # other weights: refreshable_reference copies the policy in
    swap = refreshable_reference("swap", swap_policy, T.FORWARD)
    model = refreshable_reference("model", model_policy, T.FORWARD, reference_model=second)
    return (swap_policy, swap), (model_policy, model)


@pytest.mark.parametrize("strategy", ["swap", "model"])
def test_soft_refresh_is_alpha_policy_plus_one_minus_alpha_reference(dist_ctx, strategy):
    (swap_policy, swap), (model_policy, model) = _references()
    policy, reference = (swap_policy, swap) if strategy == "swap" else (model_policy, model)
    assert isinstance(reference, RefreshableReference)
    initial = _weights(policy)
    assert all(torch.equal(initial[n], w) for n, w in _held(reference).items())
    _move(policy, seed=1)
    moved = _weights(policy)
    reference.refresh(0.3)
    want = _expected(0.3, moved, initial)
    got = _held(reference)
    assert got.keys() == want.keys()
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-6, atol=1e-7, msg=n)
    assert any(not torch.equal(got[n], moved[n]) for n in got)  # not a copy of the policy
    # The policy itself is untouched by a refresh or by taking the reference's weights.
    assert all(torch.equal(p, moved[n]) for n, p in policy.named_parameters())
    # α = 1: exactly the policy's current weights.
    _move(policy, seed=2)
    reference.refresh()
    assert all(
        torch.equal(w, p)
        for w, p in zip(_held(reference).values(), _weights(policy).values(), strict=True)
    )


def test_swap_and_model_references_agree_through_refreshes(dist_ctx):
    (swap_policy, swap), (model_policy, model) = _references()
    batch = T.data(PAIRS, [], STEP, mbs=4, gbs=8).train_micro_batches(0)
    for seed, alpha in ((1, 0.5), (2, 0.1), (3, 1.0), (4, 0.9)):
        _move(swap_policy, seed)
        _move(model_policy, seed)
        swap.refresh(alpha)
        model.refresh(alpha)
        held_swap, held_model = _held(swap), _held(model)
        for n in held_swap:
            assert torch.equal(held_swap[n], held_model[n]), (seed, n)
        for a, b in zip(
            swap.logps(batch, split="train"), model.logps(batch, split="train"), strict=True
        ):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_soft_refresh_of_a_bf16_reference_is_computed_in_fp32(dist_ctx):
    torch.manual_seed(0)
    policy = torch.nn.Linear(64, 64).to(torch.bfloat16)
    reference = SwapReference(policy, T.FORWARD)
    initial = _weights(policy)
    _move(policy, seed=5)
    moved = _weights(policy)
    alpha = 0.37
    reference.refresh(alpha)
    got = _held(reference)
    for n in got:
        assert got[n].dtype == torch.bfloat16
        exact = alpha * moved[n].double() + (1 - alpha) * initial[n].double()
        # One rounding to bf16 of (nearly) the exact value: within half a bf16 ulp of it, plus
        # the float32 intermediate's error.
        ulp = torch.finfo(torch.bfloat16).eps * exact.abs().clamp_min(2.0**-126)
        assert ((got[n].double() - exact).abs() <= 0.5 * ulp + 1e-6 * exact.abs()).all(), n


def test_swap_weights_restore_the_policy_even_after_an_error(dist_ctx):
    policy = T.fresh_model()
    reference = SwapReference(policy, T.FORWARD)
    initial = _weights(policy)
    _move(policy, seed=1)
    live = _weights(policy)
    with pytest.raises(RuntimeError, match="inside"), reference.weights() as module:
        assert all(torch.equal(p, initial[n]) for n, p in module.named_parameters())
        raise RuntimeError("inside")
    assert all(torch.equal(p, live[n]) for n, p in policy.named_parameters())


@pytest.mark.parametrize("strategy", ["swap", "model"])
def test_checkpoint_state_round_trip_restores_a_refreshed_reference(dist_ctx, tmp_path, strategy):
    (swap_policy, swap), (model_policy, model) = _references()
    policy, reference = (swap_policy, swap) if strategy == "swap" else (model_policy, model)
    _move(policy, seed=1)
    reference.refresh(0.25)
    saved_weights = _held(reference)
    saved_state = reference.state()
    checkpointer = Checkpointer(tmp_path / "checkpoints", keep_last=2)
    checkpointer.save(3, policy, extra_models={"reference": reference.checkpoint_state()})

    # A new run: fresh policy and a reference equal to it (the initial weights), then resume.
    resumed_policy = T.fresh_model(99)
    second = T.fresh_model(98) if strategy == "model" else None
    resumed = refreshable_reference(strategy, resumed_policy, T.FORWARD, reference_model=second)
    assert resumed.state() != saved_state
    loaded = checkpointer.load(
        resumed_policy, extra_models={"reference": resumed.checkpoint_state()}
    )
    assert loaded is not None
    held = _held(resumed)
    for n in saved_weights:
        assert torch.equal(held[n], saved_weights[n]), n
    assert all(
        torch.equal(p, w)
        for p, w in zip(resumed_policy.parameters(), _weights(policy).values(), strict=True)
    )
    assert resumed.state() == saved_state  # the fingerprint follows the loaded weights


def test_fingerprint_is_the_model_fingerprint_until_refreshed(dist_ctx):
    policy = T.fresh_model()
    copy = T.fresh_model()
    swap = SwapReference(policy, T.FORWARD)
    model = ModelReference(copy, T.FORWARD, policy=policy)
    first = model_fingerprint(policy)
    assert swap.state() == {"strategy": "swap", "fingerprint": first}
    assert model.state() == {"strategy": "model", "fingerprint": first}
    _move(policy, seed=1)
    assert swap.state()["fingerprint"] == first  # the reference has not moved
    swap.refresh()
    model.refresh()
    assert swap.state()["fingerprint"] == model.state()["fingerprint"] == model_fingerprint(policy)


def test_what_cannot_be_refreshed_says_so(dist_ctx, tmp_path):
    policy = T.fresh_model()
    reference = SwapReference(policy, T.FORWARD)
    for bad in (0.0, -0.5, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"\(0, 1\]"):
            reference.refresh(bad)
    with pytest.raises(RuntimeError, match="without policy="):
        ModelReference(T.fresh_model(), T.FORWARD).refresh()
    with pytest.raises(ValueError, match="names or shapes"):
        lora = T.fresh_model()
        add_lora(lora, LoraConfig(rank=4, alpha=8.0))
        ModelReference(T.fresh_model(), T.FORWARD, policy=lora)
    lora_policy = T.fresh_model()
    add_lora(lora_policy, LoraConfig(rank=4, alpha=8.0))
    with pytest.raises(NotImplementedError, match="swap or model"):
        AdapterReference(lora_policy, T.FORWARD, lora_disabled).refresh()
    with pytest.raises(NotImplementedError, match="swap or model"):
        PrecomputedReference({}, "key").refresh(0.5)
    for strategy in ("precompute", "adapters"):
        with pytest.raises(ValueError, match="swap or model"):
            refreshable_reference(strategy, policy, T.FORWARD)
    with pytest.raises(ValueError, match="reference_model"):
        refreshable_reference("model", policy, T.FORWARD)


def test_train_only_reference_skips_the_forward_outside_training(dist_ctx):
    policy = T.fresh_model()
    inner = SwapReference(policy, T.FORWARD)
    wrapped = TrainOnlyReference(inner)
    batch = T.data(PAIRS, [], STEP, mbs=4, gbs=8).train_micro_batches(0)
    assert wrapped.strategy == "swap" and wrapped.state() == inner.state()
    for a, b in zip(
        wrapped.logps(batch, split="train"), inner.logps(batch, split="train"), strict=True
    ):
        assert torch.equal(a, b)
    zeros = wrapped.logps(batch, split="val")
    assert [z.tolist() for z in zeros] == [[0.0] * 8, [0.0] * 8]

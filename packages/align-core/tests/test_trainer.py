"""The trainer loop on a tiny GPT in one process: normalisation, non-finite steps, packing."""

import math

import pytest
import torch
from _core_scripts import load_tiny

from align_core.algorithms import DPOConfig, SFTConfig
from align_core.algorithms._packed import packed_forward
from align_core.algorithms.dpo import DPOStep
from align_core.algorithms.sft import SFTStep
from align_core.reference import SwapReference
from align_core.trainer import InMemorySink, TrainerConfig
from align_core.trainer.loop import NonFiniteError

T = load_tiny()

PAIRS = T.preference_examples(48)
SFT = T.sft_examples(48)


def _params(trainer):
    return {n: p.detach().clone() for n, p in trainer.model.module.named_parameters()}


def _grads(trainer):
    """The (clipped) gradients of the last step, from megatron DDP's buffers."""
    return {n: p.main_grad.clone() for n, p in trainer.model.module.named_parameters()}


def _same_grads(a, b):
    ga, gb = _grads(a), _grads(b)
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], rtol=1e-4, atol=1e-7)


def _dpo_trainer(mbs, gbs=8, **kwargs):
    policy = T.fresh_model()
    step = DPOStep(DPOConfig(ref_policy_kl_penalty=0.5, sft_loss_weight=0.1))
    ref = SwapReference(policy, T.FORWARD)
    return T.trainer(
        policy, step, T.data(PAIRS, [], step, mbs=mbs, gbs=gbs, **kwargs), reference=ref
    )


def _run(trainer, steps):
    return [trainer.train_step() for _ in range(steps)]


def _train_alike(x, y, steps):
    """Train ``x`` and ``y`` side by side for ``steps`` steps; they must agree at every step.

    The gradients of the first step are equal, and so are every step's loss and gradient norm.

    Returns:
        The step metrics of ``x`` and of ``y``.
    """
    a, b = _run(x, 1), _run(y, 1)
    _same_grads(x, y)
    a, b = a + _run(x, steps - 1), b + _run(y, steps - 1)
    for ma, mb in zip(a, b, strict=True):
        assert ma["loss"] == pytest.approx(mb["loss"], rel=1e-5)
        assert ma["grad_norm"] == pytest.approx(mb["grad_norm"], rel=1e-4)
    return a, b


@pytest.mark.parametrize("algorithm", ["dpo", "sft"])
def test_micro_batch_1_x_accumulation_8_equals_8_x_1(dist_ctx, algorithm):
    def build(mbs):
        if algorithm == "dpo":
            return _dpo_trainer(mbs)
        step = SFTStep(SFTConfig())  # token mean over the global batch
        return T.trainer(T.fresh_model(), step, T.data(SFT, [], step, mbs=mbs, gbs=8))

    a, _ = _train_alike(build(1), build(8), steps=3)
    assert a[0]["consumed_samples"] == 8.0 and a[2]["consumed_samples"] == 24.0


def test_step_metrics_use_nemo_aligner_names(dist_ctx):
    trainer = _dpo_trainer(4)
    metrics = trainer.train_step()
    expected = {
        "loss",
        "preference_loss",
        "sft_loss",
        "acc",
        "rewards_chosen_mean",
        "rewards_rejected_mean",
        "rewards_margin",
        "grad_norm",
        "lr",
        "consumed_samples",
        "epoch",
        "tokens_per_s",
        "step_time",
        "peak_memory",
    }
    assert expected <= set(metrics)
    # Step 0: policy = reference, so the preference loss is ln 2 and no pair is "accurate".
    assert metrics["preference_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert metrics["acc"] == 0.0 and metrics["rewards_margin"] == 0.0
    assert metrics["peak_memory"] > 0 and metrics["tokens_per_s"] > 0


class _NaNAt:
    """Delegates to an algorithm step, making the loss of one step NaN."""

    def __init__(self, inner, step):
        self.inner, self.bad, self.calls = inner, step, 0
        self.name, self.needs_reference, self.ref_shape = inner.name, inner.needs_reference, 2

    def build_micro_batch(self, examples, collate):
        return self.inner.build_micro_batch(examples, collate)

    def normalizer(self, micro_batches, global_examples):
        self.calls += 1
        norm = self.inner.normalizer(micro_batches, global_examples)
        return norm * float("nan") if self.calls == self.bad else norm

    def loss_fn(self, normalizer):
        return self.inner.loss_fn(normalizer)

    def finalize_metrics(self, sums):
        return self.inner.finalize_metrics(sums)


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_nonfinite_loss_stops_naming_the_step_or_is_skipped(dist_ctx, policy):
    model = T.fresh_model()
    step = _NaNAt(DPOStep(DPOConfig()), 2)
    sink = InMemorySink()
    config = TrainerConfig(max_steps=3, val_check_interval=0, save_interval=0, nonfinite=policy)
    trainer = T.trainer(
        model,
        step,
        T.data(PAIRS, [], step, mbs=4, gbs=8),
        reference=SwapReference(model, T.FORWARD),
        config=config,
        sinks=[sink],
    )
    trainer.train_step()
    after_one = _params(trainer)
    if policy == "stop":
        with pytest.raises(NonFiniteError, match="step 2") as err:
            trainer.train_step()
        assert err.value.step == 2
        for name, value in _params(trainer).items():  # the bad update was not applied
            torch.testing.assert_close(value, after_one[name], rtol=0, atol=0)
        return
    assert trainer.fit() == "completed"
    assert trainer.state.step == 3 and trainer.state.skipped_steps == 1
    norms = sink.series("grad_norm")  # steps 2 and 3 were logged by fit()
    assert math.isnan(norms[0]) and math.isfinite(norms[1])
    assert sink.train[-1][1]["skipped_steps"] == 1.0


@pytest.mark.parametrize("algorithm", ["dpo", "ipo", "sft"])
def test_packed_batches_give_the_padded_losses_and_gradients(dist_ctx, algorithm):
    def build(capacity):
        model = T.fresh_model()
        if algorithm == "dpo":
            step = DPOStep(DPOConfig(ref_policy_kl_penalty=0.5, sft_loss_weight=0.2))
            ref, examples = SwapReference(model, T.FORWARD), PAIRS
        elif algorithm == "ipo":  # IPO on token-mean log-probs, its documented convention
            config = DPOConfig(preference_loss="ipo", preference_average_log_probs=True)
            step, ref, examples = DPOStep(config), SwapReference(model, T.FORWARD), PAIRS
        else:
            step, ref, examples = SFTStep(SFTConfig()), None, SFT
        source = T.data(examples, [], step, mbs=4, gbs=8, pack_capacity=capacity)
        trainer = T.trainer(model, step, source, reference=ref, forward=packed_forward(T.FORWARD))
        if capacity is not None:
            batches = source.train_micro_batches(0)
            assert all(
                b["tokens"].shape[0] < 4 * (1 if algorithm == "sft" else 2) for b in batches
            )  # several sequences share a row
        return trainer

    a, b = _train_alike(build(None), build(128), steps=2)
    if algorithm != "sft":
        for ma, mb in zip(a, b, strict=True):
            assert ma["rewards_margin"] == pytest.approx(mb["rewards_margin"], abs=1e-5)


@pytest.mark.parametrize("cause", ["sigterm", "max_time"])
def test_stop_requests_save_at_the_next_step_boundary(dist_ctx, cause):
    from align_core.trainer import StopRequest

    trainer = _dpo_trainer(4)
    saved = []
    trainer._save = lambda step, state: saved.append((step, state)) or f"ckpt-{step}"
    trainer.train_step()
    stop = StopRequest(0.0 if cause == "max_time" else None)
    stop.signalled = cause == "sigterm"
    trainer.stop = stop
    assert trainer.fit() == cause
    assert trainer.state.step == 1  # no further step ran
    assert [s for s, _ in saved] == [1] and saved[0][1]["consumed_samples"] == 8

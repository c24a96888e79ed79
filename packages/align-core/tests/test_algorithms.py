"""Algorithm steps: losses and metrics against hand-derived values (no model, no megatron)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _core_batches import random_batch

from align_core.algorithms import DPOConfig, KTOConfig, SFTConfig
from align_core.algorithms._common import padded_segment_ids, segment_sums
from align_core.algorithms.dpo import DPOStep, dpo_loss_and_metrics
from align_core.algorithms.kto import KTOStep, kto_loss_and_metrics
from align_core.algorithms.sft import SFTStep, sft_loss_and_metrics
from align_data import CollateConfig, PreferenceExample, UnpairedExample


def _batch(num_seqs: int, seed: int = 0, length: int = 7):
    # Prompt/padding positions are ignored; every row keeps at least two scored tokens.
    return random_batch(
        num_seqs, seed=seed, length=length, max_end_trim=3, logp_scale=3, ref_scale=20
    )


def test_segment_sums_match_masked_row_sums():
    batch, tl, mask = _batch(5)
    out = segment_sums(tl, batch["segment_ids"], 5)
    torch.testing.assert_close(out, (tl * mask).sum(-1))
    # Packed layout: two sequences in one row.
    seg = torch.tensor([[0, 0, 1, 1, 1, -1]])
    vals = torch.arange(6.0)[None]
    torch.testing.assert_close(segment_sums(vals, seg, 2), torch.tensor([1.0, 9.0]))


@pytest.mark.parametrize("average", [False, True])
@pytest.mark.parametrize("loss", ["dpo", "cdpo", "ipo", "rpo_sq", "rpo_bwd_kl", "rpo_fwd_kl"])
def test_dpo_family_losses_and_metrics(loss, average):
    b, normalizer, beta, eta = 3, 12.0, 0.3, 0.7
    batch, tl, mask = _batch(2 * b, seed=1)
    batch["chosen_gt_rewards"] = torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64)
    batch["rejected_gt_rewards"] = torch.tensor([0.0, 0.7, -1.0], dtype=torch.float64)
    cfg = DPOConfig(
        ref_policy_kl_penalty=beta,
        preference_loss="dpo" if loss == "cdpo" else loss,
        label_smoothing=0.1 if loss == "cdpo" else 0.0,
        preference_average_log_probs=average,
        sft_loss_weight=0.25,
        gt_reward_scale=eta,
    )
    out, metrics = dpo_loss_and_metrics(cfg, torch.tensor(normalizer), batch, tl)

    counts = mask.sum(-1).double()
    pol = (tl * mask).sum(-1)
    ref = batch["ref_logps"]
    pol_p, ref_p = (pol / counts, ref / counts) if average else (pol, ref)
    rc, rr = pol_p[:b] - ref_p[:b], pol_p[b:] - ref_p[b:]
    d = rc - rr
    target = eta * (batch["chosen_gt_rewards"] - batch["rejected_gt_rewards"])
    if loss == "dpo":
        pref = -F.logsigmoid(beta * d)
    elif loss == "cdpo":
        pref = -0.9 * F.logsigmoid(beta * d) - 0.1 * F.logsigmoid(-beta * d)
    elif loss == "ipo":
        pref = (d - 1 / (2 * beta)) ** 2
    elif loss == "rpo_sq":
        pref = (beta * d - target) ** 2
    else:
        p_model, p_target = torch.sigmoid(beta * d), torch.sigmoid(target)

        def kl(p, q):
            return p * torch.log(p / q) + (1 - p) * torch.log((1 - p) / (1 - q))

        pref = kl(p_target, p_model) if loss == "rpo_bwd_kl" else kl(p_model, p_target)
    sft = -(pol[:b] / counts[:b] if average else pol[:b])
    expected = (pref + 0.25 * sft).sum() / normalizer
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(metrics["preference_loss"], pref.sum().detach())
    torch.testing.assert_close(metrics["sft_loss"], sft.sum().detach())
    assert float(metrics["acc"]) == float((rc > rr).sum())
    torch.testing.assert_close(metrics["rewards_chosen"], (beta * rc).sum().detach())
    # Gradient flows to the policy token log-probs (and only to scored ones).
    out.backward()
    assert tl.grad is not None and torch.all(tl.grad[~mask] == 0)

    final = DPOStep(cfg).finalize_metrics({k: float(v) for k, v in metrics.items()})
    assert math.isclose(final["acc"], float((rc > rr).double().mean()))
    assert math.isclose(
        final["rewards_margin"], float(beta * (rc.mean() - rr.mean()).detach()), rel_tol=1e-9
    )


def test_dpo_at_policy_equals_reference_is_ln2():
    batch, tl, _ = _batch(8, seed=2)
    # The reference pass computes its sums the same way the policy's are computed.
    batch["ref_logps"] = segment_sums(tl, batch["segment_ids"], 8).detach()
    loss, metrics = dpo_loss_and_metrics(DPOConfig(), torch.tensor(4.0), batch, tl)
    assert float(loss.detach()) == pytest.approx(math.log(2), abs=1e-12)
    assert float(metrics["acc"]) == 0.0


def test_micro_batch_split_sums_to_the_global_loss():
    cfg = DPOConfig(ref_policy_kl_penalty=0.5)
    b = 4
    batch, tl, _ = _batch(2 * b, seed=3)
    full, _ = dpo_loss_and_metrics(cfg, torch.tensor(float(b)), batch, tl)
    parts = 0.0
    for i in range(b):
        rows = torch.tensor([i, b + i])
        sub = {
            "labels": batch["labels"][rows],
            "segment_ids": padded_segment_ids(batch["labels"][rows]),
            "seq_token_counts": batch["seq_token_counts"][rows],
            "ref_logps": batch["ref_logps"][rows],
        }
        part, _ = dpo_loss_and_metrics(cfg, torch.tensor(float(b)), sub, tl[rows])
        parts = parts + part
    torch.testing.assert_close(parts, full)


def test_kto_loss_uses_the_kl_baseline_and_weights():
    b, beta, wd, wu = 4, 0.5, 1.5, 0.7
    batch, tl, mask = _batch(2 * b, seed=4)
    batch["desirable"] = torch.tensor([True, False, True, False])
    cfg = KTOConfig(
        ref_policy_kl_penalty=beta, desirable_loss_weight=wd, undesirable_loss_weight=wu
    )
    loss, metrics = kto_loss_and_metrics(cfg, None, torch.tensor(10.0), batch, tl)
    pol = (tl * mask).sum(-1)
    r = pol - batch["ref_logps"]
    z0 = torch.clamp(r[b:].mean(), min=0).detach()
    des = batch["desirable"]
    desirable_loss = wd * (1 - torch.sigmoid(beta * (r[:b] - z0)))
    undesirable_loss = wu * (1 - torch.sigmoid(beta * (z0 - r[:b])))
    per = torch.where(des, desirable_loss, undesirable_loss)
    torch.testing.assert_close(loss, per.sum() / 10.0)
    torch.testing.assert_close(metrics["kl"], z0)
    right = torch.where(des, r[:b] > z0, r[:b] < z0)
    assert float(metrics["acc"]) == float(right.sum())
    final = KTOStep(cfg).finalize_metrics({k: float(v) for k, v in metrics.items()})
    r = r.detach()
    assert math.isclose(final["rewards_chosen_mean"], float(beta * r[:b][des].mean()), rel_tol=1e-9)
    assert math.isclose(
        final["rewards_rejected_mean"], float(beta * r[:b][~des].mean()), rel_tol=1e-9
    )
    loss.backward()
    # The KL samples only set the (detached) baseline: no gradient reaches them.
    assert torch.all(tl.grad[b:] == 0)


def test_kto_micro_batch_of_one_is_an_error():
    step = KTOStep(KTOConfig())
    one = [UnpairedExample(np.array([1, 2]), np.array([3, 4]), True, index=0)]
    with pytest.raises(ValueError, match="at least 2 examples per micro-batch"):
        step.build_micro_batch(one, CollateConfig(pad_id=0))


@pytest.mark.parametrize("reduction", ["token_mean", "sequence_mean"])
def test_sft_reductions(reduction):
    batch, tl, mask = _batch(5, seed=5)
    counts = mask.sum(-1).double()
    nll = -(tl * mask).sum(-1)
    cfg = SFTConfig(loss_reduction=reduction)
    step = SFTStep(cfg)
    norm = step.normalizer([batch], 5)
    loss, metrics = sft_loss_and_metrics(cfg, norm, batch, tl)
    by_tokens = reduction == "token_mean"
    expected = nll.sum() / counts.sum() if by_tokens else (nll / counts).mean()
    torch.testing.assert_close(loss, expected.to(loss.dtype))
    final = step.finalize_metrics({k: float(v) for k, v in metrics.items()})
    assert math.isclose(final["loss"], float(expected), rel_tol=1e-9)


def test_dpo_model_batch_layout_follows_collate():
    step = DPOStep(DPOConfig())
    examples = [
        PreferenceExample(np.array([1, 2, 3]), np.array([4, 5]), np.array([6]), 2.0, 1.0, index=7),
        PreferenceExample(np.array([1]), np.array([8, 9, 10]), np.array([11, 12]), index=3),
    ]
    mb = step.build_micro_batch(examples, CollateConfig(pad_id=0))
    # chosen 0, chosen 1, rejected 0, rejected 1; counts = response lengths.
    assert mb["seq_token_counts"].tolist() == [2.0, 3.0, 1.0, 2.0]
    assert mb["segment_ids"].max(1).values.tolist() == [0, 1, 2, 3]
    assert mb["chosen_gt_rewards"].tolist() == [2.0, 1.0]
    assert mb["rejected_gt_rewards"].tolist() == [1.0, 0.0]
    assert mb["sample_index"].tolist() == [7, 3]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"preference_loss": "not_a_loss"}, "preference_loss"),
        ({"label_smoothing": 0.1, "preference_loss": "ipo"}, "label_smoothing"),
        ({"preference_loss_weight": 0.0, "sft_loss_weight": 0.0}, "both 0"),
        ({"ref_policy_kl_penalty": 0.0}, "kl_penalty"),
    ],
)
def test_dpo_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DPOConfig(**kwargs)

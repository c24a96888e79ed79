"""The DPO step over align-losses' whole preference menu: reference-free objectives, mixtures,
LD-DPO and WPO, against formulas written here (no model, no megatron)."""

import math

import pytest
import torch
import torch.nn.functional as F
from _core_batches import random_batch

from align_core.algorithms import DPOConfig, get_algorithm
from align_core.algorithms.dpo import DPOStep, dpo_loss_and_metrics


def _batch(num_seqs: int, seed: int = 0, length: int = 9, with_ref: bool = True):
    return random_batch(
        num_seqs,
        seed=seed,
        length=length,
        max_end_trim=4,
        logp_scale=2,
        ref_scale=15 if with_ref else None,
    )


@pytest.mark.parametrize(
    ("loss", "reference"),
    [("dpo", True), ("hinge", True), ("simpo", False), ("orpo", False), ("cpo", False)],
)
def test_whether_a_reference_is_needed_follows_the_loss(loss: str, reference: bool) -> None:
    config = DPOConfig(preference_loss=loss)
    assert config.needs_reference is reference
    assert DPOStep(config).needs_reference is reference
    assert get_algorithm("dpo").needs_reference(config) is reference
    mixed = DPOConfig(preference_loss=(loss, "sft"), preference_loss_weights=(1.0, 0.5))
    assert mixed.needs_reference is reference


def test_simpo_needs_no_reference_log_probs_and_matches_its_formula() -> None:
    b, beta, gamma = 3, 2.0, 0.4
    batch, tl, mask = _batch(2 * b, seed=3, with_ref=False)
    cfg = DPOConfig(preference_loss="simpo", ref_policy_kl_penalty=beta, gamma=gamma)
    loss, metrics = dpo_loss_and_metrics(cfg, torch.tensor(float(b)), batch, tl)
    avg = (tl * mask).sum(-1) / mask.sum(-1)
    expected = -F.logsigmoid(beta * (avg[:b] - avg[b:]) - gamma)
    torch.testing.assert_close(loss, expected.sum() / b)
    assert float(metrics["acc"]) == float((avg[:b] > avg[b:]).sum())


def test_orpo_matches_the_odds_ratio_formula() -> None:
    b, lam = 2, 0.25
    batch, tl, mask = _batch(2 * b, seed=4, with_ref=False)
    cfg = DPOConfig(preference_loss="orpo", odds_ratio_weight=lam)
    loss, _ = dpo_loss_and_metrics(cfg, torch.tensor(float(b)), batch, tl)
    avg = (tl * mask).sum(-1) / mask.sum(-1)
    log_odds = avg - torch.log1p(-torch.exp(avg))
    nll = -avg[:b]
    expected = nll - lam * F.logsigmoid(log_odds[:b] - log_odds[b:])
    torch.testing.assert_close(loss, expected.sum() / b)


def test_a_weighted_mixture_is_the_weighted_sum_of_its_parts() -> None:
    b, beta = 3, 0.3
    batch, tl, mask = _batch(2 * b, seed=5)
    cfg = DPOConfig(
        preference_loss=("dpo", "hinge"),
        preference_loss_weights=(0.8, 0.2),
        ref_policy_kl_penalty=beta,
    )
    loss, metrics = dpo_loss_and_metrics(cfg, torch.tensor(float(b)), batch, tl)
    pol = (tl * mask).sum(-1)
    ref = batch["ref_logps"]
    d = (pol[:b] - ref[:b]) - (pol[b:] - ref[b:])
    expected = 0.8 * -F.logsigmoid(beta * d) + 0.2 * torch.relu(1 - beta * d)
    torch.testing.assert_close(loss, expected.sum() / b)
    torch.testing.assert_close(metrics["preference_loss"], expected.sum().detach())


def test_ld_dpo_scales_the_longer_responses_excess_tokens() -> None:
    b, beta, alpha = 3, 0.5, 0.3
    batch, tl, mask = _batch(2 * b, seed=6)
    cfg = DPOConfig(ld_alpha=alpha, ref_policy_kl_penalty=beta)
    loss, _ = dpo_loss_and_metrics(cfg, torch.tensor(float(b)), batch, tl)
    counts = mask.sum(-1)
    policy = []
    for i in range(2 * b):
        scored = tl[i][mask[i]]
        shared = int(min(counts[i % b], counts[b + i % b]))
        policy.append(scored[:shared].sum() + alpha * scored[shared:].sum())
    pol = torch.stack(policy)
    ref = batch["ref_logps"]
    d = (pol[:b] - ref[:b]) - (pol[b:] - ref[b:])
    torch.testing.assert_close(loss, (-F.logsigmoid(beta * d)).sum() / b)
    # ld_alpha = 1 is plain DPO.
    plain, _ = dpo_loss_and_metrics(
        DPOConfig(ref_policy_kl_penalty=beta), torch.tensor(3.0), batch, tl
    )
    one, _ = dpo_loss_and_metrics(
        DPOConfig(ld_alpha=1.0, ref_policy_kl_penalty=beta), torch.tensor(3.0), batch, tl
    )
    torch.testing.assert_close(one, plain)


def test_wpo_weighs_each_pair_by_its_policy_probability() -> None:
    b, beta = 2, 0.2
    batch, tl, mask = _batch(2 * b, seed=7)
    loss, _ = dpo_loss_and_metrics(
        DPOConfig(wpo=True, ref_policy_kl_penalty=beta), torch.tensor(float(b)), batch, tl
    )
    pol = (tl * mask).sum(-1)
    avg = pol / mask.sum(-1)
    weight = torch.exp(avg[:b] + avg[b:]).clamp(max=1.0).detach()
    ref = batch["ref_logps"]
    d = (pol[:b] - ref[:b]) - (pol[b:] - ref[b:])
    torch.testing.assert_close(loss, (weight * -F.logsigmoid(beta * d)).sum() / b)


def test_policy_equal_to_reference_gives_each_objectives_constant() -> None:
    batch, tl, _ = _batch(4, seed=8)
    from align_core.algorithms._common import segment_sums

    batch["ref_logps"] = segment_sums(tl, batch["segment_ids"], 4).detach()
    for loss, constant in (("dpo", math.log(2)), ("hinge", 1.0), ("robust", math.log(2))):
        out, _ = dpo_loss_and_metrics(DPOConfig(preference_loss=loss), torch.tensor(2.0), batch, tl)
        assert float(out) == pytest.approx(constant, abs=1e-12), loss


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"preference_loss": "hinge", "label_smoothing": 0.1}, "model.dpo.label_smoothing"),
        ({"preference_loss": "dpo", "gamma": 0.5}, "model.dpo.gamma applies to none"),
        ({"preference_loss": ("dpo", "sft"), "preference_loss_weights": (1.0,)}, "1 weights"),
        ({"preference_loss": "ipoo"}, "did you mean 'ipo'"),
        ({"ld_alpha": 1.5}, "ld_alpha"),
    ],
)
def test_settings_that_cannot_apply_are_refused(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DPOConfig(**kwargs)


def test_bco_pair_shifts_by_the_running_mean_of_every_training_reward_so_far() -> None:
    """δ after each training micro-batch is the mean of all rewards seen (this micro-batch
    included, TRL's order); validation (no grad) reads δ without moving it; the MPO mixture
    ``0.8·dpo + 0.2·bco_pair`` is the weighted sum of the two formulas."""
    b, beta = 2, 0.5
    cfg = DPOConfig(
        preference_loss=("dpo", "bco_pair"),
        preference_loss_weights=(0.8, 0.2),
        ref_policy_kl_penalty=beta,
    )
    step = DPOStep(cfg)
    seen: list[torch.Tensor] = []
    for seed in (7, 8):
        batch, tl, mask = _batch(2 * b, seed=seed)
        loss, _ = step.loss_fn(torch.tensor(float(b)))(batch, tl)
        logps = (tl * mask).sum(-1)
        rewards = beta * (logps - batch["ref_logps"])
        seen.append(rewards.detach())
        delta = torch.cat(seen).mean()
        a = rewards[:b]
        r = rewards[b:]
        dpo = -F.logsigmoid(a - r)
        bco = -F.logsigmoid(a - delta) - F.logsigmoid(-(r - delta))
        torch.testing.assert_close(loss, (0.8 * dpo + 0.2 * bco).sum() / b)
    saved = step.state_dict()
    assert saved["reward_mean"]["mean"] == pytest.approx(float(torch.cat(seen).mean()))
    assert saved["reward_mean"]["count"] == 4 * b
    with torch.no_grad():
        batch, tl, _ = _batch(2 * b, seed=9)
        step.loss_fn(torch.tensor(float(b)))(batch, tl)
    assert step.state_dict() == saved
    fresh = DPOStep(cfg)
    fresh.load_state_dict(saved)
    assert fresh.state_dict() == saved


def test_bco_pair_starts_at_two_ln2() -> None:
    """Policy = reference: every reward and δ are 0, so ℓ = 2 ln 2 per pair."""
    from align_core.algorithms._common import segment_sums

    batch, tl, _ = _batch(4, seed=10)
    batch["ref_logps"] = segment_sums(tl, batch["segment_ids"], 4).detach()
    step = DPOStep(DPOConfig(preference_loss="bco_pair"))
    loss, _ = step.loss_fn(torch.tensor(2.0))(batch, tl)
    assert float(loss) == pytest.approx(2 * math.log(2), abs=1e-12)

"""``preference_loss``: selection by name, weighted combinations, and its input validation."""

from __future__ import annotations

import math

import pytest
import torch

from align_losses import (
    PREFERENCE_LOSSES,
    bco_reward_mean,
    dpo_loss,
    ipo_loss,
    needs_reference,
    preference_loss,
    preference_loss_parameters,
    rpo_loss,
)

B = 5


def _data(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)

    def rand(scale: float, shift: float = 0.0) -> torch.Tensor:
        return scale * torch.rand(B, generator=gen, dtype=torch.float64) + shift

    lc = torch.randint(2, 9, (B,), generator=gen).double()
    lr = torch.randint(2, 9, (B,), generator=gen).double()
    pc, pr = -lc * rand(1.0, 0.2), -lr * rand(1.0, 0.2)
    return {
        "policy_chosen_logps": pc,
        "policy_rejected_logps": pr,
        "ref_chosen_logps": pc + rand(2.0, -1.0),
        "ref_rejected_logps": pr + rand(2.0, -1.0),
        "chosen_lengths": lc,
        "rejected_lengths": lr,
        "chosen_gt_rewards": rand(3.0),
        "rejected_gt_rewards": rand(3.0),
    }


def _positional(d: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    keys = (
        "policy_chosen_logps",
        "policy_rejected_logps",
        "ref_chosen_logps",
        "ref_rejected_logps",
    )
    return tuple(d[k] for k in keys)


def test_single_names_equal_the_functions() -> None:
    d = _data()
    x = _positional(d)
    assert torch.equal(
        preference_loss("sigmoid", **d, beta=0.3).losses, dpo_loss(*x, beta=0.3).losses
    )
    assert torch.equal(preference_loss("dpo", **d).losses, dpo_loss(*x).losses)
    cdpo = preference_loss("sigmoid", **d, label_smoothing=0.2).losses
    assert torch.equal(cdpo, dpo_loss(*x, label_smoothing=0.2).losses)
    assert torch.equal(preference_loss("ipo", **d, beta=0.5).losses, ipo_loss(*x, beta=0.5).losses)
    gt = (d["chosen_gt_rewards"], d["rejected_gt_rewards"])
    for div in ("sq", "bwd_kl", "fwd_kl"):
        got = preference_loss(f"rpo_{div}", **d, gt_reward_scale=2.0).losses
        assert torch.equal(got, rpo_loss(*x, *gt, gt_reward_scale=2.0, divergence=div).losses)


def test_every_registered_name_runs_on_the_full_data() -> None:
    d = _data(1)
    d["reward_mean"] = torch.tensor(0.1, dtype=torch.float64)
    for name in PREFERENCE_LOSSES:
        out = preference_loss(name, **d)
        assert out.losses.shape == (B,) and torch.isfinite(out.losses).all(), name


def test_weighted_combination_is_the_weighted_sum_of_terms() -> None:
    # MPO: 0.8·sigmoid + 0.2·bco_pair + 1.0·sft, written out by hand from the formulas.
    d = _data(2)
    beta, delta = 0.4, 0.05
    pc, pr, rc, rr = _positional(d)
    pc.requires_grad_()
    out = preference_loss(
        ["sigmoid", "bco_pair", "sft"],
        weights=[0.8, 0.2, 1.0],
        **{**d, "policy_chosen_logps": pc},
        beta=beta,
        reward_mean=torch.tensor(delta, dtype=torch.float64),
    )
    a, b = pc - rc, pr - rr

    def log_sig(x: torch.Tensor) -> torch.Tensor:
        return -torch.log1p(torch.exp(-x))

    sigmoid = -log_sig(beta * (a - b))
    bco = -log_sig(beta * a - delta) - log_sig(-(beta * b - delta))
    sft = -pc / d["chosen_lengths"]
    expected = 0.8 * sigmoid + 0.2 * bco + 1.0 * sft
    torch.testing.assert_close(out.losses, expected, rtol=1e-13, atol=1e-13)
    (got,) = torch.autograd.grad(out.losses.sum(), pc, retain_graph=True)
    (want,) = torch.autograd.grad(expected.sum(), pc)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13)
    # rewards come from the first objective: β(π − π_ref)
    torch.testing.assert_close(out.chosen_rewards, (beta * a).detach())


def test_default_weights_are_one() -> None:
    d = _data(3)
    both = preference_loss(["hinge", "apo_zero"], **d).losses
    torch.testing.assert_close(
        both, preference_loss("hinge", **d).losses + preference_loss("apo_zero", **d).losses
    )


def test_pair_weights_multiply_each_pair_and_are_detached() -> None:
    d = _data(4)
    w = torch.linspace(0.1, 1.0, B, dtype=torch.float64, requires_grad=True)
    out = preference_loss("sigmoid", **d, pair_weights=w)
    torch.testing.assert_close(out.losses, w.detach() * preference_loss("sigmoid", **d).losses)
    assert not out.losses.requires_grad  # nothing else requires grad here: w is detached


def test_bco_pair_with_running_state() -> None:
    d = _data(5)
    beta = 0.2
    state = None
    for step in range(3):
        d = _data(10 + step)
        chosen = beta * (d["policy_chosen_logps"] - d["ref_chosen_logps"])
        rejected = beta * (d["policy_rejected_logps"] - d["ref_rejected_logps"])
        state = bco_reward_mean(state, chosen, rejected)
        out = preference_loss("bco_pair", **d, beta=beta, reward_mean=state.mean)
    # δ after three steps is the mean of all 3·2·B rewards seen.
    seen = []
    for step in range(3):
        d = _data(10 + step)
        seen.append(beta * (d["policy_chosen_logps"] - d["ref_chosen_logps"]))
        seen.append(beta * (d["policy_rejected_logps"] - d["ref_rejected_logps"]))
    assert state is not None
    torch.testing.assert_close(state.mean, torch.cat(seen).mean())
    assert state.count.item() == 3 * 2 * B
    assert torch.isfinite(out.losses).all()


def test_reference_free_objectives_need_no_reference() -> None:
    d = _data(6)
    free = {k: v for k, v in d.items() if not k.startswith("ref_")}
    for name in ("simpo", "alphapo", "cpo", "orpo", "sft"):
        assert not needs_reference(name)
        assert not PREFERENCE_LOSSES[name].needs_reference
        preference_loss(name, **free)
    assert not needs_reference(["simpo", "sft"])
    assert needs_reference(["simpo", "sigmoid"])
    for name in ("sigmoid", "ipo", "hinge", "bco_pair", "forward_kl", "rpo_sq"):
        assert needs_reference(name)


def test_unknown_name_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="unknown preference loss 'sigmod'") as err:
        preference_loss("sigmod", **_data())
    for name in ("sigmoid", "hinge", "simpo", "orpo", "alpha_divergence"):
        assert name in str(err.value)
    with pytest.raises(ValueError, match="valid names"):
        needs_reference(["sigmoid", "kto"])


def test_input_validation() -> None:
    d = _data()
    with pytest.raises(ValueError, match="betta"):
        preference_loss("sigmoid", **d, betta=0.1)
    with pytest.raises(ValueError, match=r"label_smoothing.*apply to none"):
        preference_loss("hinge", **d, label_smoothing=0.1)
    with pytest.raises(ValueError, match="needs"):
        preference_loss("sigmoid", policy_chosen_logps=d["policy_chosen_logps"])
    with pytest.raises(ValueError, match=r"needs.*chosen_lengths"):
        preference_loss("simpo", **{k: v for k, v in d.items() if "lengths" not in k})
    with pytest.raises(ValueError, match="2 weights for 1"):
        preference_loss("sigmoid", weights=[1.0, 2.0], **d)
    with pytest.raises(ValueError, match="finite"):
        preference_loss(["sigmoid", "hinge"], weights=[1.0, math.nan], **d)
    with pytest.raises(ValueError, match="repeat"):
        preference_loss(["sigmoid", "sigmoid"], **d)
    with pytest.raises(ValueError, match="no preference loss"):
        preference_loss([], **d)
    with pytest.raises(ValueError, match="pair_weights"):
        preference_loss("sigmoid", **d, pair_weights=torch.ones(B + 1))
    with pytest.raises(ValueError, match="per-quantile"):
        preference_loss(["sigmoid", "aot"], **d, pair_weights=torch.ones(B))


def test_hyperparameters_are_shared_by_every_selected_loss_that_takes_them() -> None:
    d = _data(7)
    x = _positional(d)
    combined = preference_loss(["sigmoid", "robust"], **d, beta=0.3, label_smoothing=0.1).losses
    from align_losses import robust_loss

    expected = (
        dpo_loss(*x, beta=0.3, label_smoothing=0.1).losses
        + robust_loss(*x, beta=0.3, label_smoothing=0.1).losses
    )
    torch.testing.assert_close(combined, expected)


def test_preference_loss_parameters() -> None:
    assert preference_loss_parameters("hinge") == {"beta"}
    assert preference_loss_parameters(["sigmoid", "discopop"]) == {
        "beta",
        "label_smoothing",
        "discopop_tau",
    }
    assert preference_loss_parameters("rpo_sq") == {"beta", "gt_reward_scale"}
    assert preference_loss_parameters("alpha_divergence") == {
        "beta",
        "divergence_alpha",
        "label_smoothing",
    }
    assert preference_loss_parameters("orpo") == {"odds_ratio_weight"}
    with pytest.raises(ValueError, match="valid names"):
        preference_loss_parameters("nope")

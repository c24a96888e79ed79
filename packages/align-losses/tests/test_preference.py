import math

import pytest
import torch

from align_losses import PreferenceOutput, dpo_loss, ipo_loss, rpo_loss, spin_loss


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def pair(pc: float, pr: float, rc: float, rr: float) -> tuple[torch.Tensor, ...]:
    return tuple(torch.tensor([v], dtype=torch.float64) for v in (pc, pr, rc, rr))


@pytest.mark.parametrize("beta", [0.01, 0.1, 0.5, 1.0, 10.0])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 0.5])
def test_dpo_at_policy_equal_reference_is_ln2(beta: float, label_smoothing: float) -> None:
    gen = torch.Generator().manual_seed(0)
    chosen = -50 * torch.rand(8, generator=gen)
    rejected = -50 * torch.rand(8, generator=gen)
    out = dpo_loss(
        chosen,
        rejected,
        chosen.clone(),
        rejected.clone(),
        beta=beta,
        label_smoothing=label_smoothing,
    )
    assert isinstance(out, PreferenceOutput)
    torch.testing.assert_close(out.losses, torch.full((8,), math.log(2.0)))
    assert torch.equal(out.chosen_rewards, torch.zeros(8))


@pytest.mark.parametrize("delta", [-3.0, -0.5, 0.0, 1.5, 4.0])
def test_dpo_hand_values(delta: float) -> None:
    # Δ = (π_c − ref_c) − (π_r − ref_r) = ((−10 + δ) − (−12)) − ((−20) − (−22)) = δ.
    beta = 0.5
    out = dpo_loss(*pair(-10.0 + delta, -20.0, -12.0, -22.0), beta=beta)
    expected = math.log(1.0 + math.exp(-beta * delta))  # −log σ(βΔ)
    assert out.losses.item() == pytest.approx(expected, abs=1e-12)
    assert out.chosen_rewards.item() == pytest.approx(beta * (2.0 + delta), abs=1e-12)
    assert out.rejected_rewards.item() == pytest.approx(beta * 2.0, abs=1e-12)


def test_cdpo_hand_value_and_gradient() -> None:
    beta, eps, delta = 0.2, 0.15, 3.0
    inputs = [t.requires_grad_() for t in pair(delta, 0.0, 0.0, 0.0)]
    out = dpo_loss(*inputs, beta=beta, label_smoothing=eps)
    x = beta * delta
    expected = -(1 - eps) * math.log(sigmoid(x)) - eps * math.log(sigmoid(-x))
    assert out.losses.item() == pytest.approx(expected, abs=1e-12)
    out.losses.sum().backward()
    # dℓ/dπ_c = β[−(1−ε)(1 − σ(x)) + ε σ(x)], and the opposite for π_r.
    d_chosen = beta * (-(1 - eps) * (1 - sigmoid(x)) + eps * sigmoid(x))
    assert inputs[0].grad.item() == pytest.approx(d_chosen, abs=1e-12)
    assert inputs[1].grad.item() == pytest.approx(-d_chosen, abs=1e-12)
    assert inputs[2].grad is None or torch.all(inputs[2].grad == 0)  # reference is constant


def test_rewards_are_detached() -> None:
    pc = torch.tensor([-3.0], requires_grad=True)
    out = dpo_loss(pc, torch.tensor([-4.0]), torch.tensor([-3.5]), torch.tensor([-4.0]), beta=2.0)
    assert out.losses.requires_grad
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad
    assert out.chosen_rewards.item() == pytest.approx(1.0)


@pytest.mark.parametrize("beta", [0.05, 0.1, 1.0, 3.0])
def test_ipo_at_zero_margin_is_quarter_over_beta_squared(beta: float) -> None:
    out = ipo_loss(*pair(-5.0, -7.0, -6.0, -8.0), beta=beta)  # Δ = 1 − 1 = 0
    assert out.losses.item() == pytest.approx(1.0 / (4.0 * beta**2), rel=1e-12)


def test_ipo_hand_value() -> None:
    # β = 0.25 → target margin 1/(2β) = 2; Δ = 5 → (5 − 2)² = 9.
    out = ipo_loss(*pair(5.0, 0.0, 0.0, 0.0), beta=0.25)
    assert out.losses.item() == pytest.approx(9.0, abs=1e-12)


def bernoulli_kl(a: float, b: float) -> float:
    return a * math.log(a / b) + (1 - a) * math.log((1 - a) / (1 - b))


@pytest.mark.parametrize(
    ("delta", "r_c", "r_r", "eta"), [(2.0, 1.0, 0.0, 1.0), (-1.0, 3.0, 5.0, 0.5)]
)
def test_rpo_hand_values(delta: float, r_c: float, r_r: float, eta: float) -> None:
    beta = 0.7
    logps = pair(delta, 0.0, 0.0, 0.0)
    gt = (torch.tensor([r_c], dtype=torch.float64), torch.tensor([r_r], dtype=torch.float64))
    target = eta * (r_c - r_r)
    model = beta * delta

    def run(div: str) -> float:
        return rpo_loss(*logps, *gt, beta=beta, gt_reward_scale=eta, divergence=div).losses.item()

    assert run("sq") == pytest.approx((model - target) ** 2, abs=1e-12)
    assert run("bwd_kl") == pytest.approx(bernoulli_kl(sigmoid(target), sigmoid(model)), abs=1e-12)
    assert run("fwd_kl") == pytest.approx(bernoulli_kl(sigmoid(model), sigmoid(target)), abs=1e-12)


def test_rpo_is_zero_when_the_implicit_gap_matches_the_target() -> None:
    # βΔ = 0.5·2 = 1 = η(R_c − R_r) = 2·0.5.
    gt = (torch.tensor([0.75]), torch.tensor([0.25]))
    for div in ("sq", "bwd_kl", "fwd_kl"):
        out = rpo_loss(
            *pair(2.0, 0.0, 0.0, 0.0), *gt, beta=0.5, gt_reward_scale=2.0, divergence=div
        )
        assert out.losses.item() == pytest.approx(0.0, abs=1e-7)


def test_spin_is_dpo_with_real_as_chosen() -> None:
    beta = 0.3
    out = spin_loss(*pair(-4.0, -9.0, -5.0, -8.0), beta=beta)  # Δ = 1 − (−1) = 2
    assert out.losses.item() == pytest.approx(-math.log(sigmoid(beta * 2.0)), abs=1e-12)
    assert out.chosen_rewards.item() == pytest.approx(beta * 1.0)
    assert out.rejected_rewards.item() == pytest.approx(beta * -1.0)


def test_half_precision_inputs_give_float32() -> None:
    x = [torch.tensor([-3.0, -1.0], dtype=torch.bfloat16) for _ in range(4)]
    out = dpo_loss(*x)
    assert out.losses.dtype == torch.float32
    torch.testing.assert_close(out.losses, torch.full((2,), math.log(2.0)))


def test_extreme_margins_are_finite() -> None:
    pc = torch.tensor([1e4, -1e4, 0.0], requires_grad=True)
    zeros = torch.zeros(3)
    for fn in (dpo_loss, ipo_loss, spin_loss):
        out = fn(pc, zeros, zeros, zeros, beta=1.0)
        (grad,) = torch.autograd.grad(out.losses.sum(), pc)
        assert torch.isfinite(out.losses).all() and torch.isfinite(grad).all()
    for div in ("sq", "bwd_kl", "fwd_kl"):
        out = rpo_loss(
            pc, zeros, zeros, zeros, torch.tensor([1e3, -1e3, 0.0]), zeros, divergence=div
        )
        (grad,) = torch.autograd.grad(out.losses.sum(), pc)
        assert torch.isfinite(out.losses).all() and torch.isfinite(grad).all()


def test_bad_arguments_raise() -> None:
    x = pair(0.0, 0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(*x, beta=0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(*x, label_smoothing=0.7)
    with pytest.raises(ValueError, match="divergence"):
        rpo_loss(*x, x[0], x[0], divergence="kl")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="one shape"):
        ipo_loss(torch.zeros(2), torch.zeros(3), torch.zeros(2), torch.zeros(2))

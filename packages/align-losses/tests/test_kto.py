import math

import pytest
import torch

from align_losses import KTOOutput, kto_loss


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


@pytest.mark.parametrize(("w_d", "w_u"), [(1.0, 1.0), (1.5, 0.7)])
def test_at_zero_reward_and_zero_baseline_loss_is_half_the_weight(w_d: float, w_u: float) -> None:
    out = kto_loss(
        t(-3.0, -5.0, -2.0),
        t(-3.0, -5.0, -2.0),
        torch.tensor([True, False, True]),
        t(-4.0, -6.0),
        t(-4.0, -6.0),
        beta=0.3,
        desirable_weight=w_d,
        undesirable_weight=w_u,
    )
    assert isinstance(out, KTOOutput)
    assert out.losses.tolist() == pytest.approx([0.5 * w_d, 0.5 * w_u, 0.5 * w_d], abs=1e-12)
    assert out.kl.item() == 0.0


def test_hand_values_with_positive_baseline() -> None:
    beta = 0.5
    # KL samples: ratios 1.0 and 3.0 → z0 = mean = 2.0.
    policy, ref = t(1.0, -2.0), t(0.0, 0.0)  # r = 1, −2
    out = kto_loss(
        policy,
        ref,
        torch.tensor([True, False]),
        t(1.0, 3.0),
        t(0.0, 0.0),
        beta=beta,
        desirable_weight=2.0,
        undesirable_weight=3.0,
    )
    assert out.kl.item() == pytest.approx(2.0)
    expected = [2.0 * (1 - sigmoid(beta * (1.0 - 2.0))), 3.0 * (1 - sigmoid(beta * (2.0 + 2.0)))]
    assert out.losses.tolist() == pytest.approx(expected, abs=1e-12)
    assert out.rewards.tolist() == pytest.approx([beta * 1.0, beta * -2.0])


def test_negative_kl_mean_is_clamped_to_zero() -> None:
    # Ratios +1 and −3: the mean −1 is clamped (clamping each sample first would give 0.5).
    out = kto_loss(t(0.0), t(0.0), torch.tensor([True]), t(1.0, -3.0), t(0.0, 0.0))
    assert out.kl.item() == 0.0
    assert out.losses.item() == pytest.approx(0.5)


def test_gradient_matches_hand_derivative() -> None:
    beta, z0 = 0.4, 1.0
    policy = t(2.0, 0.5).requires_grad_()
    out = kto_loss(policy, t(0.0, 0.0), torch.tensor([True, False]), t(z0), t(0.0), beta=beta)
    out.losses.sum().backward()
    x_d = beta * (2.0 - z0)
    x_u = beta * (z0 - 0.5)
    # d/dr [1 − σ(β(r − z0))] = −β σ(1 − σ); d/dr [1 − σ(β(z0 − r))] = +β σ(1 − σ).
    expected = [-beta * sigmoid(x_d) * (1 - sigmoid(x_d)), beta * sigmoid(x_u) * (1 - sigmoid(x_u))]
    assert policy.grad.tolist() == pytest.approx(expected, abs=1e-12)


def test_no_gradient_through_the_kl_baseline() -> None:
    kl_policy = t(1.0, 2.0).requires_grad_()
    policy = t(0.5).requires_grad_()
    out = kto_loss(policy, t(0.0), torch.tensor([True]), kl_policy, t(0.0, 0.0))
    assert not out.kl.requires_grad and not out.rewards.requires_grad
    out.losses.sum().backward()
    assert kl_policy.grad is None and policy.grad is not None


@pytest.mark.parametrize("flag", [True, False])
def test_single_sided_batches(flag: bool) -> None:
    policy = t(-1.0, 0.5, 2.0).requires_grad_()
    out = kto_loss(policy, t(0.0, 0.0, 0.0), torch.full((3,), flag), t(0.2), t(0.0), beta=1.0)
    assert torch.isfinite(out.losses).all()
    r = [-1.0, 0.5, 2.0]
    sign = 1.0 if flag else -1.0  # desirable: 1 − σ(r − z0); undesirable: 1 − σ(z0 − r)
    expected = [1 - sigmoid(sign * (x - 0.2)) for x in r]
    assert out.losses.tolist() == pytest.approx(expected, abs=1e-12)
    out.losses.sum().backward()
    assert torch.isfinite(policy.grad).all()


def test_empty_batch_and_empty_kl_batch() -> None:
    out = kto_loss(t(), t(), torch.zeros(0, dtype=torch.bool), t(), t())
    assert out.losses.shape == (0,) and out.kl.item() == 0.0
    out = kto_loss(t(1.0), t(0.0), torch.tensor([True]), t(), t(), beta=1.0)
    assert out.kl.item() == 0.0
    assert out.losses.item() == pytest.approx(1 - sigmoid(1.0))


def test_extreme_rewards_are_finite() -> None:
    policy = t(1e4, -1e4, 1e4, -1e4).requires_grad_()
    out = kto_loss(
        policy, t(0, 0, 0, 0), torch.tensor([True, True, False, False]), t(1e4), t(0.0), beta=1.0
    )
    out.losses.sum().backward()
    assert torch.isfinite(out.losses).all() and torch.isfinite(policy.grad).all()


def test_bad_arguments_raise() -> None:
    with pytest.raises(TypeError, match="bool"):
        kto_loss(t(0.0), t(0.0), torch.tensor([1]), t(0.0), t(0.0))
    with pytest.raises(ValueError, match="beta"):
        kto_loss(t(0.0), t(0.0), torch.tensor([True]), t(0.0), t(0.0), beta=-1.0)
    with pytest.raises(ValueError, match="one shape"):
        kto_loss(t(0.0, 1.0), t(0.0), torch.tensor([True]), t(0.0), t(0.0))

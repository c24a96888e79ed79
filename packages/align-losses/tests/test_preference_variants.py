"""DPO-family variants and reference-free objectives against their papers' formulas.

Every objective is compared, in float64, value and gradient, with a formula written here from
the paper (or TRL's documented ``loss_type``) using plain torch ops: probabilities as
``torch.sigmoid``, logs taken of them, likelihood ratios exponentiated; nothing from the package
under test. Then the step-0 invariants: at policy = reference each reference-based loss takes a
known constant.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from align_losses import (
    PreferenceOutput,
    alphapo_loss,
    aot_loss,
    aot_pair_loss,
    apo_down_loss,
    apo_zero_loss,
    bco_pair_loss,
    cpo_loss,
    discopop_loss,
    dpo_loss,
    exo_pair_loss,
    fdpo_loss,
    hinge_loss,
    nca_pair_loss,
    orpo_loss,
    robust_loss,
    sft_loss,
    sigmoid_norm_loss,
    simpo_loss,
    sppo_hard_loss,
)

B = 6
BETA = 0.7


def sig(x: Tensor) -> Tensor:
    return 1.0 / (1.0 + torch.exp(-x))


def log_sig(x: Tensor) -> Tensor:
    return torch.log(sig(x))


# --------------------------------------------------------------------------------------------
# Independent formulas. Arguments: policy/reference chosen/rejected sums, lengths (token counts).


def f_hinge(pc, pr, rc, rr, lc, lr):
    return torch.clamp(1.0 - BETA * ((pc - rc) - (pr - rr)), min=0.0)


def f_robust(pc, pr, rc, rr, lc, lr, eps=0.2):
    x = BETA * ((pc - rc) - (pr - rr))
    return ((1 - eps) * -log_sig(x) - eps * -log_sig(-x)) / (1 - 2 * eps)


def f_exo(pc, pr, rc, rr, lc, lr, eps=0.05):
    p = sig(BETA * ((pc - rc) - (pr - rr)))  # model's P(chosen wins)
    return p * torch.log(p / (1 - eps)) + (1 - p) * torch.log((1 - p) / eps)


def f_nca(pc, pr, rc, rr, lc, lr):
    rw, rl = BETA * (pc - rc), BETA * (pr - rr)
    return -log_sig(rw) - 0.5 * log_sig(-rw) - 0.5 * log_sig(-rl)


def f_bco(pc, pr, rc, rr, lc, lr, delta=0.3):
    rw, rl = BETA * (pc - rc), BETA * (pr - rr)
    return -torch.log(sig(rw - delta)) - torch.log(1 - sig(rl - delta))


def f_sppo(pc, pr, rc, rr, lc, lr):
    return ((pc - rc) - 0.5 / BETA) ** 2 + ((pr - rr) + 0.5 / BETA) ** 2


def _sorted(x: Tensor) -> Tensor:
    # Selection by explicit argmin, one element at a time (differentiable, no torch.sort).
    rest, out = list(range(x.numel())), []
    while rest:
        i = min(rest, key=lambda j: x[j].item())
        out.append(x[i])
        rest.remove(i)
    return torch.stack(out)


def f_aot(pc, pr, rc, rr, lc, lr, eps=0.1):
    d = _sorted(pc - pr) - _sorted(rc - rr)
    return -(1 - eps) * log_sig(BETA * d) - eps * log_sig(-BETA * d)


def f_aot_pair(pc, pr, rc, rr, lc, lr, eps=0.1):
    d = _sorted(pc - rc) - _sorted(pr - rr)
    return -(1 - eps) * log_sig(BETA * d) - eps * log_sig(-BETA * d)


def f_apo_zero(pc, pr, rc, rr, lc, lr):
    return (1 - sig(BETA * (pc - rc))) + sig(BETA * (pr - rr))


def f_apo_down(pc, pr, rc, rr, lc, lr):
    return sig(BETA * (pc - rc)) + (1 - sig(BETA * ((pc - rc) - (pr - rr))))


def f_discopop(pc, pr, rc, rr, lc, lr, tau=0.4):
    x = BETA * ((pc - rc) - (pr - rr))
    m = sig(x / tau)
    return -log_sig(x) * (1 - m) + torch.exp(-x) * m


def f_sigmoid_norm(pc, pr, rc, rr, lc, lr):
    return -log_sig(BETA * ((pc - rc) / lc - (pr - rr) / lr))


# f-DPO: the implicit reward is β f'(u), u = π/π_ref.
def _fdpo(f_prime: Callable[[Tensor], Tensor]):
    def loss(pc, pr, rc, rr, lc, lr):
        uw, ul = torch.exp(pc - rc), torch.exp(pr - rr)
        return -log_sig(BETA * (f_prime(uw) - f_prime(ul)))

    return loss


ALPHA_DIV = 0.3
f_reverse_kl = _fdpo(lambda u: torch.log(u) + 1)  # f(u) = u log u
f_forward_kl = _fdpo(lambda u: -1 / u)  # f(u) = −log u
f_js = _fdpo(lambda u: torch.log(2 * u / (1 + u)))  # f(u) = u log u − (1+u) log((1+u)/2)
f_alpha = _fdpo(lambda u: (1 - u ** (-ALPHA_DIV)) / ALPHA_DIV)


def f_simpo(pc, pr, rc, rr, lc, lr, beta=2.5, gamma=1.4):
    return -log_sig(beta / lc * pc - beta / lr * pr - gamma)


def f_alphapo(pc, pr, rc, rr, lc, lr, beta=2.5, gamma=1.4, alpha=0.3):
    def reward(logp, n):  # −(β/α)(P^(−α/|y|) − 1), P = exp(logp)
        return -(beta / alpha) * (torch.exp(logp) ** (-alpha / n) - 1)

    return -log_sig(reward(pc, lc) - reward(pr, lr) - gamma)


def f_cpo(pc, pr, rc, rr, lc, lr, lam=0.6):
    return -log_sig(BETA * (pc - pr)) + lam * (-pc / lc)


def f_orpo(pc, pr, rc, rr, lc, lr, lam=0.25):
    pw, pl = torch.exp(pc / lc), torch.exp(pr / lr)
    odds_w, odds_l = pw / (1 - pw), pl / (1 - pl)
    return -pc / lc - lam * log_sig(torch.log(odds_w / odds_l))


def f_sft(pc, pr, rc, rr, lc, lr):
    return -pc / lc


def _ref(fn):
    def call(pc, pr, rc, rr, lc, lr, **kw):
        return fn(pc, pr, rc, rr, **kw)

    return call


def _lens(fn):
    def call(pc, pr, rc, rr, lc, lr, **kw):
        return fn(pc, pr, rc, rr, lc, lr, **kw)

    return call


def _free(fn, *, rejected_lengths=True):
    def call(pc, pr, rc, rr, lc, lr, **kw):
        if rejected_lengths:
            return fn(pc, pr, lc, lr, **kw)
        return fn(pc, pr, lc, **kw)

    return call


# name: (implementation adapter, keyword arguments, independent formula)
CASES: dict[str, tuple[Callable[..., PreferenceOutput], dict, Callable[..., Tensor]]] = {
    "hinge": (_ref(hinge_loss), {"beta": BETA}, f_hinge),
    "robust": (_ref(robust_loss), {"beta": BETA, "label_smoothing": 0.2}, f_robust),
    "exo_pair": (_ref(exo_pair_loss), {"beta": BETA, "label_smoothing": 0.05}, f_exo),
    "nca_pair": (_ref(nca_pair_loss), {"beta": BETA}, f_nca),
    "bco_pair": (_ref(bco_pair_loss), {"beta": BETA, "reward_mean": 0.3}, f_bco),
    "sppo_hard": (_ref(sppo_hard_loss), {"beta": BETA}, f_sppo),
    "aot": (_ref(aot_loss), {"beta": BETA, "label_smoothing": 0.1}, f_aot),
    "aot_pair": (_ref(aot_pair_loss), {"beta": BETA, "label_smoothing": 0.1}, f_aot_pair),
    "apo_zero": (_ref(apo_zero_loss), {"beta": BETA}, f_apo_zero),
    "apo_down": (_ref(apo_down_loss), {"beta": BETA}, f_apo_down),
    "discopop": (_ref(discopop_loss), {"beta": BETA, "discopop_tau": 0.4}, f_discopop),
    "sigmoid_norm": (_lens(sigmoid_norm_loss), {"beta": BETA}, f_sigmoid_norm),
    "reverse_kl": (_ref(fdpo_loss), {"beta": BETA, "divergence": "reverse_kl"}, f_reverse_kl),
    "forward_kl": (_ref(fdpo_loss), {"beta": BETA, "divergence": "forward_kl"}, f_forward_kl),
    "js_divergence": (_ref(fdpo_loss), {"beta": BETA, "divergence": "js_divergence"}, f_js),
    "alpha_divergence": (
        _ref(fdpo_loss),
        {"beta": BETA, "divergence": "alpha_divergence", "divergence_alpha": ALPHA_DIV},
        f_alpha,
    ),
    "simpo": (_free(simpo_loss), {"beta": 2.5, "gamma": 1.4}, f_simpo),
    "alphapo": (_free(alphapo_loss), {"beta": 2.5, "gamma": 1.4, "alpha": 0.3}, f_alphapo),
    "cpo": (
        _free(cpo_loss, rejected_lengths=False),
        {"beta": BETA, "nll_weight": 0.6},
        f_cpo,
    ),
    "orpo": (_free(orpo_loss), {"odds_ratio_weight": 0.25}, f_orpo),
    "sft": (_free(sft_loss), {}, f_sft),
}


def _inputs(seed: int) -> tuple[Tensor, ...]:
    """Summed log-probs of responses of 3-12 tokens, references within ±1.5 nats of the policy."""
    gen = torch.Generator().manual_seed(seed)
    lc = torch.randint(3, 13, (B,), generator=gen).double()
    lr = torch.randint(3, 13, (B,), generator=gen).double()
    pc = -lc * (0.3 + 1.2 * torch.rand(B, generator=gen, dtype=torch.float64))
    pr = -lr * (0.3 + 1.2 * torch.rand(B, generator=gen, dtype=torch.float64))
    rc = pc + 3 * torch.rand(B, generator=gen, dtype=torch.float64) - 1.5
    rr = pr + 3 * torch.rand(B, generator=gen, dtype=torch.float64) - 1.5
    return pc, pr, rc, rr, lc, lr


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("seed", [0, 1])
def test_value_and_gradient_match_the_formula(name: str, seed: int) -> None:
    impl, kwargs, formula = CASES[name]
    pc, pr, rc, rr, lc, lr = _inputs(seed)
    pc, pr = pc.requires_grad_(), pr.requires_grad_()
    out = impl(pc, pr, rc, rr, lc, lr, **kwargs)
    expected = formula(pc, pr, rc, rr, lc, lr)
    assert out.losses.dtype == torch.float64 and out.losses.shape == (B,)
    torch.testing.assert_close(out.losses, expected, rtol=1e-12, atol=1e-12)
    upstream = torch.linspace(0.5, 1.5, B, dtype=torch.float64)
    grad = dict(allow_unused=True, materialize_grads=True)  # sft ignores the rejected response
    got = torch.autograd.grad((out.losses * upstream).sum(), (pc, pr), **grad)
    want = torch.autograd.grad((expected * upstream).sum(), (pc, pr), **grad)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad


@pytest.mark.parametrize("name", list(CASES))
def test_gradcheck(name: str) -> None:
    impl, kwargs, _ = CASES[name]
    pc, pr, rc, rr, lc, lr = _inputs(3)

    def fn(pc: Tensor, pr: Tensor) -> Tensor:
        return impl(pc, pr, rc, rr, lc, lr, **kwargs).losses

    assert torch.autograd.gradcheck(fn, (pc.requires_grad_(), pr.requires_grad_()))


def test_reference_gets_no_gradient() -> None:
    pc, pr, rc, rr, lc, lr = _inputs(4)
    rc, rr = rc.requires_grad_(), rr.requires_grad_()
    for name, (impl, kwargs, _) in CASES.items():
        out = impl(pc.requires_grad_(), pr.requires_grad_(), rc, rr, lc, lr, **kwargs)
        assert out.losses.grad_fn is not None, name
        grads = torch.autograd.grad(out.losses.sum(), (rc, rr), allow_unused=True)
        assert all(g is None or torch.all(g == 0) for g in grads), name


# --------------------------------------------------------------------------------------------
# Step-0 invariants: policy = reference.

LN2 = math.log(2.0)
STEP0: dict[str, tuple[Callable[..., PreferenceOutput], dict, Callable[[float], float]]] = {
    "hinge": (hinge_loss, {}, lambda beta: 1.0),
    "robust": (robust_loss, {"label_smoothing": 0.3}, lambda beta: LN2),
    "exo_pair": (
        exo_pair_loss,
        {"label_smoothing": 0.01},
        lambda beta: -LN2 - 0.5 * math.log(0.01 * 0.99),
    ),
    "nca_pair": (nca_pair_loss, {}, lambda beta: 2 * LN2),
    "bco_pair": (bco_pair_loss, {"reward_mean": 0.0}, lambda beta: 2 * LN2),
    "sppo_hard": (sppo_hard_loss, {}, lambda beta: 1 / (2 * beta**2)),
    "aot": (aot_loss, {"label_smoothing": 0.2}, lambda beta: LN2),
    "aot_pair": (aot_pair_loss, {}, lambda beta: LN2),
    "apo_zero": (apo_zero_loss, {}, lambda beta: 1.0),
    "apo_down": (apo_down_loss, {}, lambda beta: 1.0),
    "discopop": (discopop_loss, {}, lambda beta: (1 + LN2) / 2),
    "forward_kl": (fdpo_loss, {"divergence": "forward_kl"}, lambda beta: LN2),
    "js_divergence": (fdpo_loss, {"divergence": "js_divergence"}, lambda beta: LN2),
    "alpha_divergence": (fdpo_loss, {"divergence": "alpha_divergence"}, lambda beta: LN2),
}


@pytest.mark.parametrize("name", list(STEP0))
@pytest.mark.parametrize("beta", [0.05, 0.5, 3.0])
def test_policy_equal_reference_gives_the_known_constant(name: str, beta: float) -> None:
    fn, kwargs, constant = STEP0[name]
    gen = torch.Generator().manual_seed(5)
    chosen = -40 * torch.rand(B, generator=gen, dtype=torch.float64)
    rejected = -40 * torch.rand(B, generator=gen, dtype=torch.float64)
    out = fn(chosen, rejected, chosen.clone(), rejected.clone(), beta=beta, **kwargs)
    torch.testing.assert_close(out.losses, torch.full((B,), constant(beta), dtype=torch.float64))
    assert torch.equal(out.chosen_rewards, torch.zeros(B, dtype=torch.float64))


def test_sigmoid_norm_at_policy_equal_reference_is_ln2() -> None:
    x = -torch.rand(B, dtype=torch.float64) * 20
    n = torch.arange(1, B + 1, dtype=torch.float64)
    out = sigmoid_norm_loss(x, x.flip(0), x.clone(), x.flip(0).clone(), n, n.flip(0))
    torch.testing.assert_close(out.losses, torch.full((B,), LN2, dtype=torch.float64))


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_reference_free_at_equal_average_log_probs(gamma: float) -> None:
    # Chosen 4 tokens at −8, rejected 2 tokens at −4: both average −2.
    pc, pr = torch.tensor([-8.0], dtype=torch.float64), torch.tensor([-4.0], dtype=torch.float64)
    lc, lr = torch.tensor([4.0]), torch.tensor([2.0])
    softplus_gamma = math.log1p(math.exp(gamma))
    simpo = simpo_loss(pc, pr, lc, lr, beta=2.0, gamma=gamma).losses.item()
    assert simpo == pytest.approx(softplus_gamma, abs=1e-12)
    alphapo = alphapo_loss(pc, pr, lc, lr, gamma=gamma, alpha=0.5).losses.item()
    assert alphapo == pytest.approx(softplus_gamma, abs=1e-12)
    # ORPO: equal odds → −avg_c + λ ln 2.
    orpo = orpo_loss(pc, pr, lc, lr, odds_ratio_weight=0.3).losses.item()
    assert orpo == pytest.approx(2.0 + 0.3 * LN2, abs=1e-12)
    # CPO with equal sums: ln 2 + λ·(token-mean NLL).
    cpo = cpo_loss(pc, pc.clone(), lc, nll_weight=0.5).losses.item()
    assert cpo == pytest.approx(LN2 + 0.5 * 2.0, abs=1e-12)


def test_alphapo_at_alpha_zero_is_simpo() -> None:
    pc, pr, _, _, lc, lr = _inputs(6)
    a = alphapo_loss(pc, pr, lc, lr, beta=2.0, gamma=0.7, alpha=0.0)
    s = simpo_loss(pc, pr, lc, lr, beta=2.0, gamma=0.7)
    assert torch.equal(a.losses, s.losses) and torch.equal(a.chosen_rewards, s.chosen_rewards)
    # and the α → 0 limit is continuous
    near = alphapo_loss(pc, pr, lc, lr, beta=2.0, gamma=0.7, alpha=1e-7)
    torch.testing.assert_close(near.losses, s.losses, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Label smoothing: signs and the ε = 0 limit.


def test_zero_smoothing_reproduces_dpo_exactly() -> None:
    pc, pr, rc, rr, _, _ = _inputs(7)
    dpo = dpo_loss(pc, pr, rc, rr, beta=BETA)
    assert torch.equal(dpo_loss(pc, pr, rc, rr, beta=BETA, label_smoothing=0.0).losses, dpo.losses)
    assert torch.equal(robust_loss(pc, pr, rc, rr, beta=BETA).losses, dpo.losses)
    reverse = fdpo_loss(pc, pr, rc, rr, beta=BETA, divergence="reverse_kl")
    assert torch.equal(reverse.losses, dpo.losses)
    expected = torch.log1p(torch.exp(-BETA * ((pc - rc) - (pr - rr))))  # −log σ(βΔ)
    torch.testing.assert_close(dpo.losses, expected, rtol=1e-13, atol=0)


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3, 0.45])
def test_gradient_sign_at_margin_zero(eps: float) -> None:
    # d ℓ / d(βΔ) at Δ = 0: cDPO −(1 − 2ε)/2 (weaker push as ε grows, never reversed for
    # ε < 0.5); rDPO −1/(2(1 − 2ε)) (stronger push: the unbiased correction).
    beta = 1.0
    zero = torch.zeros(1, dtype=torch.float64)
    for fn, expected in (
        (dpo_loss, -(1 - 2 * eps) / 2),
        (robust_loss, -1 / (2 * (1 - 2 * eps))),
    ):
        pc = zero.clone().requires_grad_()
        fn(pc, zero, zero, zero, beta=beta, label_smoothing=eps).losses.sum().backward()
        assert pc.grad.item() == pytest.approx(expected, abs=1e-14)
        assert pc.grad.item() < 0  # always pushes the chosen response up at a zero margin


def test_cdpo_at_half_smoothing_has_no_gradient_at_zero_margin() -> None:
    pc = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    zero = torch.zeros(1, dtype=torch.float64)
    dpo_loss(pc, zero, zero, zero, label_smoothing=0.5).losses.sum().backward()
    assert pc.grad.item() == 0.0


def test_exo_pair_is_minimised_at_the_smoothed_target() -> None:
    # KL(Bern(σ(βΔ)) ‖ Bern(1 − ε)) is 0 where σ(βΔ) = 1 − ε.
    eps, beta = 0.1, 0.5
    delta = math.log((1 - eps) / eps) / beta
    pc = torch.tensor([delta], dtype=torch.float64)
    zero = torch.zeros(1, dtype=torch.float64)
    loss = exo_pair_loss(pc, zero, zero, zero, beta=beta, label_smoothing=eps).losses.item()
    assert loss == pytest.approx(0.0, abs=1e-14)


# --------------------------------------------------------------------------------------------
# Numerics, shapes and argument checks.


def test_extreme_margins_are_finite() -> None:
    pc = torch.tensor([1e4, -1e4, 0.0, 300.0, -300.0], requires_grad=True)
    zeros = torch.zeros(5)
    lengths = torch.full((5,), 50.0)
    for name, (impl, kwargs, _) in CASES.items():
        kwargs = {**kwargs, "beta": 1.0} if "beta" in kwargs else kwargs
        out = impl(pc, zeros, zeros, zeros, lengths, lengths, **kwargs)
        (grad,) = torch.autograd.grad(out.losses.sum(), pc)
        assert not torch.isnan(out.losses).any(), name
        assert not torch.isnan(grad).any(), name
        if name not in ("forward_kl", "alpha_divergence", "sppo_hard"):
            assert torch.isfinite(out.losses).all(), name


def test_half_precision_inputs_give_float32() -> None:
    x = [torch.tensor([-3.0, -1.0], dtype=torch.bfloat16) for _ in range(4)]
    n = torch.tensor([2, 3])
    for name, (impl, kwargs, _) in CASES.items():
        assert impl(*x, n, n, **kwargs).losses.dtype == torch.float32, name


def test_bad_arguments_raise() -> None:
    x = [torch.zeros(2) for _ in range(4)]
    with pytest.raises(ValueError, match="label_smoothing"):
        robust_loss(*x, label_smoothing=0.5)
    with pytest.raises(ValueError, match="label_smoothing"):
        exo_pair_loss(*x, label_smoothing=0.0)
    with pytest.raises(ValueError, match="divergence"):
        fdpo_loss(*x, divergence="hellinger")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="divergence_alpha"):
        fdpo_loss(*x, divergence="alpha_divergence", divergence_alpha=0.0)
    with pytest.raises(ValueError, match="discopop_tau"):
        discopop_loss(*x, discopop_tau=0.0)
    with pytest.raises(ValueError, match="beta"):
        hinge_loss(*x, beta=-1.0)
    with pytest.raises(ValueError, match="one shape"):
        simpo_loss(torch.zeros(2), torch.zeros(2), torch.ones(3), torch.ones(2))
    with pytest.raises(ValueError, match="odds_ratio_weight"):
        orpo_loss(*x, odds_ratio_weight=-1.0)

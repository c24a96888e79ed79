"""Generalised JSD, skewed KLs and token weights in `topk_kd_loss` and `full_vocab_kd_loss`.

The references below are written in probability space, straight from the papers' formulas:
full softmax, mixtures as ``β·p + (1 − β)·q`` of probabilities, KL as ``Σ a·log(a / b)``.
"""

import itertools
import math

import pytest
import torch
from _losses_reference import SavedTensorBytes, assert_close_with_grad, assert_zero_with_grad
from torch import Tensor

from align_losses import full_vocab_kd_loss, topk_kd_loss
from align_losses.distill import _FullVocabDivergence

# (divergence, beta, skew)
SETTINGS = [
    ("forward_kl", 0.5, 0.1),
    ("reverse_kl", 0.5, 0.1),
    ("jsd", 0.1, 0.1),
    ("jsd", 0.5, 0.1),
    ("jsd", 0.9, 0.1),
    ("skew_forward_kl", 0.5, 0.1),
    ("skew_forward_kl", 0.5, 0.6),
    ("skew_reverse_kl", 0.5, 0.1),
    ("skew_reverse_kl", 0.5, 0.6),
]
MIXTURES = [s for s in SETTINGS if s[0] not in ("forward_kl", "reverse_kl")]


def kl(a: Tensor, b: Tensor) -> Tensor:
    """Σ a·log(a / b) with 0·log 0 = 0."""
    terms = a * (a.log() - b.log())
    return torch.where(a > 0, terms, torch.zeros_like(terms)).sum(-1)


def naive_divergence(p: Tensor, q: Tensor, divergence: str, beta: float, skew: float) -> Tensor:
    if divergence == "forward_kl" or (divergence == "jsd" and beta == 0):
        return kl(p, q)
    if divergence == "reverse_kl" or (divergence == "jsd" and beta == 1):
        return kl(q, p)
    if divergence == "jsd":
        m = beta * p + (1 - beta) * q
        return beta * kl(p, m) + (1 - beta) * kl(q, m)
    if divergence == "skew_forward_kl":
        return kl(p, skew * p + (1 - skew) * q)
    return kl(q, (1 - skew) * p + skew * q)


def topk_distributions(
    student: Tensor,
    values: Tensor,
    ids: Tensor,
    *,
    student_scale: float = 1.0,
    teacher_scale: float = 1.0,
    lse: Tensor | None = None,
    cross: bool = False,
) -> tuple[Tensor, Tensor]:
    """The teacher's p and the student's q over the K (or K + 1) classes, by full softmax."""
    scaled = student_scale * student
    if cross:
        ids = scaled.detach().topk(values.shape[-1], dim=-1).indices
        values = values.sort(dim=-1, descending=True).values
    if lse is None:
        q = torch.softmax(scaled.gather(-1, ids), dim=-1)
        p = torch.softmax(teacher_scale * values, dim=-1)
        return p, q
    q_ids = torch.softmax(scaled, dim=-1).gather(-1, ids)
    p_ids = torch.exp(values - lse.unsqueeze(-1))
    q = torch.cat([q_ids, 1 - q_ids.sum(-1, keepdim=True)], dim=-1)
    p = torch.cat([p_ids, 1 - p_ids.sum(-1, keepdim=True)], dim=-1)
    return p, q


def make_case(n: int = 6, vocab: int = 17, k: int = 4, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(n, vocab, generator=gen, dtype=torch.float64) * 2
    teacher = torch.randn(n, vocab, generator=gen, dtype=torch.float64) * 2
    values, ids = teacher.topk(k, dim=-1)
    return student, teacher, values, ids, teacher.logsumexp(-1)


def grad_of(out: Tensor, x: Tensor, weights: Tensor) -> Tensor:
    return torch.autograd.grad((out * weights).sum(), x)[0]


# ----------------------------------------------------------------------------- top-K


@pytest.mark.parametrize(("divergence", "beta", "skew"), SETTINGS)
@pytest.mark.parametrize("tail", [False, True])
@pytest.mark.parametrize("cross", [False, True])
def test_topk_matches_naive(divergence, beta, skew, tail, cross, small_chunks) -> None:
    student, _, values, ids, lse = make_case(seed=11)
    student.requires_grad_()
    scales = dict(student_scale=0.8, teacher_scale=1.0 if tail else 1.3)
    lse = lse if tail else None
    out = topk_kd_loss(
        student,
        values,
        None if cross else ids,
        divergence=divergence,
        beta=beta,
        skew=skew,
        teacher_logsumexp=lse,
        cross_tokenizer=cross,
        **scales,
    )
    p, q = topk_distributions(student, values, ids, lse=lse, cross=cross, **scales)
    ref = naive_divergence(p, q, divergence, beta, skew)
    weights = torch.rand(student.shape[0], dtype=torch.float64)
    assert_close_with_grad(out, ref, student, weights, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("tail", [False, True])
def test_topk_endpoints_are_the_plain_kls_exactly(tail: bool) -> None:
    student, _, values, ids, lse = make_case(seed=12)
    lse = lse if tail else None

    def loss(divergence: str, **kw: float) -> Tensor:
        return topk_kd_loss(
            student, values, ids, divergence=divergence, teacher_logsumexp=lse, **kw
        )

    forward, reverse = loss("forward_kl"), loss("reverse_kl")
    assert (forward > 0).all() and (reverse > 0).all()
    assert torch.equal(loss("jsd", beta=0.0), forward)
    assert torch.equal(loss("jsd", beta=1.0), reverse)
    assert torch.equal(loss("skew_forward_kl", skew=0.0), forward)
    assert torch.equal(loss("skew_reverse_kl", skew=0.0), reverse)
    # Near the endpoints the generalised JSD is ~β·forward KL and ~(1 − β)·reverse KL.
    beta = 1e-6
    torch.testing.assert_close(loss("jsd", beta=beta) / beta, forward, rtol=1e-4, atol=0)
    torch.testing.assert_close(loss("jsd", beta=1 - beta) / beta, reverse, rtol=1e-4, atol=0)


@pytest.mark.parametrize(("divergence", "beta", "skew"), SETTINGS)
@pytest.mark.parametrize("tail", [False, True])
def test_topk_identical_distributions_give_zero(divergence, beta, skew, tail) -> None:
    student, teacher, values, ids, lse = make_case(seed=13)
    # Tail: the student's full logits are the teacher's (equal over the K + 1 classes too);
    # K-way: equal at the K ids, so the renormalised distributions coincide.
    student = teacher.clone() if tail else student.scatter(-1, ids, values)
    student.requires_grad_()
    out = topk_kd_loss(
        student,
        values,
        ids,
        divergence=divergence,
        beta=beta,
        skew=skew,
        teacher_logsumexp=lse if tail else None,
    )
    assert_zero_with_grad(out, student, atol=1e-12)


def test_topk_jsd_is_symmetric_at_one_half() -> None:
    # K-way: p = softmax(t), q = softmax(z[ids]); swapping them swaps teacher and student.
    student, _, values, ids, _ = make_case(seed=14)
    swapped_student = student.scatter(-1, ids, values)
    swapped_values = student.gather(-1, ids)
    a = topk_kd_loss(student, values, ids, divergence="jsd", beta=0.5)
    b = topk_kd_loss(swapped_student, swapped_values, ids, divergence="jsd", beta=0.5)
    assert (a > 0).all()
    torch.testing.assert_close(a, b, atol=1e-14, rtol=1e-12)


def test_topk_token_weights_multiply_the_per_token_loss() -> None:
    student, _, values, ids, lse = make_case(seed=15)
    student = student.reshape(2, 3, -1).requires_grad_()
    values, ids, lse = values.reshape(2, 3, -1), ids.reshape(2, 3, -1), lse.reshape(2, 3)
    weights = torch.tensor([[0.0, 1.0, 2.5], [0.3, 0.0, 1.0]], dtype=torch.float64)
    kwargs = dict(divergence="jsd", beta=0.3, teacher_logsumexp=lse)
    plain = topk_kd_loss(student, values, ids, **kwargs)
    weighted = topk_kd_loss(student, values, ids, token_weights=weights, **kwargs)
    torch.testing.assert_close(weighted, plain * weights, atol=0, rtol=0)
    ones = torch.ones_like(weights)
    torch.testing.assert_close(
        grad_of(weighted, student, ones), grad_of(plain, student, weights), atol=1e-14, rtol=0
    )


# ----------------------------------------------------------------------- full vocabulary


def naive_full(
    student: Tensor,
    teacher: Tensor,
    divergence: str,
    beta: float,
    skew: float,
    student_scale: float = 1.0,
    teacher_scale: float = 1.0,
) -> Tensor:
    p = torch.softmax(teacher_scale * teacher, dim=-1)
    q = torch.softmax(student_scale * student, dim=-1)
    return naive_divergence(p, q, divergence, beta, skew)


@pytest.mark.parametrize(("divergence", "beta", "skew"), SETTINGS)
@pytest.mark.parametrize("scales", [(1.0, 1.0), (0.7, 1.6)])
def test_full_vocab_matches_naive(divergence, beta, skew, scales, small_chunks) -> None:
    gen = torch.Generator().manual_seed(21)
    # Non-contiguous [B, T, V] slices, as for logits[:, :-1] of a batch; the teacher's layout
    # differs from the student's in one of the two cases.
    student_full = torch.randn(2, 5, 13, generator=gen, dtype=torch.float64) * 2
    teacher_full = torch.randn(2, 5, 13, generator=gen, dtype=torch.float64) * 2
    student = student_full[:, :-1].detach().requires_grad_()
    s_s, s_t = scales
    teacher = teacher_full[:, 1:] if s_s == 1.0 else teacher_full[:, 1:].contiguous()
    kwargs = dict(divergence=divergence, beta=beta, skew=skew)
    out = full_vocab_kd_loss(student, teacher, student_scale=s_s, teacher_scale=s_t, **kwargs)
    ref = naive_full(student, teacher, student_scale=s_s, teacher_scale=s_t, **kwargs)
    assert out.shape == (2, 4)
    weights = torch.rand(2, 4, generator=gen, dtype=torch.float64)
    assert_close_with_grad(out, ref, student, weights, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize(
    "kind", ["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl"]
)
def test_full_vocab_gradcheck(kind: str, small_chunks: int) -> None:
    gen = torch.Generator().manual_seed(22)
    student = torch.randn(3, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(3, 7, generator=gen, dtype=torch.float64)
    lam = 0.3

    def fn(z: Tensor) -> Tensor:
        return _FullVocabDivergence.apply(z, teacher, kind, lam, 0.9, 1.2, None)

    assert torch.autograd.gradcheck(fn, (student,))


def test_full_vocab_endpoints_are_the_plain_kls_exactly() -> None:
    gen = torch.Generator().manual_seed(23)
    student = torch.randn(5, 11, generator=gen)
    teacher = torch.randn(5, 11, generator=gen)

    def loss(divergence: str, **kw: float) -> Tensor:
        return full_vocab_kd_loss(student, teacher, divergence=divergence, **kw)

    forward, reverse = loss("forward_kl"), loss("reverse_kl")
    assert torch.equal(loss("jsd", beta=0.0), forward)
    assert torch.equal(loss("jsd", beta=1.0), reverse)
    assert torch.equal(loss("skew_forward_kl", skew=0.0), forward)
    assert torch.equal(loss("skew_reverse_kl", skew=0.0), reverse)
    torch.testing.assert_close(forward, naive_full(student, teacher, "forward_kl", 0, 0))


def test_full_vocab_k_equal_v_topk_agrees() -> None:
    # With K = V the top-K classes are the whole vocabulary: both functions compute one thing.
    student, teacher, _, _, lse = make_case(seed=24)
    student.requires_grad_()
    values, ids = teacher.topk(teacher.shape[-1], dim=-1)
    for (divergence, beta, skew), tail in itertools.product(SETTINGS, (None, lse)):
        kw = dict(divergence=divergence, beta=beta, skew=skew)
        full = full_vocab_kd_loss(student, teacher, **kw)
        top = topk_kd_loss(student, values, ids, teacher_logsumexp=tail, **kw)
        assert_close_with_grad(full, top, student, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize(("divergence", "beta", "skew"), SETTINGS)
def test_full_vocab_identical_distributions_give_zero(divergence, beta, skew) -> None:
    gen = torch.Generator().manual_seed(25)
    logits = torch.randn(4, 9, generator=gen, dtype=torch.float64) * 3
    student = (logits + 5.0).requires_grad_()  # a shift does not change the softmax
    out = full_vocab_kd_loss(student, logits, divergence=divergence, beta=beta, skew=skew)
    assert_zero_with_grad(out, student, atol=1e-13)


def test_full_vocab_jsd_is_symmetric_at_one_half() -> None:
    gen = torch.Generator().manual_seed(26)
    a, b = torch.randn(2, 6, 10, generator=gen, dtype=torch.float64).unbind(0)
    ab = full_vocab_kd_loss(a, b, divergence="jsd", beta=0.5)
    ba = full_vocab_kd_loss(b, a, divergence="jsd", beta=0.5)
    assert (ab > 0).all()
    torch.testing.assert_close(ab, ba, atol=1e-14, rtol=1e-12)


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.8])
def test_full_vocab_jsd_of_disjoint_supports_is_the_binary_entropy(beta: float) -> None:
    # p = (1, 0), q = (0, 1): m = (β, 1 − β), JSD = β log(1/β) + (1 − β) log(1/(1 − β)).
    inf = float("inf")
    teacher = torch.tensor([[0.0, -inf]], dtype=torch.float64)
    student = torch.tensor([[-inf, 0.0]], dtype=torch.float64, requires_grad=True)
    out = full_vocab_kd_loss(student, teacher, divergence="jsd", beta=beta)
    expected = -beta * math.log(beta) - (1 - beta) * math.log1p(-beta)
    assert out.item() == pytest.approx(expected, abs=1e-14)
    (grad,) = torch.autograd.grad(out.sum(), student)
    assert torch.isfinite(grad).all()


def test_full_vocab_padded_vocabulary_entries_are_ignored() -> None:
    # −inf columns on both sides (megatron's padded vocabulary) change nothing.
    gen = torch.Generator().manual_seed(27)
    student = torch.randn(3, 8, generator=gen, dtype=torch.float64)
    teacher = torch.randn(3, 8, generator=gen, dtype=torch.float64)
    pad = torch.full((3, 3), float("-inf"), dtype=torch.float64)
    padded_student = torch.cat([student, pad], dim=-1).requires_grad_()
    for divergence, beta, skew in SETTINGS:
        kw = dict(divergence=divergence, beta=beta, skew=skew)
        out = full_vocab_kd_loss(padded_student, torch.cat([teacher, pad], dim=-1), **kw)
        torch.testing.assert_close(out, naive_full(student, teacher, **kw))
        (grad,) = torch.autograd.grad(out.sum(), padded_student)
        assert torch.isfinite(grad).all() and (grad[:, 8:] == 0).all()


def test_full_vocab_token_weights() -> None:
    gen = torch.Generator().manual_seed(28)
    student = torch.randn(4, 9, generator=gen, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(4, 9, generator=gen, dtype=torch.float64)
    weights = torch.tensor([0.0, 0.5, 1.0, 3.0], dtype=torch.float64)
    plain = full_vocab_kd_loss(student, teacher, divergence="skew_reverse_kl")
    weighted = full_vocab_kd_loss(
        student, teacher, divergence="skew_reverse_kl", token_weights=weights
    )
    torch.testing.assert_close(weighted, plain * weights, atol=0, rtol=0)
    ones = torch.ones_like(weights)
    torch.testing.assert_close(
        grad_of(weighted, student, ones), grad_of(plain, student, weights), atol=1e-14, rtol=0
    )


def test_full_vocab_keeps_no_vocabulary_sized_tensor_for_backward() -> None:
    gen = torch.Generator().manual_seed(29)
    student = torch.randn(64, 500, generator=gen, requires_grad=True)
    teacher = torch.randn(64, 500, generator=gen)
    with SavedTensorBytes() as saved:
        out = full_vocab_kd_loss(student, teacher, divergence="jsd")
    assert saved.large(student.shape[0] * 4, excluding=(student, teacher)) == []
    out.sum().backward()
    assert torch.isfinite(student.grad).all()


# --------------------------------------------------------------- low precision, extremes


def _extreme_logits(dtype: torch.dtype, seed: int) -> tuple[Tensor, Tensor]:
    """Student and teacher logits at ±1e4, near-identical rows and −inf (padded) columns."""
    gen = torch.Generator().manual_seed(seed)
    teacher = torch.randn(8, 40, generator=gen) * 1e4
    student = torch.randn(8, 40, generator=gen) * 1e4
    student[:3] = teacher[:3] + torch.randn(3, 40, generator=gen) * 1e-3  # rounding territory
    student[3] = teacher[3]
    teacher[:, -4:] = float("-inf")
    student[:, -4:] = float("-inf")
    student[4, :10] = 3e4  # far above the teacher
    return student.to(dtype), teacher.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("divergence", "beta", "skew"), MIXTURES)
def test_mixtures_never_negative_or_nan_at_low_precision(dtype, divergence, beta, skew) -> None:
    scale = 2.0 if dtype == torch.float16 else 1.0  # keep float16 within its range
    student, teacher = _extreme_logits(torch.float32, seed=31)
    student = (student / scale).to(dtype).requires_grad_()
    teacher = (teacher / scale).to(dtype)
    kw = dict(divergence=divergence, beta=beta, skew=skew)
    full = full_vocab_kd_loss(student, teacher, **kw)
    values, ids = teacher.float().topk(16, dim=-1)
    lse = teacher.float().logsumexp(-1)
    topk = topk_kd_loss(student, values.to(dtype), ids, **kw)
    tail = topk_kd_loss(student, values, ids, teacher_logsumexp=lse, **kw)
    for out in (full, topk, tail):
        assert out.dtype == torch.float32
        assert torch.isfinite(out).all() and (out >= 0).all(), out
        (grad,) = torch.autograd.grad(out.sum(), student)
        assert grad.dtype == dtype and torch.isfinite(grad).all()
    # Identical rows: 0 up to float32 rounding of log m.
    assert full[3].item() < 1e-6 and topk[3].item() < 1e-6


def test_jsd_is_bounded_by_the_binary_entropy_at_extremes() -> None:
    # JSD(β) ≤ H(β) for any p, q (it is the mutual information of a β-coin and the sample).
    student, teacher = _extreme_logits(torch.float32, seed=32)
    for beta in (0.05, 0.5, 0.95):
        bound = -beta * math.log(beta) - (1 - beta) * math.log1p(-beta)
        out = full_vocab_kd_loss(student, teacher, divergence="jsd", beta=beta)
        assert (out <= bound + 1e-6).all() and (out >= 0).all()


# ------------------------------------------------------------------------------ errors


def test_argument_errors() -> None:
    student, teacher, values, ids, _ = make_case()
    with pytest.raises(ValueError, match="beta"):
        topk_kd_loss(student, values, ids, divergence="jsd", beta=1.5)
    with pytest.raises(ValueError, match="skew"):
        topk_kd_loss(student, values, ids, divergence="skew_forward_kl", skew=1.0)
    with pytest.raises(ValueError, match="token_weights"):
        topk_kd_loss(student, values, ids, token_weights=torch.ones(3))
    with pytest.raises(ValueError, match="divergence"):
        full_vocab_kd_loss(student, teacher, divergence="js")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="same shape"):
        full_vocab_kd_loss(student, teacher[:, :-1])
    with pytest.raises(ValueError, match="positive"):
        full_vocab_kd_loss(student, teacher, teacher_scale=0.0)
    with pytest.raises(ValueError, match="beta"):
        full_vocab_kd_loss(student, teacher, divergence="jsd", beta=-0.1)

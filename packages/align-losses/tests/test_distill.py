import itertools
import math

import pytest
import torch
from _losses_reference import (
    SavedTensorBytes,
    assert_close_with_grad,
    assert_zero_with_grad,
    dense_kl,
    naive_topk_kd,
)

from align_losses import topk_kd_loss
from align_losses.distill import _GatherColumns, _TopKTailLogProbs

DIVERGENCES = ["forward_kl", "reverse_kl"]


def make_case(n: int = 6, vocab: int = 17, k: int = 4, seed: int = 0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    student = (torch.randn(n, vocab, generator=gen) * 2).to(dtype)
    teacher_full = torch.randn(n, vocab, generator=gen, dtype=torch.float64) * 2
    values, ids = torch.topk(teacher_full, k, dim=-1)
    return student, values.to(dtype), ids, teacher_full.logsumexp(-1).to(dtype)


MODES = list(itertools.product(DIVERGENCES, [False, True], [False, True], [(1.0, 1.0), (0.7, 1.6)]))


@pytest.mark.parametrize(("divergence", "tail", "cross", "scales"), MODES)
def test_matches_naive_dense(divergence, tail, cross, scales, small_chunks) -> None:
    student_scale, teacher_scale = scales
    if tail:
        teacher_scale = 1.0  # the tail bucket is defined for unscaled teacher logits
    student, values, ids, lse = make_case(seed=3)
    student.requires_grad_()
    weights = torch.rand(student.shape[0], dtype=torch.float64)
    kwargs = dict(
        divergence=divergence,
        student_scale=student_scale,
        teacher_scale=teacher_scale,
        teacher_logsumexp=lse if tail else None,
        cross_tokenizer=cross,
    )
    out = topk_kd_loss(student, values, None if cross else ids, **kwargs)
    ref = naive_topk_kd(student, values, ids, **kwargs)
    assert_close_with_grad(out, ref, student, weights, atol=1e-10, rtol=1e-10)


def test_leading_dimensions_and_non_contiguous_logits(small_chunks: int) -> None:
    gen = torch.Generator().manual_seed(4)
    full = torch.randn(2, 6, 13, generator=gen, dtype=torch.float64)
    student = full[:, :-1].detach().requires_grad_()
    teacher_full = torch.randn(2, 5, 13, generator=gen, dtype=torch.float64)
    values, ids = teacher_full.topk(3, dim=-1)
    lse = teacher_full.logsumexp(-1)
    for tail in (None, lse):
        out = topk_kd_loss(student, values, ids, teacher_logsumexp=tail)
        ref = naive_topk_kd(student, values, ids, teacher_logsumexp=tail)
        assert out.shape == (2, 5)
        assert_close_with_grad(out, ref, student)


def test_hand_values_k_way() -> None:
    # Teacher (0, 0) → p = (1/2, 1/2); student logits (0, ln 3) at the ids → q = (1/4, 3/4).
    student = torch.tensor([[0.0, 5.0, math.log(3.0)]], dtype=torch.float64)
    values = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
    ids = torch.tensor([[0, 2]])
    forward = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    reverse = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert topk_kd_loss(student, values, ids).item() == pytest.approx(forward, abs=1e-12)
    assert topk_kd_loss(student, values, ids, divergence="reverse_kl").item() == pytest.approx(
        reverse, abs=1e-12
    )


def test_hand_value_tail_bucket() -> None:
    # V = 3, student logits all 0 → q = (1/3 | tail 2/3). Teacher: top-1 holds half the mass.
    student = torch.zeros(1, 3, dtype=torch.float64, requires_grad=True)
    values = torch.tensor([[1.0]], dtype=torch.float64)
    lse = torch.tensor([1.0 + math.log(2.0)], dtype=torch.float64)  # p_1 = e^{1 − L} = 1/2
    out = topk_kd_loss(student, values, torch.tensor([[0]]), teacher_logsumexp=lse)
    expected = 0.5 * math.log(0.5 / (1 / 3)) + 0.5 * math.log(0.5 / (2 / 3))
    assert out.item() == pytest.approx(expected, abs=1e-12)
    out.backward()
    # Forward KL gradient w.r.t. the logits is q_v − p(class of v) · q_v / q(class of v):
    # id 0: 1/3 − 1/2; each tail token: 1/3 − (1/2)(1/3)/(2/3) = 1/12.
    assert student.grad.tolist()[0] == pytest.approx([1 / 3 - 1 / 2, 1 / 12, 1 / 12], abs=1e-12)


def test_identical_distributions_give_zero() -> None:
    student, values, ids, _ = make_case(seed=5)
    # Put the teacher's own logits at its ids: the K-way distributions coincide.
    student = student.scatter(-1, ids, values).requires_grad_()
    for div in DIVERGENCES:
        out = topk_kd_loss(student, values, ids, divergence=div)
        assert_zero_with_grad(out, student, atol=1e-12)


def test_k_equal_one_k_way_is_zero() -> None:
    student, values, ids, _ = make_case(k=1, seed=6)
    student.requires_grad_()
    out = topk_kd_loss(student, values, ids)
    out.sum().backward()
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.equal(student.grad, torch.zeros_like(student))


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_k_equal_one_with_tail_matches_naive(divergence: str) -> None:
    student, values, ids, lse = make_case(k=1, seed=7)
    student.requires_grad_()
    out = topk_kd_loss(student, values, ids, teacher_logsumexp=lse, divergence=divergence)
    ref = naive_topk_kd(student, values, ids, teacher_logsumexp=lse, divergence=divergence)
    assert_close_with_grad(out, ref, student)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("tail", [False, True])
@pytest.mark.parametrize("cross", [False, True])
def test_k_equal_v_is_the_full_vocabulary_kl(divergence: str, tail: bool, cross: bool) -> None:
    gen = torch.Generator().manual_seed(8)
    vocab = 9
    student = torch.randn(4, vocab, generator=gen, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(4, vocab, generator=gen, dtype=torch.float64)
    values, ids = teacher.topk(vocab, dim=-1)
    lse = teacher.logsumexp(-1) if tail else None
    out = topk_kd_loss(
        student,
        values,
        ids,
        divergence=divergence,
        teacher_logsumexp=lse,
        cross_tokenizer=cross,
    )
    assert torch.isfinite(out).all()
    if not cross:  # with K = V, pairing by rank is a different (sorted) alignment
        ref = dense_kl(teacher, student, divergence)
        assert_close_with_grad(out, ref, student, atol=1e-12, rtol=1e-10)
    else:
        ref = dense_kl(values, student.sort(dim=-1, descending=True).values, divergence)
        torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-10)


def test_cross_tokenizer_pairs_by_rank_and_ignores_ids() -> None:
    # Student top-2 are logits 3 (id 4) and 1 (id 0); teacher values come unsorted.
    student = torch.tensor([[1.0, -2.0, 0.0, -5.0, 3.0]], dtype=torch.float64)
    teacher = torch.tensor([[-1.0, 2.0]], dtype=torch.float64)
    out = topk_kd_loss(student, teacher, None, cross_tokenizer=True)
    p = torch.softmax(torch.tensor([2.0, -1.0], dtype=torch.float64), 0)
    q = torch.softmax(torch.tensor([3.0, 1.0], dtype=torch.float64), 0)
    assert out.item() == pytest.approx(float((p * (p / q).log()).sum()), abs=1e-12)


def test_tail_stays_accurate_when_the_top_k_hold_almost_all_mass() -> None:
    # float32 student with q_tail ≈ 1e-11: 1 − Σ q_i would round to 0 (log → −inf).
    vocab, k = 50, 3
    student = torch.zeros(2, vocab)
    student[:, :k] = 30.0
    ids = torch.arange(k).repeat(2, 1)
    teacher_full = torch.zeros(2, vocab, dtype=torch.float64)
    teacher_full[:, :k] = 10.0
    lse = teacher_full.logsumexp(-1)
    for div in DIVERGENCES:
        out = topk_kd_loss(
            student, teacher_full[:, :k].float(), ids, teacher_logsumexp=lse.float(), divergence=div
        )
        ref = naive_topk_kd(
            student.double(), teacher_full[:, :k], ids, teacher_logsumexp=lse, divergence=div
        )
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-6)


def test_gradcheck_gather_columns() -> None:
    logits = torch.randn(3, 2, 7, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([[[0, 6, 2], [1, 1, 3]], [[5, 4, 3], [2, 0, 6]], [[6, 5, 4], [0, 1, 2]]])
    assert torch.autograd.gradcheck(lambda x: _GatherColumns.apply(x, ids, 0, None), (logits,))


@pytest.mark.parametrize("scale", [1.0, 0.6])
def test_gradcheck_tail_log_probs(scale: float, small_chunks: int) -> None:
    logits = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    ids = torch.stack([torch.randperm(8)[:3] for _ in range(5)])
    assert torch.autograd.gradcheck(
        lambda x: _TopKTailLogProbs.apply(x, ids, scale, 0, None), (logits,)
    )


@pytest.mark.parametrize(
    ("divergence", "tail", "cross"), list(itertools.product(DIVERGENCES, [0, 1], [0, 1]))
)
def test_gradcheck_full_loss(divergence: str, tail: int, cross: int) -> None:
    student, values, ids, lse = make_case(n=3, vocab=7, k=3, seed=9)
    student.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x: topk_kd_loss(
            x,
            values,
            ids,
            divergence=divergence,
            student_scale=1.3,
            teacher_logsumexp=lse if tail else None,
            cross_tokenizer=bool(cross),
        ),
        (student,),
    )


@pytest.mark.parametrize("tail", [False, True])
def test_keeps_no_vocab_sized_softmax(tail: bool) -> None:
    student, values, ids, lse = make_case(n=16, vocab=64, k=4, dtype=torch.float32)
    student.requires_grad_()
    with SavedTensorBytes() as saved:
        topk_kd_loss(student, values, ids, teacher_logsumexp=lse if tail else None)
    assert saved.large(16 * 64 // 2, excluding=(student,)) == []


@pytest.mark.parametrize("tail", [False, True])
def test_bf16_student_accumulates_in_fp32(tail: bool) -> None:
    student, values, ids, lse = make_case(n=8, vocab=300, k=20, seed=10, dtype=torch.float32)
    student = student.to(torch.bfloat16).requires_grad_()
    out = topk_kd_loss(student, values, ids, teacher_logsumexp=lse if tail else None)
    assert out.dtype == torch.float32
    exact = student.detach().double().requires_grad_()
    ref = naive_topk_kd(
        exact, values.double(), ids, teacher_logsumexp=lse.double() if tail else None
    )
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    (grad,) = torch.autograd.grad(out.sum(), student)
    assert grad.dtype == torch.bfloat16
    want = torch.autograd.grad(ref.sum(), exact)[0]
    torch.testing.assert_close(grad.double(), want, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize(
    ("divergence", "tail", "cross"), list(itertools.product(DIVERGENCES, [0, 1], [0, 1]))
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_extreme_logits_are_finite(divergence: str, tail: int, cross: int, dtype) -> None:
    gen = torch.Generator().manual_seed(11)
    sign = lambda *shape: (torch.randint(0, 2, shape, generator=gen) * 2 - 1).float()  # noqa: E731
    student = (1e4 * sign(4, 30)).to(dtype).requires_grad_()
    teacher = 1e4 * sign(4, 30)
    values, ids = teacher.topk(5, dim=-1)
    out = topk_kd_loss(
        student,
        values.to(dtype),
        ids,
        divergence=divergence,
        teacher_logsumexp=teacher.logsumexp(-1) if tail else None,
        cross_tokenizer=bool(cross),
    )
    (grad,) = torch.autograd.grad(out.sum(), student)
    assert torch.isfinite(out).all() and torch.isfinite(grad).all()


def test_int32_teacher_ids_are_accepted() -> None:
    student, values, ids, lse = make_case(seed=12)
    for tail in (None, lse):
        torch.testing.assert_close(
            topk_kd_loss(student, values, ids.int(), teacher_logsumexp=tail),
            naive_topk_kd(student, values, ids, teacher_logsumexp=tail),
        )


def test_teacher_gets_no_gradient() -> None:
    student, values, ids, lse = make_case()
    student.requires_grad_()
    values.requires_grad_()
    lse.requires_grad_()
    topk_kd_loss(student, values, ids, teacher_logsumexp=lse).sum().backward()
    assert values.grad is None and lse.grad is None and student.grad is not None


def test_bad_arguments_raise() -> None:
    student, values, ids, lse = make_case()
    with pytest.raises(ValueError, match="divergence"):
        topk_kd_loss(student, values, ids, divergence="js")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="teacher_scale"):
        topk_kd_loss(student, values, ids, teacher_logsumexp=lse, teacher_scale=2.0)
    with pytest.raises(ValueError, match="positive"):
        topk_kd_loss(student, values, ids, student_scale=0.0)
    with pytest.raises(ValueError, match="teacher_topk_ids"):
        topk_kd_loss(student, values, None)
    with pytest.raises(ValueError, match="K = 20"):
        topk_kd_loss(student, torch.zeros(6, 20), torch.zeros(6, 20, dtype=torch.long))
    with pytest.raises(ValueError, match="differ"):
        topk_kd_loss(student[:3], values, ids)

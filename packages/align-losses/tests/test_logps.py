import math

import pytest
import torch
from _losses_reference import SavedTensorBytes, assert_close_with_grad, naive_token_logps

from align_losses import chunked_linear_logps, sequence_logps, token_logps


def _grad(out: torch.Tensor, wrt: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    (grad,) = torch.autograd.grad((out * weights).sum(), wrt)
    return grad


# --------------------------------------------------------------------------- token_logps


def test_token_logps_hand_values() -> None:
    # V = 2 with logits (0, ln 3): p = (1/4, 3/4). Uniform logits over V = 5: p = 1/5.
    logits = torch.tensor([[0.0, math.log(3.0)], [0.0, math.log(3.0)]], dtype=torch.float64)
    out = token_logps(logits, torch.tensor([0, 1]))
    assert out.tolist() == pytest.approx([math.log(0.25), math.log(0.75)], abs=1e-12)
    uniform = token_logps(torch.full((3, 5), 7.0), torch.tensor([0, 2, 4]))
    assert uniform.tolist() == pytest.approx([math.log(0.2)] * 3, abs=1e-6)


def test_token_logps_hand_gradient() -> None:
    # d log p_y / d z = onehot(y) − softmax(z); softmax(0, ln 3) = (1/4, 3/4), label 0.
    logits = torch.tensor([0.0, math.log(3.0)], dtype=torch.float64, requires_grad=True)
    token_logps(logits, torch.tensor(0)).backward()
    assert logits.grad.tolist() == pytest.approx([0.75, -0.75], abs=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("chunked", [False, True])
def test_token_logps_matches_naive(dtype: torch.dtype, chunked: bool, request) -> None:
    if chunked:
        request.getfixturevalue("small_chunks")
    gen = torch.Generator().manual_seed(0)
    full = torch.randn(3, 8, 13, generator=gen, dtype=dtype) * 3
    logits = full[:, :-1].detach().requires_grad_()  # non-contiguous over the batch
    labels = torch.randint(0, 13, (3, 7), generator=gen)
    labels[0, :3] = -100
    labels[2, -1] = -100
    weights = torch.randn(3, 7, generator=gen, dtype=dtype)

    out = token_logps(logits, labels)
    ref = naive_token_logps(logits, labels)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert_close_with_grad(out, ref, logits, weights, atol=tol, rtol=tol)


def test_token_logps_custom_ignore_index() -> None:
    logits = torch.randn(4, 6, dtype=torch.float64)
    labels = torch.tensor([1, 5, 2, 5])
    out = token_logps(logits, labels, ignore_index=5)
    ref = naive_token_logps(logits, labels, ignore_index=5)
    torch.testing.assert_close(out, ref)
    assert out[1] == 0 and out[3] == 0


def test_int32_labels_are_accepted() -> None:
    logits = torch.randn(3, 4, 8, dtype=torch.float64)
    labels = torch.randint(0, 8, (3, 4))
    labels[0, 0] = -100
    expected = naive_token_logps(logits, labels)
    torch.testing.assert_close(token_logps(logits, labels.int()), expected)
    hidden, weight = torch.randn(5, 3, dtype=torch.float64), torch.randn(8, 3, dtype=torch.float64)
    flat = labels.reshape(-1)[:5]
    torch.testing.assert_close(
        chunked_linear_logps(hidden, weight, flat.int()),
        naive_token_logps(hidden @ weight.T, flat),
    )


def test_token_logps_all_ignored_gives_zero_and_zero_grad() -> None:
    logits = torch.randn(2, 4, 9, requires_grad=True)
    labels = torch.full((2, 4), -100)
    out = token_logps(logits, labels)
    assert torch.equal(out, torch.zeros(2, 4))
    out.sum().backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_token_logps_gradcheck(small_chunks: int) -> None:
    logits = torch.randn(2, 5, 7, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 7, (2, 5))
    labels[1, 2] = -100
    assert torch.autograd.gradcheck(lambda x: token_logps(x, labels), (logits,))


def test_token_logps_keeps_no_vocab_sized_tensor_for_backward() -> None:
    logits = torch.randn(16, 50, requires_grad=True)
    labels = torch.randint(0, 50, (16,))
    with SavedTensorBytes() as naive:
        naive_token_logps(logits, labels)
    # Positive control: the dense path keeps a [N, V] log-softmax alive.
    assert naive.large(16 * 50, excluding=(logits,))
    with SavedTensorBytes() as lean:
        token_logps(logits, labels)
    assert lean.large(16 * 50, excluding=(logits,)) == []
    assert lean.saved, "the custom function saves the logits themselves"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_token_logps_half_precision_accumulates_in_fp32(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(1)
    logits = (torch.randn(6, 300, generator=gen) * 4).to(dtype).requires_grad_()
    labels = torch.randint(0, 300, (6,), generator=gen)
    weights = torch.randn(6, generator=gen)
    out = token_logps(logits, labels)
    assert out.dtype == torch.float32
    exact = logits.detach().double().requires_grad_()
    ref = naive_token_logps(exact, labels)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    grad = _grad(out, logits, weights)
    assert grad.dtype == dtype
    torch.testing.assert_close(
        grad.double(), _grad(ref, exact, weights.double()), atol=1e-2, rtol=1e-2
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_logps_extreme_logits_are_finite(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(2)
    signs = torch.randint(0, 2, (4, 6, 40), generator=gen) * 2 - 1
    logits = (1e4 * signs).to(dtype).requires_grad_()
    labels = torch.randint(0, 40, (4, 6), generator=gen)
    out = token_logps(logits, labels)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(logits.grad).all()
    ref = naive_token_logps(logits.detach().double(), labels)
    torch.testing.assert_close(out.double(), ref)


def test_token_logps_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="vocabulary dimension"):
        token_logps(torch.randn(2, 3, 5), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        token_logps(torch.randn(2, 5), torch.zeros(2))


# ------------------------------------------------------------------------ sequence_logps


def test_sequence_logps_sum_and_average() -> None:
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 6, 10, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 10, (3, 6), generator=gen)
    labels[0, :4] = -100  # 2 tokens scored
    labels[1, :] = -100  # none scored
    per_token = naive_token_logps(logits, labels)
    total = sequence_logps(logits, labels)
    mean = sequence_logps(logits, labels, average=True)
    torch.testing.assert_close(total, per_token.sum(-1))
    expected_mean = [per_token[0].sum() / 2, 0.0, per_token[2].sum() / 6]
    assert mean.tolist() == pytest.approx([float(x) for x in expected_mean], abs=1e-12)


def test_sequence_logps_average_with_no_tokens_is_zero_not_nan() -> None:
    logits = torch.randn(2, 3, 7, requires_grad=True)
    labels = torch.full((2, 3), -100)
    out = sequence_logps(logits, labels, average=True)
    assert torch.equal(out, torch.zeros(2))
    out.sum().backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


# ------------------------------------------------------------------ chunked_linear_logps


def _linear_case(
    seed: int, ignored: tuple[int, int], *, frozen_weight: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``[2, 4, 6]`` hidden states, an ``[11, 6]`` weight, labels with one ignored, weights."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2, 4, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 6, generator=gen, dtype=torch.float64)
    weight.requires_grad_(not frozen_weight)
    labels = torch.randint(0, 11, (2, 4), generator=gen)
    labels[ignored] = -100
    weights = torch.randn(2, 4, generator=gen, dtype=torch.float64)
    return hidden, weight, labels, weights


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 100])
def test_chunked_linear_matches_unfused(chunk_size: int) -> None:
    hidden, weight, labels, weights = _linear_case(4, (1, 1), frozen_weight=False)
    out = chunked_linear_logps(hidden, weight, labels, chunk_size=chunk_size)
    ref = naive_token_logps(hidden @ weight.T, labels)
    assert_close_with_grad(out, ref, (hidden, weight), weights, atol=1e-12, rtol=1e-12)


def test_chunked_linear_gradcheck() -> None:
    hidden = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 5, -100, 2, 3])
    assert torch.autograd.gradcheck(
        lambda h, w: chunked_linear_logps(h, w, labels, chunk_size=2), (hidden, weight)
    )


def test_chunked_linear_frozen_weight_and_all_ignored() -> None:
    hidden = torch.randn(4, 3, requires_grad=True)
    weight = torch.randn(5, 3)
    labels = torch.full((4,), -100)
    out = chunked_linear_logps(hidden, weight, labels, chunk_size=3)
    assert torch.equal(out, torch.zeros(4))
    out.sum().backward()
    assert torch.equal(hidden.grad, torch.zeros_like(hidden))


def test_chunked_linear_frozen_hidden_gives_the_weight_gradient() -> None:
    hidden = torch.randn(6, 3, dtype=torch.float64)
    weight = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 6, 3, -100, 2, 2])
    (got,) = torch.autograd.grad(
        chunked_linear_logps(hidden, weight, labels, chunk_size=4).sum(), weight
    )
    (want,) = torch.autograd.grad(naive_token_logps(hidden @ weight.T, labels).sum(), weight)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("chunk_size", [1, 3, 100])
def test_chunked_linear_frozen_weight_matches_unfused(chunk_size: int) -> None:
    # A frozen weight takes the path that forms the hidden-state gradient in forward.
    hidden, weight, labels, weights = _linear_case(6, (0, 2), frozen_weight=True)
    out = chunked_linear_logps(hidden, weight, labels, chunk_size=chunk_size)
    ref = naive_token_logps(hidden @ weight.T, labels)
    (got,) = assert_close_with_grad(out, ref, hidden, weights, atol=1e-12, rtol=1e-12)
    assert torch.equal(got[0, 2], torch.zeros(6, dtype=torch.float64))  # ignored position


def test_chunked_linear_frozen_weight_gradcheck_and_saved_size() -> None:
    hidden = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(6, 4, dtype=torch.float64)
    labels = torch.tensor([0, 5, -100, 2, 3])
    assert torch.autograd.gradcheck(
        lambda h: chunked_linear_logps(h, weight, labels, chunk_size=2), (hidden,)
    )
    # What is kept for backward is at most hidden-sized ([N, H]), never [N, V] or the weight.
    big_hidden = torch.randn(32, 8, requires_grad=True)
    big_weight = torch.randn(40, 8)
    with SavedTensorBytes() as saved:
        chunked_linear_logps(big_hidden, big_weight, torch.randint(0, 40, (32,)), chunk_size=8)
    assert max(t.numel() for t in saved.saved) == 32 * 8


def test_chunked_linear_frozen_weight_bf16_matches_unfused_bf16() -> None:
    gen = torch.Generator().manual_seed(7)
    hidden = torch.randn(12, 16, generator=gen).to(torch.bfloat16).requires_grad_()
    weight = (torch.randn(64, 16, generator=gen) / 4).to(torch.bfloat16)
    labels = torch.randint(0, 64, (12,), generator=gen)
    out = chunked_linear_logps(hidden, weight, labels, chunk_size=5)
    ref = token_logps(hidden @ weight.T, labels)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    got, want = _grad(out, hidden, torch.ones(12)), _grad(ref, hidden, torch.ones(12))
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)


def test_chunked_linear_no_tokens_gives_zero_weight_gradient() -> None:
    hidden = torch.randn(0, 3, requires_grad=True)
    weight = torch.randn(5, 3, requires_grad=True)
    out = chunked_linear_logps(hidden, weight, torch.zeros(0, dtype=torch.long))
    (grad,) = torch.autograd.grad(out.sum(), weight)
    assert torch.equal(grad, torch.zeros(5, 3))


def test_chunked_linear_never_saves_logits() -> None:
    hidden = torch.randn(32, 8, requires_grad=True)
    weight = torch.randn(40, 8, requires_grad=True)
    labels = torch.randint(0, 40, (32,))
    with SavedTensorBytes() as saved:
        chunked_linear_logps(hidden, weight, labels, chunk_size=8)
    assert saved.large(32 * 40 // 2) == []


def test_chunked_linear_bf16_matches_unfused_bf16() -> None:
    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(12, 16, generator=gen).to(torch.bfloat16).requires_grad_()
    weight = (torch.randn(64, 16, generator=gen) / 4).to(torch.bfloat16).requires_grad_()
    labels = torch.randint(0, 64, (12,), generator=gen)
    out = chunked_linear_logps(hidden, weight, labels, chunk_size=5)
    assert out.dtype == torch.float32
    ref = token_logps(hidden @ weight.T, labels)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    got = torch.autograd.grad(out.sum(), (hidden, weight))
    want = torch.autograd.grad(ref.sum(), (hidden, weight))
    for g, w in zip(got, want, strict=True):
        assert g.dtype == torch.bfloat16
        torch.testing.assert_close(g.float(), w.float(), atol=2e-2, rtol=2e-2)


def test_chunked_linear_extreme_logits_are_finite() -> None:
    hidden = torch.zeros(6, 2)
    hidden[:, 0] = 1.0
    weight = torch.zeros(10, 2)
    weight[:, 0] = 1e4 * (torch.arange(10) % 2 * 2 - 1)  # logits ±1e4
    hidden.requires_grad_()
    weight.requires_grad_()
    labels = torch.arange(6)
    out = chunked_linear_logps(hidden, weight, labels, chunk_size=4)
    out.sum().backward()
    assert torch.isfinite(out).all()
    assert torch.isfinite(hidden.grad).all() and torch.isfinite(weight.grad).all()
    # Even labels sit at −1e4 while half the vocabulary is at +1e4: log p = −2e4 − ln 5.
    expected = [-2e4 - math.log(5.0) if i % 2 == 0 else -math.log(5.0) for i in range(6)]
    assert out.tolist() == pytest.approx(expected, rel=1e-6)


def test_chunked_linear_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_linear_logps(
            torch.randn(2, 3), torch.randn(4, 3), torch.zeros(2).long(), chunk_size=0
        )
    with pytest.raises(ValueError, match=r"\[V, H\]"):
        chunked_linear_logps(torch.randn(2, 3), torch.randn(4, 5), torch.zeros(2).long())
    with pytest.raises(TypeError, match="dtypes differ"):
        chunked_linear_logps(
            torch.randn(2, 3), torch.randn(4, 3, dtype=torch.float64), torch.zeros(2).long()
        )

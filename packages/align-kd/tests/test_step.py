"""The KD micro-batch loss against the dense formulas of DESIGN.md, reductions, metrics, config."""

from __future__ import annotations

import math

import pytest
import torch
from _kd_helpers import dense_kd

from align_kd import KDStep, KnowledgeDistillationConfig, check_vocabularies, kd_loss_and_metrics

V, V_ROWS, K = 7, 9, 4  # real vocabulary, padded rows, stored teacher top-k


def _batch(seed: int = 0, b: int = 2, s: int = 6, t_len: int | None = None):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, s, V_ROWS, generator=g, dtype=torch.float64) * 2
    logits[..., V:] = 50.0  # padded rows: would dominate everything unless masked
    labels = torch.randint(0, V, (b, s), generator=g)
    labels[0, :2] = -100
    labels[-1, -1] = -100
    t_len = s if t_len is None else t_len
    teacher = torch.randn(b, t_len, V, generator=g, dtype=torch.float64) * 3
    top = torch.topk(teacher, K, dim=-1)
    lse = torch.logsumexp(teacher, -1)
    shift = top.values[..., :1]
    batch = {
        "labels": labels,
        "teacher_logits": (top.values - shift).float(),
        "teacher_ids": top.indices,
        "teacher_logsumexp": (lse - shift[..., 0]).float(),
    }
    return logits, batch


def _expected(cfg, logits, batch, k):
    z = logits[..., :V]
    mask = batch["labels"] != -100
    t = batch["teacher_logits"][..., :k].double()
    ids = batch["teacher_ids"][..., :k]
    lse = batch["teacher_logsumexp"].double() if cfg.tail else None
    kd = dense_kd(
        z,
        t,
        ids,
        s_scale=cfg.logits_scale,
        t_scale=cfg.target_logits_scale,
        t_lse=lse,
        kind=cfg.kd_loss,
        beta=cfg.jsd_beta,
        alpha=cfg.skew_alpha,
    )
    logp = torch.log_softmax(cfg.logits_scale * z, -1)
    nll = -logp.gather(-1, batch["labels"].clamp(min=0)[..., None])[..., 0]
    total = cfg.kd_loss_weight * kd + cfg.sft_loss_weight * nll
    return total[mask].sum(), kd[mask].sum(), nll[mask].sum(), int(mask.sum())


CONFIGS = [
    KnowledgeDistillationConfig(),
    KnowledgeDistillationConfig(kd_loss="bwd_kl", logits_scale=0.5, target_logits_scale=2.0),
    KnowledgeDistillationConfig(tail=True, sft_loss_weight=0.3, kd_loss_weight=0.7),
    KnowledgeDistillationConfig(kd_loss="bwd_kl", tail=True, top_k=2, logits_scale=1.5),
    KnowledgeDistillationConfig(top_k=3, sft_loss_weight=1.0, logits_scale=2.0),
    KnowledgeDistillationConfig(kd_loss="jsd", jsd_beta=0.3),
    KnowledgeDistillationConfig(kd_loss="jsd", tail=True, sft_loss_weight=0.2),
    KnowledgeDistillationConfig(kd_loss="skew_fwd_kl", skew_alpha=0.2, tail=True),
    KnowledgeDistillationConfig(kd_loss="skew_bwd_kl", logits_scale=0.7),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.kd_loss}-tail{c.tail}-k{c.top_k}")
def test_loss_and_metrics_equal_dense_formulas(cfg):
    logits, batch = _batch()
    k = cfg.top_k or K
    want_total, want_kd, want_nll, tokens = _expected(cfg, logits.clone(), batch, k)

    z = logits.clone().requires_grad_(True)
    normalizer = torch.tensor(float(tokens) * 2)  # as if another rank held as many tokens
    loss, metrics = kd_loss_and_metrics(cfg, normalizer, batch, z.clone(), vocab_size=V, group=None)
    torch.testing.assert_close(loss.double(), want_total / (2 * tokens), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(metrics["loss"].double(), want_total, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(metrics["kd_loss"].double(), want_kd, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(metrics["sft_loss"].double(), want_nll, rtol=1e-6, atol=1e-9)
    assert metrics["tokens"].item() == tokens

    loss.backward()
    ref = logits.clone().requires_grad_(True)
    (_expected(cfg, ref, batch, k)[0] / (2 * tokens)).backward()
    torch.testing.assert_close(z.grad, ref.grad, rtol=1e-6, atol=1e-9)
    assert torch.all(z.grad[..., V:] == 0)


def test_global_token_mean_over_micro_batches():
    step = KDStep(KnowledgeDistillationConfig(sft_loss_weight=0.5), vocab_size=V)
    (l1, b1), (l2, b2) = _batch(seed=1, b=1, s=5), _batch(seed=2, b=3, s=5)
    normalizer = step.normalizer([b1, b2], global_examples=4)
    tokens = int((b1["labels"] != -100).sum() + (b2["labels"] != -100).sum())
    assert normalizer.item() == tokens
    loss_fn = step.loss_fn(normalizer)
    (a, ma), (b, mb) = loss_fn(b1, l1), loss_fn(b2, l2)
    joined = {k: torch.cat([b1[k], b2[k]]) for k in b1}
    want = _expected(step.config, torch.cat([l1, l2]), joined, K)[0] / tokens
    torch.testing.assert_close((a + b).double(), want, rtol=1e-6, atol=1e-9)
    sums = {k: float(ma[k] + mb[k]) for k in ma}
    final = step.finalize_metrics(sums)
    assert final["loss"] == pytest.approx(want.item(), rel=1e-6)
    assert set(final) == {"loss", "kd_loss", "sft_loss", "top1_agreement"}


def test_short_teacher_rows_are_padded_and_masked():
    logits, batch = _batch(t_len=4)
    batch["labels"][:, 4:] = -100
    cfg = KnowledgeDistillationConfig(tail=True)
    loss, _ = kd_loss_and_metrics(cfg, torch.tensor(1.0), batch, logits, vocab_size=V, group=None)
    trimmed = {k: v[:, :4] for k, v in batch.items()}
    want = _expected(cfg, logits[:, :4], trimmed, K)[0]
    torch.testing.assert_close(loss.double(), want, rtol=1e-6, atol=1e-9)


def test_top1_agreement_counts_matching_argmax():
    logits, batch = _batch()
    ids = batch["teacher_ids"].clone()
    logits[..., :V] = -5.0
    mask = batch["labels"] != -100
    agree = torch.zeros_like(mask)
    agree[0, 2:4] = True  # student's argmax equals the teacher's top-1 at two labelled positions
    agree[1, 0] = True
    for b, s in agree.nonzero().tolist():
        logits[b, s, ids[b, s, 0]] = 5.0
    for b, s in (~agree).nonzero().tolist():
        logits[b, s, ids[b, s, 1]] = 5.0
    _, metrics = kd_loss_and_metrics(
        KnowledgeDistillationConfig(), torch.tensor(1.0), batch, logits, vocab_size=V, group=None
    )
    assert metrics["top1_agree"].item() == int((agree & mask).sum()) == 3
    cross = KnowledgeDistillationConfig(cross_tokenizer=True)
    _, metrics = kd_loss_and_metrics(
        cross, torch.tensor(1.0), batch, logits, vocab_size=V, group=None
    )
    assert "top1_agree" not in metrics


def test_cross_tokenizer_pairs_by_rank():
    logits, batch = _batch()
    cfg = KnowledgeDistillationConfig(cross_tokenizer=True)
    loss, _ = kd_loss_and_metrics(
        cfg, torch.tensor(1.0), batch, logits.clone(), vocab_size=V, group=None
    )
    own = torch.topk(logits[..., :V], K, dim=-1).indices  # student's top-K, descending
    mask = batch["labels"] != -100
    kd = dense_kd(logits[..., :V], batch["teacher_logits"], own)
    torch.testing.assert_close(loss.double(), kd[mask].sum(), rtol=1e-6, atol=1e-9)


def test_kd_of_teacher_equal_student_is_zero():
    logits, batch = _batch()
    top = torch.topk(logits[..., :V], K, dim=-1)
    batch["teacher_logits"], batch["teacher_ids"] = top.values.float(), top.indices
    batch["teacher_logsumexp"] = torch.logsumexp(logits[..., :V], -1).float()
    for cfg in (KnowledgeDistillationConfig(), KnowledgeDistillationConfig(tail=True)):
        _, m = kd_loss_and_metrics(
            cfg, torch.tensor(1.0), batch, logits.clone(), vocab_size=V, group=None
        )
        assert abs(m["kd_loss"].item()) < 1e-5
        assert m["top1_agree"].item() == m["tokens"].item()


def test_config_errors_are_clear():
    with pytest.raises(ValueError, match=r"target_logits_scale=1\.0"):
        KnowledgeDistillationConfig(tail=True, target_logits_scale=2.0)
    with pytest.raises(ValueError, match="cannot both be 0"):
        KnowledgeDistillationConfig(kd_loss_weight=0.0)
    with pytest.raises(ValueError, match="fwd_kl"):
        KnowledgeDistillationConfig(kd_loss="kl")  # type: ignore[arg-type]
    logits, batch = _batch()
    with pytest.raises(ValueError, match="provides only 4"):
        kd_loss_and_metrics(
            KnowledgeDistillationConfig(top_k=5),
            torch.tensor(1.0),
            batch,
            logits,
            vocab_size=V,
            group=None,
        )
    with pytest.raises(ValueError, match="cross_tokenizer=true"):
        check_vocabularies(teacher_vocab_size=300, student_vocab_size=259, cross_tokenizer=False)
    check_vocabularies(teacher_vocab_size=300, student_vocab_size=259, cross_tokenizer=True)
    assert KnowledgeDistillationConfig(kd_loss="bwd_kl").divergence == "reverse_kl"
    assert KnowledgeDistillationConfig(kd_loss="jsd").divergence == "jsd"
    with pytest.raises(ValueError, match=r"jsd_beta must be in \[0, 1\]"):
        KnowledgeDistillationConfig(kd_loss="jsd", jsd_beta=1.5)
    with pytest.raises(ValueError, match=r"skew_alpha must be in \[0, 1\)"):
        KnowledgeDistillationConfig(kd_loss="skew_fwd_kl", skew_alpha=1.0)
    with pytest.raises(ValueError, match="on_policy_micro_batch_size"):
        KnowledgeDistillationConfig(on_policy_micro_batch_size=0)
    assert math.isclose(KnowledgeDistillationConfig().kd_loss_weight, 1.0)

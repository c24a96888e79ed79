"""Tiny models, synthetic-task examples and dense reference math for the align-kd tests."""

from __future__ import annotations

from pathlib import Path

import torch

from align_core import ModelConfig, build_gpt_model, seed_all
from align_data import (
    ByteTokenizer,
    SFTExample,
    TokenizeConfig,
    load_records,
    tokenize_records,
    write_synthetic_dataset,
)

TOKENIZER = ByteTokenizer()
VOCAB = TOKENIZER.vocab_size  # 259 real ids; models pad their rows beyond it
TEACHER_CFG = ModelConfig(
    vocab_size=VOCAB, make_vocab_size_divisible_by=64, seq_length=64, init_method_std=0.2
)
STUDENT_CFG = TEACHER_CFG.replace(hidden_size=32, ffn_hidden_size=64, num_attention_heads=2)


def synthetic_examples(tmp: Path, *, num_train: int, num_eval: int = 0, seed: int = 0):
    """Tokenized SFT examples of align-data's synthetic task: ``(train, eval)``."""
    files = write_synthetic_dataset(tmp, seed=seed, num_train=num_train, num_eval=num_eval)
    cfg = TokenizeConfig(max_length=64)

    def load(path: Path) -> list[SFTExample]:
        records = load_records(path, kind="sft").records
        return tokenize_records(records, TOKENIZER, cfg).examples

    return load(files.sft_train), (load(files.sft_eval) if num_eval else [])


def build(cfg: ModelConfig, seed: int) -> torch.nn.Module:
    """A single-process model with seeded weights."""
    seed_all(seed)
    return build_gpt_model(cfg)


def full_logits(model: torch.nn.Module, tokens: torch.Tensor, vocab: int = VOCAB) -> torch.Tensor:
    """``[B, S, V]`` logits over the real vocabulary (float64), plain forward."""
    seq = tokens.shape[1]
    pos = torch.arange(seq).expand_as(tokens)
    mask = torch.ones(seq, seq, dtype=torch.bool).triu(1)[None, None]
    return model(tokens, pos, mask)[..., :vocab].double()


def dense_kd(
    student: torch.Tensor,
    t_logits: torch.Tensor,
    t_ids: torch.Tensor,
    *,
    reverse: bool = False,
    s_scale: float = 1.0,
    t_scale: float = 1.0,
    t_lse: torch.Tensor | None = None,
    kind: str | None = None,
    beta: float = 0.5,
    alpha: float = 0.1,
) -> torch.Tensor:
    """Per-token divergence from DESIGN.md's table, written densely (float64).

    ``kind`` (default ``bwd_kl`` if ``reverse`` else ``fwd_kl``) may also be ``jsd`` (GKD:
    β·KL(p‖m) + (1−β)·KL(q‖m), m = βp + (1−β)q), ``skew_fwd_kl`` (KL(p ‖ αp + (1−α)q)) or
    ``skew_bwd_kl`` (KL(q ‖ (1−α)p + αq)); p is the teacher, q the student.
    """
    z = s_scale * student.double()
    t = t_logits.double()
    if t_lse is None:
        log_p = torch.log_softmax(t_scale * t, -1)
        log_q = torch.log_softmax(z.gather(-1, t_ids), -1)
    else:
        log_full = torch.log_softmax(z, -1)
        log_q_ids = log_full.gather(-1, t_ids)
        q_tail = 1 - log_q_ids.exp().sum(-1, keepdim=True)
        log_p_ids = t - t_lse.double().unsqueeze(-1)
        p_tail = (1 - log_p_ids.exp().sum(-1, keepdim=True)).clamp(min=1e-300)
        log_p = torch.cat([log_p_ids, p_tail.log()], -1)
        log_q = torch.cat([log_q_ids, q_tail.log()], -1)
    p, q = log_p.exp(), log_q.exp()

    def kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a * (a.log() - b.log())).sum(-1)

    kind = kind or ("bwd_kl" if reverse else "fwd_kl")
    if kind == "jsd":
        m = beta * p + (1 - beta) * q
        return beta * kl(p, m) + (1 - beta) * kl(q, m)
    if kind == "skew_fwd_kl":
        return kl(p, alpha * p + (1 - alpha) * q)
    if kind == "skew_bwd_kl":
        return kl(q, (1 - alpha) * p + alpha * q)
    return (q * (log_q - log_p)).sum(-1) if kind == "bwd_kl" else (p * (log_p - log_q)).sum(-1)


def nemo_kd_lines(examples, reader, *, batch_size: int, eos_id: int) -> list[dict]:
    """NeMo-Aligner ``compute_topk_logits.py`` lines for examples whose top-k are in ``reader``.

    Each chunk of ``batch_size`` examples is padded to its longest sequence as NeMo's SFT
    collate does (tokens = ids[:-1] and labels = ids[1:] padded with EOS, loss_mask 0 on the
    prompt and padding); top-k rows of padding positions are zeros.
    """
    import numpy as np

    lines = []
    for lo in range(0, len(examples), batch_size):
        chunk = examples[lo : lo + batch_size]
        seqs = [np.concatenate([e.prompt_ids, e.completion_ids]).tolist() for e in chunk]
        s = max(len(x) for x in seqs) - 1
        for e, seq in zip(chunk, seqs, strict=True):
            n = len(seq) - 1
            sample = reader[e.index]
            k = sample.logits.shape[1]
            topk = sample.logits.float().tolist() + [[0.0] * k] * (s - n)
            ids = sample.ids.tolist() + [[0] * k] * (s - n)
            mask = [0] * (len(e.prompt_ids) - 1) + [1] * len(e.completion_ids) + [0] * (s - n)
            lines.append(
                {
                    "tokens": seq[:-1] + [eos_id] * (s - n),
                    "labels": seq[1:] + [eos_id] * (s - n),
                    "loss_mask": mask,
                    "context_lengths": len(e.prompt_ids),
                    "topk_logits": topk,
                    "topk_token_ids": ids,
                    "log_sum_exp_logits": sample.logsumexp.tolist() + [0.0] * (s - n),
                    "index": e.index,
                }
            )
    return lines

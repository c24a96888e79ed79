"""Distillation benchmark: teacher-pass throughput, shard size against NeMo-Aligner JSONL, and
the student loss's peak memory with the top-k KD loss against a dense full-vocabulary KD loss.

    uv run python bench/kd.py                 # defaults: vocab 32000, K 100, a small CPU teacher
    uv run python bench/kd.py --vocab 128256 --top-k 100 --examples 128

1. Teacher pass: a randomly initialised GPT (its top-k ids spread over the whole vocabulary, as a
   real teacher's do) over align-data's synthetic SFT task with `align_kd.run_teacher_pass`;
   tokens/s = input positions stored per second.
2. Size: the store's bytes per stored position against the JSONL NeMo-Aligner's
   ``compute_topk_logits.py`` writes for the same data (its line format, ``json.dumps`` of
   ``tolist()``, batches padded to their longest sequence as NeMo's collate does), for fp32
   teacher logits and for bf16 ones (a bf16 teacher's logits print shorter). Plus the time to
   fetch one random sample: memory-mapped store vs scanning the JSONL.
3. Memory: one student loss step on ``[N, V]`` logits from hidden states and an output layer,
   forward + backward; peak tensor memory above the inputs, counted by torch's ``MemTracker``
   (every tensor storage allocated through the dispatcher, on CPU or CUDA).
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _examples(tmp: Path, n: int):
    from align_data import (
        ByteTokenizer,
        TokenizeConfig,
        load_records,
        tokenize_records,
        write_synthetic_dataset,
    )

    files = write_synthetic_dataset(tmp / "data", seed=0, num_train=n, num_eval=0)
    records = load_records(files.sft_train, kind="sft").records
    return tokenize_records(records, ByteTokenizer(), TokenizeConfig(max_length=256)).examples


def _nemo_jsonl(examples, reader, path: Path, batch_size: int, bf16: bool) -> int:
    """Write NeMo-Aligner's KD JSONL for the stored top-k; returns its size in bytes.

    Lines as ``compute_topk_logits.py`` writes them: every field of NeMo's SFT collate but
    ``position_ids``/``attention_mask`` (``tokens``, ``labels``, ``loss_mask``, ``contexts``,
    ``context_lengths``, ``answers``, ``metadata``), each batch padded with EOS to its longest
    sequence rounded up to a multiple of 8, then ``topk_logits``, ``topk_token_ids``,
    ``log_sum_exp_logits`` (padding positions included) and ``index``.
    """
    eos = 258
    with open(path, "w", encoding="utf-8") as f:
        for lo in range(0, len(examples), batch_size):
            chunk = examples[lo : lo + batch_size]
            seqs = [np.concatenate([e.prompt_ids, e.completion_ids]).tolist() for e in chunk]
            s = -(-(max(len(x) for x in seqs) - 1) // 8) * 8
            for i, (e, seq) in enumerate(zip(chunk, seqs, strict=True)):
                n = len(seq) - 1
                pad = s - n
                sample = reader[lo + i]
                logits = sample.logits.float()
                if bf16:
                    logits = logits.bfloat16().float()
                k = logits.shape[1]
                prompt = len(e.prompt_ids)
                answer = seq[prompt:]
                obj = {
                    "tokens": seq[:-1] + [eos] * pad,
                    "labels": seq[1:] + [eos] * pad,
                    "loss_mask": [0] * (prompt - 1) + [1] * (n - prompt + 1) + [0] * pad,
                    "contexts": seq[:prompt] + [eos] * (s - prompt),
                    "context_lengths": prompt,
                    "answers": answer + [eos] * (s - len(answer)),
                    "metadata": {},
                    "topk_logits": logits.tolist() + [[0.0] * k] * pad,
                    "topk_token_ids": sample.ids.tolist() + [[0] * k] * pad,
                    "log_sum_exp_logits": sample.logsumexp.tolist() + [0.0] * pad,
                    "index": lo + i,
                }
                f.write(json.dumps(obj, ensure_ascii=False) + "\n")
    return path.stat().st_size


def _store_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def teacher_and_size(args: argparse.Namespace) -> list[str]:
    from align_core import ModelConfig, ParallelConfig, build_gpt_model, init_distributed, seed_all
    from align_kd import TeacherPassConfig, open_teacher_store, run_teacher_pass

    init_distributed(ParallelConfig(), seed=0)
    seed_all(0)
    cfg = ModelConfig(
        vocab_size=args.vocab,
        num_layers=args.layers,
        hidden_size=args.hidden,
        ffn_hidden_size=4 * args.hidden,
        num_attention_heads=max(1, args.hidden // 64),
        seq_length=256,
        init_method_std=0.2,
    )
    teacher = build_gpt_model(cfg)
    rows = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        examples = _examples(tmp, args.examples)
        positions = sum(len(e.prompt_ids) + len(e.completion_ids) - 1 for e in examples)
        sizes = {}
        warm = TeacherPassConfig(output_dir=str(tmp / "warm-up"), top_k=args.top_k)
        run_teacher_pass(  # first forwards pay one-off set-up costs
            teacher,
            examples[:8],
            warm,
            vocab_size=args.vocab,
            pad_id=256,
            progress=lambda s, p: None,
        )
        for dtype in ("bf16", "fp32"):
            out = tmp / f"store-{dtype}"
            pass_cfg = TeacherPassConfig(
                output_dir=str(out), top_k=args.top_k, dtype=dtype, micro_batch_size=8
            )
            with torch.no_grad():
                result = run_teacher_pass(
                    teacher,
                    examples,
                    pass_cfg,
                    vocab_size=args.vocab,
                    pad_id=256,
                    progress=lambda s, p: None,
                )
            sizes[dtype] = _store_bytes(out)
            rows.append(
                f"| teacher pass ({dtype} store) | {result.positions_per_second:,.0f} tokens/s "
                f"| {positions:,} positions, {args.layers}×{args.hidden} GPT, V={args.vocab:,}, "
                f"K={args.top_k} |"
            )
        reader = open_teacher_store(tmp / "store-fp32")
        for label, bf16 in (("fp32 logits", False), ("bf16 logits", True)):
            jsonl = _nemo_jsonl(
                examples, reader, tmp / f"nemo-{bf16}.jsonl", args.nemo_batch_size, bf16
            )
            for dtype in ("bf16", "fp32"):
                rows.append(
                    f"| NeMo JSONL ({label}) vs store ({dtype}) | {jsonl / positions:,.0f} vs "
                    f"{sizes[dtype] / positions:,.0f} bytes/token | {jsonl / sizes[dtype]:.1f}× "
                    "smaller |"
                )
        picks = random.Random(0).sample(range(len(examples)), min(20, len(examples)))
        start = time.perf_counter()
        for i in picks:
            reader[i].logits.float().sum()
        store_ms = 1e3 * (time.perf_counter() - start) / len(picks)
        start = time.perf_counter()
        for i in picks:
            with open(tmp / "nemo-False.jsonl", encoding="utf-8") as f:
                for line in f:
                    obj = json.loads(line)
                    if obj["index"] == i:
                        break
        jsonl_ms = 1e3 * (time.perf_counter() - start) / len(picks)
        rows.append(
            f"| random sample read | store {store_ms:.2f} ms vs JSONL scan {jsonl_ms:.1f} ms "
            f"| {len(examples)} samples |"
        )
    return rows


def _loss_step(kind: str, n: int, vocab: int, hidden: int, k: int, device: str) -> int:
    """One student loss step (forward + backward); the peak tensor memory above its inputs."""
    from torch.distributed._tools.mem_tracker import MemTracker

    from align_losses import topk_kd_loss

    g = torch.Generator(device="cpu").manual_seed(0)
    h = torch.randn(n, hidden, generator=g).to(device).requires_grad_(True)
    w = (torch.randn(vocab, hidden, generator=g) * 0.05).to(device).requires_grad_(True)
    t_logits = torch.sort(torch.randn(n, k, generator=g) * 3, descending=True).values.to(device)
    t_ids = torch.argsort(torch.rand(n, vocab, generator=g), dim=-1)[:, :k].to(device)
    t_lse = (torch.logsumexp(t_logits, -1) + 1.0).to(device)
    tracker = MemTracker()
    tracker.track_external(h, w, t_logits, t_ids, t_lse)
    with tracker:
        start = tracker.get_tracker_snapshot("current")[torch.device(device)]["Total"]
        logits = h @ w.t()
        if kind == "topk":
            loss = topk_kd_loss(logits, t_logits, t_ids).mean()
        elif kind == "topk_tail":
            loss = topk_kd_loss(logits, t_logits, t_ids, teacher_logsumexp=t_lse).mean()
        else:  # dense: the teacher's top-k as a dense [N, V] target, full-vocabulary KL
            target = torch.full((n, vocab), float("-inf"), device=device)
            target.scatter_(1, t_ids, torch.log_softmax(t_logits, -1))
            loss = torch.nn.functional.kl_div(
                torch.log_softmax(logits, -1), target, log_target=True, reduction="batchmean"
            )
        loss.backward()
        del logits, loss
    return tracker.get_tracker_snapshot("peak")[torch.device(device)]["Total"] - start


def memory(args: argparse.Namespace) -> list[str]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    n, v = args.tokens, args.vocab
    logits_mib = n * v * 4 / 2**20
    results = {
        kind: _loss_step(kind, n, v, args.hidden, args.top_k, device) / 2**20
        for kind in ("topk", "topk_tail", "dense")
    }
    rows = []
    for kind, label in (
        ("topk", "topk_kd_loss (K-way)"),
        ("topk_tail", "topk_kd_loss + tail"),
        ("dense", "dense full-vocabulary KL"),
    ):
        rows.append(
            f"| student loss step peak, {label} | {results[kind]:,.0f} MiB "
            f"| N={n:,} tokens, V={v:,}, K={args.top_k} (one [N, V] fp32 = {logits_mib:,.0f} MiB)"
            f"; dense / this = {results['dense'] / results[kind]:.1f}× |"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--top-k", type=int, default=100)
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=2048, help="tokens of the memory step")
    parser.add_argument("--skip-teacher", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--nemo-batch-size", type=int, default=8, help="NeMo's batch_size")
    args = parser.parse_args()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"align-kd benchmark on {device}, torch {torch.__version__}\n")
    print("| measurement | result | setting |")
    print("|---|---|---|")
    rows = [] if args.skip_teacher else teacher_and_size(args)
    rows += [] if args.skip_memory else memory(args)
    for row in rows:
        print(row, flush=True)


if __name__ == "__main__":
    main()

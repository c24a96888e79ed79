"""align-data benchmark: preprocessing throughput and packing efficiency.

    uv run python bench/data.py [--records 40000] [--seed 0]

1. Preprocessing throughput (records/s) of preference JSONL with 1 and 2 worker processes, for
   the byte tokenizer and for a small Hugging Face BPE tokenizer trained on the fly, plus the time
   of a second run that reuses the cached shards.
2. Packing efficiency (real positions / positions computed) on a long-tailed (log-normal) length
   distribution: no packing (every sequence padded to max_length, or micro-batches of 8 padded to
   their longest) against first-fit-decreasing and shuffled first fit, for SFT sequences and for
   preference pairs (chosen + rejected kept in one pack).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from align_data import (
    ByteTokenizer,
    HFTokenizer,
    PreprocessConfig,
    TokenizeConfig,
    plan_packs,
    preprocess,
)

WORDS = [
    "the",
    "a",
    "model",
    "answer",
    "question",
    "data",
    "token",
    "train",
    "loss",
    "policy",
    "reference",
    "prefer",
    "chosen",
    "rejected",
    "response",
    "prompt",
    "reward",
    "learn",
    "step",
    "batch",
    "pack",
    "length",
    "sample",
    "teacher",
    "student",
    "logits",
    "sequence",
    "mask",
    "label",
    "gradient",
    "update",
    "epoch",
    "shard",
    "cache",
    "worker",
]


def sentence(rng: random.Random, mean_words: float) -> str:
    n = max(1, int(rng.lognormvariate(np.log(mean_words), 0.8)))
    return " ".join(rng.choice(WORDS) for _ in range(n)) + "."


def write_preference_file(path: Path, records: int, seed: int) -> None:
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(records):
            row = {
                "prompt": sentence(rng, 25) + "\n",
                "chosen": sentence(rng, 30),
                "rejected": sentence(rng, 30),
            }
            f.write(json.dumps(row) + "\n")


def hf_tokenizer(directory: Path, seed: int) -> HFTokenizer:
    rng = random.Random(seed)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1000,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([sentence(rng, 30) for _ in range(2000)], trainer)
    tok.save(str(directory / "tokenizer.json"))
    return HFTokenizer(directory, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def bench_preprocess(records: int, seed: int) -> None:
    work = Path(tempfile.mkdtemp(prefix="align-data-bench-"))
    try:
        source = work / "pref.jsonl"
        write_preference_file(source, records, seed)
        size_mb = source.stat().st_size / 2**20
        tokenizers = {"byte": ByteTokenizer(), "hf-bpe-1k": hf_tokenizer(work, seed)}
        print(f"\n## Preprocessing throughput ({records:,} preference records, {size_mb:.1f} MB)")
        load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
        print(f"CPU cores: {os.cpu_count()}; load average before: {load}\n")
        print("| tokenizer | workers | wall s | records/s | tokens/s | CPU s | records/CPU-s |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for name, tok in tokenizers.items():
            for workers in (1, 2):
                cache = work / f"cache-{name}-{workers}"
                cfg = PreprocessConfig(
                    kind="preference",
                    num_workers=workers,
                    chunk_bytes=1 << 20,
                    progress=False,
                    tokenize=TokenizeConfig(max_length=1024),
                )
                cpu = cpu_seconds()
                start = time.perf_counter()
                ds = preprocess(source, tok, cache, cfg)
                seconds = time.perf_counter() - start
                cpu = cpu_seconds() - cpu
                print(
                    f"| {name} | {workers} | {seconds:.2f} | {len(ds) / seconds:,.0f} | "
                    f"{ds.summary.tokens / seconds:,.0f} | {cpu:.2f} | {len(ds) / cpu:,.0f} |"
                )
            start = time.perf_counter()
            again = preprocess(source, tok, cache, cfg)
            seconds = time.perf_counter() - start
            assert again.reused
            print(
                f"| {name} | cached rerun | {seconds:.2f} | {len(again) / seconds:,.0f} "
                "| - | - | - |"
            )
        load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
        print(f"\nload average after: {load}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the worker processes)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def padded_efficiency(rows: np.ndarray, width: int) -> float:
    """Every sequence padded to ``width`` positions."""
    return float(rows.sum() / (rows.size * width))


def microbatch_efficiency(items: np.ndarray, micro: int, seed: int) -> float:
    """Items (rows of one or two sequences) shuffled into micro-batches padded to the longest."""
    order = np.random.default_rng(seed).permutation(len(items))
    slots = 0
    for start in range(0, len(order), micro):
        chunk = items[order[start : start + micro]]
        slots += chunk.size * int(chunk.max())
    return float(items.sum() / slots)


def bench_packing(seed: int) -> None:
    rng = np.random.default_rng(seed)
    max_length, capacity, n = 4096, 4096, 20_000
    # Long tail: median ~300 positions, a few near the maximum.
    sft = np.clip(rng.lognormal(np.log(300), 1.0, size=n), 16, max_length).astype(np.int64)
    pref = np.clip(rng.lognormal(np.log(300), 1.0, size=(n, 2)), 16, max_length // 2)
    pref = pref.astype(np.int64)  # (chosen, rejected) positions per pair
    print(f"\n## Packing efficiency (real positions / computed positions, {n:,} items)")
    print(
        f"Log-normal lengths (median {int(np.median(sft))}, p99 {int(np.percentile(sft, 99))}, "
        f"max {max_length} for SFT, {max_length // 2} per preference sequence); "
        f"pack capacity {capacity}; micro-batches of 8 items.\n"
    )
    print("| data | method | rows | efficiency | plan time (s) |")
    print("|---|---|---:|---:|---:|")
    cases = (
        ("SFT", sft[:, None], sft, max_length),
        ("preference pairs", pref, pref.sum(axis=1), max_length // 2),
    )
    for name, rows, items, width in cases:
        print(
            f"| {name} | no packing, pad to max_length | {rows.size:,} | "
            f"{padded_efficiency(rows, width):.3f} | - |"
        )
        print(
            f"| {name} | no packing, pad micro-batch to its longest | {rows.size:,} | "
            f"{microbatch_efficiency(rows, 8, seed):.3f} | - |"
        )
        for algorithm in ("first_fit_decreasing", "first_fit_shuffle"):
            start = time.perf_counter()
            plan = plan_packs(items, capacity, algorithm=algorithm, seed=seed)
            seconds = time.perf_counter() - start
            print(
                f"| {name} | {algorithm} | {plan.num_packs:,} | {plan.efficiency:.3f} | "
                f"{seconds:.2f} |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=40_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    bench_preprocess(args.records, args.seed)
    bench_packing(args.seed)


if __name__ == "__main__":
    main()

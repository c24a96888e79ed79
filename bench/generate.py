"""Generation throughput with and without the KV cache (align_core.generation), one process.

    uv run python bench/generate.py                 # tiny and larger CPU models
    uv run python bench/generate.py --batch 16 --new-tokens 128 --repeats 5 --threads 2

Greedy decoding of random prompts with the EOS disabled, so every sample generates exactly
``--new-tokens`` tokens. tokens/s counts generated tokens only (batch × new tokens) over one
`Generator.generate` call, the median of ``--repeats`` calls after one warm-up call that also
checks that both paths produce the same tokens. Besides wall-clock tokens/s the table shows tokens
per CPU-second of this process, which moves less when other jobs share the machine.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

from align_core import ModelConfig, ParallelConfig, build_gpt_model, init_distributed
from align_core.generation import Generator, LengthConfig, SamplingConfig

CONFIGS = {
    "tiny (2L, h64)": ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=256),
    "larger (12L, h256)": ModelConfig(
        num_layers=12,
        hidden_size=256,
        ffn_hidden_size=1024,
        num_attention_heads=8,
        vocab_size=1024,
    ),
}


def _time_call(
    generator: Generator, prompts: list[list[int]], length: LengthConfig
) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    generator.generate(prompts, SamplingConfig(use_greedy=True), length)
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    init_distributed(ParallelConfig(), seed=0)
    length = LengthConfig(max_length=args.new_tokens)
    print(
        f"batch {args.batch}, prompt {args.prompt_len}, {args.new_tokens} new tokens, greedy, "
        f"fp32, {args.threads} thread(s), median of {args.repeats}\n"
        "| model | params | KV cache tok/s | recompute tok/s | speed-up | "
        "KV cache tok/CPU-s | recompute tok/CPU-s | same tokens |\n"
        "|---|---|---|---|---|---|---|---|",
        flush=True,
    )
    for name, base in CONFIGS.items():
        cfg = base.replace(seq_length=args.prompt_len + args.new_tokens)
        torch.manual_seed(0)
        model = build_gpt_model(cfg).eval()
        params = sum(p.numel() for p in model.parameters())
        prompts = torch.randint(0, cfg.vocab_size - 1, (args.batch, args.prompt_len)).tolist()
        # the EOS id is outside the vocabulary the model may generate, so no sample stops early
        make = dict(vocab_size=cfg.vocab_size - 1, eos_ids=cfg.vocab_size - 1)
        cached = Generator(model, **make)
        plain = Generator(model, use_kv_cache=False, **make)
        same = torch.equal(
            cached.generate(prompts, SamplingConfig(use_greedy=True), length).tokens,
            plain.generate(prompts, SamplingConfig(use_greedy=True), length).tokens,
        )
        generated = args.batch * args.new_tokens
        wall, cpu = {}, {}
        for label, gen in (("cache", cached), ("recompute", plain)):
            times = [_time_call(gen, prompts, length) for _ in range(args.repeats)]
            wall[label] = generated / statistics.median(t[0] for t in times)
            cpu[label] = generated / statistics.median(t[1] for t in times)
        print(
            f"| {name} | {params / 1e6:.2f} M | {wall['cache']:,.0f} | {wall['recompute']:,.0f} | "
            f"{wall['cache'] / wall['recompute']:.1f}x | {cpu['cache']:,.0f} | "
            f"{cpu['recompute']:,.0f} | {'yes' if same else 'NO'} |",
            flush=True,
        )


if __name__ == "__main__":
    main()

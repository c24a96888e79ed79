"""align-core model layer on CPU: forward+backward throughput and checkpoint save/load time.

Run: ``uv run python bench/model.py`` (``--configs tiny`` for a quick look, ``--steps N``).

For each configuration (fp32, one process, gloo, megatron local spec, DDP-wrapped as in
training) it measures, after one warm-up step, the best of ``--steps`` timed steps of:

- forward+backward through `align_core.forward_backward` with token log-probs from the logits
  (``fused=False``) and from the final hidden states (``fused=True``, no ``[B, S, V]`` logits);
- one optimizer step (megatron Adam, clipping at 1.0);
- saving a checkpoint (model + optimizer + RNG, `align_core.Checkpointer`) and loading it into
  fresh objects.

It prints a markdown table: wall-clock minima, and in parentheses the minima of this process's
CPU time (``time.process_time``; the checkpoint writer's forked processes are not counted). On a
busy machine the wall times are noisy and more than one thread can make them much worse (OpenMP
threads spin waiting for each other); with ``--threads 1`` the CPU time is close to what a quiet
machine takes.
"""

from __future__ import annotations

import argparse
import functools
import tempfile
import time
import warnings
from pathlib import Path

CONFIGS = {
    # name: (ModelConfig overrides, micro-batch size, sequence length)
    "tiny": ({}, 8, 128),
    "100m": (
        {
            "num_layers": 12,
            "hidden_size": 768,
            "ffn_hidden_size": 2048,
            "num_attention_heads": 12,
            "vocab_size": 16000,
            "seq_length": 256,
        },
        2,
        256,
    ),
}


def _best(fn, steps: int) -> tuple[float, float]:
    """Best wall-clock and best process-CPU seconds of ``steps`` calls after one warm-up."""
    fn()
    walls, cpus = [], []
    for _ in range(steps):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return min(walls), min(cpus)


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def bench(name: str, steps: int) -> dict[str, float | str]:
    import torch

    from align_core import (
        Checkpointer,
        LogProbConfig,
        ModelConfig,
        OptimizerConfig,
        build_gpt_model,
        build_optimizer,
        forward_backward,
        forward_token_logps,
        seed_all,
        wrap_ddp,
    )

    overrides, micro, seq = CONFIGS[name]
    cfg = ModelConfig(**overrides)
    seed_all(0)
    model = wrap_ddp(build_gpt_model(cfg))
    optimizer = build_optimizer(model, OptimizerConfig(lr=1e-5), clip_grad=1.0)
    params = sum(p.numel() for p in model.module.parameters())
    tokens = torch.randint(0, cfg.vocab_size, (micro, seq))
    labels = torch.roll(tokens, -1, 1)
    labels[:, -1] = -100
    batches = [{"tokens": tokens, "labels": labels}]

    def loss_fn(batch, logps):
        return -logps.sum() / micro, {}

    def fwd_bwd(fused: bool) -> None:
        model.zero_grad_buffer()
        forward = functools.partial(
            forward_token_logps, vocab_size=cfg.vocab_size, config=LogProbConfig(fused=fused)
        )
        forward_backward(model, batches, forward, loss_fn)

    logits_s = _best(functools.partial(fwd_bwd, False), steps)
    fused_s = _best(functools.partial(fwd_bwd, True), steps)
    optim_s = _best(optimizer.step, steps)

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Checkpointer(tmp, keep_last=1)
        counter = iter(range(1, 1000))
        save_s = _best(lambda: ckpt.save(next(counter), model, optimizer), steps)
        size = _dir_bytes(ckpt.path(ckpt.latest_step()))
        seed_all(1)
        fresh = wrap_ddp(build_gpt_model(cfg))
        fresh_opt = build_optimizer(fresh, OptimizerConfig(lr=1e-5), clip_grad=1.0)
        load_s = _best(lambda: ckpt.load(fresh, fresh_opt), steps)

    n_tokens = micro * seq
    return {
        "config": name,
        "params": f"{params / 1e6:.1f} M",
        "batch": f"{micro}×{seq}",
        "fwd+bwd tok/s, logits (per CPU-s)": _rate(n_tokens, logits_s),
        "fwd+bwd tok/s, fused (per CPU-s)": _rate(n_tokens, fused_s),
        "optimizer step": _secs(optim_s),
        "ckpt size": f"{size / 2**20:.0f} MiB",
        "save": _secs(save_s),
        "load": _secs(load_s),
    }


def _rate(n: int, times: tuple[float, float]) -> str:
    return f"{n / times[0]:,.0f} ({n / times[1]:,.0f})"


def _secs(times: tuple[float, float]) -> str:
    return f"{times[0]:.2f} s ({times[1]:.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="tiny,100m", help="comma-separated: tiny, 100m")
    parser.add_argument("--steps", type=int, default=2, help="timed repetitions (best is kept)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    from align_core import ParallelConfig, init_distributed

    init_distributed(ParallelConfig())
    rows = [bench(name, args.steps) for name in args.configs.split(",")]
    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads, fp32, 1 process\n")
    header = list(rows[0])
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(str(row[h]) for h in header) + " |")


if __name__ == "__main__":
    main()

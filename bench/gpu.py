"""One GPU, one command: the `gpu` tests, then DPO training throughput per reference strategy.

    uv run python bench/gpu.py                       # tests + table, about 5 min on one H100/H200
    uv run python bench/gpu.py --out gpu.json        # also write everything as JSON
    uv run python bench/gpu.py --skip-tests --models llama-1b --strategies swap precompute

Without CUDA it prints one line and exits with code 2. Exit code 1: a `gpu` test or a
measurement failed (the table and the JSON say which); 0 otherwise.

1. ``pytest -m gpu`` over the workspace's test paths, in a subprocess (`packages/align-core/
   tests/test_gpu.py`: Transformer Engine vs local spec DPO/KTO steps, bf16 step-0 loss ln 2,
   `.nemo` under TE, KV-cache decoding).
2. DPO training through the production `align_core.trainer.loop.Trainer` (megatron DDP, megatron
   Adam with fp32 master weights, bf16 model, TE layers where installed, the fused log-prob
   path), one run per model × reference strategy (`align_core.reference`): ``swap`` (reference
   weights in pinned host memory), ``precompute`` (one forward pass before training; its time is
   reported apart), ``model`` (a second model on the GPU), ``adapters`` (LoRA rank 16 on every
   linear, the base model as reference). Models:

   - ``llama-1b``: Llama-shaped, random weights: 16 layers, hidden 2048, SwiGLU ffn 5632, 32
     heads, 8 KV heads, vocabulary 32000, untied (0.85 B parameters);
   - ``smollm2-135m``: SmolLM2-135M-Instruct loaded from the Hugging Face directory
     ``tests/hf_models.py`` builds (`align_core.hf.open_hf` + `load_hf_weights`); skipped with
     its reason when the ``hf`` dependency group is missing.

   Synthetic pairs, every sequence exactly ``--seq`` tokens (a quarter prompt), so no padding;
   ``--warmup`` steps (the first one's preference loss must be ln 2), then ``--steps`` timed
   steps between two device synchronisations. Reported: tokens/s (policy tokens, chosen and
   rejected, per second of training step), MFU (`step_flops` / time / the GPU's bf16 dense peak
   from `peak_bf16_flops`, n/a for GPUs not in the table), peak memory
   (``torch.cuda.max_memory_allocated`` over the run's steps, weights and optimizer state
   included).

A ``--budget-s`` wall-clock budget (default 420 s, counted from the start) skips the remaining
runs once spent, so the command stays under 8 minutes on one H100/H200.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import importlib.util
import json
import math
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
STRATEGIES = ("swap", "precompute", "model", "adapters")
MODELS = ("llama-1b", "smollm2-135m")

PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989.0),
    ("H100", 989.0),  # SXM; PCIe and NVL parts are slower and not in the table
    ("A100", 312.0),
    ("L40S", 362.0),
)
"""Dense (no sparsity) bf16 tensor-core peak, TFLOP/s, by a substring of the device name."""


# ------------------------------------------------------------------------------- pure parts


def peak_bf16_flops(device_name: str) -> float | None:
    """The dense bf16 peak FLOP/s of a GPU, from `PEAK_BF16_TFLOPS`; None when not in the table.

    Args:
        device_name: ``torch.cuda.get_device_name()``, e.g. ``"NVIDIA H100 80GB HBM3"``.
    """
    name = device_name.upper()
    if "H100" in name and ("PCIE" in name or "NVL" in name):
        return None
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in name:
            return tflops * 1e12
    return None


def matmul_params(
    *,
    num_layers: int,
    hidden_size: int,
    ffn_hidden_size: int,
    num_attention_heads: int,
    num_query_groups: int | None,
    kv_channels: int | None,
    vocab_size: int,
    gated: bool,
) -> int:
    """N of the FLOP count: the parameters that take part in matrix multiplications.

    Per layer the fused q/k/v projection ``h × (heads + 2·groups)·d``, the attention output
    ``heads·d × h``, the MLP's ``h × ffn`` (twice for gated activations) and ``ffn × h``; plus
    the output layer ``vocab × h`` (counted once whether or not it is tied to the input
    embedding, whose lookup is no matmul). Biases and norms are left out.
    """
    groups = num_query_groups or num_attention_heads
    d = kv_channels or hidden_size // num_attention_heads
    per_layer = (
        hidden_size * (num_attention_heads + 2 * groups) * d
        + num_attention_heads * d * hidden_size
        + hidden_size * ffn_hidden_size * (2 if gated else 1)
        + ffn_hidden_size * hidden_size
    )
    return num_layers * per_layer + vocab_size * hidden_size


def sequence_flops(
    n_params: int,
    num_layers: int,
    attention_width: int,
    seq: int,
    *,
    kind: str,
) -> float:
    """FLOPs of one sequence of ``seq`` tokens (the PaLM / Megatron "model FLOPs" count).

    With N = `matmul_params`, L layers, a = heads × head width (the hidden size here) and s the
    sequence length:

    - ``forward``: ``2·N·s + 4·L·a·s²`` (a multiply-add is 2 FLOPs; ``QKᵀ`` and ``softmax·V``
      are ``2·a·s²`` each per layer);
    - ``train`` (forward + backward, the backward twice the forward):
      ``6·N·s + 12·L·a·s²``;
    - ``frozen`` (LoRA: the base weights get no gradient, so the backward skips their
      ``2·N·s`` weight-gradient half; attention has no weights):
      ``4·N·s + 12·L·a·s²``.

    The attention term counts the whole ``s × s`` score matrix, not the causal half (the
    convention of the PaLM paper's MFU, which Megatron also reports).

    Raises:
        ValueError: An unknown ``kind``.
    """
    dense, attention = n_params * seq, num_layers * attention_width * seq * seq
    if kind == "forward":
        return 2.0 * dense + 4.0 * attention
    if kind == "train":
        return 6.0 * dense + 12.0 * attention
    if kind == "frozen":
        return 4.0 * dense + 12.0 * attention
    raise ValueError(f"kind must be forward, train or frozen, got {kind!r}")


def step_flops(
    n_params: int,
    num_layers: int,
    attention_width: int,
    seq_lengths: Sequence[int],
    *,
    strategy: str,
) -> float:
    """FLOPs of one DPO optimizer step over sequences of ``seq_lengths`` (chosen and rejected).

    The policy trains on every sequence (``frozen`` for ``adapters``: LoRA); the reference runs a
    forward over every sequence in the step with ``swap``, ``model`` and ``adapters``, and none
    with ``precompute`` (its pass happens once, before training, and is timed apart).
    """
    kind = "frozen" if strategy == "adapters" else "train"
    total = sum(
        sequence_flops(n_params, num_layers, attention_width, s, kind=kind) for s in seq_lengths
    )
    if strategy != "precompute":
        total += sum(
            sequence_flops(n_params, num_layers, attention_width, s, kind="forward")
            for s in seq_lengths
        )
    return total


def mfu(flops: float, seconds: float, peak_flops: float | None) -> float | None:
    """Model FLOPs utilisation: achieved FLOP/s over the peak; None without a peak."""
    if peak_flops is None or seconds <= 0:
        return None
    return flops / seconds / peak_flops


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """The results as a markdown table (skipped and failed runs say why)."""
    head = (
        "| model | params | seq | strategy | micro × accum | tok/s | MFU | peak memory | "
        "step-0 loss | precompute |\n|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in rows:
        if r.get("error") or r.get("skipped"):
            why = r.get("error") or r.get("skipped")
            lines.append(f"| {r['model']} | | | {r['strategy']} | | {why} | | | | |")
            continue
        util = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f} %"
        pre = "" if r["precompute_s"] is None else f"{r['precompute_s']:.1f} s"
        lines.append(
            f"| {r['model']} | {r['params'] / 1e6:,.1f} M | {r['seq']} | {r['strategy']} | "
            f"{r['micro_batch_size']} × {r['accumulation']} | {r['tokens_per_s']:,.0f} | {util} | "
            f"{r['peak_memory_bytes'] / 2**30:.1f} GiB | {r['step0_loss']:.6f} | {pre} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------- measurement


def _hf_models():
    spec = importlib.util.spec_from_file_location("hf_models", ROOT / "tests" / "hf_models.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _llama_1b(seq: int):
    from align_core import ModelConfig

    config = ModelConfig(
        num_layers=16,
        hidden_size=2048,
        ffn_hidden_size=5632,
        num_attention_heads=32,
        num_query_groups=8,
        vocab_size=32000,
        seq_length=seq,
        activation="swiglu",
        normalization="RMSNorm",
        dtype="bf16",
    )
    return config, None


def _smollm2(seq: int):
    """SmolLM2-135M's config (bf16) and directory; any ``seq`` fits its 8192 positions."""
    path = _hf_models().smollm2_dir()
    from align_core.hf import open_hf

    with open_hf(path) as ckpt:
        config = ckpt.model_config_for(1)
    return config.replace(dtype="bf16"), path


def _build(config, weights: Path | None):
    from align_core import build_gpt_model

    model = build_gpt_model(config)
    if weights is not None:
        from align_core.hf import load_hf_weights, open_hf

        with open_hf(weights) as ckpt:
            load_hf_weights(model, ckpt)
    return model


def _pairs(count: int, seq: int, vocab: int, seed: int):
    import numpy as np

    from align_data import PreferenceExample

    rng = np.random.default_rng(seed)
    prompt = seq // 4
    response = seq - prompt + 1  # a row is prompt + response - 1 positions

    def ids(n: int):
        return rng.integers(0, vocab, n, dtype=np.int64).astype(np.int32)

    return [
        PreferenceExample(ids(prompt), ids(response), ids(response), index=i) for i in range(count)
    ]


def _reference(strategy: str, policy, forward, data, config, weights, workdir: Path):
    from align_core.reference import (
        AdapterReference,
        ModelReference,
        SwapReference,
        precompute_reference,
    )

    if strategy == "swap":
        return SwapReference(policy, forward), None
    if strategy == "model":
        second = _build(config, weights)
        second.load_state_dict({k: v for k, v in policy.state_dict().items() if "_lora." not in k})
        return ModelReference(second, forward), None
    if strategy == "adapters":
        from align_core.lora import lora_disabled

        return AdapterReference(policy, forward, lora_disabled), None
    steps = data.steps_per_epoch
    start = time.perf_counter()
    reference = precompute_reference(
        policy,
        forward,
        root=workdir / "reference_cache",
        key={"bench": "gpu", "strategy": strategy},
        splits={
            "train": (
                len(data.train),
                lambda: iter(
                    [(data.train_micro_batches(s * data.global_batch_size) for s in range(steps))]
                ),
            )
        },
        writer=True,
    )
    torch.cuda.synchronize()
    return reference, time.perf_counter() - start


def run_one(
    name: str,
    config: Any,
    weights: Path | None,
    strategy: str,
    *,
    seq: int,
    micro_batch_size: int,
    global_batch_size: int,
    warmup: int,
    steps: int,
    device: torch.device,
    peak: float | None,
) -> dict[str, Any]:
    """One model × strategy: build, (precompute), train, measure; frees the GPU afterwards."""
    from align_core.algorithms import DPOConfig
    from align_core.algorithms.dpo import DPOStep
    from align_core.logprobs import forward_token_logps
    from align_core.optim import OptimizerConfig, build_optimizer
    from align_core.trainer import TrainerConfig
    from align_core.trainer.data import TrainData
    from align_core.trainer.loop import ParallelGroups, Trainer
    from align_core.training import wrap_ddp
    from align_data import CollateConfig

    lr = 1e-6
    with tempfile.TemporaryDirectory(prefix="align-bench-gpu-") as tmp:
        policy = _build(config, weights)
        if strategy == "adapters":
            from align_core.lora import LoraConfig, add_lora

            add_lora(policy, LoraConfig(rank=16))
        forward = functools.partial(forward_token_logps, vocab_size=config.vocab_size)
        algorithm = DPOStep(DPOConfig(ref_policy_kl_penalty=0.1))
        examples = _pairs(global_batch_size * (warmup + steps), seq, config.vocab_size, seed=0)
        data = TrainData(
            examples,
            [],
            algorithm,
            CollateConfig(pad_id=0),
            micro_batch_size=micro_batch_size,
            global_batch_size=global_batch_size,
            shuffle=False,
        )
        reference, precompute_s = _reference(
            strategy, policy, forward, data, config, weights, Path(tmp)
        )
        model = wrap_ddp(policy)
        optimizer = build_optimizer(model, OptimizerConfig(lr=lr), clip_grad=1.0)
        trainer = Trainer(
            config=TrainerConfig(max_steps=warmup + steps, val_check_interval=0, save_interval=0),
            algorithm=algorithm,
            model=model,
            optimizer=optimizer,
            data=data,
            forward_fn=forward,
            learning_rate=lambda s: lr,
            groups=ParallelGroups.from_megatron(device),
            reference=reference,
        )
        # Every sequence of a step (all micro-batches); all steps have the same lengths.
        lengths = [int(n) for mb in data.train_micro_batches(0) for n in mb["lengths"].tolist()]
        torch.cuda.reset_peak_memory_stats(device)
        first = trainer.train_step()
        for _ in range(warmup - 1):
            trainer.train_step()
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(steps):
            last = trainer.train_step()
        torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        n = matmul_params(
            num_layers=config.num_layers,
            hidden_size=config.hidden_size,
            ffn_hidden_size=config.ffn_hidden_size,
            num_attention_heads=config.num_attention_heads,
            num_query_groups=config.num_query_groups,
            kv_channels=config.kv_channels,
            vocab_size=config.vocab_size,
            gated=config.gated,
        )
        width = config.num_attention_heads * (
            config.kv_channels or config.hidden_size // config.num_attention_heads
        )
        flops = steps * step_flops(n, config.num_layers, width, lengths, strategy=strategy)
        result = {
            "model": name,
            "strategy": strategy,
            "params": sum(p.numel() for p in policy.parameters()),
            "matmul_params": n,
            "seq": seq,
            "micro_batch_size": micro_batch_size,
            "accumulation": data.accumulation_steps,
            "global_batch_size": global_batch_size,
            "steps": steps,
            "seconds": seconds,
            "tokens_per_s": steps * sum(lengths) / seconds,
            "flops_per_step": flops / steps,
            "mfu": mfu(flops, seconds, peak),
            "peak_memory_bytes": int(torch.cuda.max_memory_allocated(device)),
            "step0_loss": first["preference_loss"],
            "step0_is_ln2": abs(first["preference_loss"] - math.log(2)) < 1e-6,
            "last_loss": last["loss"],
            "precompute_s": precompute_s,
        }
        del trainer, model, optimizer, reference, policy
    gc.collect()
    torch.cuda.empty_cache()
    return result


def run_gpu_tests(timeout: float) -> dict[str, Any]:
    """``pytest -m gpu`` in a subprocess: return code and its summary line."""
    start = time.perf_counter()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "-rs"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return {"returncode": None, "summary": f"timed out after {timeout:.0f} s", "output": ""}
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    return {
        "returncode": done.returncode,
        "summary": lines[-1] if lines else done.stderr.strip()[-300:],
        "output": done.stdout[-20000:] + done.stderr[-5000:],
        "seconds": time.perf_counter() - start,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--skip-tests", action="store_true", help="do not run pytest -m gpu")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES))
    parser.add_argument("--seq", type=int, default=2048, help="llama-1b sequence length")
    parser.add_argument("--smollm2-seq", type=int, default=1024)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--budget-s", type=float, default=420.0)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/gpu.py needs CUDA: no GPU is visible to torch", file=sys.stderr)
        return 2
    start = time.perf_counter()
    device_name = torch.cuda.get_device_name()
    peak = peak_bf16_flops(device_name)
    report: dict[str, Any] = {
        "device": device_name,
        "peak_bf16_flops": peak,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "gpu_tests": None,
        "runs": [],
    }
    print(f"{device_name}: bf16 peak {'n/a' if peak is None else f'{peak / 1e12:.0f} TFLOP/s'}")
    failed = False
    if not args.skip_tests:
        tests = run_gpu_tests(timeout=max(60.0, args.budget_s / 2))
        report["gpu_tests"] = tests
        print(f"pytest -m gpu: {tests['summary']}", flush=True)
        if tests["returncode"] != 0:
            failed = True
            print(tests["output"][-4000:])

    from align_core import ParallelConfig, init_distributed

    ctx = init_distributed(ParallelConfig(), seed=1234)
    # name: (config and weights for a sequence length, seq, micro batch, global batch) in pairs
    models: dict[str, tuple[Callable[[int], tuple[Any, Path | None]], int, int, int]] = {
        "llama-1b": (_llama_1b, args.seq, 2, 8),
        "smollm2-135m": (_smollm2, args.smollm2_seq, 4, 16),
    }
    for name in args.models:
        make, seq, mbs, gbs = models[name]
        config, weights, unavailable = None, None, None
        try:
            config, weights = make(seq)
        except ModuleNotFoundError as exc:  # smollm2 without the hf dependency group
            unavailable = str(exc)
        except Exception as exc:  # e.g. the SmolLM2 build failed: report, go on
            unavailable = f"not built: {type(exc).__name__}: {exc}"[:300]
            failed = True
        for strategy in args.strategies:
            row: dict[str, Any] = {"model": name, "strategy": strategy}
            if unavailable is not None:
                row["skipped"] = unavailable
            elif time.perf_counter() - start > args.budget_s:
                row["skipped"] = f"time budget of {args.budget_s:.0f} s spent"
            else:
                try:
                    row = run_one(
                        name,
                        config,
                        weights,
                        strategy,
                        seq=seq,
                        micro_batch_size=mbs,
                        global_batch_size=gbs,
                        warmup=args.warmup,
                        steps=args.steps,
                        device=ctx.device,
                        peak=peak,
                    )
                    failed |= not row["step0_is_ln2"]
                except Exception as exc:  # report and go on with the next run
                    row["error"] = f"{type(exc).__name__}: {exc}"[:300]
                    failed = True
                    with contextlib.suppress(Exception):
                        gc.collect()
                        torch.cuda.empty_cache()
            report["runs"].append(row)
            print(json.dumps(row), flush=True)
    report["seconds"] = time.perf_counter() - start
    print()
    print(markdown_table(report["runs"]))
    print(f"\n{report['seconds']:.0f} s in all")
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""align-core model layer on CPU: forward+backward throughput and checkpoint save/load time.

Run: ``uv run python bench/model.py`` (``--configs tiny`` for a quick look, ``--steps N``);
``uv run python bench/model.py --hf`` for the Hugging Face import/export comparison below.

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

``--hf`` (needs the ``hf`` dependency group) compares importing and exporting a real model,
SmolLM2-135M-Instruct as a Hugging Face directory (``tests/hf_models.py`` builds it), with
align (`align_core.hf.open_hf` + `build_gpt_model` + `load_hf_weights`; `save_hf`) and with
transformers (``from_pretrained``; ``save_pretrained``). Each measurement runs in a fresh
process: seconds, and the peak resident memory above the process's memory just before the
phase (sampled every 2 ms), against the model's size on disk. Best of ``--steps`` processes.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import subprocess
import sys
import tempfile
import threading
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


class _PeakRss:
    """Peak resident memory of this process while the block runs, above its start.

    ``peak`` is the resident set; ``private_peak`` leaves out file-backed pages (memory-mapped
    safetensors, which the page cache holds and the kernel can drop), i.e. ``rss - shared``.
    """

    def __enter__(self) -> _PeakRss:
        import psutil

        self._process = psutil.Process()
        info = self._process.memory_info()
        self.start, self.private_start = info.rss, info.rss - info.shared
        self.peak, self.private_peak = self.start, self.private_start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _record(self) -> None:
        info = self._process.memory_info()
        self.peak = max(self.peak, info.rss)
        self.private_peak = max(self.private_peak, info.rss - info.shared)

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self._record()

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._record()

    @property
    def above_start(self) -> dict[str, int]:
        return {
            "peak_bytes": self.peak - self.start,
            "private_bytes": self.private_peak - self.private_start,
        }


def _hf_worker(kind: str, src: str, out: str) -> dict[str, float]:
    """One measurement in this (fresh) process: seconds, peak and private bytes above start."""
    import torch

    if kind.startswith("transformers"):
        from transformers import AutoModelForCausalLM

        if kind == "transformers-export":
            model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
        with _PeakRss() as rss:
            start = time.perf_counter()
            if kind == "transformers-import":
                model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
            else:
                model.save_pretrained(out)
            seconds = time.perf_counter() - start
        return {"seconds": seconds, **rss.above_start}
    from align_core import ParallelConfig, build_gpt_model, init_distributed
    from align_core.hf import load_hf_weights, open_hf, save_hf

    init_distributed(ParallelConfig())

    def load():
        with open_hf(src) as ckpt:
            config = ckpt.model_config_for(1)
            model = build_gpt_model(config)
            load_hf_weights(model, ckpt)
        return model, config

    if kind == "align-export":
        model, config = load()
    with _PeakRss() as rss:
        start = time.perf_counter()
        if kind == "align-import":
            model, config = load()
        else:
            with open_hf(src) as ckpt:
                save_hf(model, out, config, source=ckpt)
        seconds = time.perf_counter() - start
    return {"seconds": seconds, **rss.above_start}


def hf_io(steps: int) -> None:
    """Print the import/export table of SmolLM2-135M: align against transformers."""
    spec = importlib.util.spec_from_file_location(
        "hf_models", Path(__file__).parents[1] / "tests" / "hf_models.py"
    )
    assert spec is not None and spec.loader is not None
    hf_models = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hf_models)
    src = hf_models.smollm2_dir()
    size = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    rows = []
    for kind in ("align-import", "transformers-import", "align-export", "transformers-export"):
        runs = []
        for _ in range(steps):
            with tempfile.TemporaryDirectory() as out:
                done = subprocess.run(
                    [sys.executable, __file__, "--hf-worker", kind, str(src), out],
                    capture_output=True, text=True, check=True,
                )  # fmt: skip
            runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
        best = min(runs, key=lambda r: r["seconds"])
        peak = min(r["peak_bytes"] for r in runs)
        private = min(r["private_bytes"] for r in runs)
        rows.append((kind, best["seconds"], peak, private))
    print(f"\nSmolLM2-135M-Instruct, fp32 safetensors {size / 2**20:.0f} MiB; best of {steps}\n")
    print("| phase | seconds | peak RSS above start | private (not file-backed) | × model size |")
    print("|---|---|---|---|---|")
    for kind, seconds, peak, private in rows:
        print(
            f"| {kind} | {seconds:.2f} | {peak / 2**20:,.0f} MiB | {private / 2**20:,.0f} MiB "
            f"| {private / size:.2f} |"
        )
    times = {kind: seconds for kind, seconds, _, _ in rows}
    for phase in ("import", "export"):
        ratio = times[f"align-{phase}"] / times[f"transformers-{phase}"]
        print(f"align {phase}: {ratio:.2f}× transformers' time")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="tiny,100m", help="comma-separated: tiny, 100m")
    parser.add_argument("--steps", type=int, default=2, help="timed repetitions (best is kept)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--hf", action="store_true", help="Hugging Face import/export table")
    parser.add_argument("--hf-worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    if args.hf_worker:
        print(json.dumps(_hf_worker(*args.hf_worker)))
        return
    if args.hf:
        hf_io(args.steps)
        return

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

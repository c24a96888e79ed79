"""DPO on this CPU: `align run dpo` (megatron-core) against TRL's DPOTrainer, same model and data.

Both train the same Llama-style model (4 layers, hidden 256, MLP 688 SwiGLU, 4 heads, vocabulary
1024, RMSNorm, RoPE, untied embeddings, fp32) on the same 256 synthetic prompt/chosen/rejected
rows (prompts of 32-48 tokens, responses of 31-47 tokens plus EOS), 8 pairs per step, 30 steps,
lr 1e-4, beta 0.1, max length 128, 2 threads. Timing follows TRL's CPU anchor measurement
(../shared/reference/trl_cpu_anchor.md): wall time from the end of step 5 to the end of step 30,
real (unpadded) tokens of those steps, peak RSS of the training process (``ru_maxrss``). Each
measurement is a fresh process.

align is run exactly as a user would (``python -m align_cli run dpo --restore ... key=value``),
once per reference strategy: ``precompute`` (the default: one pass before training, cached),
``model`` (a second frozen model), ``swap`` (reference weights swapped in from pinned CPU memory)
and, with LoRA adapters (rank 16 on all linears), ``adapters`` (the base model without adapters);
``precompute+full`` adds full activation recomputation
(``model.activations_checkpoint_granularity=full``, TRL's gradient checkpointing).

TRL is not part of the default install. With it (``uv sync --group bench``, or
``pip install trl transformers datasets accelerate``) the script also runs TRL's DPOTrainer in the
same two configurations as the anchor (TRL defaults: separate reference model and gradient
checkpointing; and its fastest: ``precompute_ref_log_probs=True`` without checkpointing).
Without TRL it prints align's numbers next to the anchor's recorded TRL numbers, labelled as
recorded, not measured now.

    uv run python bench/dpo_vs_trl.py                  # align strategies (+ TRL when installed)
    uv run python bench/dpo_vs_trl.py --repeats 3      # medians of 3 fresh runs each
    uv run python bench/dpo_vs_trl.py --strategies precompute,precompute+full --no-trl
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

LAYERS, HIDDEN, FFN, HEADS, VOCAB, MAX_POSITIONS = 4, 256, 688, 4, 1024, 256
ROWS, PAIRS_PER_STEP, STEPS, WARMUP, MAX_LENGTH = 256, 8, 30, 5, 128
LR, BETA, THREADS = 1e-4, 0.1, 2

# TRL 1.16.0 on the project's 2-vCPU machine, medians of 10 fresh runs
# (../shared/reference/trl_cpu_anchor.md, section 2): s/step, real tokens/s, peak RSS MiB.
ANCHOR = {
    "TRL defaults (ref model, grad ckpt)": (0.687, 1854.0, 716.0),
    "TRL precompute_ref_log_probs, grad ckpt": (0.512, 2487.0, 703.0),
    "TRL ref model, no grad ckpt": (0.538, 2368.0, 831.0),
    "TRL precompute_ref_log_probs, no grad ckpt": (0.410, 3104.0, 820.0),
}
ANCHOR_REAL_TOKENS_PER_STEP = 1273.2


@dataclass
class Result:
    """One measured run.

    Attributes:
        name: What ran.
        s_per_step: Wall seconds per step over steps 6-30.
        tokens_per_s: Real (unpadded) tokens per second over steps 6-30.
        tokens_per_step: Real tokens per step (prompt counted in both sequences of a pair).
        peak_mib: Peak RSS of the training process.
        startup_s: From launching the process to the end of step 1 (imports, data, model,
            reference precompute, first step).
        first_loss: Loss of step 1 (ln 2 = 0.6931 when policy = reference).
    """

    name: str
    s_per_step: float
    tokens_per_s: float
    tokens_per_step: float
    peak_mib: float
    startup_s: float
    first_loss: float


# ----------------------------------------------------------------------------- shared assets


def _words(rng: random.Random, n: int) -> list[str]:
    consonants, vowels = "bdfgklmnprstvz", "aeiou"
    out = []
    for _ in range(n):
        syllables = rng.choice([1, 1, 2, 2, 3])
        out.append("".join(rng.choice(consonants) + rng.choice(vowels) for _ in range(syllables)))
    return out


def _text_of_length(rng: random.Random, encode: Any, target: int) -> str:
    words: list[str] = []
    while True:
        words += _words(rng, 1)
        text = " " + " ".join(words)
        if len(encode(text)) >= target:
            return text


def build_assets(workdir: Path) -> dict[str, Any]:
    """The model (.nemo with its tokenizer), the tokenizer files and the JSONL rows."""
    from align_core.config import ModelConfig
    from align_core.nemo import build_tokenizer, write_byte_bpe_files, write_tiny_nemo

    spec = write_byte_bpe_files(workdir / "tokenizer", VOCAB)
    tokenizer = build_tokenizer(spec)
    model = ModelConfig(
        num_layers=LAYERS,
        hidden_size=HIDDEN,
        ffn_hidden_size=FFN,
        num_attention_heads=HEADS,
        vocab_size=VOCAB,
        seq_length=MAX_POSITIONS,
        activation="swiglu",
        normalization="RMSNorm",
        position_embedding_type="rope",
        share_embeddings_and_output_weights=False,
    )
    nemo = write_tiny_nemo(workdir / "model.nemo", model, tokenizer=spec, seed=0)
    rng = random.Random(0)
    rows = []
    for _ in range(ROWS):
        prompt = _text_of_length(rng, tokenizer.encode, rng.randint(32, 48))
        chosen = _text_of_length(rng, tokenizer.encode, rng.randint(31, 47))
        rejected = _text_of_length(rng, tokenizer.encode, rng.randint(31, 47))
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    data = workdir / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {
        "nemo": str(nemo),
        "vocab_file": str(spec.vocab_file),
        "merge_file": str(spec.merge_file),
        "data": str(data),
    }


# ------------------------------------------------------------------------------------- align


def run_align(assets: dict[str, Any], variant: str, workdir: Path) -> Result:
    """One ``align run dpo`` in a fresh process; numbers from its metrics.jsonl.

    ``variant`` is a reference strategy, optionally with ``+full`` (full activation
    recomputation); ``adapters`` trains LoRA adapters.
    """
    strategy, _, recompute = variant.partition("+")
    lora = strategy == "adapters"
    run_dir = workdir / f"align-{strategy}-{time.time_ns()}"
    overrides = [
        f"model.data.data_prefix={assets['data']}",
        f"model.global_batch_size={PAIRS_PER_STEP}",
        f"model.micro_batch_size={PAIRS_PER_STEP}",
        f"model.data.seq_length={MAX_LENGTH}",
        f"trainer.dpo.max_steps={STEPS}",
        "trainer.dpo.val_check_interval=0",
        "trainer.dpo.save_interval=0",
        f"model.optim.lr={LR}",
        "model.optim.weight_decay=0.0",
        "model.optim.sched.style=linear",
        f"model.dpo.ref_policy_kl_penalty={BETA}",
        f"model.reference.strategy={strategy}",
        f"exp_manager.explicit_log_dir={run_dir}",
        "exp_manager.create_plots=false",
        "exp_manager.create_tensorboard_logger=false",
        "exp_manager.checkpoint_callback_params.save_nemo_on_train_end=false",
    ]
    if lora:
        overrides.append("model.peft.peft_scheme=lora")
    if recompute:
        overrides.append(f"model.activations_checkpoint_granularity={recompute}")
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS)}
    command = [sys.executable, "-m", "align_cli", "run", "dpo", "-q"]
    start = time.time()
    proc = subprocess.run(
        [*command, "--restore", assets["nemo"], *overrides],
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"align run dpo ({strategy}) failed:\n{proc.stdout}\n{proc.stderr}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = {r["step"]: r for r in rows if r["split"] == "train"}
    timed = [train[s] for s in range(WARMUP + 1, STEPS + 1)]
    wall = train[STEPS]["time"] - train[WARMUP]["time"]
    tokens = sum(r["tokens_per_s"] * r["step_time"] for r in timed)
    name = f"align, {strategy} reference" + (" (LoRA r=16)" if lora else "")
    name += f", {recompute} recompute" if recompute else ""
    return Result(
        name=name,
        s_per_step=wall / len(timed),
        tokens_per_s=tokens / wall,
        tokens_per_step=tokens / len(timed),
        peak_mib=max(r["peak_memory"] for r in train.values()) / 2**20,
        startup_s=train[1]["time"] - start,
        first_loss=train[1]["loss"],
    )


# --------------------------------------------------------------------------------------- TRL


def trl_available() -> bool:
    """Whether TRL, transformers and datasets import."""
    import importlib.util

    return all(importlib.util.find_spec(m) for m in ("trl", "transformers", "datasets"))


def trl_worker(config: dict[str, Any]) -> dict[str, Any]:
    """Train with TRL's DPOTrainer as the anchor does; runs in its own process."""
    import resource

    import torch
    from datasets import Dataset
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        PreTrainedTokenizerFast,
        TrainerCallback,
    )
    from trl import DPOConfig, DPOTrainer

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    workdir = Path(config["workdir"])
    # The same byte-level BPE as align's (vocab.json + merges.txt), as a fast HF tokenizer.
    bpe = Tokenizer(models.BPE.from_file(config["vocab_file"], config["merge_file"]))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|reserved_0|>"
    )
    model = LlamaForCausalLM(
        LlamaConfig(
            num_hidden_layers=LAYERS,
            hidden_size=HIDDEN,
            intermediate_size=FFN,
            num_attention_heads=HEADS,
            num_key_value_heads=HEADS,
            vocab_size=VOCAB,
            max_position_embeddings=MAX_POSITIONS,
            tie_word_embeddings=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    )
    model_dir = workdir / f"trl-model-{os.getpid()}"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    rows = [json.loads(line) for line in Path(config["data"]).read_text().splitlines()]
    dataset = Dataset.from_list(rows)
    marks: dict[int, float] = {}
    tokens: dict[int, float] = {}

    class Clock(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            marks[state.global_step] = time.time()

    class CountingTrainer(DPOTrainer):
        def training_step(self, model: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
            step = self.state.global_step + 1
            if "attention_mask" in inputs:
                real = float(inputs["attention_mask"].sum())
            else:
                real = float(
                    2 * inputs["prompt_attention_mask"].sum()
                    + inputs["chosen_attention_mask"].sum()
                    + inputs["rejected_attention_mask"].sum()
                )
            tokens[step] = tokens.get(step, 0.0) + real
            return super().training_step(model, inputs, *args, **kwargs)

    args = DPOConfig(
        output_dir=str(workdir / f"trl-out-{os.getpid()}"),
        per_device_train_batch_size=PAIRS_PER_STEP,
        gradient_accumulation_steps=1,
        max_steps=STEPS,
        learning_rate=LR,
        beta=BETA,
        max_length=MAX_LENGTH,
        report_to=[],
        logging_steps=10,
        logging_first_step=True,
        save_strategy="no",
        use_cpu=True,
        dataloader_num_workers=0,
        bf16=False,
        seed=42,
        disable_tqdm=True,
        gradient_checkpointing=config["gradient_checkpointing"],
        precompute_ref_log_probs=config["precompute"],
    )
    trainer = CountingTrainer(
        model=str(model_dir), args=args, train_dataset=dataset, processing_class=tokenizer
    )
    trainer.add_callback(Clock())
    trainer.train()
    first_loss = next((e["loss"] for e in trainer.state.log_history if "loss" in e), float("nan"))
    wall = marks[STEPS] - marks[WARMUP]
    timed_tokens = sum(tokens[s] for s in range(WARMUP + 1, STEPS + 1))
    return {
        "s_per_step": wall / (STEPS - WARMUP),
        "tokens_per_s": timed_tokens / wall,
        "tokens_per_step": timed_tokens / (STEPS - WARMUP),
        "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "startup_s": marks[1],  # absolute; the parent subtracts its launch time
        "first_loss": first_loss,
    }


def run_trl(assets: dict[str, Any], workdir: Path, gc: bool, precompute: bool) -> Result:
    """One TRL run in a fresh process."""
    config = {**assets, "workdir": str(workdir), "gradient_checkpointing": gc}
    config["precompute"] = precompute
    start = time.time()
    proc = subprocess.run(
        [sys.executable, __file__, "--trl-worker", json.dumps(config)],
        env={**os.environ, "OMP_NUM_THREADS": str(THREADS)},
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"TRL run failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    data = json.loads(proc.stdout.strip().splitlines()[-1])
    data["startup_s"] -= start
    reference = "precompute_ref_log_probs" if precompute else "ref model"
    name = f"TRL, {reference}, " + ("grad ckpt" if gc else "no grad ckpt")
    return Result(name=name, **data)


# ------------------------------------------------------------------------------------ report


def median(results: list[Result]) -> Result:
    """Field-wise median of repeated runs of one configuration."""
    fields = {
        k: statistics.median(getattr(r, k) for r in results)
        for k in asdict(results[0])
        if k != "name"
    }
    return Result(name=results[0].name, **fields)


def print_table(title: str, rows: list[Result]) -> None:
    """A plain-text table (this script has no dependency beyond align and, optionally, TRL)."""
    print(f"\n{title}")
    header = (
        f"{'run':<48} {'s/step':>7} {'tok/s':>7} {'tok/step':>8} {'peak MiB':>9} "
        f"{'step1 s':>8} {'loss@1':>8}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r.name:<48} {r.s_per_step:>7.3f} {r.tokens_per_s:>7.0f} {r.tokens_per_step:>8.1f} "
            f"{r.peak_mib:>9.0f} {r.startup_s:>8.1f} {r.first_loss:>8.4f}"
        )


def print_ratios(pairs: list[tuple[Result, str, float, float]], label: str) -> None:
    """Each align run against a TRL configuration: (align, TRL name, TRL tokens/s, TRL MiB)."""
    print(f"\n{label}")
    for align, name, tok_s, peak in pairs:
        print(
            f"  {align.name} vs {name}: tokens/s x{align.tokens_per_s / tok_s:.2f}, "
            f"peak memory x{align.peak_mib / peak:.2f}"
        )


def matched_pairs(
    align_rows: list[Result], trl: list[tuple[str, float, float]]
) -> list[tuple[Result, str, float, float]]:
    """align's precompute runs against every TRL configuration with the same memory trade-off.

    align without recomputation faces TRL without gradient checkpointing; align with full
    recomputation faces TRL with it (TRL's default).
    """
    pairs = []
    for align in align_rows:
        if not align.name.startswith("align, precompute reference"):
            continue
        recomputes = align.name.endswith("full recompute")
        pairs += [
            (align, name, tok_s, peak)
            for name, tok_s, peak in trl
            if name.endswith("no grad ckpt") != recomputes
        ]
    return pairs


def load_average() -> str:
    """The 1-minute load average (other processes skew CPU timings)."""
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except OSError:
        return "n/a"


def main(argv: list[str] | None = None) -> int:
    """Run the comparison and print it."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1, help="fresh runs per configuration")
    parser.add_argument(
        "--strategies",
        default="precompute,precompute+full,model,swap,adapters",
        help="align reference strategies to run (adapters trains LoRA adapters; +full adds "
        "full activation recomputation)",
    )
    parser.add_argument("--no-trl", action="store_true", help="do not run TRL even if installed")
    parser.add_argument("--workdir", default=None, help="keep assets and runs here")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    parser.add_argument("--trl-worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.trl_worker is not None:
        print(json.dumps(trl_worker(json.loads(args.trl_worker))))
        return 0
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="dpo-vs-trl-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"workdir {workdir}; load average before: {load_average()}")
    assets = build_assets(workdir)
    use_trl = trl_available() and not args.no_trl
    configs: list[tuple[str, Any]] = [
        (f"align:{s}", lambda s=s: run_align(assets, s, workdir))
        for s in args.strategies.split(",")
        if s
    ]
    if use_trl:
        configs += [
            (f"trl:{gc}:{pre}", lambda gc=gc, pre=pre: run_trl(assets, workdir, gc, pre))
            for gc, pre in ((True, False), (True, True), (False, True))
        ]
    runs: dict[str, list[Result]] = {key: [] for key, _ in configs}
    # Interleaved (a, b, c, a, b, c, ...): a change in machine load hits every configuration.
    for _ in range(args.repeats):
        for key, make in configs:
            runs[key].append(make())
            print(f"  done: {runs[key][-1].name}", flush=True)
    measured = [median(runs[key]) for key, _ in configs if key.startswith("align:")]
    trl_rows = [median(runs[key]) for key, _ in configs if key.startswith("trl:")]
    print(f"load average after: {load_average()}")
    print_table(
        f"measured now ({args.repeats} run(s) each, median; 2 threads; steps {WARMUP + 1}-{STEPS})",
        measured + trl_rows,
    )
    if use_trl:
        print_ratios(
            matched_pairs(measured, [(r.name, r.tokens_per_s, r.peak_mib) for r in trl_rows]),
            "ratios (measured side by side; recomputation against gradient checkpointing):",
        )
    else:
        if not trl_available():
            print(
                "\nTRL is not installed (uv sync --group bench, or pip install trl transformers "
                "datasets accelerate); below are TRL's RECORDED anchor numbers, not measured now."
            )
        print(
            f"\nrecorded TRL anchor (trl_cpu_anchor.md, TRL 1.16.0, medians of 10 runs; "
            f"{ANCHOR_REAL_TOKENS_PER_STEP} real tokens/step):"
        )
        for name, (s_step, tok_s, peak) in ANCHOR.items():
            print(f"  {name:<46} {s_step:>7.3f} s/step {tok_s:>7.0f} tok/s {peak:>6.0f} MiB")
        print_ratios(
            matched_pairs(measured, [(n, tok_s, peak) for n, (_, tok_s, peak) in ANCHOR.items()]),
            "ratios against the RECORDED anchor (different runs, different machine load):",
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps([asdict(r) for r in measured + trl_rows], indent=2) + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

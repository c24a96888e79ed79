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

``--model smollm2`` trains the real SmolLM2-135M-Instruct (30 layers, hidden 576, 9 heads with 3
KV heads, vocabulary 49,152, tied embeddings; the fp32 Hugging Face directory that
``tests/hf_models.py`` builds from the ``hf`` group's GGUF) with ``align run dpo --restore DIR``
and with TRL's DPOTrainer on the same directory, on 64 synthetic English preference pairs given
to both as chat messages (a user turn; chosen and rejected assistant turns) and rendered by the
model's own chat template (ChatML with SmolLM2's default system turn). Sequences are 81-157
tokens (mean 119), nothing is truncated (max length 256). Both take the pairs in file order (align
``model.data.shuffle=false``, TRL ``train_sampling_strategy="sequential"``), so every step has
the same pairs in both. Global batch 8 pairs, micro batch 2 (TRL: per-device batch 2 with 4
accumulation steps), 8 steps (one epoch), lr 1e-6 (linear decay), beta 0.1, AdamW without weight
decay, fp32 (TRL ``bf16=False``), 2 threads. Timed: the end of step 2 to the end of step 8.
Before timing, the TRL worker checks that TRL tokenized every pair to exactly the ids align-data
makes (written by the parent from ``align_data.tokenize_records``); the report checks that every
run trained exactly the data's tokens of each step, in file order, and that step 1's loss is
ln 2. Tokens are those of the sequences (prompt counted in both of a pair): align's own count is
one less per sequence (the last token is only a label, never an input) and is corrected to that.
Peak memory there is the kernel's ``ru_maxrss`` of the child process from ``wait4``, for both.
Configurations: TRL defaults (reference model, gradient checkpointing), TRL's fastest on CPU
(``precompute_ref_log_probs=True``, no checkpointing), align's default (``precompute``) and
align with full recomputation. Needs ``uv sync --group hf --group bench`` (without TRL: align only).

``--mem-cap-gib G`` (smollm2) then finds, for each configuration, the largest micro batch that
trains two steps, each on the same longest pairs of the data (AdamW's state only exists from the
second step on), without the process tree's memory going above G GiB: the resident set of the
child plus the private memory (USS) of the helpers it forks is polled every 20 ms and the tree
is killed above the cap, and the child's kernel-counted peak RSS must also be within the cap (no
cgroup is used: the machine's cgroup hierarchy is not ours to change, and ``RLIMIT_AS`` would
count the CUDA wheels' virtual mappings). Doubling from the benchmark's micro batch (2), then
bisection until the largest fit and the smallest failure are less than an eighth apart. About
half an hour on a quiet machine.

    uv run python bench/dpo_vs_trl.py --model smollm2                     # ~15 min
    uv run python bench/dpo_vs_trl.py --model smollm2 --mem-cap-gib 8     # + the cap search
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
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


@dataclass(frozen=True)
class Setup:
    """Batching and schedule of one benchmark model (both frameworks use the same).

    Attributes:
        model: ``toy`` or ``smollm2``.
        pairs_per_step: Global batch (pairs per optimizer step).
        micro_batch: Pairs per forward/backward (TRL: per-device batch; the rest is gradient
            accumulation).
        steps: Optimizer steps.
        warmup: Steps left out of the timing.
        max_length: Longest sequence (nothing in the data is longer).
        lr: Peak learning rate (linear decay).
        sequential: Take the pairs in file order in both frameworks (otherwise each shuffles
            with its own seed).
    """

    model: str
    pairs_per_step: int
    micro_batch: int
    steps: int
    warmup: int
    max_length: int
    lr: float
    sequential: bool


TOY = Setup("toy", PAIRS_PER_STEP, PAIRS_PER_STEP, STEPS, WARMUP, MAX_LENGTH, LR, False)
SMOLLM2 = Setup("smollm2", 8, 2, 8, 2, 256, 1e-6, True)
LN2 = 0.6931471805599453
# A memory probe trains this many steps on the same worst micro batch: AdamW's state is created
# by the first optimizer step, so only from the second step on do it and the activations coexist.
PROBE_STEPS = 2


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
        step_tokens: Real tokens of every step, in order (to check that both frameworks
            trained on the same tokens).
        load: 1-minute load average at the end of the run.
        cpu_s_per_step: CPU seconds (user + system, all threads, the process and its helpers)
            per timed step: less sensitive than wall time to other processes on a busy machine.
        tokens_per_cpu_s: Real tokens per CPU second over the timed steps (a run that keeps
            both cores busy all the time reaches half its tokens/s on a quiet machine).
        median_step_tokens_per_s: Median over the timed steps of each step's tokens / seconds
            (robust to a burst of other work on a shared machine slowing one step).
        step_seconds: Wall seconds of every step (from the end of the one before; NaN for
            step 1).
    """

    name: str
    s_per_step: float
    tokens_per_s: float
    tokens_per_step: float
    peak_mib: float
    startup_s: float
    first_loss: float
    step_tokens: tuple[float, ...] = ()
    load: float = float("nan")
    cpu_s_per_step: float = float("nan")
    tokens_per_cpu_s: float = float("nan")
    median_step_tokens_per_s: float = float("nan")
    step_seconds: tuple[float, ...] = ()


def median_step_rate(
    step_tokens: dict[int, float], ends: dict[int, float], first: int, last: int
) -> float:
    """Median of tokens / seconds over steps ``first..last`` (``ends``: each step's end time)."""
    return statistics.median(
        step_tokens[s] / (ends[s] - ends[s - 1]) for s in range(first, last + 1)
    )


def step_durations(ends: dict[int, float]) -> tuple[float, ...]:
    """Seconds of every step from the end of the previous one (NaN for the first)."""
    return tuple(ends[s] - ends[s - 1] if s - 1 in ends else float("nan") for s in sorted(ends))


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


def align_command(
    assets: dict[str, Any],
    variant: str,
    run_dir: Path,
    setup: Setup,
    *,
    micro_batch: int | None = None,
    steps: int | None = None,
    data: str | None = None,
) -> list[str]:
    """The ``align run dpo`` command line of one run (``micro_batch``, ``steps`` and ``data``
    override the setup's, for the memory-cap probes, which run one step of one micro batch)."""
    strategy, _, recompute = variant.partition("+")
    micro = micro_batch or setup.micro_batch
    overrides = [
        f"model.data.data_prefix={data or assets['data']}",
        f"model.global_batch_size={micro if micro_batch else setup.pairs_per_step}",
        f"model.micro_batch_size={micro}",
        f"model.data.seq_length={setup.max_length}",
        f"trainer.dpo.max_steps={steps or setup.steps}",
        "trainer.dpo.val_check_interval=0",
        "trainer.dpo.save_interval=0",
        f"model.optim.lr={setup.lr}",
        "model.optim.weight_decay=0.0",
        "model.optim.sched.style=linear",
        f"model.dpo.ref_policy_kl_penalty={BETA}",
        f"model.reference.strategy={strategy}",
        f"exp_manager.explicit_log_dir={run_dir}",
        "exp_manager.create_plots=false",
        "exp_manager.create_tensorboard_logger=false",
        "exp_manager.checkpoint_callback_params.save_nemo_on_train_end=false",
    ]
    if setup.model != "toy":
        overrides.append("exp_manager.checkpoint_callback_params.save_hf_on_train_end=false")
    if setup.sequential:
        overrides.append("model.data.shuffle=false")
    if strategy == "adapters":
        overrides.append("model.peft.peft_scheme=lora")
    if recompute:
        overrides.append(f"model.activations_checkpoint_granularity={recompute}")
    restore = assets["hf_dir"] if setup.model != "toy" else assets["nemo"]
    return [sys.executable, "-m", "align_cli", "run", "dpo", "-q", "--restore", restore, *overrides]


def child_env() -> dict[str, str]:
    """Environment of every measured process: 2 threads."""
    return {**os.environ, "OMP_NUM_THREADS": str(THREADS)}


def run_align(assets: dict[str, Any], variant: str, workdir: Path, setup: Setup = TOY) -> Result:
    """One ``align run dpo`` in a fresh process; numbers from its metrics.jsonl.

    ``variant`` is a reference strategy, optionally with ``+full`` (full activation
    recomputation); ``adapters`` trains LoRA adapters. Peak memory: align's own ``peak_memory``
    metric (``ru_maxrss``) for the toy model; for the real model the kernel's ``ru_maxrss`` of
    the child process from ``wait4``, the same measure as TRL's there.
    """
    from dpo_real import run_watched

    strategy, _, recompute = variant.partition("+")
    lora = strategy == "adapters"
    run_dir = workdir / f"align-{strategy}-{time.time_ns()}"
    start = time.time()
    proc = run_watched(align_command(assets, variant, run_dir, setup), child_env())
    if proc.returncode != 0:
        raise RuntimeError(f"align run dpo ({variant}) failed:\n{proc.stdout}\n{proc.stderr}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = {r["step"]: r for r in rows if r["split"] == "train"}
    steps, warmup = setup.steps, setup.warmup
    # align counts the positions it feeds (a sequence of n tokens is n - 1 inputs: the last
    # token is only a label); TRL counts all n. The real model's table counts n for both.
    extra = 0 if setup.model == "toy" else 2 * setup.pairs_per_step
    step_tokens = {s: r["tokens_per_s"] * r["step_time"] + extra for s, r in train.items()}
    timed = [train[s] for s in range(warmup + 1, steps + 1)]
    wall = train[steps]["time"] - train[warmup]["time"]
    tokens = sum(step_tokens[s] for s in range(warmup + 1, steps + 1))
    name = f"align, {strategy} reference" + (" (LoRA r=16)" if lora else "")
    name += f", {recompute} recompute" if recompute else ""
    if setup.model == "toy":
        peak = max(r["peak_memory"] for r in train.values()) / 2**20
    else:
        peak = proc.peak_bytes / 2**20
    cpu = proc.cpu_between(train[warmup]["time"], train[steps]["time"])
    ends = {s: r["time"] for s, r in train.items()}
    return Result(
        name=name,
        cpu_s_per_step=cpu / len(timed),
        tokens_per_cpu_s=tokens / cpu,
        median_step_tokens_per_s=median_step_rate(step_tokens, ends, warmup + 1, steps),
        step_seconds=step_durations(ends),
        s_per_step=wall / len(timed),
        tokens_per_s=tokens / wall,
        tokens_per_step=tokens / len(timed),
        peak_mib=peak,
        startup_s=train[1]["time"] - start,
        first_loss=train[1]["loss"],
        step_tokens=tuple(round(step_tokens[s]) for s in sorted(step_tokens)),
        load=os.getloadavg()[0],
    )


# --------------------------------------------------------------------------------------- TRL


def trl_available() -> bool:
    """Whether TRL, transformers and datasets import."""
    import importlib.util

    return all(importlib.util.find_spec(m) for m in ("trl", "transformers", "datasets"))


def _toy_trl_model(config: dict[str, Any], workdir: Path) -> tuple[str, Any]:
    """The toy model as a Hugging Face directory and its tokenizer (align's byte-level BPE)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

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
    return str(model_dir), tokenizer


def check_same_tokens(dataset: Any, token_ids_file: str) -> None:
    """Raise unless TRL's tokenized dataset holds exactly align-data's ids, pair by pair."""
    expected = json.loads(Path(token_ids_file).read_text())
    if len(dataset) != len(expected):
        raise RuntimeError(f"TRL kept {len(dataset)} pairs, align-data {len(expected)}")
    for i, (row, want) in enumerate(zip(dataset, expected, strict=True)):
        for key in ("prompt_ids", "chosen_ids", "rejected_ids"):
            if list(row[key]) != want[key]:
                raise RuntimeError(
                    f"pair {i}: TRL's {key} differ from align-data's\n"
                    f"  TRL:   {list(row[key])}\n  align: {want[key]}"
                )


def trl_worker(config: dict[str, Any]) -> dict[str, Any]:
    """Train with TRL's DPOTrainer as the anchor does; runs in its own process.

    With ``hf_dir`` in ``config`` the model and tokenizer are that Hugging Face directory and
    the data are chat messages; otherwise the toy model is built here.
    """
    import resource

    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    setup = Setup(**config["setup"])
    steps, warmup = config.get("steps") or setup.steps, setup.warmup
    micro = config.get("micro_batch") or setup.micro_batch
    pairs_per_step = micro if config.get("micro_batch") else setup.pairs_per_step
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    workdir = Path(config["workdir"])
    if "hf_dir" in config:
        model_path = config["hf_dir"]
        tokenizer = AutoTokenizer.from_pretrained(model_path)
    else:
        model_path, tokenizer = _toy_trl_model(config, workdir)
    data_file = config.get("data_override") or config["data"]
    rows = [json.loads(line) for line in Path(data_file).read_text().splitlines()]
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

    extra: dict[str, Any] = {}
    if setup.sequential:
        extra["train_sampling_strategy"] = "sequential"
    args = DPOConfig(
        output_dir=str(workdir / f"trl-out-{os.getpid()}"),
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=pairs_per_step // micro,
        max_steps=steps,
        learning_rate=setup.lr,
        beta=BETA,
        max_length=setup.max_length,
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
        **extra,
    )
    trainer = CountingTrainer(
        model=model_path, args=args, train_dataset=dataset, processing_class=tokenizer
    )
    if config.get("token_ids") and not config.get("data_override"):
        check_same_tokens(trainer.train_dataset, config["token_ids"])
    trainer.add_callback(Clock())
    trainer.train()
    first_loss = next((e["loss"] for e in trainer.state.log_history if "loss" in e), float("nan"))
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if steps <= warmup:  # a memory probe: no timing
        wall, timed_tokens = float("nan"), float("nan")
    else:
        wall = marks[steps] - marks[warmup]
        timed_tokens = sum(tokens[s] for s in range(warmup + 1, steps + 1))
    return {
        "s_per_step": wall / max(steps - warmup, 1),
        "tokens_per_s": timed_tokens / wall,
        "tokens_per_step": timed_tokens / max(steps - warmup, 1),
        "peak_mib": peak_mib,
        "startup_s": marks[1],  # absolute; the parent subtracts its launch time
        "first_loss": first_loss,
        "step_tokens": [tokens[s] for s in sorted(tokens)],
        "marks": marks,  # absolute step-end times, for the CPU time and the step rates
    }


def trl_command(
    assets: dict[str, Any],
    workdir: Path,
    setup: Setup,
    gc: bool,
    precompute: bool,
    *,
    micro_batch: int | None = None,
    steps: int | None = None,
    data: str | None = None,
) -> list[str]:
    """The TRL worker's command line (``micro_batch``/``steps``/``data`` as in `align_command`)."""
    config = {
        **{k: v for k, v in assets.items() if k not in ("rows", "lengths", "stats")},
        "workdir": str(workdir),
        "gradient_checkpointing": gc,
        "precompute": precompute,
        "setup": asdict(setup),
        "micro_batch": micro_batch,
        "steps": steps,
        "data_override": data,
    }
    return [sys.executable, __file__, "--trl-worker", json.dumps(config)]


def trl_name(gc: bool, precompute: bool) -> str:
    """The display name of a TRL configuration."""
    reference = "precompute_ref_log_probs" if precompute else "ref model"
    return f"TRL, {reference}, " + ("grad ckpt" if gc else "no grad ckpt")


def run_trl(
    assets: dict[str, Any], workdir: Path, gc: bool, precompute: bool, setup: Setup = TOY
) -> Result:
    """One TRL run in a fresh process."""
    from dpo_real import run_watched

    start = time.time()
    proc = run_watched(trl_command(assets, workdir, setup, gc, precompute), child_env())
    if proc.returncode != 0:
        raise RuntimeError(f"TRL run failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    data = json.loads(proc.stdout.strip().splitlines()[-1])
    data["startup_s"] -= start
    data["step_tokens"] = tuple(round(t) for t in data["step_tokens"])
    if setup.model != "toy":
        data["peak_mib"] = proc.peak_bytes / 2**20
    ends = {int(k): v for k, v in data.pop("marks").items()}
    cpu = proc.cpu_between(ends[setup.warmup], ends[setup.steps])
    data["cpu_s_per_step"] = cpu / (setup.steps - setup.warmup)
    data["tokens_per_cpu_s"] = data["tokens_per_step"] * (setup.steps - setup.warmup) / cpu
    step_tokens = dict(enumerate(data["step_tokens"], start=1))
    data["median_step_tokens_per_s"] = median_step_rate(
        step_tokens, ends, setup.warmup + 1, setup.steps
    )
    data["step_seconds"] = step_durations(ends)
    return Result(name=trl_name(gc, precompute), load=os.getloadavg()[0], **data)


# ------------------------------------------------------------------------------------ report


def median(results: list[Result]) -> Result:
    """Field-wise median of repeated runs of one configuration (step tokens: the first run's;
    load: the highest)."""
    fields = {
        k: statistics.median(getattr(r, k) for r in results)
        for k in asdict(results[0])
        if k not in ("name", "step_tokens", "load", "step_seconds")
    }
    return Result(
        name=results[0].name,
        step_tokens=results[0].step_tokens,
        step_seconds=results[0].step_seconds,
        load=max(r.load for r in results),
        **fields,
    )


def print_table(title: str, rows: list[Result]) -> None:
    """A plain-text table (this script has no dependency beyond align and, optionally, TRL)."""
    print(f"\n{title}")
    header = (
        f"{'run':<48} {'s/step':>7} {'tok/s':>7} {'med tok/s':>9} {'CPU s/step':>10} "
        f"{'tok/CPU-s':>9} {'tok/step':>8} {'peak MiB':>9} {'step1 s':>8} {'loss@1':>8} "
        f"{'load':>5}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r.name:<48} {r.s_per_step:>7.3f} {r.tokens_per_s:>7.0f} "
            f"{r.median_step_tokens_per_s:>9.0f} {r.cpu_s_per_step:>10.3f} "
            f"{r.tokens_per_cpu_s:>9.0f} {r.tokens_per_step:>8.1f} {r.peak_mib:>9.0f} "
            f"{r.startup_s:>8.1f} {r.first_loss:>8.4f} {r.load:>5.1f}"
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


def expected_step_tokens(assets: dict[str, Any], setup: Setup) -> tuple[int, ...]:
    """Tokens of every step when the pairs are taken in file order (both sequences of a pair,
    the prompt in each)."""
    per_pair = [sum(pair) for pair in assets["lengths"]]
    size = setup.pairs_per_step
    return tuple(sum(per_pair[s * size : (s + 1) * size]) for s in range(setup.steps))


def check_runs(runs: list[Result], expected: tuple[int, ...]) -> None:
    """Print whether step 1 started at ln 2 and whether every run trained the data's tokens in
    file order."""
    print("\nchecks:")
    for r in runs:
        verdict = "ok" if abs(r.first_loss - LN2) < 1e-3 else "NOT ln 2"
        print(f"  {r.name}: step-1 loss {r.first_loss:.7f} ({verdict})")
    same = all(r.step_tokens == expected for r in runs)
    print(
        f"  tokens of every step {'as in the data, in every run' if same else 'DIFFER'}: "
        f"{list(expected)}"
    )
    if not same:
        for r in runs:
            print(f"    {r.name}: {list(r.step_tokens)}")


def memory_cap(
    assets: dict[str, Any],
    workdir: Path,
    setup: Setup,
    variants: list[str],
    trl_configs: list[tuple[bool, bool]],
    cap_gib: float,
    limit: int,
) -> list[dict[str, Any]]:
    """The largest micro batch of every configuration within ``cap_gib`` (`PROBE_STEPS`
    training steps, each on the longest pairs of the data)."""
    from dpo_real import largest_fitting, longest_rows, run_watched

    cap = int(cap_gib * 2**30)
    found = []

    def align_attempt(variant: str) -> Any:
        def attempt(m: int) -> Any:
            run_dir = workdir / f"cap-align-{time.time_ns()}"
            command = align_command(
                assets,
                variant,
                run_dir,
                setup,
                micro_batch=m,
                steps=PROBE_STEPS,
                data=str(longest_rows(assets, m, workdir, PROBE_STEPS)),
            )
            return run_watched(command, child_env(), cap)

        return attempt

    def trl_attempt(gc: bool, pre: bool) -> Any:
        def attempt(m: int) -> Any:
            command = trl_command(
                assets,
                workdir,
                setup,
                gc,
                pre,
                micro_batch=m,
                steps=PROBE_STEPS,
                data=str(longest_rows(assets, m, workdir, PROBE_STEPS)),
            )
            return run_watched(command, child_env(), cap)

        return attempt

    names = {v: align_name(v) for v in variants}
    todo = [(names[v], align_attempt(v)) for v in variants]
    todo += [(trl_name(gc, pre), trl_attempt(gc, pre)) for gc, pre in trl_configs]
    for name, attempt in todo:
        print(f"  {name} (load {load_average()}):", flush=True)
        best, failed, probes = largest_fitting(attempt, cap, setup.micro_batch, limit)
        fitted = [p for p in probes if p.micro_batch == best and p.fits]
        found.append(
            {
                "name": name,
                "largest_micro_batch": best,
                "smallest_failing": failed,
                "peak_mib_at_largest": fitted[0].peak_mib if fitted else float("nan"),
                "limit": limit,
                "probes": [asdict(p) for p in probes],
                "load": os.getloadavg()[0],
            }
        )
    return found


def align_name(variant: str) -> str:
    """The display name of an align variant (as `run_align` names its result)."""
    strategy, _, recompute = variant.partition("+")
    name = f"align, {strategy} reference" + (" (LoRA r=16)" if strategy == "adapters" else "")
    return name + (f", {recompute} recompute" if recompute else "")


def main(argv: list[str] | None = None) -> int:
    """Run the comparison and print it."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model",
        choices=("toy", "smollm2"),
        default="toy",
        help="toy: the anchor's 4-layer model; smollm2: SmolLM2-135M-Instruct (hf group)",
    )
    parser.add_argument("--repeats", type=int, default=1, help="fresh runs per configuration")
    parser.add_argument(
        "--strategies",
        default=None,
        help="align reference strategies to run (adapters trains LoRA adapters; +full adds "
        "full activation recomputation); default: precompute,precompute+full,model,swap,adapters "
        "(toy), precompute,precompute+full (smollm2)",
    )
    parser.add_argument("--no-trl", action="store_true", help="do not run TRL even if installed")
    parser.add_argument(
        "--mem-cap-gib",
        type=float,
        default=None,
        help="smollm2: also find each configuration's largest micro batch under this RSS cap",
    )
    parser.add_argument(
        "--mem-cap-limit", type=int, default=64, help="largest micro batch the cap search tries"
    )
    parser.add_argument(
        "--skip-throughput", action="store_true", help="smollm2: only the memory-cap search"
    )
    parser.add_argument("--workdir", default=None, help="keep assets and runs here")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    parser.add_argument("--trl-worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.trl_worker is not None:
        print(json.dumps(trl_worker(json.loads(args.trl_worker))))
        return 0
    real = args.model != "toy"
    if args.mem_cap_gib is not None and not real:
        parser.error("--mem-cap-gib needs --model smollm2")
    setup = SMOLLM2 if real else TOY
    strategies = args.strategies or (
        "precompute,precompute+full" if real else "precompute,precompute+full,model,swap,adapters"
    )
    variants = [s for s in strategies.split(",") if s]
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="dpo-vs-trl-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"workdir {workdir}; load average before: {load_average()}")
    if real:
        from dpo_real import DataShape, describe_lengths, smollm2_assets

        assets = smollm2_assets(workdir, DataShape(), setup.max_length)
        print(f"SmolLM2-135M-Instruct ({assets['hf_dir']}); {describe_lengths(assets['lengths'])}")
        trl_configs = [(True, False), (False, True)]
    else:
        assets = build_assets(workdir)
        trl_configs = [(True, False), (True, True), (False, True)]
    use_trl = trl_available() and not args.no_trl
    align_configs: list[tuple[str, Any]] = [
        (f"align:{s}", lambda s=s: run_align(assets, s, workdir, setup)) for s in variants
    ]
    trl_runs: list[tuple[str, Any]] = []
    if use_trl:
        trl_runs = [
            (f"trl:{gc}:{pre}", lambda gc=gc, pre=pre: run_trl(assets, workdir, gc, pre, setup))
            for gc, pre in trl_configs
        ]
    if real:  # align, TRL, align, TRL, ...
        configs = [c for pair in zip(align_configs, trl_runs, strict=False) for c in pair]
        configs += align_configs[len(trl_runs) :] + trl_runs[len(align_configs) :]
    else:
        configs = align_configs + trl_runs
    if args.skip_throughput:
        configs = []
    runs: dict[str, list[Result]] = {key: [] for key, _ in configs}
    # Interleaved (a, b, c, a, b, c, ...): a change in machine load hits every configuration.
    for _ in range(args.repeats if configs else 0):
        for key, make in configs:
            runs[key].append(make())
            r = runs[key][-1]
            print(
                f"  done: {r.name}: {r.tokens_per_s:.0f} tok/s, {r.peak_mib:.0f} MiB, "
                f"load {r.load:.1f}",
                flush=True,
            )
    order = [key for key, _ in align_configs + trl_runs if key in runs]
    measured = [median(runs[key]) for key in order if key.startswith("align:")]
    trl_rows = [median(runs[key]) for key in order if key.startswith("trl:")]
    print(f"load average after: {load_average()}")
    if configs:
        print_table(
            f"measured now ({args.repeats} run(s) each, median; 2 threads; "
            f"steps {setup.warmup + 1}-{setup.steps}; load = highest 1-min load average at "
            "the end of a run)",
            measured + trl_rows,
        )
    if real and configs:
        check_runs([r for key in order for r in runs[key]], expected_step_tokens(assets, setup))
    if configs and use_trl:
        pairs = matched_pairs(measured, [(r.name, r.tokens_per_s, r.peak_mib) for r in trl_rows])
        print_ratios(
            pairs, "ratios (measured side by side; recomputation against gradient checkpointing):"
        )
        trl_by_name = {r.name: r for r in trl_rows}
        print("median step tokens/s and tokens per CPU second, the same pairs:")
        for align, name, _, _ in pairs:
            trl = trl_by_name[name]
            step = align.median_step_tokens_per_s / trl.median_step_tokens_per_s
            cpu = align.tokens_per_cpu_s / trl.tokens_per_cpu_s
            print(f"  {align.name} vs {name}: median step x{step:.2f}, per CPU second x{cpu:.2f}")
    elif configs and real:
        print(
            "\nTRL is not installed (uv sync --group hf --group bench): align's numbers only; "
            "there is no recorded TRL anchor for this model."
        )
    elif configs:
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
    caps: list[dict[str, Any]] = []
    if args.mem_cap_gib is not None:
        limit = min(args.mem_cap_limit, len(assets["rows"]))
        print(
            f"\nlargest micro batch within {args.mem_cap_gib:g} GiB of resident memory "
            f"({PROBE_STEPS} steps, each on the longest pairs; RSS + forked helpers' USS "
            f"polled every 20 ms, killed above the cap; kernel ru_maxrss also within the cap; "
            f"tried up to {limit}):"
        )
        caps = memory_cap(
            assets,
            workdir,
            setup,
            variants,
            trl_configs if use_trl else [],
            args.mem_cap_gib,
            limit,
        )
        for c in caps:
            if c["smallest_failing"] is None:
                beyond = f"(all tried fit, up to {limit})"
            else:
                beyond = f"({c['smallest_failing']} does not)"
            print(
                f"  {c['name']:<48} {c['largest_micro_batch']:>3} {beyond:<24} "
                f"peak {c['peak_mib_at_largest']:.0f} MiB there"
            )
            points = ", ".join(
                f"{p['micro_batch']}: {p['peak_mib']:.0f}" for p in c["probes"] if p["fits"]
            )
            print(f"      peak MiB by micro batch (fitting probes) {points}")
        print(f"load average after the cap search: {load_average()}")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "model": setup.model,
                    "setup": asdict(setup),
                    "runs": {key: [asdict(r) for r in runs[key]] for key in order},
                    "medians": [asdict(r) for r in measured + trl_rows],
                    "memory_cap_gib": args.mem_cap_gib,
                    "memory_cap": caps,
                },
                indent=2,
            )
            + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The SPIN run: iterations of (generate with the opponent, train on real vs generated, refresh).

`train_spin` is the entry point the ``align`` CLI calls for ``align run spin`` (the SPIN
counterpart of `align_core.trainer.train`). Per iteration ``t`` of ``trainer.max_iterations``:

1. at the iteration's first step the opponent π_t is set to the policy's current weights
   (`align_core.trainer.spin_rollout.Opponent.refresh`);
2. π_t answers every training prompt (`rollout`: sharded over data parallelism, chunks of
   ``rollout_micro_batch_size``, a seed per example and iteration), with the optimizer state
   offloaded to host memory on GPU; the answers are written to
   ``run_dir/generations/iter_<t>.jsonl`` — or read from it when it is already complete, so a
   resumed run never generates them again;
3. the policy is trained for ``trainer.max_epochs`` epochs on the pairs (real answer, π_t's
   answer) of iteration ``t`` (and ``t − 1`` with ``train_on_previous_iteration``) with
   `align_core.algorithms.spin.SPINStep` at β_t, π_t being the reference; the shared
   `align_core.trainer.loop.Trainer` runs the steps, validation and saves of the iteration;
4. the trained policy becomes π_{t+1}.

Steps and samples are counted over the whole run; iteration ``t`` covers the global steps
``[start_t, start_t + steps_t)`` with ``steps_t = steps_per_epoch_t × max_epochs``
(`plan_iterations`), capped overall by ``trainer.max_steps``. Checkpoints carry the iteration
and the opponent's weights (an extra model of the checkpoint), so a run resumes mid-iteration
with the right opponent; at an iteration boundary the opponent is the policy itself. The final
checkpoint keeps the opponent too: raising ``trainer.max_iterations`` and resuming continues
with another iteration.

Metrics (train): ``loss``, ``acc``, ``rewards_actual_mean``, ``rewards_generated_mean``,
``rewards_margin``, ``generated_length_mean``, ``iteration``, ``kl_penalty``,
``generation_tokens_per_s`` (of the iteration's rollout) and the trainer's own (``grad_norm``,
``lr``, ``consumed_samples``, ``epoch`` within the iteration, ...). Validation: ``loss`` (SFT NLL
per token of the held-out answers) and ``generated_length_mean`` of ``spin.val_generations``
held-out prompts answered greedily by the current policy, written to
``run_dir/generations/val_step_<step>.jsonl``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from align_core.algorithms.spin import SPINConfig
from align_core.config import ModelConfig, ParallelConfig
from align_core.generation import LengthConfig, SamplingConfig
from align_core.optim import OptimizerConfig, SchedulerConfig
from align_core.trainer.config import ReferenceConfig, TrainerConfig
from align_core.trainer.loop import plan_steps
from align_core.trainer.metrics import MetricsSink
from align_core.trainer.run import DataConfig, RunResult
from align_core.trainer.spin_rollout import OpponentStrategy
from align_data.records import Text

__all__ = [
    "GenerateConfig",
    "GenerateResult",
    "IterationPlan",
    "SPINRunConfig",
    "SPINTrainerConfig",
    "generate_jsonl",
    "generation_length",
    "plan_iterations",
    "read_prompts",
    "resolve_opponent_strategy",
    "train_spin",
    "trainer_config",
]


@dataclass
class SPINTrainerConfig(TrainerConfig):
    """``trainer.spin``: the trainer's settings, ``max_epochs`` per iteration, plus iterations.

    ``max_steps`` (when ≥ 0) caps the whole run; ``val_check_interval`` and ``save_interval``
    count steps within an iteration (every iteration also validates and saves at its end).

    Attributes:
        max_iterations: SPIN iterations (each: generate, then ``max_epochs`` epochs).
    """

    max_iterations: int = 3

    def __post_init__(self) -> None:
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:
            parent()
        if self.max_iterations < 0:
            raise ValueError("trainer.spin.max_iterations must be >= 0")


@dataclass
class SPINRunConfig:
    """Everything one SPIN run needs (the SPIN counterpart of `RunConfig`).

    Attributes:
        run_dir: Checkpoints, ``generations/``, the exported ``final.nemo``.
        model: Architecture; None takes it from ``restore_from_path`` (or the tiny default).
        parallel: Tensor/pipeline layout (data parallel is the rest of the world).
        trainer: Loop settings per iteration, and ``max_iterations``.
        reference: The opponent's strategy: ``swap`` (default for ``auto``) or ``model``.
        data: SFT files (prompt/completion, messages, NeMo input/output or conversations) and
            batch sizes (``global_batch_size`` counts pairs). Packing is not supported.
        spin: SPIN settings (β, rollout and sampling settings, ...).
        optim: Optimizer settings.
        sched: Learning-rate schedule over the steps of all iterations.
        restore_from_path: The SFT ``.nemo`` to start from; None builds a fresh model with the
            byte tokenizer (tests and demos).
        resume: Continue from the newest checkpoint in ``run_dir`` when there is one.
        export_nemo: Write the final policy to ``run_dir/final.nemo`` when the run completes;
            None: unless the model was restored from a Hugging Face directory.
        export_hf: Write the final policy to ``run_dir/final_hf/`` when the run completes;
            None: when the model was restored from a Hugging Face directory.
        seed: Seed of initialisation and of the generation seeds.
    """

    run_dir: str
    model: ModelConfig | None = None
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    trainer: SPINTrainerConfig = field(default_factory=SPINTrainerConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    data: DataConfig = field(default_factory=DataConfig)
    spin: SPINConfig = field(default_factory=SPINConfig)
    optim: OptimizerConfig = field(default_factory=OptimizerConfig)
    sched: SchedulerConfig = field(default_factory=SchedulerConfig)
    restore_from_path: str | None = None
    resume: bool = True
    export_nemo: bool | None = None
    export_hf: bool | None = None
    seed: int = 1234


@dataclass(frozen=True)
class IterationPlan:
    """The global steps of one iteration.

    Attributes:
        iteration: 0-based iteration.
        pairs: Training pairs (prompts, or twice that with ``train_on_previous_iteration``).
        start_step: Global steps done before it.
        steps: Its steps (``steps_per_epoch × max_epochs``, or fewer under ``max_steps``).
        steps_per_epoch: Global batches per epoch of its pairs.
        val_check_interval: Validate every this many of its steps (0: never).
    """

    iteration: int
    pairs: int
    start_step: int
    steps: int
    steps_per_epoch: int
    val_check_interval: int

    @property
    def end_step(self) -> int:
        """Global step count when the iteration is done."""
        return self.start_step + self.steps


def trainer_config(cfg: TrainerConfig, **changes: Any) -> TrainerConfig:
    """A plain `TrainerConfig` with ``cfg``'s values (a `SPINTrainerConfig` too) and changes."""
    base = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(TrainerConfig)}
    return TrainerConfig(**{**base, **changes})


def plan_iterations(
    cfg: SPINTrainerConfig,
    *,
    prompts: int,
    global_batch_size: int,
    val_batches: int,
    train_on_previous_iteration: bool,
) -> list[IterationPlan]:
    """Where each iteration starts and how many steps it has (NeMo-Aligner's accounting).

    Raises:
        ValueError: Fewer pairs than one global batch.
    """
    plans: list[IterationPlan] = []
    start = 0
    for t in range(cfg.max_iterations):
        pairs = prompts * (2 if train_on_previous_iteration and t > 0 else 1)
        sp = plan_steps(
            trainer_config(cfg, max_steps=-1),
            train_samples=pairs,
            global_batch_size=global_batch_size,
            val_batches=val_batches,
        )
        steps = sp.max_steps if cfg.max_steps < 0 else min(sp.max_steps, cfg.max_steps - start)
        if steps <= 0:
            break
        plans.append(
            IterationPlan(t, pairs, start, steps, sp.steps_per_epoch, sp.val_check_interval)
        )
        start += steps
    return plans


def resolve_opponent_strategy(config: ReferenceConfig) -> OpponentStrategy:
    """``model.reference.strategy`` for SPIN: ``auto`` is ``swap`` (NeMo-Aligner's choice).

    Raises:
        ValueError: ``adapters`` or ``precompute``, which cannot hold an opponent that changes
            every iteration.
    """
    if config.strategy in ("auto", "swap"):
        return "swap"
    if config.strategy == "model":
        return "model"
    raise ValueError(
        f"model.reference.strategy={config.strategy} cannot be SPIN's opponent, which becomes "
        "the trained policy after every iteration; use swap (host memory) or model (a second "
        "model in device memory)"
    )


def generation_length(
    length: LengthConfig, prompts: Sequence[Sequence[int]], seq_length: int
) -> LengthConfig:
    """The length limits of a rollout over ``prompts``: the same for every chunk.

    ``max_length`` is capped so that the longest prompt plus its response fits ``seq_length``
    (NeMo-Aligner's rule, applied to the whole prompt set rather than per batch, so a response
    never depends on which prompts share its batch).

    Raises:
        ValueError: The longest prompt leaves no room for a response.
    """
    longest = max(len(p) for p in prompts)
    room = seq_length - longest
    if room < 1:
        raise ValueError(
            f"a prompt of {longest} tokens leaves no room to generate within seq_length "
            f"{seq_length}"
        )
    most = min(length.max_length, room)
    return LengthConfig(max_length=most, min_length=min(length.min_length, most))


def train_spin(run: SPINRunConfig, sinks: Sequence[MetricsSink] = ()) -> RunResult:
    """Train one SPIN run on this process's share of the world (call it on every rank).

    Initialises torch.distributed and megatron's groups from the launcher's environment,
    restores the SFT policy (or builds a fresh one), tokenizes the SFT data, resumes from
    ``run_dir`` when asked and possible, and runs the iterations (see the module docstring)
    until ``max_iterations``, ``max_steps``, the wall-clock limit or SIGTERM; then exports
    ``run_dir/final.nemo`` when the run completed and ``export_nemo`` is set. Metrics go to
    ``sinks`` on global rank 0 only (``start`` once with a `RunPlan` whose ``algorithm`` is
    ``"spin"``, ``finish`` however the run ends).

    Args:
        run: The run configuration.
        sinks: Metric receivers (rank 0 only).

    Returns:
        How the run ended (on every rank); ``steps`` and ``consumed_samples`` count all
        iterations; ``reference_strategy`` is the opponent's strategy.

    Raises:
        align_core.trainer.loop.NonFiniteError: A NaN/inf loss or gradient with
            ``trainer.nonfinite="stop"``.
        align_data.DataError: A malformed record (strict mode), before any training.
        ValueError: An inconsistent configuration, before any training; generations files
            written with other settings.
    """
    from align_core.trainer.spin_session import run_spin

    return run_spin(run, sinks)


# ------------------------------------------------------------------------------ align generate


@dataclass
class GenerateConfig:
    """``align generate``: answer every prompt of a JSONL file with one model.

    Attributes:
        prompts_file: JSONL, one prompt per line (see `read_prompts` for the accepted shapes).
        output_file: Where the completions go (JSONL, written by global rank 0 through a
            temporary file renamed when complete).
        restore_from_path: The ``.nemo`` to generate with; None builds a fresh ``model`` with
            the byte tokenizer (tests and demos).
        model: Architecture; None takes it from ``restore_from_path``.
        parallel: Tensor/pipeline layout (data parallel is the rest of the world; the prompts
            are sharded over it).
        sampling_params: Greedy or sampling settings and end strings.
        length_params: Most and fewest new tokens (capped so the longest prompt plus its
            response fits ``seq_length``).
        micro_batch_size: Prompts per generation call on each data-parallel rank.
        seq_length: Longest prompt plus response; None uses the model's ``seq_length``.
        seed: Prompt ``i`` is sampled with a seed derived from ``(seed, i)``, so the output
            does not depend on the parallel layout or ``micro_batch_size``.
        add_bos: Put the tokenizer's BOS in front of each prompt: None as training
            tokenization does (when the model was trained with one, the tokenizer's
            ``adds_bos``), True always, False never. A chat template that writes the BOS
            itself never gets a second one.
        chat_template: Render plain string prompts through the tokenizer's chat template (as
            one user turn, with the generation prompt): None when the tokenizer has one, True
            always (an error without one), False never (the text is tokenized as it is). Chat
            ``messages`` prompts are always rendered through the template.
    """

    prompts_file: str
    output_file: str
    restore_from_path: str | None = None
    model: ModelConfig | None = None
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    sampling_params: SamplingConfig = field(default_factory=SamplingConfig)
    length_params: LengthConfig = field(default_factory=LengthConfig)
    micro_batch_size: int = 32
    seq_length: int | None = None
    seed: int = 1234
    add_bos: bool | None = None
    chat_template: bool | None = None

    def __post_init__(self) -> None:
        if self.micro_batch_size < 1:
            raise ValueError("micro_batch_size must be >= 1")


@dataclass(frozen=True)
class GenerateResult:
    """What `generate_jsonl` wrote.

    Attributes:
        output_file: The completions file.
        prompts: Prompts answered.
        generated_tokens: Tokens generated over all prompts.
        seconds: Generation wall-clock time (the slowest data-parallel rank).
        tokens_per_s: ``generated_tokens / seconds``.
    """

    output_file: str
    prompts: int
    generated_tokens: int
    seconds: float
    tokens_per_s: float


_RESPONSE_KEYS = {"completion", "chosen", "rejected", "response", "chosen_response", "output"}


def _text(value: Any, path: str, line: int, key: str) -> Text:
    from align_data import DataError, Message

    if isinstance(value, str):
        return value
    if isinstance(value, list) and value:
        turns = []
        for i, m in enumerate(value):
            if not (isinstance(m, dict) and isinstance(m.get("content"), str)) or m.get(
                "role"
            ) not in ("system", "user", "assistant"):
                raise DataError(
                    path, line, f"{key}[{i}]", "expected {role: system|user|assistant, content}"
                )
            turns.append(Message(m["role"], m["content"]))
        return tuple(turns)
    raise DataError(path, line, key, "expected a string or a list of chat messages")


def read_prompts(path: str) -> list[Text]:
    """The prompts of a JSONL file, one per non-empty line.

    A line may be ``{"prompt": text or messages}`` (other keys ignored), ``{"input": text}``
    (NeMo), ``{"messages": [...]}`` (a conversation; a final assistant turn is dropped), or a
    record of any align-data format (its prompt is used).

    Raises:
        align_data.DataError: A line that is not such a record (naming file, line and field).
    """
    import json

    from align_data import RECORD_FIELD, DataError, Source, detect_format, parse_record

    prompts: list[Text] = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(path, line_no, RECORD_FIELD, f"not JSON: {exc}") from None
            if not isinstance(obj, dict):
                raise DataError(path, line_no, RECORD_FIELD, "expected a JSON object")
            keys = set(obj)
            if "prompt" in keys and not keys & _RESPONSE_KEYS:
                prompts.append(_text(obj["prompt"], path, line_no, "prompt"))
            elif "input" in keys and "output" not in keys:
                prompts.append(_text(obj["input"], path, line_no, "input"))
            elif "messages" in keys:
                turns = _text(obj["messages"], path, line_no, "messages")
                if isinstance(turns, tuple) and turns[-1].role == "assistant":
                    turns = turns[:-1]
                if not turns:
                    raise DataError(path, line_no, "messages", "no turn before the answer")
                prompts.append(turns)
            else:
                source = Source(path, line_no)
                prompts.append(parse_record(obj, detect_format(obj, source), source).prompt)
    return prompts


def _prompt_json(prompt: Text) -> Any:
    if isinstance(prompt, str):
        return prompt
    return [{"role": m.role, "content": m.content} for m in prompt]


def generate_jsonl(config: GenerateConfig) -> GenerateResult:
    """Answer every prompt of ``config.prompts_file`` and write ``config.output_file``.

    Call it on every rank (``align generate`` under torchrun works like a training run).
    Prompts are tokenized by `align_data.tokenize_prompt`: through the tokenizer's chat template
    with the generation prompt (messages, and plain text unless ``chat_template`` is False or
    the tokenizer has none), with the BOS where training puts it (``add_bos``), then sharded
    over data-parallel ranks and generated in chunks of
    ``micro_batch_size``. Each output line is ``{"index", "prompt", "completion",
    "prompt_length", "generated_length", "finished"}`` in input order: ``completion`` is the
    decoded response (EOS dropped, cut before an end string), so the file is SFT
    prompt/completion data; ``finished`` is False where the length limit cut it.

    Args:
        config: Files, model and generation settings.

    Returns:
        What was written (on every rank).

    Raises:
        align_data.DataError: A malformed prompt line, or a prompt too long for
            ``seq_length``, naming the file and line.
    """
    from megatron.core import parallel_state

    from align_core.parallel import init_distributed
    from align_core.trainer.build import build_policy, resolve_model_source
    from align_core.trainer.run import RunConfig
    from align_core.trainer.spin_rollout import (
        generation_seeds,
        make_generator,
        rollout,
        write_jsonl_atomically,
    )
    from align_data import DataError, Source, tokenize_prompt

    ctx = init_distributed(config.parallel, seed=config.seed)
    prompts = read_prompts(config.prompts_file)
    if not prompts:
        raise DataError(config.prompts_file, 1, "<record>", "the file holds no prompts")
    view = RunConfig(
        algorithm="sft",
        run_dir=str(config.output_file) + ".run",
        model=config.model,
        parallel=config.parallel,
        restore_from_path=config.restore_from_path,
        seed=config.seed,
    )
    source = resolve_model_source(view)
    tok = source.tokenizer
    seq = config.seq_length or source.model.seq_length
    ids: list[list[int]] = []
    for i, prompt in enumerate(prompts):
        ids.append(
            tokenize_prompt(
                prompt,
                tok,
                chat_template=config.chat_template,
                add_bos=config.add_bos,
                source=Source(config.prompts_file, i + 1),
            )
        )
        if len(ids[-1]) >= seq:
            raise DataError(
                config.prompts_file,
                i + 1,
                "prompt",
                f"{len(ids[-1])} tokens leave no room to generate within seq_length {seq}",
            )
        if not ids[-1]:
            raise DataError(config.prompts_file, i + 1, "prompt", "the prompt has no tokens")
    model = build_policy(source, config.parallel)
    result = rollout(
        make_generator(model, tok, seq),
        ids,
        generation_seeds(config.seed, 0, range(len(ids))),
        sampling=config.sampling_params,
        length=generation_length(config.length_params, ids, seq),
        micro_batch_size=config.micro_batch_size,
        group=parallel_state.get_data_parallel_group(),
    )
    if ctx.is_main:
        write_jsonl_atomically(
            Path(config.output_file),
            [
                {
                    "index": i,
                    "prompt": _prompt_json(prompts[i]),
                    "completion": result.texts[i],
                    "prompt_length": len(ids[i]),
                    "generated_length": len(result.responses[i]),
                    "finished": result.finished[i],
                }
                for i in range(len(ids))
            ],
        )
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    return GenerateResult(
        output_file=str(config.output_file),
        prompts=len(ids),
        generated_tokens=result.tokens,
        seconds=result.seconds,
        tokens_per_s=result.tokens_per_s,
    )

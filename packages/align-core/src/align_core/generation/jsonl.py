"""``align generate``: answer every prompt of a JSONL file with one model, into a JSONL file.

`GenerateConfig` is the command's configuration, `read_prompts` reads the prompts (plain text,
chat messages, or the prompt of any align-data record), and `generate_jsonl` tokenizes them,
runs one `align_core.generation.rollout.rollout` over the data-parallel ranks and writes the
completions (SFT prompt/completion data) through a temporary file renamed when complete.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from align_core.config import ModelConfig, ParallelConfig
from align_core.generation.config import LengthConfig, SamplingConfig
from align_core.generation.files import write_jsonl_atomically
from align_core.generation.rollout import (
    generation_length,
    generation_seeds,
    make_generator,
    rollout,
)
from align_data.records import Text

__all__ = ["GenerateConfig", "GenerateResult", "generate_jsonl", "read_prompts"]


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
    from align_core.parallel import init_distributed, megatron_data_group
    from align_core.trainer.build import build_policy, resolve_model_source
    from align_core.trainer.run import RunConfig
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
        group=megatron_data_group(),
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

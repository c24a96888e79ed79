"""SPIN's generation side: the opponent, rollouts over data parallelism, the generations files.

`Opponent` holds π_t, the weights the policy had when iteration ``t`` started: it generates the
iteration's responses and is the reference of its loss, and `Opponent.refresh` makes the trained
policy the next opponent. Two strategies, as for DPO's reference
(`align_core.reference`): ``swap`` keeps the opponent weights in host memory (pinned with CUDA)
and copies them into the live model around each use, in a ``finally`` that restores the policy;
``model`` keeps a second, frozen model in device memory.

`rollout` answers a list of prompts on every data-parallel layout the same way: the prompts are
split into contiguous shards, one per data-parallel rank; each rank generates its shard in
chunks of ``rollout_micro_batch_size`` (grouped by prompt length, which only saves padding
steps); every response is drawn with its own seed (`generation_seeds`: run seed, stream = the
iteration, example index), so it depends only on its prompt, its seed and the weights; the
responses are all-gathered so every rank holds all of them in prompt order.

Generations files (`write_generations` / `read_generations`): ``iter_<t>.jsonl`` holds one line
per training prompt (index, prompt, real and generated text, their lengths, whether generation
finished with EOS or an end string, and the token ids, so a resumed run rebuilds exactly the
same pairs); ``iter_<t>.meta.json`` is written last, atomically, and marks the file complete. A
file is reused only when its meta matches the run's data fingerprint, seed and generation
settings.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from align_core.algorithms._common import ModelBatch
from align_core.generation import Generator, LengthConfig, SamplingConfig
from align_core.model import unwrap_model
from align_core.reference import reference_forward
from align_core.schedule import ForwardFn

__all__ = [
    "VALIDATION_STREAM",
    "GenerationRow",
    "Opponent",
    "OpponentStrategy",
    "RolloutResult",
    "decode_rows",
    "generation_seeds",
    "make_generator",
    "read_generations",
    "rollout",
    "write_generations",
    "write_jsonl_atomically",
]

OpponentStrategy = Literal["swap", "model"]
VALIDATION_STREAM = 2**31 - 1
"""Seed stream of the validation generations (rollouts use the iteration as their stream)."""


def generation_seeds(seed: int, stream: int, indices: Sequence[int]) -> list[int]:
    """One sampling seed per example, a pure function of ``(seed, stream, index)``.

    Args:
        seed: The run seed.
        stream: The iteration (rollouts) or `VALIDATION_STREAM`.
        indices: Example indices.

    Returns:
        Seeds in ``[0, 2**62)``, independent across the three inputs.
    """
    out = []
    for index in indices:
        state = np.random.SeedSequence([int(seed), int(stream), int(index)]).generate_state(
            1, np.uint64
        )
        out.append(int(state[0]) >> 2)
    return out


# ------------------------------------------------------------------------------------ rollout


@dataclass(frozen=True)
class RolloutResult:
    """Responses to every prompt of a rollout (identical on every rank).

    Attributes:
        responses: Generated token ids per prompt, in prompt order (final EOS included).
        texts: Decoded responses (EOS dropped, cut before an end string).
        finished: Whether each response ended with EOS or an end string (else: length limit).
        tokens: Generated tokens over all prompts.
        seconds: Wall-clock time of the slowest data-parallel rank.
    """

    responses: list[list[int]]
    texts: list[str]
    finished: list[bool]
    tokens: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens per second over the whole data-parallel group."""
        return self.tokens / max(self.seconds, 1e-9)


def rollout(
    generator: Generator,
    prompts: Sequence[Sequence[int]],
    seeds: Sequence[int],
    *,
    sampling: SamplingConfig,
    length: LengthConfig,
    micro_batch_size: int,
    group: dist.ProcessGroup | None,
) -> RolloutResult:
    """Generate one response per prompt, sharded over the data-parallel ``group``.

    Every rank of the world calls it with the same prompts and seeds (tensor- and pipeline-parallel
    peers generate the same shard together).

    Args:
        generator: This rank's generator (over the weights to sample from).
        prompts: Prompt token ids, all of them.
        seeds: One sampling seed per prompt.
        sampling: Sampling settings.
        length: Length limits (use the same limits for every chunk: see `LengthConfig`).
        micro_batch_size: Prompts per `Generator.generate` call.
        group: Data-parallel group (None: this process alone).

    Returns:
        The `RolloutResult`, identical on every rank.
    """
    if len(seeds) != len(prompts):
        raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
    size = dist.get_world_size(group) if group is not None and dist.is_initialized() else 1
    rank = dist.get_rank(group) if size > 1 else 0
    n = len(prompts)
    mine = list(range(n * rank // size, n * (rank + 1) // size))
    mine.sort(key=lambda i: len(prompts[i]))
    start = time.perf_counter()
    local: list[tuple[int, list[int], str, bool]] = []
    for lo in range(0, len(mine), micro_batch_size):
        chunk = mine[lo : lo + micro_batch_size]
        out = generator.generate(
            [prompts[i] for i in chunk], sampling, length, seed=[seeds[i] for i in chunk]
        )
        texts = out.texts if out.texts is not None else [""] * len(chunk)
        finished = out.finished.tolist()
        for i, ids, text, done in zip(chunk, out.responses(), texts, finished, strict=True):
            local.append((i, ids, text, bool(done)))
    elapsed = time.perf_counter() - start
    shards: list[Any] = [(local, elapsed)]
    if size > 1:
        shards = [None] * size
        dist.all_gather_object(shards, (local, elapsed), group=group)
    rows = sorted((row for shard, _ in shards for row in shard), key=lambda r: r[0])
    if [r[0] for r in rows] != list(range(n)):
        raise RuntimeError("rollout: the gathered responses do not cover every prompt once")
    return RolloutResult(
        responses=[r[1] for r in rows],
        texts=[r[2] for r in rows],
        finished=[r[3] for r in rows],
        tokens=sum(len(r[1]) for r in rows),
        seconds=max(s for _, s in shards),
    )


def make_generator(module: torch.nn.Module, tokenizer: Any, max_sequence_length: int) -> Generator:
    """A `Generator` over ``module`` with the tokenizer's EOS, padding and decoder.

    Args:
        module: This rank's model chunk holding the weights to sample from.
        tokenizer: An align-data tokenizer (``vocab_size``, ``eos_id``, ``pad_id``, ``decode``).
        max_sequence_length: Longest prompt plus response.
    """
    from align_core.generation import GenerationGroups

    return Generator(
        module,
        vocab_size=tokenizer.vocab_size,
        eos_ids=tokenizer.eos_id,
        pad_id=tokenizer.pad_id,
        decoder=tokenizer,
        groups=GenerationGroups.from_parallel_state(),
        max_sequence_length=max_sequence_length,
    )


# ----------------------------------------------------------------------------------- opponent


class Opponent:
    """SPIN's opponent π_t: the policy's weights when iteration ``t`` started.

    It is the reference policy of the iteration's loss (`logps`, the trainer's
    `align_core.reference.ReferencePolicy` protocol) and the model that generates the
    iteration's responses (`weights`). `refresh` copies the policy's current weights in.
    """

    def __init__(
        self,
        policy: torch.nn.Module,
        forward_fn: ForwardFn,
        *,
        strategy: OpponentStrategy,
        merge: int = 1,
        opponent_model: torch.nn.Module | None = None,
    ) -> None:
        """Hold a copy of ``policy``'s current weights.

        Args:
            policy: This rank's policy chunk (unwrapped or DDP-wrapped).
            forward_fn: Per-micro-batch forward returning token log-probs.
            strategy: ``swap`` (host copy swapped in) or ``model`` (second device model).
            merge: Training micro-batches per reference forward.
            opponent_model: For ``model``: a model of the policy's architecture and layout.

        Raises:
            ValueError: An unknown strategy, or ``model`` without ``opponent_model``.
        """
        if strategy not in ("swap", "model"):
            raise ValueError(
                f"SPIN's opponent strategy must be swap or model, got {strategy!r} (the opponent "
                "changes every iteration, so neither precompute nor adapters can represent it)"
            )
        self.strategy: OpponentStrategy = strategy
        self._policy = unwrap_model(policy)
        self._forward_fn = forward_fn
        self._merge = merge
        named = list(self._policy.named_parameters())
        self._names = [n for n, _ in named]
        self._params = [p for _, p in named]
        self._model: torch.nn.Module | None = None
        self._host: list[Tensor] = []
        self._stash: list[Tensor] = []
        if strategy == "model":
            if opponent_model is None:
                raise ValueError("the model strategy needs opponent_model")
            self._model = unwrap_model(opponent_model).eval()
            for p in self._model.parameters():
                p.requires_grad_(False)
        else:
            pin = torch.cuda.is_available()
            self._host = [self._host_like(p, pin) for p in self._params]
            self._stash = [self._host_like(p, pin) for p in self._params]
        self.refresh()

    @staticmethod
    def _host_like(p: Tensor, pin: bool) -> Tensor:
        return torch.empty(p.shape, dtype=p.dtype, device="cpu", pin_memory=pin)

    def refresh(self) -> None:
        """Make the policy's current weights the opponent (start of an iteration)."""
        with torch.no_grad():
            if self._model is not None:
                self._model.load_state_dict(self._policy.state_dict())
            else:
                for h, p in zip(self._host, self._params, strict=True):
                    h.copy_(p.detach(), non_blocking=True)
                if torch.cuda.is_available():
                    torch.cuda.current_stream().synchronize()

    @contextlib.contextmanager
    def weights(self) -> Iterator[torch.nn.Module]:
        """A module holding the opponent's weights, for the duration of the context.

        ``swap``: the policy itself with the opponent weights copied in; its own weights are
        copied back in a ``finally`` block. ``model``: the second model.
        """
        if self._model is not None:
            yield self._model
            return
        with torch.no_grad():
            for p, s in zip(self._params, self._stash, strict=True):
                s.copy_(p.detach(), non_blocking=True)
            for p, h in zip(self._params, self._host, strict=True):
                p.detach().copy_(h, non_blocking=True)
        try:
            yield self._policy
        finally:
            with torch.no_grad():
                for p, s in zip(self._params, self._stash, strict=True):
                    p.detach().copy_(s, non_blocking=True)

    def logps(self, micro_batches: Sequence[ModelBatch], *, split: str) -> list[Tensor]:
        """Opponent per-sequence log-prob sums of training pairs (zeros for validation).

        SPIN's validation loss is the SFT NLL, which does not use a reference, so validation
        batches get zeros without a forward pass.
        """
        if split != "train":
            return [torch.zeros(mb["seq_token_counts"].numel()) for mb in micro_batches]
        with self.weights() as module:
            return reference_forward(module, micro_batches, self._forward_fn, merge=self._merge)

    def state(self) -> dict[str, str]:
        """What the trainer's checkpoint records about the reference: the strategy."""
        return {"strategy": self.strategy}

    def checkpoint_state(self) -> torch.nn.Module | dict[str, Tensor]:
        """The opponent weights as a checkpoint extra model (`align_core.checkpoint`).

        A module (``model``), or a state dict keyed like the policy's: the host copies of the
        parameters and the policy's own values of any other tensors (buffers, which training
        does not change). `Checkpointer.load` overwrites these tensors in place.
        """
        if self._model is not None:
            return self._model
        out: dict[str, Tensor] = dict(zip(self._names, self._host, strict=True))
        for key, value in self._policy.state_dict().items():
            if key not in out and isinstance(value, Tensor):
                out[key] = value.detach().clone()
        return out


# -------------------------------------------------------------------------- generations files


@dataclass(frozen=True)
class GenerationRow:
    """One line of a generations file.

    Attributes:
        index: The training example's index.
        prompt_ids: Prompt tokens.
        real_ids: The real (SFT) answer's tokens.
        generated_ids: The opponent's answer's tokens.
        finished: Whether generation ended with EOS or an end string.
    """

    index: int
    prompt_ids: list[int]
    real_ids: list[int]
    generated_ids: list[int]
    finished: bool


def decode_rows(tokenizer: Any, rows: Sequence[GenerationRow]) -> dict[str, list[str]]:
    """``prompt`` and ``real`` texts of generation rows (a leading BOS and final EOS left out)."""

    def text(ids: Sequence[int]) -> str:
        ids = list(ids)
        if ids and ids[0] == tokenizer.bos_id:
            ids = ids[1:]
        while ids and ids[-1] == tokenizer.eos_id:
            ids = ids[:-1]
        return tokenizer.decode(ids)

    return {"prompt": [text(r.prompt_ids) for r in rows], "real": [text(r.real_ids) for r in rows]}


def write_jsonl_atomically(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """Write JSON lines to ``path`` through a temporary file renamed when complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _meta_path(path: Path) -> Path:
    return path.with_name(path.name.removesuffix(".jsonl") + ".meta.json")


def write_generations(
    path: Path,
    rows: Sequence[GenerationRow],
    texts: Mapping[str, Sequence[str]],
    meta: Mapping[str, Any],
) -> None:
    """Write a generations file and, last, its meta file (which marks it complete).

    Args:
        path: ``.../iter_<t>.jsonl``.
        rows: One row per training prompt, in index order.
        texts: ``prompt``, ``real`` and ``generated`` texts, one per row.
        meta: The reuse key (``key``) and rollout statistics.
    """
    lines = [
        {
            "index": r.index,
            "prompt": texts["prompt"][i],
            "real": texts["real"][i],
            "generated": texts["generated"][i],
            "prompt_length": len(r.prompt_ids),
            "real_length": len(r.real_ids),
            "generated_length": len(r.generated_ids),
            "finished": r.finished,
            "prompt_ids": r.prompt_ids,
            "real_ids": r.real_ids,
            "generated_ids": r.generated_ids,
        }
        for i, r in enumerate(rows)
    ]
    meta_path = _meta_path(path)
    meta_path.unlink(missing_ok=True)
    write_jsonl_atomically(path, lines)
    tmp = meta_path.with_name(meta_path.name + ".tmp")
    tmp.write_text(json.dumps(dict(meta), indent=1, sort_keys=True) + "\n")
    os.replace(tmp, meta_path)


def read_generations(
    path: Path, key: Mapping[str, Any]
) -> tuple[list[GenerationRow], dict[str, Any]] | None:
    """Read a complete generations file written under the same ``key``.

    Args:
        path: ``.../iter_<t>.jsonl``.
        key: What the generations depend on (data fingerprint, seed, settings).

    Returns:
        ``(rows, meta)``, or None when the file or its meta file is missing (incomplete).

    Raises:
        ValueError: The file was written with other data or generation settings.
    """
    meta_path = _meta_path(path)
    if not path.is_file() or not meta_path.is_file():
        return None
    meta = json.loads(meta_path.read_text())
    saved = meta.get("key")
    want = json.loads(json.dumps(dict(key)))
    if saved != want:
        diff = sorted(
            k for k in set(want) | set(saved or {}) if (saved or {}).get(k) != want.get(k)
        )
        raise ValueError(
            f"{path} was generated with other settings ({', '.join(diff)} differ); delete it "
            "(and its .meta.json) to generate again, or use a new run directory"
        )
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            rows.append(
                GenerationRow(
                    int(r["index"]),
                    list(r["prompt_ids"]),
                    list(r["real_ids"]),
                    list(r["generated_ids"]),
                    bool(r["finished"]),
                )
            )
    return rows, meta

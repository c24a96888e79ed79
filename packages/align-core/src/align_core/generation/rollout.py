"""Rollouts: one response per prompt, sharded over data parallelism, reproducible per example.

`rollout` answers a list of prompts on every data-parallel layout the same way: the prompts are
split into contiguous shards, one per data-parallel rank; each rank generates its shard in
chunks of ``micro_batch_size`` (grouped by prompt length, which only saves padding steps);
every response is drawn with its own seed (`generation_seeds`: run seed, stream, example
index), so it depends only on its prompt, its seed and the weights; the responses are
all-gathered so every rank holds all of them in prompt order. `generation_length` gives the one
length limit a whole prompt set shares, and `make_generator` a `Generator` over a model chunk
with a tokenizer's EOS, padding and decoder. SPIN's opponent and ``align generate`` use them.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from align_core.generation.config import LengthConfig, SamplingConfig
from align_core.generation.generator import Generator
from align_core.generation.pipeline import GenerationGroups

__all__ = [
    "VALIDATION_STREAM",
    "RolloutResult",
    "generation_length",
    "generation_seeds",
    "make_generator",
    "rollout",
]

VALIDATION_STREAM = 2**31 - 1
"""Seed stream of SPIN's validation generations (its rollouts use the iteration as stream)."""


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
    return Generator(
        module,
        vocab_size=tokenizer.vocab_size,
        eos_ids=tokenizer.eos_id,
        pad_id=tokenizer.pad_id,
        decoder=tokenizer,
        groups=GenerationGroups.from_parallel_state(),
        max_sequence_length=max_sequence_length,
    )

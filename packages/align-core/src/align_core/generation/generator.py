"""Batched text generation for megatron-core GPT models, under tensor and pipeline parallelism.

Layout. Prompts are right-padded into one ``[B, T]`` tensor, so column ``j`` is position ``j`` for
every sample: the positions (rotary or learned) are exactly those of training, and no padding ever
needs an attention mask. Generation starts at the shortest prompt's length and moves the whole
batch one column per step; a sample whose prompt is longer than the current column keeps its
prompt token (it is still reading its prompt), the others append the chosen token. This is the
scheme of megatron's own static engine. Its cost is one step per column between the shortest and
the longest prompt, so callers that care can group prompts of similar length.

Cache. With ``use_kv_cache=True`` (default) the first step runs the shared prompt prefix at once
and every later step one column, with megatron's static inference context holding keys and values
(`KVCache`). With ``use_kv_cache=False`` every step recomputes the whole prefix: the reference the
cached path is tested against and the baseline of ``bench/generate.py``.

Parallelism. Every rank of a tensor/pipeline group calls `Generator.generate` with the same
prompts and seeds. The last pipeline stage gathers the vocabulary-parallel logits, every one of its
tensor-parallel ranks selects tokens with identical seeds, and rank 0's choice is broadcast to the
whole group (`ModelParallelStage`). Data-parallel replicas generate their own prompts
independently.

Why not megatron's ``StaticInferenceEngine``: its controller samples from one generator for the
whole batch (outputs then depend on batch composition), works on its own tokenizer and request
objects, and offers no per-sample seeds, minimum length or end-string trimming; the piece of it
that matters for speed, the KV cache, is used here directly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from align_core.generation.config import LengthConfig, SamplingConfig
from align_core.generation.kv_cache import KVCache
from align_core.generation.pipeline import GenerationGroups, ModelParallelStage
from align_core.generation.prompts import PaddingSide, right_pad, unpad_prompts
from align_core.generation.sampling import (
    apply_repetition_penalty,
    block_tokens,
    choose_tokens,
    derive_seeds,
    mask_padded_vocab,
    sample_uniforms,
    token_presence,
)
from align_core.generation.stopping import (
    end_string_window,
    new_end_string,
    trim_at_end_string,
)
from align_core.model import unwrap_model

__all__ = ["GenerationResult", "Generator", "TextDecoder"]


class TextDecoder(Protocol):
    """What the generator needs from a tokenizer: ``decode`` (``align_data.Tokenizer`` has it)."""

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``."""
        ...


@dataclass(frozen=True)
class GenerationResult:
    """What one `Generator.generate` call produced (identical on every rank of the group).

    Attributes:
        tokens: ``[B, T]`` int64: each row is its prompt followed by its response, right-padded
            with the pad id (``T`` = the longest prompt plus response in the batch).
        prompt_lengths: ``[B]`` int64 prompt lengths.
        response_lengths: ``[B]`` int64 generated tokens per sample, the final EOS or the token that
            completed an end string included.
        logprobs: ``[B, R]`` float32 log-probability of each generated token under the distribution
            it was drawn from (after penalty, temperature, top-k and top-p; greedy: the softmax of
            the penalised logits); 0 beyond a sample's response. ``R`` = the longest response.
        finished: ``[B]`` bool, True where an EOS token or end string ended the response, False
            where it hit the length limit.
        texts: Decoded responses cut before the first end string (EOS left out), when the
            generator has a decoder; else None.
    """

    tokens: torch.Tensor
    prompt_lengths: torch.Tensor
    response_lengths: torch.Tensor
    logprobs: torch.Tensor
    finished: torch.Tensor
    texts: list[str] | None = None

    def responses(self) -> list[list[int]]:
        """The generated token ids of each sample."""
        rows = self.tokens.tolist()
        starts = self.prompt_lengths.tolist()
        counts = self.response_lengths.tolist()
        return [row[s : s + n] for row, s, n in zip(rows, starts, counts, strict=True)]

    def sequences(self) -> list[list[int]]:
        """Prompt plus response of each sample, without padding."""
        rows = self.tokens.tolist()
        ends = (self.prompt_lengths + self.response_lengths).tolist()
        return [row[:e] for row, e in zip(rows, ends, strict=True)]


class Generator:
    """Generates responses to batches of prompts with one megatron-core GPT model.

    Args:
        model: This rank's stage of the model (``build_gpt_model``; possibly ``Float16Module``).
        vocab_size: The tokenizer's vocabulary size; ids at or above it (megatron's padding) are
            never generated.
        eos_ids: Id(s) that end a response (kept as its last token).
        pad_id: Id written after each sequence; default the first of ``eos_ids`` (NeMo's choice).
        decoder: Tokenizer used for end strings and for ``GenerationResult.texts``.
        groups: Tensor- and pipeline-parallel groups (`GenerationGroups.from_parallel_state`).
        use_kv_cache: Cache keys and values (megatron's static inference context); False
            recomputes the whole prefix at every step.
        max_sequence_length: Longest prompt plus response; default the model's own.

    Raises:
        ValueError: When the model was built with sequence parallelism (a one-column decoding
            step cannot be split over the sequence; build the generating model without it).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        vocab_size: int,
        eos_ids: int | Sequence[int],
        pad_id: int | None = None,
        decoder: TextDecoder | None = None,
        groups: GenerationGroups = GenerationGroups(),  # noqa: B008
        use_kv_cache: bool = True,
        max_sequence_length: int | None = None,
    ) -> None:
        self.model = model
        self.vocab_size = vocab_size
        self.eos_ids = (eos_ids,) if isinstance(eos_ids, int) else tuple(eos_ids)
        if not self.eos_ids:
            raise ValueError("eos_ids must name at least one token")
        self.pad_id = self.eos_ids[0] if pad_id is None else pad_id
        self.decoder = decoder
        self.use_kv_cache = use_kv_cache
        self.stage = ModelParallelStage(model, groups)
        inner = unwrap_model(model)
        if inner.config.sequence_parallel:
            raise ValueError("generation does not support sequence parallelism")
        self.max_sequence_length = max_sequence_length or inner.max_sequence_length

    def generate(
        self,
        prompts: Sequence[Sequence[int]] | torch.Tensor,
        sampling: SamplingConfig = SamplingConfig(),  # noqa: B008
        length: LengthConfig = LengthConfig(),  # noqa: B008
        *,
        seed: int | Sequence[int] = 0,
        prompt_lengths: torch.Tensor | Sequence[int] | None = None,
        padding_side: PaddingSide = "right",
    ) -> GenerationResult:
        """Generate one response per prompt.

        Args:
            prompts: Token ids per prompt, or a padded ``[B, S]`` tensor with ``prompt_lengths``.
            sampling: Greedy or sampling settings and end strings.
            length: Most and fewest new tokens per sample.
            seed: One seed for the call (per-sample seeds are derived from it and the row index),
                or one seed per prompt: a prompt's response then depends only on its own seed,
                whatever else is in the batch.
            prompt_lengths: Real lengths when ``prompts`` is a padded tensor.
            padding_side: Where a padded tensor's padding is: ``"right"`` or ``"left"``.

        Returns:
            The `GenerationResult`.

        Raises:
            ValueError: On an empty prompt, a prompt that leaves no room to generate, end strings
                without a decoder, or a seed list of the wrong length.
        """
        rows = self._prompt_rows(prompts, prompt_lengths, padding_side)
        if sampling.end_strings and self.decoder is None:
            raise ValueError("end_strings need a decoder: pass decoder= to Generator")
        batch = len(rows)
        seeds = derive_seeds(seed, batch) if isinstance(seed, int) else [int(s) for s in seed]
        if len(seeds) != batch:
            raise ValueError(f"{len(seeds)} seeds for {batch} prompts")
        longest = max(len(r) for r in rows)
        max_new = min(length.max_length, self.max_sequence_length - longest)
        if max_new < 1:
            raise ValueError(
                f"a prompt of {longest} tokens leaves no room in max_sequence_length "
                f"{self.max_sequence_length}"
            )
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                return self._generate(rows, sampling, length, seeds, max_new)
        finally:
            self.model.train(was_training)
            if not self.stage.is_first:
                # megatron annotates ``input_tensor: Tensor``; None clears it (as megatron does).
                unwrap_model(self.model).set_input_tensor(None)  # pyright: ignore[reportArgumentType]

    def _prompt_rows(
        self,
        prompts: Sequence[Sequence[int]] | torch.Tensor,
        prompt_lengths: torch.Tensor | Sequence[int] | None,
        padding_side: PaddingSide,
    ) -> list[list[int]]:
        if isinstance(prompts, torch.Tensor):
            if prompt_lengths is None:
                raise ValueError("a padded prompt tensor needs prompt_lengths")
            rows = unpad_prompts(prompts, prompt_lengths, padding_side)
        else:
            rows = [[int(t) for t in p] for p in prompts]
        if not rows:
            raise ValueError("no prompts")
        for i, r in enumerate(rows):
            if not r:
                raise ValueError(f"prompt {i} is empty")
            if max(r) >= self.vocab_size or min(r) < 0:
                raise ValueError(f"prompt {i} has an id outside [0, {self.vocab_size})")
        return rows

    def _generate(
        self,
        rows: list[list[int]],
        sampling: SamplingConfig,
        length: LengthConfig,
        seeds: list[int],
        max_new: int,
    ) -> GenerationResult:
        device = self.stage.device
        batch = len(rows)
        columns = max(len(r) for r in rows) + max_new
        tokens, prompt_len = right_pad(rows, columns, self.pad_id, device)
        shortest = int(prompt_len.min())
        uniforms = None if sampling.use_greedy else sample_uniforms(seeds, max_new, device)
        eos = torch.tensor(self.eos_ids, device=device)
        response_len = torch.zeros(batch, dtype=torch.long, device=device)
        logprobs = torch.zeros(batch, max_new, dtype=torch.float32, device=device)
        done = torch.zeros(batch, dtype=torch.bool, device=device)
        finished = torch.zeros_like(done)
        presence: torch.Tensor | None = None
        responses: list[list[int]] = [[] for _ in rows]
        cache = KVCache(batch, columns) if self.use_kv_cache else None

        for t in range(shortest, columns):
            start = cache.length if cache is not None else 0
            logits = self.stage.forward(tokens, start, t, cache)
            in_prompt = t < prompt_len
            active = ~in_prompt & ~done
            packed = torch.zeros(2, batch, dtype=torch.float64, device=device)
            if logits is not None:
                if presence is None:
                    presence = token_presence(
                        tokens[:, :t],
                        torch.ones_like(tokens[:, :t], dtype=torch.bool),
                        logits.size(-1),
                    )
                chosen, chosen_lp = self._select(
                    logits, presence, response_len, sampling, length, uniforms, max_new
                )
                packed[0], packed[1] = chosen.double(), chosen_lp.double()
            packed = self.stage.broadcast_from_last(packed)
            chosen, chosen_lp = packed[0].long(), packed[1].float()

            column = torch.where(active, chosen, torch.full_like(chosen, self.pad_id))
            column = torch.where(in_prompt, tokens[:, t], column)
            tokens[:, t] = column
            if presence is not None:
                rows_seen = (in_prompt | active).nonzero().squeeze(1)
                presence[rows_seen, column[rows_seen]] = True
            index = response_len.clamp(max=max_new - 1)
            logprobs[active, index[active]] = chosen_lp[active]
            response_len = response_len + active.long()

            stop = active & torch.isin(chosen, eos)
            if sampling.end_strings:
                stop = stop | self._end_string_stops(
                    responses, chosen, active, stop, response_len, sampling, length
                )
            finished |= stop
            done |= stop | (active & (response_len >= max_new))
            if bool(done.all()):
                break

        used = int((prompt_len + response_len).max())
        longest_response = int(response_len.max())
        result_tokens = tokens[:, :used].clone()
        texts = self._texts(result_tokens, prompt_len, response_len, sampling)
        return GenerationResult(
            tokens=result_tokens,
            prompt_lengths=prompt_len,
            response_lengths=response_len,
            logprobs=logprobs[:, :longest_response].clone(),
            finished=finished,
            texts=texts,
        )

    def _select(
        self,
        logits: torch.Tensor,
        presence: torch.Tensor,
        response_len: torch.Tensor,
        sampling: SamplingConfig,
        length: LengthConfig,
        uniforms: torch.Tensor | None,
        max_new: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        logits = mask_padded_vocab(logits, self.vocab_size)
        logits = apply_repetition_penalty(logits, presence, sampling.repetition_penalty)
        logits = block_tokens(logits, self.eos_ids, response_len < length.min_length)
        step_uniforms = None
        if uniforms is not None:
            index = response_len.clamp(max=max_new - 1)[:, None]
            step_uniforms = uniforms.gather(1, index).squeeze(1)
        return choose_tokens(logits, sampling, step_uniforms)

    def _end_string_stops(
        self,
        responses: list[list[int]],
        chosen: torch.Tensor,
        active: torch.Tensor,
        stopped: torch.Tensor,
        response_len: torch.Tensor,
        sampling: SamplingConfig,
        length: LengthConfig,
    ) -> torch.Tensor:
        """Host-side check of the rows whose newest token completed an end string."""
        assert self.decoder is not None
        window = end_string_window(sampling.end_strings)
        out = torch.zeros_like(active)
        chosen_list, active_list = chosen.tolist(), active.tolist()
        stopped_list, count_list = stopped.tolist(), response_len.tolist()
        for b, is_active in enumerate(active_list):
            if not is_active:
                continue
            responses[b].append(chosen_list[b])
            if stopped_list[b] or count_list[b] < max(length.min_length, 1):
                continue
            tail = responses[b][-window:]
            before = self.decoder.decode(tail[:-1])
            after = self.decoder.decode(tail)
            if new_end_string(before, after, sampling.end_strings):
                out[b] = True
        return out

    def _texts(
        self,
        tokens: torch.Tensor,
        prompt_len: torch.Tensor,
        response_len: torch.Tensor,
        sampling: SamplingConfig,
    ) -> list[str] | None:
        if self.decoder is None:
            return None
        texts = []
        starts, counts = prompt_len.tolist(), response_len.tolist()
        for row, s, n in zip(tokens.tolist(), starts, counts, strict=True):
            response = row[s : s + n]
            while response and response[-1] in self.eos_ids:
                response = response[:-1]
            texts.append(trim_at_end_string(self.decoder.decode(response), sampling.end_strings))
        return texts

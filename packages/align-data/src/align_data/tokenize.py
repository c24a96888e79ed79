"""Tokenizing records into examples with an exact prompt/response boundary.

Prompt and response are rendered (chat templates) and tokenized *separately*, then concatenated:
a tokenizer can never merge tokens across the boundary, so every response token — and only
response tokens — gets a label. A BOS is put in front of the prompt when the model was trained
with one (:func:`resolve_add_bos`: ``TokenizeConfig.add_bos``, by default the tokenizer's
``adds_bos``) — never a second one: not when the prompt already starts with the BOS id, nor when
a chat template already wrote the BOS token's text at the start. An EOS ends every response
(unless the response already ends with it, or, for a chat-rendered response, already contains it).

:func:`tokenize_prompt` tokenizes a prompt to generate from by the same rules.

Over-long examples follow :class:`TokenizeConfig`: with ``overlong="truncate"`` the prompt is
truncated from the left (after the BOS) down to ``min_prompt_length`` tokens, then responses from
the right; an example whose response would lose every token, or whose prompt would keep nothing
but its BOS, is dropped, never trained with no labels or no prompt. With ``overlong="drop"``
over-long examples are dropped. Either way each truncated or dropped example is counted
(:class:`TokenizeStats`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np

from align_data.chat import (
    ChatTemplate,
    ChatTemplateError,
    JinjaChatTemplate,
    conversation_segments,
    split_prompt_response,
)
from align_data.errors import RECORD_FIELD, DataError
from align_data.records import (
    Message,
    PreferenceRecord,
    Record,
    SFTRecord,
    Source,
    Text,
    UnpairedRecord,
)
from align_data.tokenizer import Tokenizer

__all__ = [
    "Example",
    "FitResult",
    "PreferenceExample",
    "SFTExample",
    "TokenizeConfig",
    "TokenizeResult",
    "TokenizeStats",
    "Tokenized",
    "UnpairedExample",
    "fit_lengths",
    "resolve_add_bos",
    "tokenize_prompt",
    "tokenize_record",
    "tokenize_records",
]

OverlongPolicy = Literal["truncate", "drop"]
DropKind = Literal["overlong", "empty_prompt", "empty_response"]


@dataclass(frozen=True, kw_only=True)
class TokenizeConfig:
    """How records become token ids.

    Attributes:
        max_length: Maximum tokens of one sequence (prompt + response, BOS and EOS included).
        overlong: ``truncate`` (prompt from the left, then response from the right) or ``drop``.
        max_prompt_length: If set, prompts are first cut (from the left) to this many tokens
            (with ``overlong="drop"``, longer prompts drop the example).
        min_prompt_length: Truncation never cuts a prompt below this many tokens (BOS included).
        add_bos: Put the tokenizer's BOS in front of every prompt (True), never (False), or
            as the model was trained (None: the tokenizer's ``adds_bos``). A chat template that
            writes the BOS itself never gets a second one.
        add_eos: End every response with the tokenizer's EOS.
        train_on_all_assistant_turns: For multi-turn SFT chat records, also train on the
            assistant turns inside the prompt (NeMo chat SFT behaviour); by default only the last
            assistant turn is trained.
    """

    max_length: int = 2048
    overlong: OverlongPolicy = "truncate"
    max_prompt_length: int | None = None
    min_prompt_length: int = 1
    add_bos: bool | None = None
    add_eos: bool = True
    train_on_all_assistant_turns: bool = False

    def __post_init__(self) -> None:
        if self.max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {self.max_length}")
        if self.overlong not in ("truncate", "drop"):
            raise ValueError(f"overlong must be 'truncate' or 'drop', got {self.overlong!r}")
        if self.min_prompt_length < 1:
            raise ValueError(f"min_prompt_length must be at least 1, got {self.min_prompt_length}")
        if self.max_prompt_length is not None and self.max_prompt_length < self.min_prompt_length:
            raise ValueError("max_prompt_length must be at least min_prompt_length")


@dataclass(frozen=True)
class PreferenceExample:
    """A tokenized preference pair (int32 id arrays).

    Attributes:
        prompt_ids: Prompt tokens (BOS first when added).
        chosen_ids: Chosen response tokens (EOS last unless truncated).
        rejected_ids: Rejected response tokens.
        chosen_reward: Ground-truth reward of the chosen response, or None.
        rejected_reward: Ground-truth reward of the rejected response, or None.
        index: Position in its dataset (-1 when not from a dataset).
    """

    prompt_ids: np.ndarray
    chosen_ids: np.ndarray
    rejected_ids: np.ndarray
    chosen_reward: float | None = None
    rejected_reward: float | None = None
    index: int = -1


@dataclass(frozen=True)
class UnpairedExample:
    """A tokenized labelled completion (KTO).

    Attributes:
        prompt_ids: Prompt tokens.
        completion_ids: Completion tokens.
        desirable: Whether the completion is desirable.
        index: Position in its dataset (-1 when not from a dataset).
    """

    prompt_ids: np.ndarray
    completion_ids: np.ndarray
    desirable: bool
    index: int = -1


@dataclass(frozen=True)
class SFTExample:
    """A tokenized prompt and completion (SFT, SPIN, distillation).

    Attributes:
        prompt_ids: Prompt tokens.
        completion_ids: Completion tokens.
        prompt_loss_mask: uint8 array over the prompt, 1 on tokens that are trained too (earlier
            assistant turns with ``train_on_all_assistant_turns``), or None (prompt not trained).
        index: Position in its dataset (-1 when not from a dataset).
    """

    prompt_ids: np.ndarray
    completion_ids: np.ndarray
    prompt_loss_mask: np.ndarray | None = None
    index: int = -1


Example = PreferenceExample | UnpairedExample | SFTExample


@dataclass(frozen=True)
class FitResult:
    """Outcome of the over-long policy for one example.

    Attributes:
        prompt_length: Tokens of the prompt to keep (its last ones, after the BOS).
        response_lengths: Tokens of each response to keep (its first ones).
        prompt_truncated: Whether the prompt was shortened.
        response_truncated: Whether any response was shortened.
        drop_kind: ``overlong`` (dropped by ``overlong="drop"``), ``empty_prompt`` (the prompt
            would keep nothing but its BOS), ``empty_response`` (a response would lose every
            token) or None when the example is kept.
        drop_reason: Why the example is dropped, in words, or None.
    """

    prompt_length: int
    response_lengths: tuple[int, ...]
    prompt_truncated: bool
    response_truncated: bool
    drop_kind: DropKind | None = None
    drop_reason: str | None = None


def fit_lengths(
    prompt_length: int,
    response_lengths: Sequence[int],
    config: TokenizeConfig,
    *,
    prompt_bos: bool = False,
) -> FitResult:
    """Applies the over-long policy to token counts (the pure core of truncation).

    Every sequence is prompt + one response and must fit in ``config.max_length``.

    Args:
        prompt_length: Prompt tokens.
        response_lengths: Tokens of each response sharing the prompt.
        config: The policy.
        prompt_bos: The prompt starts with a BOS that truncation keeps; a prompt truncated to
            that BOS alone drops the example (``empty_prompt``).

    Returns:
        The lengths to keep, or a drop reason.
    """
    longest = max(response_lengths)
    limit = config.max_length
    total = prompt_length + longest
    cap = config.max_prompt_length
    if config.overlong == "drop":
        reason = None
        if total > limit:
            reason = f"over-long: {total} tokens > max_length {limit}"
        elif cap is not None and prompt_length > cap:
            reason = f"over-long prompt: {prompt_length} tokens > max_prompt_length {cap}"
        kind: DropKind | None = "overlong" if reason else None
        return FitResult(prompt_length, tuple(response_lengths), False, False, kind, reason)
    keep_prompt = prompt_length
    if cap is not None and keep_prompt > cap:
        keep_prompt = cap
    if keep_prompt + longest > limit:
        floor = min(keep_prompt, config.min_prompt_length)
        keep_prompt = max(floor, limit - longest)
    if keep_prompt < prompt_length and keep_prompt <= int(prompt_bos):
        reason = (
            f"prompt truncated to the BOS alone: the longest response has {longest} tokens, "
            f"max_length is {limit}"
        )
        return FitResult(keep_prompt, tuple(response_lengths), False, False, "empty_prompt", reason)
    room = limit - keep_prompt
    kept = tuple(min(r, room) for r in response_lengths)
    if min(kept) <= 0:
        reason = (
            f"response fully truncated: the prompt keeps {keep_prompt} of max_length {limit} "
            f"tokens (min_prompt_length {config.min_prompt_length})"
        )
        return FitResult(keep_prompt, kept, False, False, "empty_response", reason)
    return FitResult(
        keep_prompt, kept, keep_prompt < prompt_length, kept != tuple(response_lengths)
    )


@dataclass(frozen=True)
class Tokenized:
    """One record's tokenization outcome.

    Attributes:
        example: The example, or None when dropped.
        source: The record's origin.
        prompt_truncated: Whether the prompt was truncated.
        response_truncated: Whether a response was truncated.
        drop_kind: ``overlong``, ``empty_prompt`` or ``empty_response`` when dropped, else None.
        drop_reason: Why it was dropped, in words, or None.
    """

    example: Example | None
    source: Source
    prompt_truncated: bool = False
    response_truncated: bool = False
    drop_kind: DropKind | None = None
    drop_reason: str | None = None


@dataclass
class TokenizeStats:
    """Counts over many records (every truncation and drop is counted).

    Attributes:
        records: Records tokenized.
        examples: Examples kept.
        truncated: Kept examples with any truncation.
        prompt_truncated: Kept examples whose prompt was truncated.
        response_truncated: Kept examples with a truncated response.
        dropped_overlong: Examples dropped by ``overlong="drop"``.
        dropped_empty_prompt: Examples dropped because the prompt would keep only its BOS.
        dropped_empty_response: Examples dropped because a response lost every token.
    """

    records: int = 0
    examples: int = 0
    truncated: int = 0
    prompt_truncated: int = 0
    response_truncated: int = 0
    dropped_overlong: int = 0
    dropped_empty_prompt: int = 0
    dropped_empty_response: int = 0

    def add(self, item: Tokenized) -> None:
        """Counts one outcome."""
        self.records += 1
        if item.example is None:
            if item.drop_kind == "empty_response":
                self.dropped_empty_response += 1
            elif item.drop_kind == "empty_prompt":
                self.dropped_empty_prompt += 1
            else:
                self.dropped_overlong += 1
            return
        self.examples += 1
        self.truncated += int(item.prompt_truncated or item.response_truncated)
        self.prompt_truncated += int(item.prompt_truncated)
        self.response_truncated += int(item.response_truncated)

    def merge(self, other: TokenizeStats) -> None:
        """Adds another set of counts to this one."""
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


def resolve_add_bos(add_bos: bool | None, tokenizer: Tokenizer) -> bool:
    """Whether prompts get the tokenizer's BOS: ``add_bos``, or when None the tokenizer's rule.

    Args:
        add_bos: The setting (``TokenizeConfig.add_bos``, ``align generate``'s ``add_bos``);
            None follows ``tokenizer.adds_bos``.
        tokenizer: The tokenizer.

    Returns:
        False whenever the tokenizer has no BOS.
    """
    if tokenizer.bos_id is None:
        return False
    return tokenizer.adds_bos if add_bos is None else add_bos


class _Encoder:
    """Renders and encodes the texts of one record."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        template: ChatTemplate | None,
        *,
        add_bos: bool | None,
        add_eos: bool,
    ) -> None:
        self.tok = tokenizer
        self.add_eos = add_eos
        self.template = template if template is not None else tokenizer.chat_template
        self.bos = tokenizer.bos_id if resolve_add_bos(add_bos, tokenizer) else None
        self.eos = tokenizer.eos_id

    def _template(self, source: Source, field: str) -> ChatTemplate:
        if self.template is None:
            raise DataError(
                source.path,
                source.line,
                field,
                "chat messages need a chat template: use a tokenizer that has one or pass "
                "chat_template=",
            )
        return self.template

    def _with_bos(
        self, ids: list[int], mask: list[int], rendered: str = ""
    ) -> tuple[list[int], list[int]]:
        """Puts the BOS in front unless ``ids`` or the chat-``rendered`` text start with it."""
        if self.bos is None or (ids and ids[0] == self.bos):
            return ids, mask
        template = self.template
        bos_text = template.bos_token if isinstance(template, JinjaChatTemplate) else ""
        if rendered and bos_text and rendered.startswith(bos_text):
            return ids, mask
        return [self.bos, *ids], [0, *mask]

    def _with_eos(self, ids: list[int], chat: bool) -> list[int]:
        if not self.add_eos:
            return ids
        if (chat and self.eos in ids) or (ids and ids[-1] == self.eos):
            return ids
        return [*ids, self.eos]

    def encode(
        self, prompt: Text, responses: Sequence[Text], source: Source, train_prompt: bool
    ) -> tuple[list[int], list[int], list[list[int]]]:
        """Returns ``(prompt_ids, prompt_loss_mask, [response_ids, ...])``."""
        if isinstance(prompt, str):
            ids = self.tok.encode(prompt)
            prompt_ids, mask = self._with_bos(ids, [0] * len(ids))
            outs = [self._with_eos(self.tok.encode(str(r)), chat=False) for r in responses]
            return prompt_ids, mask, outs
        template = self._template(source, "prompt")
        try:
            texts = []
            for response in responses:
                turns: tuple[Message, ...] = (
                    (Message("assistant", response),) if isinstance(response, str) else response
                )
                prompt_text, response_text = split_prompt_response(template, prompt, turns)
                texts.append(response_text)
            prompt_ids: list[int] = []
            mask: list[int] = []
            if train_prompt:
                for text, trained in conversation_segments(template, prompt):
                    piece = self.tok.encode(text)
                    prompt_ids += piece
                    mask += [int(trained)] * len(piece)
        except ChatTemplateError as exc:
            raise DataError(source.path, source.line, "prompt", str(exc)) from None
        if not train_prompt:
            prompt_ids = self.tok.encode(prompt_text)
            mask = [0] * len(prompt_ids)
        prompt_ids, mask = self._with_bos(prompt_ids, mask, prompt_text)
        outs = []
        for text in texts:
            if not text:
                raise DataError(
                    source.path, source.line, RECORD_FIELD, "the chat template renders no response"
                )
            outs.append(self._with_eos(self.tok.encode(text), chat=True))
        return prompt_ids, mask, outs

    def encode_prompt(self, prompt: Text, source: Source, chat_template: bool | None) -> list[int]:
        """Token ids of a prompt to generate from (see :func:`tokenize_prompt`)."""
        use_template = chat_template if chat_template is not None else self.template is not None
        if isinstance(prompt, str) and not use_template:
            ids = self.tok.encode(prompt)
            return self._with_bos(ids, [0] * len(ids))[0]
        if self.template is None:
            what = "chat_template=true needs" if isinstance(prompt, str) else "chat messages need"
            raise DataError(
                source.path,
                source.line,
                "prompt",
                f"{what} a chat template; the tokenizer has none",
            )
        messages = (Message("user", prompt),) if isinstance(prompt, str) else prompt
        try:
            text = self.template.render(messages, add_generation_prompt=True)
        except ChatTemplateError as exc:
            raise DataError(source.path, source.line, "prompt", str(exc)) from None
        ids = self.tok.encode(text)
        return self._with_bos(ids, [0] * len(ids), text)[0]


def _array(ids: Sequence[int]) -> np.ndarray:
    return np.asarray(ids, dtype=np.int32)


def _cut_prompt(ids: list[int], keep: int, has_bos: bool) -> list[int]:
    """Keeps ``keep`` tokens: the BOS (if any) and the last ones (truncation from the left)."""
    if keep >= len(ids):
        return ids
    if has_bos:
        return [ids[0], *ids[len(ids) - keep + 1 :]]
    return ids[len(ids) - keep :]


def tokenize_record(
    record: Record,
    tokenizer: Tokenizer,
    config: TokenizeConfig,
    *,
    chat_template: ChatTemplate | None = None,
) -> Tokenized:
    """Tokenizes one record into an example, applying the over-long policy.

    Args:
        record: A preference, unpaired or SFT record.
        tokenizer: The tokenizer.
        config: Lengths, BOS/EOS and the over-long policy.
        chat_template: Template for chat records; defaults to the tokenizer's.

    Returns:
        The example with its truncation flags, or a drop reason.

    Raises:
        DataError: When chat records have no template, the template cannot be split, or a text
            cannot be encoded (a lone surrogate).
    """
    enc = _Encoder(tokenizer, chat_template, add_bos=config.add_bos, add_eos=config.add_eos)
    train_prompt = isinstance(record, SFTRecord) and config.train_on_all_assistant_turns
    if isinstance(record, PreferenceRecord):
        responses: list[Text] = [record.chosen, record.rejected]
    elif isinstance(record, UnpairedRecord):
        responses = [record.completion]
    else:
        responses = [record.completion]
    train_prompt = train_prompt and not isinstance(record.prompt, str)
    try:
        prompt_ids, mask, outs = enc.encode(record.prompt, responses, record.source, train_prompt)
    except UnicodeEncodeError as exc:
        source = record.source
        message = f"cannot be encoded: {exc.reason} (character {exc.start + 1} of a text)"
        raise DataError(source.path, source.line, RECORD_FIELD, message) from None
    # A BOS in front stays in front when the prompt is truncated, whoever wrote it.
    bos = tokenizer.bos_id
    has_bos = bos is not None and bool(prompt_ids) and prompt_ids[0] == bos
    fit = fit_lengths(len(prompt_ids), [len(o) for o in outs], config, prompt_bos=has_bos)
    if fit.drop_kind is not None:
        return Tokenized(None, record.source, drop_kind=fit.drop_kind, drop_reason=fit.drop_reason)
    keep = fit.prompt_length
    prompt_ids = _cut_prompt(prompt_ids, keep, has_bos)
    mask = _cut_prompt(mask, keep, has_bos)
    outs = [o[:n] for o, n in zip(outs, fit.response_lengths, strict=True)]
    example: Example
    if isinstance(record, PreferenceRecord):
        example = PreferenceExample(
            _array(prompt_ids),
            _array(outs[0]),
            _array(outs[1]),
            record.chosen_reward,
            record.rejected_reward,
        )
    elif isinstance(record, UnpairedRecord):
        example = UnpairedExample(_array(prompt_ids), _array(outs[0]), record.desirable)
    else:
        prompt_mask = np.asarray(mask, dtype=np.uint8) if any(mask) else None
        example = SFTExample(_array(prompt_ids), _array(outs[0]), prompt_mask)
    return Tokenized(example, record.source, fit.prompt_truncated, fit.response_truncated)


def tokenize_prompt(
    prompt: Text,
    tokenizer: Tokenizer,
    *,
    chat_template: bool | None = None,
    add_bos: bool | None = None,
    template: ChatTemplate | None = None,
    source: Source | None = None,
) -> list[int]:
    """Token ids of a prompt to generate from, ending where the model's answer begins.

    Chat ``messages`` are rendered through the chat template with the generation prompt. A
    plain string prompt is rendered the same way, as one user turn, when ``chat_template`` is
    True, or None and there is a template (an instruct model answers the prompts it was tuned
    on); with ``chat_template`` False it is tokenized as it is. The BOS follows the rule of
    :func:`tokenize_record`: added when ``add_bos`` (None: the tokenizer's ``adds_bos``) says
    so, and never twice.

    Args:
        prompt: Plain text or chat messages.
        tokenizer: The tokenizer.
        chat_template: Render plain text through the chat template (None: when there is one).
        add_bos: Put the BOS in front (None: as the model was trained, ``tokenizer.adds_bos``).
        template: The chat template; default the tokenizer's.
        source: Where the prompt came from, for errors.

    Returns:
        The prompt's token ids.

    Raises:
        DataError: When the prompt needs a chat template and there is none, or the template
            rejects the messages.
    """
    enc = _Encoder(tokenizer, template, add_bos=add_bos, add_eos=False)
    return enc.encode_prompt(prompt, source or Source("<prompt>", 1), chat_template)


@dataclass
class TokenizeResult:
    """Examples from many records.

    Attributes:
        examples: The kept examples, in record order.
        stats: Truncation and drop counts.
        dropped: ``(source, reason)`` of every dropped record.
    """

    examples: list[Example] = field(default_factory=list)
    stats: TokenizeStats = field(default_factory=TokenizeStats)
    dropped: list[tuple[Source, str]] = field(default_factory=list)


def tokenize_records(
    records: Iterable[Record],
    tokenizer: Tokenizer,
    config: TokenizeConfig,
    *,
    chat_template: ChatTemplate | None = None,
) -> TokenizeResult:
    """Tokenizes records in memory (see :func:`align_data.preprocess` for cached shards).

    Returns:
        The kept examples (``index`` numbered from 0 in order), the counts and the drops.
    """
    result = TokenizeResult()
    for record in records:
        item = tokenize_record(record, tokenizer, config, chat_template=chat_template)
        result.stats.add(item)
        if item.example is None:
            result.dropped.append((item.source, item.drop_reason or ""))
            continue
        result.examples.append(replace(item.example, index=len(result.examples)))
    return result

"""Validated records: what every file format is parsed into before tokenization.

A prompt or a response is either plain text (already formatted, NeMo-Aligner style) or a tuple of
chat :class:`Message` objects that a chat template renders. Records remember where they came from
so that later errors (for example a chat template that cannot be split at the prompt boundary)
still name file and line.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = [
    "Kind",
    "Message",
    "PreferenceRecord",
    "Record",
    "Role",
    "SFTRecord",
    "Source",
    "Text",
    "UnpairedRecord",
]

Kind = Literal["preference", "unpaired", "sft"]
"""What a training algorithm consumes: preference pairs (DPO/IPO/RPO), unpaired labelled
completions (KTO), or prompt/completion examples (SFT, SPIN, distillation)."""

Role = Literal["system", "user", "assistant"]


@dataclass(frozen=True)
class Message:
    """One chat turn.

    Attributes:
        role: ``system``, ``user`` or ``assistant``.
        content: The turn's text.
    """

    role: Role
    content: str


Text = str | tuple[Message, ...]
"""Plain text, or a conversation rendered by a chat template."""


@dataclass(frozen=True)
class Source:
    """Where a record came from.

    Attributes:
        path: Source file.
        line: 1-based line (JSONL) or row (Parquet).
    """

    path: str
    line: int


@dataclass(frozen=True)
class PreferenceRecord:
    """A preference pair.

    Attributes:
        prompt: The shared prompt.
        chosen: The preferred response (text, or assistant message(s)).
        rejected: The dispreferred response.
        chosen_reward: Ground-truth reward of ``chosen`` (reward-aware RPO), or None.
        rejected_reward: Ground-truth reward of ``rejected``, or None.
        source: Origin of the record.
    """

    prompt: Text
    chosen: Text
    rejected: Text
    chosen_reward: float | None
    rejected_reward: float | None
    source: Source


@dataclass(frozen=True)
class UnpairedRecord:
    """A single labelled completion (KTO).

    Attributes:
        prompt: The prompt.
        completion: The response.
        desirable: True for a desirable (chosen) completion, False for an undesirable one.
        source: Origin of the record.
    """

    prompt: Text
    completion: Text
    desirable: bool
    source: Source


@dataclass(frozen=True)
class SFTRecord:
    """A prompt and its reference completion (SFT, SPIN, distillation).

    For chat data, ``prompt`` holds every turn before the last assistant turn (earlier assistant
    turns included) and ``completion`` the last assistant turn.

    Attributes:
        prompt: The prompt (for SPIN: what the policy generates from).
        completion: The reference response.
        source: Origin of the record.
    """

    prompt: Text
    completion: Text
    source: Source


Record = PreferenceRecord | UnpairedRecord | SFTRecord

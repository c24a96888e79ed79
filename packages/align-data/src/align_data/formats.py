"""Record formats: detection from a record's keys, strict parsing into typed records.

Supported formats (one record per JSONL line or Parquet row):

=====================  =====================================================  ===========
format                 keys                                                   provides
=====================  =====================================================  ===========
``preference``         ``prompt``, ``chosen``, ``rejected`` (strings or chat   preference
                       messages; ``prompt`` may be omitted when ``chosen`` and
                       ``rejected`` are whole conversations), optional
                       ``chosen_reward``, ``rejected_reward``
``nemo_preference``    ``prompt``, ``chosen_response``, ``rejected_response``  preference
                       (+ the optional rewards), NeMo-Aligner DPO
``unpaired``           ``prompt``, ``completion``, ``label`` (bool)            unpaired
``nemo_kto``           ``prompt``, ``response``, ``preference``                unpaired
                       (``"chosen"`` / ``"rejected"``), NeMo-Aligner KTO
``prompt_completion``  ``prompt``, ``completion``                              sft
``messages``           ``messages`` (a conversation ending with an assistant   sft
                       turn)
``nemo_input_output``  ``input``, ``output`` (NeMo SFT)                        sft
``nemo_conversations`` ``conversations`` (``from``/``value``), ``system``      sft
                       (NeMo SFT chat)
=====================  =====================================================  ===========

Preference files can also feed the other kinds: ``unpaired`` splits each pair into a desirable
and an undesirable completion, ``sft`` keeps the prompt and the chosen response.
Unknown extra keys are ignored.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any, Literal, NoReturn, get_args

from align_data.errors import RECORD_FIELD, DataError
from align_data.records import (
    Kind,
    Message,
    PreferenceRecord,
    Record,
    Role,
    SFTRecord,
    Source,
    Text,
    UnpairedRecord,
)

__all__ = [
    "FORMAT_KIND",
    "FormatName",
    "check_format_kind",
    "convert_to_kind",
    "detect_format",
    "json_type_name",
    "lone_surrogate",
    "parse_record",
]

FormatName = Literal[
    "preference",
    "nemo_preference",
    "unpaired",
    "nemo_kto",
    "prompt_completion",
    "messages",
    "nemo_input_output",
    "nemo_conversations",
]

FORMAT_KIND: dict[FormatName, Kind] = {
    "preference": "preference",
    "nemo_preference": "preference",
    "unpaired": "unpaired",
    "nemo_kto": "unpaired",
    "prompt_completion": "sft",
    "messages": "sft",
    "nemo_input_output": "sft",
    "nemo_conversations": "sft",
}
"""Which kind of record each format provides."""

_CONVERTIBLE: set[tuple[Kind, Kind]] = {("preference", "unpaired"), ("preference", "sft")}
_ROLES: tuple[Role, ...] = ("system", "user", "assistant")
_SPEAKERS: dict[str, Role] = {
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "system": "system",
}


def json_type_name(value: object) -> str:
    """Names a decoded JSON value's type in JSON terms (string, number, list, object, ...)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list | tuple):
        return "list"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


_SURROGATE = re.compile("[\ud800-\udfff]")


def _show(value: object) -> str:
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError, RecursionError):
        text = f"a {json_type_name(value)}"
    return text if len(text) <= 60 else text[:57] + "..."


def lone_surrogate(text: str) -> str | None:
    r"""Why ``text`` is not valid Unicode (a lone surrogate and where), or None when it is.

    JSON's ``\uXXXX`` escapes can spell half of a surrogate pair, which Python's JSON
    decoder accepts but no tokenizer can encode.
    """
    found = _SURROGATE.search(text)
    if found is None:
        return None
    return (
        f"not valid Unicode: lone surrogate \\u{ord(found.group()):04x} at character "
        f"{found.start() + 1} (a \\uD800-\\uDFFF escape without its pair)"
    )


class _Ctx:
    """Error context of one record."""

    def __init__(self, source: Source) -> None:
        self.source = source

    def fail(self, field: str, message: str) -> NoReturn:
        raise DataError(self.source.path, self.source.line, field, message)

    def require(self, obj: Mapping[str, Any], key: str) -> Any:
        if key not in obj:
            keys = ", ".join(sorted(obj)) or "none"
            self.fail(key, f"missing key (record has keys: {keys})")
        return obj[key]

    def string(self, value: Any, field: str) -> str:
        if not isinstance(value, str):
            self.fail(field, f"expected a string, got {json_type_name(value)}")
        if not value.strip():
            self.fail(field, "empty text")
        return self.unicode(value, field)

    def unicode(self, value: str, field: str) -> str:
        """``value`` unchanged, or a failure when it holds a lone surrogate."""
        problem = lone_surrogate(value)
        if problem is not None:
            self.fail(field, problem)
        return value


def detect_format(obj: Mapping[str, Any], source: Source) -> FormatName:
    """Detects a record's format from its keys.

    Args:
        obj: The parsed JSON object (or Parquet row).
        source: Its location, for the error message.

    Returns:
        The format name.

    Raises:
        DataError: When no known format matches.
    """
    keys = set(obj)
    if {"chosen_response", "rejected_response"} & keys:
        return "nemo_preference"
    if {"chosen", "rejected"} <= keys:
        return "preference"
    if {"completion", "label"} <= keys:
        return "unpaired"
    if {"response", "preference"} <= keys:
        return "nemo_kto"
    if "messages" in keys:
        return "messages"
    if "conversations" in keys:
        return "nemo_conversations"
    if {"input", "output"} <= keys:
        return "nemo_input_output"
    if {"prompt", "completion"} <= keys:
        return "prompt_completion"
    ctx = _Ctx(source)
    if "topk_logits" in keys:
        ctx.fail(
            RECORD_FIELD,
            "this is NeMo-Aligner compute_topk_logits output (teacher logits), not a dataset; "
            "convert it with align_data.import_nemo_topk_jsonl",
        )
    names = ", ".join(get_args(FormatName))
    shown = ", ".join(sorted(keys)) or "none"
    ctx.fail(
        RECORD_FIELD,
        f"cannot detect the format from the keys ({shown}); known formats: {names} "
        "(see the align-data README), or pass format= explicitly",
    )


def check_format_kind(fmt: FormatName, kind: Kind, source: Source) -> None:
    """Checks that a file of format ``fmt`` can feed records of ``kind``.

    Raises:
        DataError: When the format provides another kind that cannot be converted.
    """
    provided = FORMAT_KIND[fmt]
    if provided == kind or (provided, kind) in _CONVERTIBLE:
        return
    wanted = [f for f, k in FORMAT_KIND.items() if k == kind or (k, kind) in _CONVERTIBLE]
    _Ctx(source).fail(
        RECORD_FIELD,
        f"format {fmt!r} provides {provided} records but {kind} records are needed; "
        f"formats that provide them: {', '.join(wanted)}",
    )


def convert_to_kind(record: Record, kind: Kind) -> list[Record]:
    """Converts a parsed record to the records of ``kind`` it stands for.

    A preference pair becomes two unpaired records (chosen desirable, rejected undesirable) or
    one SFT record (the chosen response); other records are returned unchanged.

    Raises:
        ValueError: For a conversion that :func:`check_format_kind` would have rejected.
    """
    if isinstance(record, PreferenceRecord):
        if kind == "preference":
            return [record]
        if kind == "unpaired":
            return [
                UnpairedRecord(record.prompt, record.chosen, True, record.source),
                UnpairedRecord(record.prompt, record.rejected, False, record.source),
            ]
        return [SFTRecord(record.prompt, record.chosen, record.source)]
    if isinstance(record, UnpairedRecord) and kind == "unpaired":
        return [record]
    if isinstance(record, SFTRecord) and kind == "sft":
        return [record]
    raise ValueError(f"cannot convert {type(record).__name__} to {kind} records")


def _conversation(
    ctx: _Ctx,
    value: Any,
    field: str,
    *,
    previous: Role | None,
    end: Role,
    role_key: str = "role",
    content_key: str = "content",
    speakers: Mapping[str, Role] | None = None,
) -> tuple[Message, ...]:
    """Validates a list of chat turns: optional leading system turn, then alternating turns."""
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        ctx.fail(field, f"expected a list of messages, got {json_type_name(value)}")
    if not value:
        ctx.fail(field, "empty list of messages")
    messages: list[Message] = []
    last = previous
    for i, turn in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(turn, dict):
            ctx.fail(where, f"expected an object with {role_key!r} and {content_key!r}")
        raw_role = turn.get(role_key)
        if raw_role is None:
            ctx.fail(f"{where}.{role_key}", "missing key")
        if not isinstance(raw_role, str):
            ctx.fail(f"{where}.{role_key}", f"expected a string, got {json_type_name(raw_role)}")
        if speakers is None:
            if raw_role not in _ROLES:
                ctx.fail(
                    f"{where}.{role_key}",
                    f"unknown role {_show(raw_role)} (expected system, user or assistant)",
                )
            role: Role = raw_role  # type: ignore[assignment]
        else:
            mapped = speakers.get(raw_role.lower())
            if mapped is None:
                ctx.fail(
                    f"{where}.{role_key}",
                    f"unknown speaker {_show(raw_role)} (expected User or Assistant)",
                )
            role = mapped
        content = turn.get(content_key)
        if content is None:
            ctx.fail(f"{where}.{content_key}", "missing key")
        if not isinstance(content, str):
            ctx.fail(f"{where}.{content_key}", f"expected a string, got {json_type_name(content)}")
        ctx.unicode(content, f"{where}.{content_key}")
        if role == "system":
            if i != 0 or previous is not None:
                ctx.fail(f"{where}.{role_key}", "a system turn may only come first")
            if content.strip():
                messages.append(Message("system", content))
            continue
        expected: Role = "assistant" if last == "user" else "user"
        if role != expected:
            after = f" after {_show(last)}" if last not in (None, "system") else " first"
            ctx.fail(
                f"{where}.{role_key}",
                f"wrong role order: expected {_show(expected)}{after}, got {_show(raw_role)}",
            )
        if not content.strip():
            ctx.fail(f"{where}.{content_key}", "empty text")
        messages.append(Message(role, content))
        last = role
    if last != end:
        ctx.fail(field, f"must end with a {_show(end)} turn, ends with {_show(last)}")
    return tuple(messages)


def _prompt(ctx: _Ctx, obj: Mapping[str, Any], key: str) -> Text:
    value = ctx.require(obj, key)
    if isinstance(value, list):
        return _conversation(ctx, value, key, previous=None, end="user")
    if not isinstance(value, str):
        ctx.fail(key, f"expected a string or a list of messages, got {json_type_name(value)}")
    return ctx.string(value, key)


def _response(ctx: _Ctx, obj: Mapping[str, Any], key: str, prompt: Text) -> Text:
    value = ctx.require(obj, key)
    if isinstance(prompt, str):
        if not isinstance(value, str):
            ctx.fail(
                key, f"expected a string (the prompt is a string), got {json_type_name(value)}"
            )
        return ctx.string(value, key)
    if isinstance(value, str):
        return (Message("assistant", ctx.string(value, key)),)
    return _conversation(ctx, value, key, previous="user", end="assistant")


def _reward(ctx: _Ctx, obj: Mapping[str, Any], key: str) -> float | None:
    value = obj.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        ctx.fail(key, f"expected a number, got {json_type_name(value)}")
    if not math.isfinite(value):
        ctx.fail(key, f"must be a finite number, got {value}")
    return float(value)


def _rewards(ctx: _Ctx, obj: Mapping[str, Any]) -> tuple[float | None, float | None]:
    chosen = _reward(ctx, obj, "chosen_reward")
    rejected = _reward(ctx, obj, "rejected_reward")
    if (chosen is None) != (rejected is None):
        missing = "rejected_reward" if rejected is None else "chosen_reward"
        other = "chosen_reward" if rejected is None else "rejected_reward"
        ctx.fail(missing, f"missing key ({other} is given; give both rewards or neither)")
    return chosen, rejected


def _implicit_prompt(ctx: _Ctx, obj: Mapping[str, Any]) -> tuple[Text, Text, Text]:
    """Splits whole ``chosen``/``rejected`` conversations at their shared prompt (TRL style)."""
    chosen = _conversation(ctx, obj["chosen"], "chosen", previous=None, end="assistant")
    rejected = _conversation(ctx, obj["rejected"], "rejected", previous=None, end="assistant")
    shared = 0
    limit = min(len(chosen), len(rejected))
    while shared < limit and chosen[shared] == rejected[shared]:
        shared += 1
    while shared > 0 and chosen[shared - 1].role != "user":
        shared -= 1
    if shared == 0:
        ctx.fail("prompt", "missing key, and chosen/rejected share no prompt turns to infer it")
    return chosen[:shared], chosen[shared:], rejected[shared:]


def _parse_preference(ctx: _Ctx, obj: Mapping[str, Any], nemo: bool) -> PreferenceRecord:
    chosen_key, rejected_key = (
        ("chosen_response", "rejected_response") if nemo else ("chosen", "rejected")
    )
    if not nemo and "prompt" not in obj and isinstance(obj.get("chosen"), list):
        prompt, chosen, rejected = _implicit_prompt(ctx, obj)
    else:
        prompt = _prompt(ctx, obj, "prompt")
        chosen = _response(ctx, obj, chosen_key, prompt)
        rejected = _response(ctx, obj, rejected_key, prompt)
    chosen_reward, rejected_reward = _rewards(ctx, obj)
    return PreferenceRecord(prompt, chosen, rejected, chosen_reward, rejected_reward, ctx.source)


def _parse_unpaired(ctx: _Ctx, obj: Mapping[str, Any], nemo: bool) -> UnpairedRecord:
    prompt = _prompt(ctx, obj, "prompt")
    if nemo:
        completion = _response(ctx, obj, "response", prompt)
        value = ctx.require(obj, "preference")
        if value not in ("chosen", "rejected"):
            ctx.fail("preference", f'expected "chosen" or "rejected", got {_show(value)}')
        desirable = value == "chosen"
    else:
        completion = _response(ctx, obj, "completion", prompt)
        value = ctx.require(obj, "label")
        if not isinstance(value, bool):
            ctx.fail("label", f"expected true or false, got {_show(value)}")
        desirable = value
    return UnpairedRecord(prompt, completion, desirable, ctx.source)


def _parse_messages(ctx: _Ctx, obj: Mapping[str, Any]) -> SFTRecord:
    turns = _conversation(
        ctx, ctx.require(obj, "messages"), "messages", previous=None, end="assistant"
    )
    return SFTRecord(turns[:-1], turns[-1:], ctx.source)


def _parse_conversations(ctx: _Ctx, obj: Mapping[str, Any]) -> SFTRecord:
    system = obj.get("system", "")
    if system is None:
        system = ""
    if not isinstance(system, str):
        ctx.fail("system", f"expected a string, got {json_type_name(system)}")
    ctx.unicode(system, "system")
    turns = _conversation(
        ctx,
        ctx.require(obj, "conversations"),
        "conversations",
        previous=None,
        end="assistant",
        role_key="from",
        content_key="value",
        speakers=_SPEAKERS,
    )
    if system.strip():
        if turns[0].role == "system":
            ctx.fail("system", "given both as the system key and as a system turn")
        turns = (Message("system", system), *turns)
    return SFTRecord(turns[:-1], turns[-1:], ctx.source)


def parse_record(obj: Any, fmt: FormatName, source: Source) -> Record:
    """Parses and validates one record of a known format.

    Args:
        obj: The decoded JSON value or Parquet row.
        fmt: Its format (see the module docstring).
        source: Its location, used in errors and kept on the record.

    Returns:
        A :class:`PreferenceRecord`, :class:`UnpairedRecord` or :class:`SFTRecord`.

    Raises:
        DataError: Naming file, line and field of the first problem found.
    """
    ctx = _Ctx(source)
    if not isinstance(obj, dict):
        ctx.fail(RECORD_FIELD, f"expected a JSON object, got {json_type_name(obj)}")
    if fmt in ("preference", "nemo_preference"):
        return _parse_preference(ctx, obj, nemo=fmt == "nemo_preference")
    if fmt in ("unpaired", "nemo_kto"):
        return _parse_unpaired(ctx, obj, nemo=fmt == "nemo_kto")
    if fmt == "messages":
        return _parse_messages(ctx, obj)
    if fmt == "nemo_conversations":
        return _parse_conversations(ctx, obj)
    if fmt == "nemo_input_output":
        prompt = ctx.string(ctx.require(obj, "input"), "input")
        return SFTRecord(prompt, ctx.string(ctx.require(obj, "output"), "output"), source)
    if fmt == "prompt_completion":
        prompt = _prompt(ctx, obj, "prompt")
        return SFTRecord(prompt, _response(ctx, obj, "completion", prompt), source)
    raise ValueError(f"unknown format {fmt!r}; known: {', '.join(get_args(FormatName))}")

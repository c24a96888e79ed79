r"""Chat templates: turning a list of messages into text, and splitting it at the prompt boundary.

Three templates are built in:

- :class:`SimpleChatTemplate`: ``User: ...\nAssistant: ...\n``, the byte tokenizer's default.
- :class:`NeMoChatTemplate`: NeMo's extra_id format
  (``<extra_id_0>System\n...\n<extra_id_1>User\n...\n<extra_id_1>Assistant\n...\n``).
- :class:`JinjaChatTemplate`: any Hugging Face ``chat_template`` (from ``tokenizer_config.json``),
  rendered with Jinja in a sandbox (needs the ``chat`` extra).

The prompt/response boundary comes from rendering twice: the prompt with the generation prompt,
and the whole conversation without it. The first must be a prefix of the second; the rest is the
response text. Prompt and response text are then tokenized separately so that the label
boundary is exact.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from align_data._extras import import_extra
from align_data.records import Message

__all__ = [
    "ChatTemplate",
    "ChatTemplateError",
    "JinjaChatTemplate",
    "NeMoChatTemplate",
    "SimpleChatTemplate",
    "conversation_segments",
    "split_prompt_response",
]


class ChatTemplateError(ValueError):
    """A template cannot be split at a turn boundary (its rendering is not prefix-consistent)."""


@runtime_checkable
class ChatTemplate(Protocol):
    """Renders chat messages to text."""

    @property
    def fingerprint(self) -> str:
        """A string that changes whenever the rendering changes (used in cache keys)."""
        ...

    def render(self, messages: Sequence[Message], *, add_generation_prompt: bool) -> str:
        """Renders ``messages`` to text.

        With ``add_generation_prompt`` the text ends where the assistant's next reply begins.
        """
        ...


def _sha(*parts: str) -> str:
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class SimpleChatTemplate:
    r"""A minimal plain-text template: one ``Role: content`` line per turn.

    ``[user "hi"]`` with the generation prompt renders as ``"User: hi\nAssistant: "``; the
    assistant's reply ``"hello"`` then adds ``"hello\n"``.

    Attributes:
        names: Display name per role.
    """

    names: Mapping[str, str] = field(
        default_factory=lambda: {"system": "System", "user": "User", "assistant": "Assistant"}
    )

    @property
    def fingerprint(self) -> str:
        """See :class:`ChatTemplate`."""
        return "simple-" + _sha(json.dumps(dict(self.names), sort_keys=True))

    def render(self, messages: Sequence[Message], *, add_generation_prompt: bool) -> str:
        """See :class:`ChatTemplate`."""
        text = "".join(f"{self.names[m.role]}: {m.content}\n" for m in messages)
        if add_generation_prompt:
            text += f"{self.names['assistant']}: "
        return text


@dataclass(frozen=True)
class NeMoChatTemplate:
    r"""NeMo's extra_id chat format (``model.data.chat_prompt_tokens``).

    Renders ``<extra_id_0>System\n{system}\n`` (always, with an empty system text when there
    is no system turn), then ``<extra_id_1>{Name}\n{content}\n`` per turn; the generation prompt
    is ``<extra_id_1>Assistant\n``.

    Attributes:
        system_turn_start: Token opening the system header.
        turn_start: Token opening each turn.
        end_of_turn: Text closing each turn.
        end_of_name: Text after the speaker name.
        names: Speaker name per role.
    """

    system_turn_start: str = "<extra_id_0>"
    turn_start: str = "<extra_id_1>"
    end_of_turn: str = "\n"
    end_of_name: str = "\n"
    names: Mapping[str, str] = field(
        default_factory=lambda: {"system": "System", "user": "User", "assistant": "Assistant"}
    )

    @property
    def fingerprint(self) -> str:
        """See :class:`ChatTemplate`."""
        parts = (self.system_turn_start, self.turn_start, self.end_of_turn, self.end_of_name)
        return "nemo-" + _sha(*parts, json.dumps(dict(self.names), sort_keys=True))

    def render(self, messages: Sequence[Message], *, add_generation_prompt: bool) -> str:
        """See :class:`ChatTemplate`."""
        system = ""
        turns = list(messages)
        if turns and turns[0].role == "system":
            system = turns.pop(0).content
        text = f"{self.system_turn_start}{self.names['system']}{self.end_of_name}"
        text += f"{system}{self.end_of_turn}"
        for m in turns:
            text += f"{self.turn_start}{self.names[m.role]}{self.end_of_name}"
            text += f"{m.content}{self.end_of_turn}"
        if add_generation_prompt:
            text += f"{self.turn_start}{self.names['assistant']}{self.end_of_name}"
        return text


def _token_text(value: Any) -> str:
    """A special token from tokenizer_config.json: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return str(value.get("content", ""))
    return "" if value is None else str(value)


class JinjaChatTemplate:
    """A Hugging Face chat template rendered with Jinja (sandboxed, as ``transformers`` does).

    The template sees ``messages`` (dicts with ``role`` and ``content``),
    ``add_generation_prompt``, ``bos_token``, ``eos_token``, a ``raise_exception`` function and a
    ``tojson`` filter, plus any ``extra`` variables.

    Args:
        source: The Jinja template text.
        bos_token: Text of the BOS token, as the template expects it.
        eos_token: Text of the EOS token.
        extra: Further template variables (for example ``{"enable_thinking": False}``).

    Raises:
        ImportError: Without jinja2 (``pip install 'align-data[chat]'``).
    """

    def __init__(
        self,
        source: str,
        *,
        bos_token: str = "",
        eos_token: str = "",
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        sandbox = import_extra("jinja2.sandbox", "Jinja chat templates need jinja2", "chat")

        def raise_exception(message: str) -> None:
            raise ChatTemplateError(f"chat template error: {message}")

        env = sandbox.ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.filters["tojson"] = lambda value, indent=None: json.dumps(
            value, ensure_ascii=False, indent=indent
        )
        env.globals["raise_exception"] = raise_exception
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.extra = dict(extra or {})
        self._template = env.from_string(source)

    def __getstate__(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "extra": self.extra,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(  # type: ignore[misc]
            state["source"],
            bos_token=state["bos_token"],
            eos_token=state["eos_token"],
            extra=state["extra"],
        )

    @classmethod
    def from_tokenizer_config(
        cls, path: str | Path, *, name: str = "default", extra: Mapping[str, Any] | None = None
    ) -> JinjaChatTemplate:
        """Loads the ``chat_template`` of a Hugging Face ``tokenizer_config.json``.

        Args:
            path: The ``tokenizer_config.json`` file, or the directory holding it. A
                ``chat_template.jinja`` file next to it is used when the config has no template.
            name: Which template to use when the config holds a list of named templates.
            extra: Further template variables.

        Raises:
            FileNotFoundError: When no chat template is found.
        """
        path = Path(path)
        config_path = path / "tokenizer_config.json" if path.is_dir() else path
        config = json.loads(config_path.read_text(encoding="utf-8"))
        source = config.get("chat_template")
        if isinstance(source, list):
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
            if name not in named:
                raise FileNotFoundError(
                    f"{config_path}: no chat template named {name!r} (has {sorted(named, key=str)})"
                )
            source = named[name]
        if not source:
            jinja_file = config_path.parent / "chat_template.jinja"
            if not jinja_file.exists():
                raise FileNotFoundError(f"{config_path}: no chat_template")
            source = jinja_file.read_text(encoding="utf-8")
        return cls(
            source,
            bos_token=_token_text(config.get("bos_token")),
            eos_token=_token_text(config.get("eos_token")),
            extra=extra,
        )

    @property
    def fingerprint(self) -> str:
        """See :class:`ChatTemplate`."""
        extra = json.dumps(self.extra, sort_keys=True, default=str)
        return "jinja-" + _sha(self.source, self.bos_token, self.eos_token, extra)

    def render(self, messages: Sequence[Message], *, add_generation_prompt: bool) -> str:
        """See :class:`ChatTemplate`."""
        return self._template.render(
            messages=[{"role": m.role, "content": m.content} for m in messages],
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
            **self.extra,
        )


def _suffix(full: str, prefix: str, what: str) -> str:
    if not full.startswith(prefix):
        raise ChatTemplateError(
            f"the chat template is not prefix-consistent: the rendered {what} is not a prefix "
            "of the rendered conversation, so the prompt/response boundary is undefined"
        )
    return full[len(prefix) :]


def split_prompt_response(
    template: ChatTemplate, prompt: Sequence[Message], response: Sequence[Message]
) -> tuple[str, str]:
    """Renders a prompt and its response and splits the text at the boundary.

    Returns:
        ``(prompt_text, response_text)`` with ``prompt_text + response_text`` equal to the
        rendering of the whole conversation.

    Raises:
        ChatTemplateError: When the template's prompt rendering is not a prefix of the whole.
    """
    prompt_text = template.render(prompt, add_generation_prompt=True)
    full = template.render([*prompt, *response], add_generation_prompt=False)
    return prompt_text, _suffix(full, prompt_text, "prompt")


def conversation_segments(
    template: ChatTemplate, prompt: Sequence[Message]
) -> list[tuple[str, bool]]:
    """Splits a multi-turn prompt into segments, marking earlier assistant turns as trainable.

    Used for SFT on every assistant turn. The concatenated segment texts equal
    ``template.render(prompt, add_generation_prompt=True)``.

    Returns:
        ``[(text, is_assistant_turn), ...]``.

    Raises:
        ChatTemplateError: When the template is not prefix-consistent at some turn.
    """
    segments: list[tuple[str, bool]] = []
    done = ""
    for j, message in enumerate(prompt):
        if message.role != "assistant":
            continue
        before = template.render(prompt[:j], add_generation_prompt=True)
        after = template.render(prompt[: j + 1], add_generation_prompt=False)
        segments.append((_suffix(before, done, f"turn {j}"), False))
        segments.append((_suffix(after, before, f"turn {j} prompt"), True))
        done = after
    final = template.render(prompt, add_generation_prompt=True)
    segments.append((_suffix(final, done, "prompt"), False))
    return [(text, trained) for text, trained in segments if text]

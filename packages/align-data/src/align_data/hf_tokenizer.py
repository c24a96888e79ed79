"""Adapter for Hugging Face ``tokenizers`` (a ``tokenizer.json``), an optional extra.

``pip install 'align-data[hf]'`` (and ``[chat]`` for the Jinja chat template).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from align_data._extras import import_extra
from align_data.chat import ChatTemplate, JinjaChatTemplate
from align_data.tokenizer import _LibraryTokenizer

__all__ = ["HFTokenizer"]


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


class HFTokenizer(_LibraryTokenizer):
    """A :class:`align_data.Tokenizer` over a Hugging Face ``tokenizers.Tokenizer``.

    Special tokens come from ``tokenizer_config.json`` (``bos_token``, ``eos_token``,
    ``pad_token``) when it sits next to ``tokenizer.json``, or from the arguments, which win.
    The pad id falls back to the EOS id.

    Whether the model was trained with a BOS in front of plain text (:attr:`adds_bos`) follows
    the tokenizer's own settings, as ``transformers`` does: ``add_bos_token`` of
    ``tokenizer_config.json`` when present (Llama-2, Mistral: true); otherwise whether the
    ``post_processor`` of ``tokenizer.json`` (a ``TemplateProcessing``, possibly inside a
    ``Sequence``) puts the BOS token before ``$A`` (Llama-3: true); otherwise False
    (SmolLM2, Qwen: their ``bos_token`` only opens chat turns).

    Args:
        tokenizer_file: Path to ``tokenizer.json`` (or the directory holding it).
        bos_token: BOS token text (None: from the config; the tokenizer may have none).
        eos_token: EOS token text (None: from the config; required somewhere).
        pad_token: Pad token text (None: from the config, else the EOS token).
        chat_template: Template for chat messages. None: the config's ``chat_template`` if any.
        add_bos_token: Whether plain text gets a BOS (None: from the config, else the
            post-processor, as described above).

    Raises:
        ImportError: Without the ``tokenizers`` library.
        ValueError: When the EOS token is unknown or a named token is not in the vocabulary.
    """

    def __init__(
        self,
        tokenizer_file: str | Path,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        chat_template: ChatTemplate | None = None,
        add_bos_token: bool | None = None,
    ) -> None:
        path = Path(tokenizer_file)
        if path.is_dir():
            path = path / "tokenizer.json"
        config_path = path.parent / "tokenizer_config.json"
        config: dict[str, Any] = {}
        if config_path.exists():
            config = json.loads(config_path.read_text(encoding="utf-8"))
        if chat_template is None and (config.get("chat_template") or _has_jinja(path.parent)):
            chat_template = JinjaChatTemplate.from_tokenizer_config(config_path)
        if add_bos_token is None and isinstance(config.get("add_bos_token"), bool):
            add_bos_token = config["add_bos_token"]
        self._setup(
            path.read_text(encoding="utf-8"),
            bos_token=bos_token or _token_text(config.get("bos_token")),
            eos_token=eos_token or _token_text(config.get("eos_token")),
            pad_token=pad_token or _token_text(config.get("pad_token")),
            chat_template=chat_template,
            adds_bos=add_bos_token,
            where=str(path),
        )

    @classmethod
    def from_bpe_files(
        cls,
        vocab_file: str | Path,
        merge_file: str | Path,
        *,
        eos_token: str = "<|endoftext|>",
        bos_token: str | None = None,
        pad_token: str | None = None,
        chat_template: ChatTemplate | None = None,
    ) -> HFTokenizer:
        """A GPT-2 style byte-level BPE from ``vocab.json`` and ``merges.txt``.

        This is the layout of NeMo's ``megatron`` ``GPT2BPETokenizer`` inside ``.nemo`` files.
        Plain text gets the BOS (:attr:`adds_bos`) whenever ``bos_token`` is given.

        Args:
            vocab_file: ``vocab.json`` (token -> id).
            merge_file: ``merges.txt``.
            eos_token: EOS token text (GPT-2: ``<|endoftext|>``).
            bos_token: BOS token text, or None for no BOS.
            pad_token: Pad token text (None: the EOS token).
            chat_template: Template for chat messages, or None.
        """
        tokenizers = _library()
        tok = tokenizers.Tokenizer(
            tokenizers.models.BPE.from_file(str(vocab_file), str(merge_file))
        )
        tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = tokenizers.decoders.ByteLevel()
        self = cls.__new__(cls)
        self._setup(
            tok.to_str(),
            bos_token=bos_token,
            eos_token=eos_token,
            pad_token=pad_token,
            chat_template=chat_template,
            adds_bos=bos_token is not None,
            where=str(vocab_file),
        )
        return self

    def _setup(
        self,
        json_text: str,
        *,
        bos_token: str | None,
        eos_token: str | None,
        pad_token: str | None,
        chat_template: ChatTemplate | None,
        adds_bos: bool | None,
        where: str,
    ) -> None:
        self._tok = _library().Tokenizer.from_str(json_text)
        self._hash = hashlib.sha256(json_text.encode()).hexdigest()[:16]
        if eos_token is None:
            raise ValueError(f"{where}: no EOS token (pass eos_token= or add it to the config)")
        bos_id = self._id(bos_token) if bos_token else None
        eos_id = self._id(eos_token)
        pad_id = self._id(pad_token) if pad_token else None
        self._set_special_ids(bos_id, eos_id, pad_id, chat_template)
        if adds_bos is None:
            processor = json.loads(json_text).get("post_processor")
            adds_bos = bos_token is not None and _post_processor_adds_bos(processor, bos_token)
        self._adds_bos = bool(adds_bos) and self._bos_id is not None

    def _id(self, token: str) -> int:
        token_id = self._tok.token_to_id(token)
        if token_id is None:
            raise ValueError(f"token {token!r} is not in the tokenizer's vocabulary")
        return int(token_id)

    @property
    def vocab_size(self) -> int:
        """See :class:`align_data.Tokenizer`."""
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    @property
    def adds_bos(self) -> bool:
        """See :class:`align_data.Tokenizer` (the rule is in the class docstring)."""
        return self._adds_bos

    @property
    def fingerprint(self) -> str:
        """See :class:`align_data.Tokenizer`."""
        return f"hf-{self._hash}-{self._bos_id}-{self._eos_id}-{self._pad_id}"

    def encode(self, text: str) -> list[int]:
        """See :class:`align_data.Tokenizer`."""
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def _decode_ids(self, ids: list[int]) -> str:
        return str(self._tok.decode(ids, skip_special_tokens=False))


def _post_processor_adds_bos(processor: Any, bos_token: str) -> bool:
    """Whether a ``tokenizer.json`` ``post_processor`` puts ``bos_token`` in front of the text.

    True when a ``TemplateProcessing`` (on its own or inside a ``Sequence`` of processors) has
    the special token ``bos_token`` before the ``$A`` sequence in its ``single`` template, as
    Llama-3's ``<|begin_of_text|> $A`` does. Other processors (``ByteLevel``, none) add nothing.

    Args:
        processor: The ``post_processor`` entry of ``tokenizer.json`` (a dict, or None).
        bos_token: Text of the BOS token.
    """
    if not isinstance(processor, dict):
        return False
    if processor.get("type") == "Sequence":
        return any(_post_processor_adds_bos(p, bos_token) for p in processor.get("processors", []))
    if processor.get("type") != "TemplateProcessing":
        return False
    for piece in processor.get("single") or []:
        if not isinstance(piece, dict) or "Sequence" in piece:
            return False
        special = piece.get("SpecialToken")
        if isinstance(special, dict) and special.get("id") == bos_token:
            return True
    return False


def _library() -> Any:
    return import_extra("tokenizers", "HFTokenizer needs the tokenizers library", "hf")


def _has_jinja(directory: Path) -> bool:
    return (directory / "chat_template.jinja").exists() and (
        directory / "tokenizer_config.json"
    ).exists()

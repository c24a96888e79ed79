"""The :class:`Tokenizer` protocol and the dependency-free :class:`ByteTokenizer`.

Adapters for Hugging Face ``tokenizers`` (:class:`align_data.HFTokenizer`) and sentencepiece
(:class:`align_data.SentencePieceTokenizer`) live in their own modules and import their library
only when constructed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from align_data.chat import ChatTemplate, SimpleChatTemplate

__all__ = ["ByteTokenizer", "Tokenizer"]


@runtime_checkable
class Tokenizer(Protocol):
    """What align needs from a tokenizer.

    ``encode`` never adds BOS/EOS by itself: tokenization adds them where the configuration asks
    (by default a BOS where :attr:`adds_bos` says the model was trained with one).
    ``decode`` leaves out the BOS, EOS and pad ids.
    """

    @property
    def vocab_size(self) -> int:
        """Number of token ids (special tokens included)."""
        ...

    @property
    def bos_id(self) -> int | None:
        """Beginning-of-sequence id, or None if the tokenizer has none."""
        ...

    @property
    def adds_bos(self) -> bool:
        """Whether the model was trained with the BOS in front of plain text.

        False when there is no BOS, and for tokenizers whose BOS token only opens chat turns
        (SmolLM2's ``<|im_start|>``). Tokenization follows it unless told otherwise
        (``TokenizeConfig.add_bos``).
        """
        ...

    @property
    def eos_id(self) -> int:
        """End-of-sequence id (ends every response)."""
        ...

    @property
    def pad_id(self) -> int:
        """Id used to pad batches (never a label)."""
        ...

    @property
    def chat_template(self) -> ChatTemplate | None:
        """The template used for chat messages, or None."""
        ...

    @property
    def fingerprint(self) -> str:
        """A string that changes whenever the token ids of any text would change."""
        ...

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without BOS/EOS."""
        ...

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``, without BOS/EOS/pad."""
        ...


class _LibraryTokenizer:
    """Special ids, chat template and decoding shared by the adapters over tokenizer libraries.

    A subclass calls :meth:`_set_special_ids` when constructed and implements
    :meth:`_decode_ids`, ``vocab_size``, ``adds_bos``, ``fingerprint`` and ``encode``.
    """

    _bos_id: int | None
    _eos_id: int
    _pad_id: int
    _chat_template: ChatTemplate | None
    _special: frozenset[int]

    def _set_special_ids(
        self,
        bos_id: int | None,
        eos_id: int,
        pad_id: int | None,
        chat_template: ChatTemplate | None,
    ) -> None:
        """Stores the special ids (without a pad id, EOS pads) and the chat template."""
        self._bos_id = bos_id
        self._eos_id = eos_id
        self._pad_id = eos_id if pad_id is None else pad_id
        self._chat_template = chat_template
        bos = {bos_id} if bos_id is not None else set()
        self._special = frozenset({eos_id, self._pad_id} | bos)

    @property
    def bos_id(self) -> int | None:
        """See :class:`Tokenizer`."""
        return self._bos_id

    @property
    def eos_id(self) -> int:
        """See :class:`Tokenizer`."""
        return self._eos_id

    @property
    def pad_id(self) -> int:
        """See :class:`Tokenizer`."""
        return self._pad_id

    @property
    def chat_template(self) -> ChatTemplate | None:
        """See :class:`Tokenizer`."""
        return self._chat_template

    def decode(self, ids: Sequence[int]) -> str:
        """See :class:`Tokenizer`."""
        return self._decode_ids([int(i) for i in ids if int(i) not in self._special])

    def _decode_ids(self, ids: list[int]) -> str:
        """Text of ``ids``, from which the special ids are already left out."""
        raise NotImplementedError


class ByteTokenizer:
    """UTF-8 bytes as tokens: ids 0-255 are bytes, then pad (256), BOS (257), EOS (258).

    No dependencies and no training: used by the tests, the synthetic demo and tiny models.

    Args:
        chat_template: Template for chat messages; :class:`SimpleChatTemplate` by default.
    """

    PAD = 256
    BOS = 257
    EOS = 258

    def __init__(self, chat_template: ChatTemplate | None = None) -> None:
        self._chat_template = chat_template if chat_template is not None else SimpleChatTemplate()

    @property
    def vocab_size(self) -> int:
        """See :class:`Tokenizer`."""
        return 259

    @property
    def bos_id(self) -> int:
        """See :class:`Tokenizer`."""
        return self.BOS

    @property
    def adds_bos(self) -> bool:
        """See :class:`Tokenizer`: always True."""
        return True

    @property
    def eos_id(self) -> int:
        """See :class:`Tokenizer`."""
        return self.EOS

    @property
    def pad_id(self) -> int:
        """See :class:`Tokenizer`."""
        return self.PAD

    @property
    def chat_template(self) -> ChatTemplate:
        """See :class:`Tokenizer`."""
        return self._chat_template

    @property
    def fingerprint(self) -> str:
        """See :class:`Tokenizer`."""
        return "byte-v1"

    def encode(self, text: str) -> list[int]:
        """See :class:`Tokenizer`."""
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        """See :class:`Tokenizer`; invalid UTF-8 sequences decode to U+FFFD."""
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

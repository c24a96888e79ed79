"""Adapter for sentencepiece ``.model`` files (as found inside ``.nemo`` archives), an extra.

``pip install 'align-data[sentencepiece]'``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from align_data._extras import import_extra
from align_data.chat import ChatTemplate
from align_data.tokenizer import _LibraryTokenizer

__all__ = ["SentencePieceTokenizer"]


class SentencePieceTokenizer(_LibraryTokenizer):
    """A :class:`align_data.Tokenizer` over a sentencepiece model.

    BOS/EOS/pad ids come from the model (``bos_id()``, ``eos_id()``, ``pad_id()``); a model
    without a pad piece pads with EOS. Plain text gets the BOS whenever the model has one
    (``adds_bos``). Pieces such as NeMo's ``<extra_id_1>`` are encoded as single tokens when the
    model defines them as user-defined symbols.

    Like NeMo's SFT datasets, prompt and response are encoded separately, so each fragment gets
    sentencepiece's dummy-prefix space when the model uses one.

    Args:
        model_file: Path to the ``.model`` file.
        chat_template: Template for chat messages (for example
            :class:`align_data.NeMoChatTemplate`), or None.

    Raises:
        ImportError: Without the ``sentencepiece`` library.
        ValueError: When the model has no EOS piece.
    """

    def __init__(
        self, model_file: str | Path, *, chat_template: ChatTemplate | None = None
    ) -> None:
        spm = import_extra(
            "sentencepiece", "SentencePieceTokenizer needs sentencepiece", "sentencepiece"
        )
        data = Path(model_file).read_bytes()
        self._sp = spm.SentencePieceProcessor(model_proto=data)
        self._hash = hashlib.sha256(data).hexdigest()[:16]
        bos, eos, pad = self._sp.bos_id(), self._sp.eos_id(), self._sp.pad_id()
        if eos < 0:
            raise ValueError(f"{model_file}: the sentencepiece model has no EOS piece")
        self._set_special_ids(
            bos if bos >= 0 else None, eos, pad if pad >= 0 else None, chat_template
        )

    @property
    def vocab_size(self) -> int:
        """See :class:`align_data.Tokenizer`."""
        return int(self._sp.get_piece_size())

    @property
    def adds_bos(self) -> bool:
        """See :class:`align_data.Tokenizer`: True when the model has a BOS piece."""
        return self._bos_id is not None

    @property
    def fingerprint(self) -> str:
        """See :class:`align_data.Tokenizer`."""
        return f"sp-{self._hash}"

    def encode(self, text: str) -> list[int]:
        """See :class:`align_data.Tokenizer`."""
        return [int(i) for i in self._sp.encode(text, out_type=int)]

    def _decode_ids(self, ids: list[int]) -> str:
        return str(self._sp.decode(ids))

"""Building a tokenizer from a ``.nemo`` config's ``tokenizer:`` description.

``.nemo`` archives name their tokenizer by library (``sentencepiece``, ``huggingface``,
``megatron``, ``byte-level``) plus files. :func:`tokenizer_from_nemo_spec` maps such a
description to the adapters of this package; it reads plain attributes, so it accepts
``align_core.nemo.TokenizerSpec`` without this package depending on align-core.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from align_data.chat import ChatTemplate
from align_data.hf_tokenizer import HFTokenizer
from align_data.sentencepiece_tokenizer import SentencePieceTokenizer
from align_data.tokenizer import ByteTokenizer, Tokenizer

__all__ = ["GPT2_EOS", "tokenizer_from_nemo_spec"]

GPT2_EOS = "<|endoftext|>"
"""BOS, EOS and pad token of NeMo's ``megatron`` ``GPT2BPETokenizer``."""


def tokenizer_from_nemo_spec(spec: Any, *, chat_template: ChatTemplate | None = None) -> Tokenizer:
    """A tokenizer for a ``.nemo`` tokenizer description.

    - ``byte-level`` (or ``spec`` None): :class:`ByteTokenizer`.
    - ``sentencepiece`` with ``model`` (a ``.model`` file): :class:`SentencePieceTokenizer`.
    - ``huggingface`` with ``model`` (a ``tokenizer.json`` or its directory):
      :class:`HFTokenizer`; with ``vocab_file`` and ``merge_file``: a byte-level BPE.
    - ``megatron`` with ``vocab_file`` and ``merge_file`` (``GPT2BPETokenizer``): a byte-level
      BPE whose BOS, EOS and pad token is ``<|endoftext|>``.

    Args:
        spec: An object with ``library`` and optional ``model``, ``vocab_file``, ``merge_file``
            attributes (paths to files already extracted from the archive).
        chat_template: Template for chat messages (the tokenizer's own, if any, otherwise).

    Raises:
        ValueError: For a description without the files these adapters need (align never
            downloads tokenizers by name).
    """
    if spec is None or spec.library == "byte-level":
        return ByteTokenizer(chat_template)
    library = spec.library
    model = getattr(spec, "model", None)
    vocab_file = getattr(spec, "vocab_file", None)
    merge_file = getattr(spec, "merge_file", None)
    if library == "sentencepiece" and model is not None:
        return SentencePieceTokenizer(model, chat_template=chat_template)
    if (
        library == "huggingface"
        and model is not None
        and (Path(model).is_dir() or Path(model).suffix == ".json")
    ):
        return HFTokenizer(model, chat_template=chat_template)
    if library in ("huggingface", "megatron") and vocab_file is not None and merge_file is not None:
        return HFTokenizer.from_bpe_files(
            vocab_file,
            merge_file,
            eos_token=GPT2_EOS,
            bos_token=GPT2_EOS,
            pad_token=GPT2_EOS,
            chat_template=chat_template,
        )
    files = {
        k: str(v)
        for k, v in (("model", model), ("vocab_file", vocab_file), ("merge_file", merge_file))
        if v is not None
    }
    raise ValueError(
        f"cannot build a tokenizer for library={library!r} type={getattr(spec, 'type', None)!r} "
        f"with files {files}: supported are byte-level, sentencepiece (.model), huggingface "
        "(tokenizer.json, or vocab.json + merges.txt) and megatron GPT-2 BPE (vocab + merges)"
    )

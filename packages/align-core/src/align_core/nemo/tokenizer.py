"""The ``tokenizer:`` section of a `.nemo` config and its file artifacts.

NeMo stores tokenizer files inside the archive as ``<uuid4hex>_<basename>`` and refers to them
from the config as ``nemo:<uuid4hex>_<basename>`` (keys ``model``, ``vocab_file`` and
``merge_file``). `TokenizerSpec` is the resolved, typed form: which library and type, and real
paths of the files. `build_tokenizer` turns it into an ``align_data`` tokenizer.
`TokenizerSpec.detached` reads the files into memory, so that a spec read from an extracted
archive can still be written into another `.nemo` after the extraction is gone.

`write_byte_bpe_files` writes a small GPT-2-style byte-level BPE vocabulary (``vocab.json`` and
``merges.txt``, NeMo's ``megatron``/``GPT2BPETokenizer`` layout) for tiny test checkpoints.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import json
import re
import shutil
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from align_core.nemo.errors import NemoFormatError

__all__ = [
    "ARTIFACT_KEYS",
    "TokenizerSpec",
    "build_tokenizer",
    "tokenizer_from_nemo",
    "tokenizer_to_nemo",
    "write_byte_bpe_files",
]

ARTIFACT_KEYS: tuple[str, ...] = ("model", "vocab_file", "merge_file")
_NEMO_PREFIX = "nemo:"
_ARTIFACT_NAME = re.compile(r"^[0-9a-f]{32}_.+")


@dataclass(frozen=True)
class TokenizerSpec:
    """What a `.nemo` says about its tokenizer.

    Attributes:
        library: NeMo's tokenizer library: ``"megatron"``, ``"huggingface"``, ``"sentencepiece"``,
            ``"byte-level"``, ...
        type: Library-specific type (``"GPT2BPETokenizer"``, a Hugging Face model name, ...).
        model: Tokenizer model file (sentencepiece ``.model``, Hugging Face ``tokenizer.json``).
        vocab_file: Vocabulary file (``vocab.json`` for GPT-2 BPE).
        merge_file: BPE merges file (``merges.txt``).
        options: Every other key of the section (``delimiter``, ``sentencepiece_legacy``,
            ``use_fast``, ...), passed through unchanged.
        contents: Artifact bytes by config key (see `detached`). Where a key is present,
            `tokenizer_to_nemo` writes these bytes instead of reading the file, which may then
            no longer exist (a closed `open_nemo` extraction).
    """

    library: str
    type: str | None = None
    model: Path | None = None
    vocab_file: Path | None = None
    merge_file: Path | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    contents: Mapping[str, bytes] = field(default_factory=dict, repr=False, compare=False)

    def files(self) -> dict[str, Path]:
        """The artifact files that are set, by config key."""
        return {k: getattr(self, k) for k in ARTIFACT_KEYS if getattr(self, k) is not None}

    def detached(self) -> TokenizerSpec:
        """This spec with every artifact file read into `contents`.

        Call it while the files exist (inside `open_nemo`'s block); the result can be exported
        with `save_nemo` after the archive's extraction has been removed. The paths are kept:
        their names become the artifact names in the new archive.

        Raises:
            FileNotFoundError: When one of the spec's files does not exist.
        """
        contents = dict(self.contents)
        for key, path in self.files().items():
            if key in contents:
                continue
            if not Path(path).is_file():
                raise FileNotFoundError(f"tokenizer.{key}: {path} does not exist")
            contents[key] = Path(path).read_bytes()
        return dataclasses.replace(self, contents=contents)


def _resolve(key: str, value: str, root: Path, members: list[str], origin: str) -> Path:
    if value.startswith(_NEMO_PREFIX):
        name = value[len(_NEMO_PREFIX) :]
        candidate = root / name
        if "/" in name or ".." in name or not candidate.is_file():
            raise NemoFormatError(
                f"{origin}: tokenizer.{key} refers to artifact {value!r}, "
                f"which is not in the archive"
            )
        return candidate
    # Older files keep the original path in the config; look for the copied artifact. A path
    # is never read outside the archive: a hostile config could name any file on the machine,
    # which a final export would then copy into its archive.
    given = Path(value)
    matches = [m for m in members if m == given.name or m.endswith("_" + given.name)]
    if len(matches) == 1:
        return root / matches[0]
    raise NemoFormatError(
        f"{origin}: tokenizer.{key} refers to {value!r}, which is not in the archive"
        + (f" ({len(matches)} members match its name)" if matches else "")
    )


def tokenizer_from_nemo(
    section: Mapping[str, Any] | None, root: Path, *, origin: str = "<nemo>"
) -> TokenizerSpec | None:
    """Resolve a ``tokenizer:`` config section against an extracted archive.

    Args:
        section: The section as loaded from ``model_config.yaml`` (None when absent).
        root: Directory the archive was extracted into.
        origin: Name of the archive, for error messages.

    Returns:
        The spec, or None when the config has no tokenizer section.

    Raises:
        NemoFormatError: When an artifact names a file the archive does not hold (``nemo:``
            references and plain paths alike: nothing outside the archive is read), or the
            section has no ``library``.
    """
    if section is None:
        return None
    if not isinstance(section, Mapping) or "library" not in section:
        raise NemoFormatError(f"{origin}: tokenizer section has no 'library' key: {section!r}")
    members = sorted(p.name for p in root.iterdir() if p.is_file())
    paths: dict[str, Path | None] = {}
    for key in ARTIFACT_KEYS:
        value = section.get(key)
        paths[key] = (
            None if value in (None, "") else _resolve(key, str(value), root, members, origin)
        )
    known = {"library", "type", *ARTIFACT_KEYS}
    return TokenizerSpec(
        library=str(section["library"]),
        type=None if section.get("type") is None else str(section["type"]),
        options={k: v for k, v in section.items() if k not in known},
        model=paths["model"],
        vocab_file=paths["vocab_file"],
        merge_file=paths["merge_file"],
    )


def tokenizer_to_nemo(spec: TokenizerSpec, staging: Path) -> dict[str, Any]:
    """Copy the tokenizer's files into ``staging`` as NeMo artifacts; return the config section.

    Files whose names already look like NeMo artifacts (``<32 hex>_<name>``, e.g. read from
    another `.nemo`) keep their names; others get a fresh ``<uuid4hex>_<basename>`` name. An
    artifact held in ``spec.contents`` is written from memory (its file need not exist).

    Raises:
        FileNotFoundError: When one of the spec's files does not exist and its bytes are not in
            ``spec.contents``.
    """
    section: dict[str, Any] = {"library": spec.library, "type": spec.type}
    for key in ARTIFACT_KEYS:
        src = getattr(spec, key)
        if src is None:
            section[key] = None
            continue
        src = Path(src)
        name = src.name if _ARTIFACT_NAME.match(src.name) else f"{uuid.uuid4().hex}_{src.name}"
        if key in spec.contents:
            (staging / name).write_bytes(spec.contents[key])
        elif src.is_file():
            shutil.copyfile(src, staging / name)
        else:
            raise FileNotFoundError(
                f"tokenizer.{key}: {src} does not exist (a spec read from an open_nemo block "
                "must be detached() before the block ends to be exported later)"
            )
        section[key] = _NEMO_PREFIX + name
    section.update(spec.options)
    return section


def build_tokenizer(spec: TokenizerSpec | None, *, chat_template: Any = None) -> Any:
    """Build the `align_data.Tokenizer` a `.nemo` describes, via ``tokenizer_from_nemo_spec``.

    Call it while the archive is still open (inside `open_nemo`'s block): the artifact files are
    read here. Hugging Face and GPT-2 BPE tokenizers need ``align-data[hf]``, sentencepiece
    ``align-data[sentencepiece]``.

    Args:
        spec: The checkpoint's tokenizer description; None gives align_data's byte tokenizer.
        chat_template: An ``align_data.ChatTemplate``; default the tokenizer's own, if any.

    Raises:
        ValueError: For a description without the files align_data needs (nothing is downloaded).
    """
    from align_data import tokenizer_from_nemo_spec

    return tokenizer_from_nemo_spec(spec, chat_template=chat_template)


# --- a tiny byte-level BPE vocabulary ---------------------------------------------------------

_CORPUS = (
    "The model reads the prompt and writes an answer. A good answer is short, true and kind. "
    "The reference policy stays fixed while the policy learns which of two answers people "
    "prefer. Training runs on one machine or on many, and every step is logged. "
    "If the run stops, it starts again where it stopped, with the same numbers as before. "
    "Tokens are pieces of text; the tokenizer turns text into tokens and tokens into text. "
    "Preference data holds a prompt, a chosen response and a rejected response for each line. "
    "Distillation teaches a small student to follow a large teacher, one token at a time. "
    "These sentences exist only so that a tiny tokenizer has something to learn its merges on."
)
_PRETOKEN = re.compile(r" ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+")
EOS_TOKEN = "<|endoftext|>"


def _byte_symbols() -> list[str]:
    """GPT-2's printable stand-in character for each byte value 0..255."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


def _learn_merges(count: int) -> list[tuple[str, str]]:
    symbols = _byte_symbols()
    words = collections.Counter(
        tuple(symbols[b] for b in piece.encode()) for piece in _PRETOKEN.findall(_CORPUS)
    )
    merges: list[tuple[str, str]] = []
    tokens = set(symbols)
    new_tokens = 0
    while new_tokens < count:
        pairs: collections.Counter[tuple[str, str]] = collections.Counter()
        for word, freq in words.items():
            for pair in itertools.pairwise(word):
                pairs[pair] += freq
        if not pairs:  # the corpus is exhausted
            break
        best = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))[0]
        merges.append(best)
        if best[0] + best[1] not in tokens:
            tokens.add(best[0] + best[1])
            new_tokens += 1
        merged = collections.Counter()
        for word, freq in words.items():
            out: list[str] = []
            i = 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += freq
        words = merged
    return merges


def write_byte_bpe_files(directory: str | Path, vocab_size: int) -> TokenizerSpec:
    """Write a GPT-2-style byte-level BPE tokenizer with exactly ``vocab_size`` tokens.

    Ids 0-255 are the bytes, then up to ``vocab_size - 257`` merged tokens learnt from a built-in
    English paragraph (about 265 at most), then ``<|reserved_N|>`` placeholders for any ids left,
    then ``<|endoftext|>`` as the last id. The files are ``vocab.json`` and
    ``merges.txt``, loadable by NeMo's ``GPT2BPETokenizer`` and by Hugging Face ``tokenizers``.

    Args:
        directory: Where to write the two files (created if missing).
        vocab_size: Total number of tokens, at least 257.

    Returns:
        A spec with ``library="megatron"``, ``type="GPT2BPETokenizer"`` and both files.

    Raises:
        ValueError: When ``vocab_size`` is below 257.
    """
    if vocab_size < 257:
        raise ValueError(f"vocab_size {vocab_size}: a byte-level BPE needs at least 257 tokens")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    merges = _learn_merges(vocab_size - 257)
    vocab = {s: i for i, s in enumerate(_byte_symbols())}
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    reserved = 0
    while len(vocab) < vocab_size - 1:
        vocab[f"<|reserved_{reserved}|>"] = len(vocab)
        reserved += 1
    vocab[EOS_TOKEN] = len(vocab)
    vocab_file, merge_file = directory / "vocab.json", directory / "merges.txt"
    vocab_file.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merge_file.write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
    )
    return TokenizerSpec(
        library="megatron",
        type="GPT2BPETokenizer",
        vocab_file=vocab_file,
        merge_file=merge_file,
    )

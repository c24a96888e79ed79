"""Generations files: what a rollout drew, on disk, reusable on resume.

``iter_<t>.jsonl`` (`write_generations` / `read_generations`) holds one line per training
prompt (index, prompt, real and generated text, their lengths, whether generation finished with
EOS or an end string, and the token ids, so a resumed run rebuilds exactly the same pairs);
``iter_<t>.meta.json`` is written last, atomically, and marks the file complete. A file is
reused only when its meta matches the run's reuse key (data fingerprint, seed, generation
settings). `write_jsonl_atomically` is the temporary-file-and-rename writer every JSONL output
of generation uses.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "GenerationRow",
    "decode_rows",
    "read_generations",
    "write_generations",
    "write_jsonl_atomically",
]


@dataclass(frozen=True)
class GenerationRow:
    """One line of a generations file.

    Attributes:
        index: The training example's index.
        prompt_ids: Prompt tokens.
        real_ids: The real (SFT) answer's tokens.
        generated_ids: The opponent's answer's tokens.
        finished: Whether generation ended with EOS or an end string.
    """

    index: int
    prompt_ids: list[int]
    real_ids: list[int]
    generated_ids: list[int]
    finished: bool


def decode_rows(tokenizer: Any, rows: Sequence[GenerationRow]) -> dict[str, list[str]]:
    """``prompt`` and ``real`` texts of generation rows (a leading BOS and final EOS left out)."""

    def text(ids: Sequence[int]) -> str:
        ids = list(ids)
        if ids and ids[0] == tokenizer.bos_id:
            ids = ids[1:]
        while ids and ids[-1] == tokenizer.eos_id:
            ids = ids[:-1]
        return tokenizer.decode(ids)

    return {"prompt": [text(r.prompt_ids) for r in rows], "real": [text(r.real_ids) for r in rows]}


def write_jsonl_atomically(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """Write JSON lines to ``path`` through a temporary file renamed when complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _meta_path(path: Path) -> Path:
    return path.with_name(path.name.removesuffix(".jsonl") + ".meta.json")


def write_generations(
    path: Path,
    rows: Sequence[GenerationRow],
    texts: Mapping[str, Sequence[str]],
    meta: Mapping[str, Any],
) -> None:
    """Write a generations file and, last, its meta file (which marks it complete).

    Args:
        path: ``.../iter_<t>.jsonl``.
        rows: One row per training prompt, in index order.
        texts: ``prompt``, ``real`` and ``generated`` texts, one per row.
        meta: The reuse key (``key``) and rollout statistics.
    """
    lines = [
        {
            "index": r.index,
            "prompt": texts["prompt"][i],
            "real": texts["real"][i],
            "generated": texts["generated"][i],
            "prompt_length": len(r.prompt_ids),
            "real_length": len(r.real_ids),
            "generated_length": len(r.generated_ids),
            "finished": r.finished,
            "prompt_ids": r.prompt_ids,
            "real_ids": r.real_ids,
            "generated_ids": r.generated_ids,
        }
        for i, r in enumerate(rows)
    ]
    meta_path = _meta_path(path)
    meta_path.unlink(missing_ok=True)
    write_jsonl_atomically(path, lines)
    tmp = meta_path.with_name(meta_path.name + ".tmp")
    tmp.write_text(json.dumps(dict(meta), indent=1, sort_keys=True) + "\n")
    os.replace(tmp, meta_path)


def read_generations(
    path: Path, key: Mapping[str, Any]
) -> tuple[list[GenerationRow], dict[str, Any]] | None:
    """Read a complete generations file written under the same ``key``.

    Args:
        path: ``.../iter_<t>.jsonl``.
        key: What the generations depend on (data fingerprint, seed, settings).

    Returns:
        ``(rows, meta)``, or None when the file or its meta file is missing (incomplete).

    Raises:
        ValueError: The file was written with other data or generation settings.
    """
    meta_path = _meta_path(path)
    if not path.is_file() or not meta_path.is_file():
        return None
    meta = json.loads(meta_path.read_text())
    saved = meta.get("key")
    want = json.loads(json.dumps(dict(key)))
    if saved != want:
        diff = sorted(
            k for k in set(want) | set(saved or {}) if (saved or {}).get(k) != want.get(k)
        )
        raise ValueError(
            f"{path} was generated with other settings ({', '.join(diff)} differ); delete it "
            "(and its .meta.json) to generate again, or use a new run directory"
        )
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            rows.append(
                GenerationRow(
                    int(r["index"]),
                    list(r["prompt_ids"]),
                    list(r["real_ids"]),
                    list(r["generated_ids"]),
                    bool(r["finished"]),
                )
            )
    return rows, meta

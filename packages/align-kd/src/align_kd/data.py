"""Offline distillation data: tokenized examples paired with the teacher's stored top-k.

`TeacherExamples` is the random-access sequence the trainer draws micro-batches from (each item
a `align_kd.KDExample`; the store is memory-mapped, nothing is loaded up front).

NeMo-Aligner's KD JSONL (``compute_topk_logits.py`` output) carries the token ids the teacher saw
next to its top-k. `import_nemo_kd_jsonl` turns it into an align-data store (through
`align_data.import_nemo_topk_jsonl`) *and* the matching examples, rebuilt from each line's
``tokens``, ``labels`` and ``loss_mask``, so existing teacher outputs train a student directly,
without re-tokenizing the original data.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import overload

import numpy as np

from align_data import DataError, SFTExample, TeacherTopKReader, import_nemo_topk_jsonl
from align_data.stores import TeacherDType
from align_kd.step import KDExample

__all__ = ["TeacherExamples", "import_nemo_kd_jsonl", "nemo_kd_examples"]


class TeacherExamples(Sequence[KDExample]):
    """Examples paired with a teacher store by position.

    Example ``i`` is store sample ``first + i``, where ``first`` is the store's first sample
    index (0 for a teacher pass; the first ``index`` of imported NeMo-Aligner output).

    Args:
        examples: The student's tokenized examples, in the order the teacher pass saw them.
        reader: The teacher store(s) (`align_kd.open_teacher_store`).

    Raises:
        ValueError: When the store does not hold exactly ``len(examples)`` consecutive samples.
    """

    def __init__(self, examples: Sequence[SFTExample], reader: TeacherTopKReader) -> None:
        ranges = reader.indices()
        self.first = ranges[0].start if ranges else 0
        if len(reader) != len(examples) or (ranges and ranges[-1].stop - self.first != len(reader)):
            held = ", ".join(f"[{r.start}, {r.stop})" for r in ranges)
            raise ValueError(
                f"the teacher store holds samples {held} but there are {len(examples)} examples; "
                "the teacher pass must cover the same examples in the same order"
            )
        self.examples = examples
        self.reader = reader

    def __len__(self) -> int:
        return len(self.examples)

    @overload
    def __getitem__(self, index: int) -> KDExample: ...

    @overload
    def __getitem__(self, index: slice) -> list[KDExample]: ...

    def __getitem__(self, index: int | slice) -> KDExample | list[KDExample]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        return KDExample(self.examples[index], self.reader[self.first + int(index)])

    def __iter__(self) -> Iterator[KDExample]:
        for i in range(len(self)):
            yield self[i]


def _example_from_line(obj: dict, path: str, line: int, index: int) -> SFTExample:
    """Rebuild the sequence of one NeMo KD line: ``tokens[:n]`` plus the last label."""
    try:
        tokens = np.asarray(obj["tokens"], dtype=np.int64).reshape(-1)
        labels = np.asarray(obj["labels"], dtype=np.int64).reshape(-1)
        mask = np.asarray(obj["loss_mask"], dtype=np.float64).reshape(-1) > 0
    except KeyError as exc:
        raise DataError(path, line, exc.args[0], "missing key") from None
    except (TypeError, ValueError):
        raise DataError(path, line, "tokens", "expected lists of integers") from None
    trained = np.flatnonzero(mask)
    if trained.size == 0:
        raise DataError(path, line, "loss_mask", "no position has loss_mask 1")
    n = int(trained[-1]) + 1
    if len(tokens) < n or len(labels) < n:
        raise DataError(path, line, "tokens", f"expected at least {n} tokens and labels")
    if not np.array_equal(tokens[1:n], labels[: n - 1]):
        raise DataError(path, line, "labels", "labels are not the tokens shifted by one")
    seq = np.concatenate([tokens[:n], labels[n - 1 : n]])
    # The completion is the last run of trained positions; earlier trained positions (multi-turn
    # chat) are marked in the prompt's loss mask. Label t is token t + 1.
    starts = np.flatnonzero(~mask[:n])
    first = int(starts[-1]) + 1 if starts.size else 0
    prompt_mask = np.zeros(first + 1, dtype=np.uint8)
    prompt_mask[1:] = mask[:first]
    return SFTExample(
        prompt_ids=seq[: first + 1].astype(np.int32),
        completion_ids=seq[first + 1 :].astype(np.int32),
        prompt_loss_mask=prompt_mask if prompt_mask.any() else None,
        index=index,
    )


def nemo_kd_examples(paths: str | Path | Sequence[str | Path]) -> list[SFTExample]:
    """The examples of NeMo-Aligner KD JSONL file(s), ordered by their ``index`` field.

    Each line's sequence is ``tokens[:n] + [labels[n-1]]`` with ``n`` one past the last position
    whose ``loss_mask`` is 1 (NeMo's labels are the tokens shifted by one), exactly the positions
    `align_data.import_nemo_topk_jsonl` keeps; ``loss_mask`` decides which labels are trained.

    Raises:
        DataError: For a malformed line (file, line and field named).
    """
    sources = [str(p) for p in ([paths] if isinstance(paths, str | Path) else paths)]
    found: list[tuple[int, SFTExample]] = []
    for path in sources:
        with open(path, encoding="utf-8") as f:
            for line, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                obj = json.loads(raw)
                index = obj.get("index")
                if isinstance(index, list) and len(index) == 1:
                    index = index[0]
                if not isinstance(index, int):
                    raise DataError(path, line, "index", f"expected an integer, got {index!r}")
                found.append((index, _example_from_line(obj, path, line, index)))
    found.sort(key=lambda item: item[0])
    first = found[0][0] if found else 0
    return [
        SFTExample(e.prompt_ids, e.completion_ids, e.prompt_loss_mask, index=i - first)
        for i, e in found
    ]


def import_nemo_kd_jsonl(
    paths: str | Path | Sequence[str | Path],
    out_dir: str | Path,
    *,
    dtype: TeacherDType = "fp32",
) -> TeacherExamples:
    """Import NeMo-Aligner KD JSONL into a teacher store and pair it with its own examples.

    The store import is resumable (align-data); the examples are rebuilt from the same lines, so
    positions and input ids match by construction.

    Args:
        paths: ``compute_topk_logits.py`` output file(s) (any order, one index range together).
        out_dir: Store directory (resumed if it exists).
        dtype: Storage dtype of the logits.

    Returns:
        The examples paired with the imported store.

    Raises:
        DataError: For a malformed line, a duplicate or missing index.
    """
    reader = import_nemo_topk_jsonl(paths, out_dir, dtype=dtype, keep_input_ids=True)
    return TeacherExamples(nemo_kd_examples(paths), reader)

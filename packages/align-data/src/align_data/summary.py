"""The preprocessing summary: counts, tokens, length histogram, truncations and drops."""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

__all__ = ["PreprocessSummary", "length_histogram"]


def length_histogram(
    lengths: np.ndarray, max_length: int, *, bins: int = 8
) -> list[tuple[int, int, int]]:
    """Counts sequence lengths in ``bins`` equal-width bins over ``[1, max_length]``.

    Returns:
        ``[(low, high, count), ...]``: lengths ``low <= L <= high``; the bins cover
        ``1..max_length`` without gaps.
    """
    lengths = np.asarray(lengths).reshape(-1)
    edges = np.linspace(0, max_length, bins + 1).round().astype(np.int64)
    out: list[tuple[int, int, int]] = []
    for lo, hi in itertools.pairwise(edges):
        if hi <= lo:
            continue
        count = int(((lengths > lo) & (lengths <= hi)).sum())
        out.append((int(lo) + 1, int(hi), count))
    return out


@dataclass
class PreprocessSummary:
    """What preprocessing read, kept, truncated and dropped.

    Attributes:
        kind: The dataset kind.
        formats: Detected or given format of each source file.
        rows: Non-blank rows read.
        records: Records after conversion (a preference pair read as unpaired counts twice).
        examples: Examples kept in the dataset.
        skipped_invalid: Invalid rows skipped (lenient mode).
        truncated: Kept examples with any truncation.
        prompt_truncated: Kept examples whose prompt was truncated from the left.
        response_truncated: Kept examples with a response truncated from the right.
        dropped_overlong: Examples dropped as over-long (``overlong="drop"``).
        dropped_empty_prompt: Examples dropped because truncation would leave the prompt only
            its BOS (lenient mode; strict mode refuses them).
        dropped_empty_response: Examples dropped because a response was fully truncated.
        sequences: Token sequences (two per preference example).
        tokens: Tokens over all sequences (a shared prompt counted once per sequence).
        label_tokens: Response tokens, i.e. tokens that carry a label.
        max_length: The configured maximum sequence length.
        length_histogram: ``(low, high, count)`` of sequence lengths.
        seconds: Wall time of the preprocessing run.
    """

    kind: str
    formats: dict[str, str] = field(default_factory=dict)
    rows: int = 0
    records: int = 0
    examples: int = 0
    skipped_invalid: int = 0
    truncated: int = 0
    prompt_truncated: int = 0
    response_truncated: int = 0
    dropped_overlong: int = 0
    dropped_empty_prompt: int = 0
    dropped_empty_response: int = 0
    sequences: int = 0
    tokens: int = 0
    label_tokens: int = 0
    max_length: int = 0
    length_histogram: list[tuple[int, int, int]] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PreprocessSummary:
        """Inverse of :meth:`to_dict`."""
        data = dict(data)
        data["length_histogram"] = [tuple(b) for b in data.get("length_histogram", [])]
        return cls(**data)

    @property
    def dropped(self) -> int:
        """Examples dropped for any reason of length (over-long, empty prompt or response)."""
        return self.dropped_overlong + self.dropped_empty_prompt + self.dropped_empty_response

    def drop_counts(self) -> str:
        """The drops by reason, e.g. ``over-long: 3, prompt cut to the BOS alone: 1``."""
        parts = [
            ("over-long", self.dropped_overlong),
            ("prompt cut to the BOS alone", self.dropped_empty_prompt),
            ("response fully truncated", self.dropped_empty_response),
        ]
        return ", ".join(f"{name}: {count}" for name, count in parts if count) or "none"

    def length_line(self, limit: str | None = None) -> str | None:
        """One line on what the length limit and validation did to the data, or None if nothing.

        Names how many kept examples were truncated (prompt cut, response cut), how many were
        dropped and why, and how many invalid records were skipped.

        Args:
            limit: How to name the length limit (default ``max_length N``), e.g. a model's
                ``seq_length``.
        """
        parts = []
        if self.truncated:
            parts.append(
                f"{self.truncated} of {self.examples} examples truncated to "
                f"{limit or f'max_length {self.max_length}'} (prompt cut: "
                f"{self.prompt_truncated}, response cut: {self.response_truncated})"
            )
        if self.dropped:
            parts.append(f"{self.dropped} dropped ({self.drop_counts()})")
        if self.skipped_invalid:
            parts.append(f"{self.skipped_invalid} invalid records skipped")
        return "; ".join(parts) or None

    def format(self) -> str:
        """A human-readable multi-line report."""
        rate = self.rows / self.seconds if self.seconds > 0 else 0.0
        lines = [
            f"kind: {self.kind}",
            *(f"source: {path} ({fmt})" for path, fmt in self.formats.items()),
            f"rows read: {self.rows}  records: {self.records}  examples kept: {self.examples}"
            f"  ({self.seconds:.2f} s, {rate:,.0f} rows/s)",
            f"skipped (invalid): {self.skipped_invalid}",
            f"truncated: {self.truncated} (prompt: {self.prompt_truncated}, "
            f"response: {self.response_truncated})",
            f"dropped: {self.dropped} "
            f"(over-long: {self.dropped_overlong}, "
            f"prompt cut to the BOS alone: {self.dropped_empty_prompt}, "
            f"response fully truncated: {self.dropped_empty_response})",
            f"sequences: {self.sequences}  tokens: {self.tokens}  "
            f"label tokens: {self.label_tokens}",
            f"sequence lengths (max_length {self.max_length}):",
        ]
        peak = max((c for _, _, c in self.length_histogram), default=0)
        for lo, hi, count in self.length_histogram:
            bar = "#" * (round(30 * count / peak) if peak else 0)
            lines.append(f"  {lo:>7}-{hi:<7} {count:>9}  {bar}")
        return "\n".join(lines)

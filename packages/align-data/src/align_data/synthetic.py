r"""A synthetic preference task with a rule a program can score (demo and learning tests).

Each prompt names a style and a few words, e.g. ``"loud: cat sun dog\n"``. The correct response
repeats the words in that style:

========  ==========================  ===============
style     rule                        example
========  ==========================  ===============
loud      every letter upper case,    ``CAT SUN DOG!``
          ends with ``!``
quiet     every letter lower case,    ``cat sun dog.``
          ends with ``.``
ask       first letter upper case,    ``Cat sun dog?``
          the rest lower, ends ``?``
========  ==========================  ===============

The chosen response follows the prompt's style; the rejected one renders the same words in
another style, so it breaks the rule (letter case and final mark). Sequences are short (about
20-45 bytes), so a tiny GPT with the byte tokenizer learns the task in a few hundred CPU steps.
:func:`score_response` grades any response in ``[0, 1]``; :func:`follows_rule` checks it exactly.

:func:`write_synthetic_dataset` writes preference, unpaired (KTO) and SFT files for train and
eval splits from one seed; eval prompts never occur in train.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "STYLES",
    "SyntheticFiles",
    "SyntheticPair",
    "expected_response",
    "follows_rule",
    "generate_pairs",
    "render_style",
    "score_response",
    "write_synthetic_dataset",
]

STYLES: tuple[str, ...] = ("loud", "quiet", "ask")
_MARK = {"loud": "!", "quiet": ".", "ask": "?"}
_WORDS = [
    "cat",
    "dog",
    "sun",
    "moon",
    "tree",
    "fish",
    "bird",
    "red",
    "blue",
    "green",
    "star",
    "rain",
    "snow",
    "wind",
    "fire",
    "rock",
    "sea",
    "sky",
    "leaf",
    "frog",
    "bear",
    "wolf",
    "lamp",
    "book",
    "cup",
    "hat",
    "box",
    "key",
    "door",
    "road",
    "ship",
    "car",
    "bell",
    "milk",
    "corn",
    "rose",
    "lake",
    "hill",
    "gold",
]


@dataclass(frozen=True)
class SyntheticPair:
    r"""One generated example.

    Attributes:
        style: The style the prompt asks for.
        words: The words to repeat.
        prompt: The prompt text (``"<style>: <words>\n"``).
        chosen: The response that follows the rule.
        rejected: The same words in another style.
    """

    style: str
    words: tuple[str, ...]
    prompt: str
    chosen: str
    rejected: str


def render_style(words: tuple[str, ...] | list[str], style: str) -> str:
    """Renders words in a style (see the module table)."""
    text = " ".join(words)
    if style == "loud":
        text = text.upper()
    elif style == "quiet":
        text = text.lower()
    elif style == "ask":
        text = text.lower()
        text = text[:1].upper() + text[1:]
    else:
        raise ValueError(f"unknown style {style!r}; styles: {', '.join(STYLES)}")
    return text + _MARK[style]


def _prompt_text(prompt: Any) -> str:
    """The instruction text of a plain prompt or of a chat prompt's last user turn."""
    if isinstance(prompt, list | tuple):
        users = [
            m["content"] if isinstance(m, dict) else m.content
            for m in prompt
            if (m["role"] if isinstance(m, dict) else m.role) == "user"
        ]
        if not users:
            raise ValueError("the chat prompt has no user turn")
        prompt = users[-1]
    return str(prompt)


def _parse(prompt: Any) -> tuple[str, tuple[str, ...]]:
    text = _prompt_text(prompt).strip()
    style, sep, rest = text.partition(":")
    words = tuple(rest.split())
    if not sep or style not in STYLES or not words:
        raise ValueError(f"not a synthetic-task prompt: {text!r}")
    return style, words


def expected_response(prompt: Any) -> str:
    """The response that follows the prompt's rule."""
    style, words = _parse(prompt)
    return render_style(words, style)


def follows_rule(prompt: Any, response: str) -> bool:
    """Whether ``response`` (surrounding whitespace ignored) is exactly the expected response."""
    return response.strip() == expected_response(prompt)


def score_response(prompt: Any, response: str) -> float:
    """Grades a response in ``[0, 1]``: the mean of three checks.

    - case: the fraction of the response's letters in the case the style requires at their place
      (0 without letters);
    - mark: 1 if the stripped response ends with the style's mark and contains no other of the
      three marks;
    - words: the fraction of the prompt's words found, in order, among the response's words
      (compared in lower case, marks stripped).

    A response equal to :func:`expected_response` scores 1.
    """
    style, words = _parse(prompt)
    text = response.strip()
    letters = [c for c in text if c.isalpha()]
    if letters:
        if style == "loud":
            good = sum(c.isupper() for c in letters)
        elif style == "quiet":
            good = sum(c.islower() for c in letters)
        else:
            good = int(letters[0].isupper()) + sum(c.islower() for c in letters[1:])
        case = good / len(letters)
    else:
        case = 0.0
    marks = {m for m in _MARK.values() if m in text} - {_MARK[style]}
    mark = float(text.endswith(_MARK[style]) and not marks)
    said = [w.strip("!.?").lower() for w in text.split()]
    found, k = 0, 0
    for w in words:
        while k < len(said) and said[k] != w:
            k += 1
        if k < len(said):
            found += 1
            k += 1
    return (case + mark + found / len(words)) / 3


def generate_pairs(
    count: int, *, seed: int = 0, min_words: int = 2, max_words: int = 4
) -> list[SyntheticPair]:
    """Generates ``count`` examples with distinct prompts, deterministically from ``seed``."""
    rng = random.Random(seed)
    limit = len(STYLES) * sum(math.perm(len(_WORDS), k) for k in range(min_words, max_words + 1))
    if count > limit:
        raise ValueError(f"at most {limit} distinct prompts; asked for {count}")
    seen: set[tuple[str, tuple[str, ...]]] = set()
    pairs: list[SyntheticPair] = []
    while len(pairs) < count:
        style = rng.choice(STYLES)
        words = tuple(rng.sample(_WORDS, rng.randint(min_words, max_words)))
        if (style, words) in seen:
            continue
        seen.add((style, words))
        other = rng.choice([s for s in STYLES if s != style])
        pairs.append(
            SyntheticPair(
                style,
                words,
                f"{style}: {' '.join(words)}\n",
                render_style(words, style),
                render_style(words, other),
            )
        )
    return pairs


@dataclass(frozen=True)
class SyntheticFiles:
    """Paths written by :func:`write_synthetic_dataset`.

    Attributes:
        preference_train: ``prompt``/``chosen``/``rejected`` records.
        preference_eval: Held-out pairs.
        unpaired_train: ``prompt``/``completion``/``label`` records (both responses of each pair).
        unpaired_eval: Held-out unpaired records.
        sft_train: ``prompt``/``completion`` records (the chosen responses).
        sft_eval: Held-out SFT records.
    """

    preference_train: Path
    preference_eval: Path
    unpaired_train: Path
    unpaired_eval: Path
    sft_train: Path
    sft_eval: Path


def _write(path: Path, rows: list[dict[str, Any]]) -> Path:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def write_synthetic_dataset(
    out_dir: str | Path,
    *,
    seed: int = 0,
    num_train: int = 2000,
    num_eval: int = 200,
    chat: bool = False,
) -> SyntheticFiles:
    """Writes the six JSONL files of the synthetic task.

    Args:
        out_dir: Output directory (created).
        seed: Seed of everything.
        num_train: Training prompts.
        num_eval: Held-out prompts (disjoint from training prompts).
        chat: Write prompts as chat messages (``[{"role": "user", ...}]``) instead of text.

    Returns:
        The file paths.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pairs = generate_pairs(num_train + num_eval, seed=seed)

    def prompt(p: SyntheticPair) -> Any:
        return [{"role": "user", "content": p.prompt.strip()}] if chat else p.prompt

    def splits(name: str, make: Any) -> tuple[Path, Path]:
        train = [row for p in pairs[:num_train] for row in make(p)]
        held = [row for p in pairs[num_train:] for row in make(p)]
        return _write(out / f"{name}_train.jsonl", train), _write(out / f"{name}_eval.jsonl", held)

    pref = splits(
        "preference",
        lambda p: [{"prompt": prompt(p), "chosen": p.chosen, "rejected": p.rejected}],
    )
    unpaired = splits(
        "unpaired",
        lambda p: [
            {"prompt": prompt(p), "completion": p.chosen, "label": True},
            {"prompt": prompt(p), "completion": p.rejected, "label": False},
        ],
    )
    sft = splits("sft", lambda p: [{"prompt": prompt(p), "completion": p.chosen}])
    return SyntheticFiles(*pref, *unpaired, *sft)

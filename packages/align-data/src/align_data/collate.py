"""Pure collate functions: lists of tokenized examples in, typed padded batches out.

No collective communication and no global state: padding to a length agreed across
data-parallel ranks is the caller's choice (``CollateConfig.pad_to_length``). See
:mod:`align_data.batches` for the shift, mask and layout conventions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from align_data.batches import (
    IGNORE_INDEX,
    DistillationBatch,
    KTOBatch,
    PreferenceBatch,
    SFTBatch,
)
from align_data.stores.teacher_shards import TeacherSample
from align_data.tokenize import PreferenceExample, SFTExample, UnpairedExample

__all__ = [
    "CollateConfig",
    "collate_distillation",
    "collate_kto",
    "collate_preference",
    "collate_sft",
    "padded_length",
    "sequence_row",
]


@dataclass(frozen=True, kw_only=True)
class CollateConfig:
    """Padding and defaults of the collate functions.

    Attributes:
        pad_id: Token id of padding (the tokenizer's ``pad_id``).
        pad_to_multiple_of: Round the padded length up to a multiple of this.
        pad_to_length: Pad every batch to exactly this length (an error if a row is longer),
            e.g. a length agreed across data-parallel ranks; None pads to the longest row.
        default_chosen_reward: Ground-truth reward of chosen responses without one.
        default_rejected_reward: Ground-truth reward of rejected responses without one.
        kl_max_length: KTO: cut each mismatched KL sequence (prompt_i + completion_j) to this
            many tokens by truncating the completion from the right; None keeps them whole.
    """

    pad_id: int
    pad_to_multiple_of: int = 1
    pad_to_length: int | None = None
    default_chosen_reward: float = 1.0
    default_rejected_reward: float = 0.0
    kl_max_length: int | None = None

    def __post_init__(self) -> None:
        if self.pad_to_multiple_of < 1:
            raise ValueError("pad_to_multiple_of must be at least 1")


Row = tuple[np.ndarray, np.ndarray]


def sequence_row(
    prompt_ids: np.ndarray,
    response_ids: np.ndarray,
    prompt_loss_mask: np.ndarray | None = None,
) -> Row:
    """The shifted ``(input_ids, labels)`` of one prompt + response sequence.

    For a sequence ``s`` of ``L = P + R`` tokens, ``input_ids = s[:-1]`` and
    ``labels[t] = s[t + 1]`` where token ``t + 1`` is a response token (or a trained prompt
    token), else -100: exactly ``R`` real labels, at positions ``P - 1 .. L - 2``.

    Raises:
        ValueError: When the response is empty (an all-masked example is never built).
    """
    if len(response_ids) == 0:
        raise ValueError("empty response: an example without labels would add a constant loss")
    seq = np.concatenate([np.asarray(prompt_ids), np.asarray(response_ids)]).astype(np.int64)
    trained = np.ones(len(seq), dtype=bool)
    if prompt_loss_mask is None:
        trained[: len(prompt_ids)] = False
    else:
        trained[: len(prompt_ids)] = np.asarray(prompt_loss_mask, dtype=bool)
    labels = np.where(trained[1:], seq[1:], IGNORE_INDEX)
    return seq[:-1], labels


def padded_length(longest: int, config: CollateConfig) -> int:
    """The batch length for rows of at most ``longest`` positions under ``config``."""
    length = longest
    if config.pad_to_length is not None:
        if longest > config.pad_to_length:
            raise ValueError(
                f"a row has {longest} positions, more than pad_to_length={config.pad_to_length}"
            )
        length = config.pad_to_length
    m = config.pad_to_multiple_of
    return -(-length // m) * m


def _pad(
    rows: Sequence[Row], config: CollateConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(input_ids, labels, attention_mask, position_ids, lengths)`` of right-padded rows."""
    lengths = np.asarray([len(ids) for ids, _ in rows], dtype=np.int64)
    t = padded_length(int(lengths.max()), config)
    input_ids = np.full((len(rows), t), config.pad_id, dtype=np.int64)
    labels = np.full((len(rows), t), IGNORE_INDEX, dtype=np.int64)
    for i, (ids, lab) in enumerate(rows):
        input_ids[i, : len(ids)] = ids
        labels[i, : len(lab)] = lab
    attention = np.arange(t)[None, :] < lengths[:, None]
    positions = np.broadcast_to(np.arange(t, dtype=np.int64), (len(rows), t)).copy()
    return (
        torch.from_numpy(input_ids),
        torch.from_numpy(labels),
        torch.from_numpy(attention),
        torch.from_numpy(positions),
        torch.from_numpy(lengths),
    )


def _indices(examples: Sequence[object]) -> torch.Tensor:
    return torch.tensor([getattr(e, "index", -1) for e in examples], dtype=torch.int64)


def _nonempty(examples: Sequence[object], what: str) -> None:
    if not examples:
        raise ValueError(f"cannot collate an empty list of {what}")


def collate_sft(examples: Sequence[SFTExample], config: CollateConfig) -> SFTBatch:
    """Pads prompt + completion sequences into an :class:`SFTBatch`."""
    _nonempty(examples, "SFT examples")
    rows = [sequence_row(e.prompt_ids, e.completion_ids, e.prompt_loss_mask) for e in examples]
    input_ids, labels, attention, positions, lengths = _pad(rows, config)
    return SFTBatch(input_ids, labels, attention, positions, lengths, _indices(examples))


def collate_preference(
    examples: Sequence[PreferenceExample], config: CollateConfig
) -> PreferenceBatch:
    """Builds one forward batch ``[chosen_0..B-1, rejected_0..B-1]`` from B pairs.

    Missing ground-truth rewards take ``config.default_chosen_reward`` /
    ``default_rejected_reward`` and are flagged in ``rewards_given``.
    """
    _nonempty(examples, "preference examples")
    rows = [sequence_row(e.prompt_ids, e.chosen_ids) for e in examples]
    rows += [sequence_row(e.prompt_ids, e.rejected_ids) for e in examples]
    input_ids, labels, attention, positions, lengths = _pad(rows, config)
    given = [e.chosen_reward is not None and e.rejected_reward is not None for e in examples]
    chosen = [
        e.chosen_reward if e.chosen_reward is not None else config.default_chosen_reward
        for e in examples
    ]
    rejected = [
        e.rejected_reward if e.rejected_reward is not None else config.default_rejected_reward
        for e in examples
    ]
    return PreferenceBatch(
        input_ids,
        labels,
        attention,
        positions,
        lengths,
        torch.tensor(chosen, dtype=torch.float32),
        torch.tensor(rejected, dtype=torch.float32),
        torch.tensor(given, dtype=torch.bool),
        _indices(examples),
    )


def collate_kto(examples: Sequence[UnpairedExample], config: CollateConfig) -> KTOBatch:
    """Builds KTO samples and mismatched KL samples in one forward batch.

    KL sample i is prompt_i followed by completion_((i+1) mod B), within this micro-batch.

    Raises:
        ValueError: With fewer than 2 examples: the only "mismatched" pair would be the sample
            itself, which biases the KL estimate.
    """
    b = len(examples)
    if b < 2:
        raise ValueError(
            f"KTO needs at least 2 examples per micro-batch to pair prompt_i with "
            f"completion_(i+1 mod B) for the KL estimate; got {b}. Use micro_batch_size >= 2."
        )
    rows = [sequence_row(e.prompt_ids, e.completion_ids) for e in examples]
    partner = [(i + 1) % b for i in range(b)]
    for i, j in enumerate(partner):
        completion = examples[j].completion_ids
        if config.kl_max_length is not None:
            room = max(1, config.kl_max_length - len(examples[i].prompt_ids))
            completion = completion[:room]
        rows.append(sequence_row(examples[i].prompt_ids, completion))
    input_ids, labels, attention, positions, lengths = _pad(rows, config)
    return KTOBatch(
        input_ids,
        labels,
        attention,
        positions,
        lengths,
        torch.tensor([e.desirable for e in examples], dtype=torch.bool),
        torch.tensor(partner, dtype=torch.int64),
        _indices(examples),
    )


def collate_distillation(
    examples: Sequence[SFTExample],
    teacher: Sequence[TeacherSample],
    config: CollateConfig,
) -> DistillationBatch:
    """Pads SFT examples and aligns the teacher's top-k with their label positions.

    Teacher sample i must have one position per input position of example i (its length minus
    one); when the store kept input ids, they must equal the example's.

    Raises:
        ValueError: On a length or token mismatch (a different tokenizer or template).
    """
    _nonempty(examples, "SFT examples")
    if len(teacher) != len(examples):
        raise ValueError(f"{len(teacher)} teacher samples for {len(examples)} examples")
    rows = [sequence_row(e.prompt_ids, e.completion_ids, e.prompt_loss_mask) for e in examples]
    input_ids, labels, attention, positions, lengths = _pad(rows, config)
    ks = {t.logits.shape[1] for t in teacher}
    if len(ks) != 1:
        raise ValueError(f"teacher samples disagree on top_k: {sorted(ks)}")
    k = ks.pop()
    b, t = input_ids.shape
    logits = torch.zeros(b, t, k, dtype=torch.float32)
    ids = torch.zeros(b, t, k, dtype=torch.int64)
    lse = torch.zeros(b, t, dtype=torch.float32)
    for i, (example, sample) in enumerate(zip(examples, teacher, strict=True)):
        n = len(rows[i][0])
        if sample.num_positions != n:
            raise ValueError(
                f"example {example.index}: the teacher has {sample.num_positions} positions but "
                f"the example has {n} input positions (different tokenizer, template or "
                "max_length?)"
            )
        if sample.input_ids is not None and not torch.equal(
            sample.input_ids.to(torch.int64), input_ids[i, :n]
        ):
            raise ValueError(
                f"example {example.index}: the teacher saw other input ids than the dataset has "
                "(different tokenizer or template?)"
            )
        logits[i, :n] = sample.logits.float()
        ids[i, :n] = sample.ids.to(torch.int64)
        lse[i, :n] = sample.logsumexp.float()
    return DistillationBatch(
        input_ids, labels, attention, positions, lengths, logits, ids, lse, _indices(examples)
    )

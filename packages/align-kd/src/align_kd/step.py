r"""The student's distillation step: model batches, the micro-batch loss, metrics.

Per token ``t`` with a label (``labels[t] != -100``):

.. math::
    \ell_t = w_{kd}\,\mathrm{KD}_t + w_{sft}\,\mathrm{NLL}_t

where ``KD_t`` is `align_losses.topk_kd_loss` between the teacher's top-k at ``t`` and the
student's (vocabulary-parallel) logits, and ``NLL_t = −log softmax(s·z_t)[y_t]``. The training
objective is the masked token mean over the **global** batch: ``Σ_t ℓ_t / N`` with ``N`` the
number of labelled tokens over every micro-batch and data-parallel rank of the step, so micro-
batch 1 × accumulation 8 equals micro-batch 8 × accumulation 1 and the result does not depend on
how tokens are spread over ranks. (NeMo-Aligner averages per micro-batch instead.)

`KDStep` has the shape of ``align_core.algorithms.contract.AlgorithmStep`` (build a model batch, the
global normaliser, the loss function, the logged metrics), so align-core's trainer loop runs it.
Model batches carry the teacher's top-k aligned with the label positions:

- ``teacher_logits [B, T, K]`` (float32, descending), ``teacher_ids [B, T, K]`` (int64),
  ``teacher_logsumexp [B, T]`` (float32): from a teacher store (offline) or added by
  `align_kd.online.OnlineTeacher` (online). ``T`` may be shorter than the padded sequence
  length; the loss pads them (positions beyond ``T`` carry no label).

Metrics are sums over the micro-batch, reduced over the global batch and divided by the number
of labelled tokens in `KDStep.finalize_metrics`: ``loss``, ``kd_loss``, ``sft_loss`` and
``top1_agreement`` (the fraction of labelled positions where the student's most likely token is
the teacher's; not with ``cross_tokenizer``, whose ids live in different vocabularies).
Training batches of on-policy runs (`align_kd.on_policy`) also carry ``on_policy`` and
``generated_tokens`` per row, reported as ``on_policy`` (the share of the step's examples the
student generated: 1 or 0) and ``generated_length_mean`` (mean sample length, on-policy steps
only).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from align_core.logprobs import mask_padded_vocab_
from align_data import (
    IGNORE_INDEX,
    CollateConfig,
    DistillationBatch,
    SFTBatch,
    SFTExample,
    TeacherSample,
    collate_distillation,
    collate_sft,
)
from align_kd.config import KnowledgeDistillationConfig
from align_kd.forward import vocab_start_of
from align_kd.topk import vocab_parallel_argmax
from align_losses import token_logps, topk_kd_loss

__all__ = [
    "TEACHER_KEYS",
    "KDExample",
    "KDStep",
    "check_vocabularies",
    "kd_loss_and_metrics",
    "kd_model_batch",
]

TEACHER_KEYS = ("teacher_logits", "teacher_ids", "teacher_logsumexp")
"""Model-batch keys holding the teacher's top-k."""

ModelBatch = dict[str, Tensor]


class KDExample(NamedTuple):
    """A tokenized example and the teacher's top-k at its input positions (offline mode).

    Attributes:
        example: The student's tokenized prompt and completion.
        teacher: The teacher's stored top-k for the same sample.
    """

    example: SFTExample
    teacher: TeacherSample


def check_vocabularies(
    *, teacher_vocab_size: int | None, student_vocab_size: int, cross_tokenizer: bool
) -> None:
    """Refuse a teacher/student pair whose vocabularies differ unless ``cross_tokenizer`` is set.

    Args:
        teacher_vocab_size: The teacher's real vocabulary size, or None when unknown (imported
            stores); ids are then checked per batch.
        student_vocab_size: The student's real vocabulary size.
        cross_tokenizer: ``model.knowledge_distillation.cross_tokenizer``.

    Raises:
        ValueError: When the sizes differ and ``cross_tokenizer`` is False.
    """
    if cross_tokenizer or teacher_vocab_size is None:
        return
    if teacher_vocab_size != student_vocab_size:
        raise ValueError(
            f"the teacher's vocabulary has {teacher_vocab_size} tokens and the student's "
            f"{student_vocab_size}: token ids cannot be matched. Set "
            "model.knowledge_distillation.cross_tokenizer=true to pair the teacher's and the "
            "student's top-k by rank instead"
        )


def _segment_ids(labels: Tensor) -> Tensor:
    rows = torch.arange(labels.shape[0], device=labels.device).unsqueeze(1).expand_as(labels)
    return torch.where(labels != IGNORE_INDEX, rows, torch.full_like(rows, -1))


def kd_model_batch(batch: SFTBatch | DistillationBatch) -> ModelBatch:
    """The model batch of a collated SFT batch (online) or distillation batch (offline).

    Returns:
        ``tokens``, ``labels``, ``position_ids``, ``lengths``, ``segment_ids``,
        ``seq_token_counts``, ``sample_index`` and, for a `DistillationBatch`, the
        `TEACHER_KEYS`.
    """
    out: ModelBatch = {
        "tokens": batch.input_ids,
        "labels": batch.labels,
        "position_ids": batch.position_ids,
        "lengths": batch.lengths,
        "segment_ids": _segment_ids(batch.labels),
        "seq_token_counts": (batch.labels != IGNORE_INDEX).sum(-1).float(),
        "sample_index": batch.sample_indices,
    }
    if isinstance(batch, DistillationBatch):
        out["teacher_logits"] = batch.teacher_logits
        out["teacher_ids"] = batch.teacher_ids
        out["teacher_logsumexp"] = batch.teacher_logsumexp
    return out


def _fit_length(x: Tensor, length: int, value: float) -> Tensor:
    extra = length - x.shape[1]
    if extra == 0:
        return x
    if extra < 0:
        return x[:, :length]
    pad = [0, 0] * (x.dim() - 2) + [0, extra]
    return torch.nn.functional.pad(x, pad, value=value)


def _teacher_inputs(
    batch: Mapping[str, Tensor], top_k: int, length: int, mask: Tensor, device: torch.device
) -> tuple[Tensor, Tensor, Tensor]:
    logits = _fit_length(batch["teacher_logits"][..., :top_k], length, 0.0)
    ids = _fit_length(batch["teacher_ids"][..., :top_k], length, 0)
    lse = _fit_length(batch["teacher_logsumexp"], length, 0.0)
    logits, ids, lse = logits.to(device).float(), ids.to(device).long(), lse.to(device).float()
    # Positions without a label carry zeros (padding): give them a proper distribution (half the
    # mass on the top-k, half in the tail) so nothing non-finite flows back through them.
    filler = torch.logsumexp(logits, dim=-1) + math.log(2.0)
    return logits, ids, torch.where(mask, lse, filler)


def kd_loss_and_metrics(
    config: KnowledgeDistillationConfig,
    normalizer: Tensor,
    batch: Mapping[str, Tensor],
    logits: Tensor,
    *,
    vocab_size: int,
    group: dist.ProcessGroup | None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Loss of one micro-batch under the `align_core.schedule` loss contract.

    Args:
        config: The distillation knobs.
        normalizer: Labelled tokens in the global batch (`KDStep.normalizer`).
        batch: The model batch (``labels`` and the `TEACHER_KEYS`).
        logits: ``[B, S, V_local]`` this rank's vocabulary slice of the student logits; padded
            vocabulary entries (ids ``>= vocab_size``) are masked in place.
        vocab_size: The student's real vocabulary size.
        group: The student's tensor-parallel group (None when unsplit).

    Returns:
        ``Σ ℓ_t / normalizer`` and detached metric sums (``loss``, ``kd_loss``, ``sft_loss``,
        ``tokens``, and ``top1_agree`` unless ``cross_tokenizer``).

    Raises:
        ValueError: When ``config.top_k`` exceeds the teacher's k.
    """
    labels = batch["labels"].to(logits.device)
    mask = labels != IGNORE_INDEX
    start = vocab_start_of(logits, group)
    mask_padded_vocab_(logits, vocab_size=vocab_size, vocab_start=start)
    k = config.effective_top_k(batch["teacher_logits"].shape[-1])
    t_logits, t_ids, t_lse = _teacher_inputs(batch, k, labels.shape[1], mask, logits.device)

    kd = topk_kd_loss(
        logits,
        t_logits,
        t_ids,
        divergence=config.divergence,  # type: ignore[arg-type]
        **config.divergence_options,
        student_scale=config.logits_scale,
        teacher_scale=config.target_logits_scale,
        teacher_logsumexp=t_lse if config.tail else None,
        cross_tokenizer=config.cross_tokenizer,
        group=group,
        vocab_start=start,
    )
    train_sft = config.sft_loss_weight > 0
    with torch.set_grad_enabled(train_sft and torch.is_grad_enabled()):
        scaled = logits if config.logits_scale == 1.0 else logits * config.logits_scale
        nll = -token_logps(scaled, labels, group=group, vocab_start=start)
    total = config.kd_loss_weight * kd
    if train_sft:
        total = total + config.sft_loss_weight * nll
    zero = torch.zeros((), dtype=kd.dtype, device=kd.device)
    total_sum = torch.where(mask, total, zero).sum()
    metrics = {
        "loss": total_sum.detach(),
        "kd_loss": torch.where(mask, kd.detach(), zero).sum(),
        "sft_loss": torch.where(mask, nll.detach().to(kd.dtype), zero).sum(),
        "tokens": mask.sum().to(kd.dtype),
    }
    if "on_policy" in batch:
        metrics["examples"] = torch.tensor(float(labels.shape[0]), dtype=kd.dtype, device=kd.device)
        metrics["on_policy_examples"] = batch["on_policy"].to(kd.device, kd.dtype).sum()
        metrics["generated_tokens"] = batch["generated_tokens"].to(kd.device, kd.dtype).sum()
    if not config.cross_tokenizer:
        student_top1 = vocab_parallel_argmax(
            logits, group=group, vocab_start=start, vocab_size=vocab_size
        )
        metrics["top1_agree"] = ((student_top1 == t_ids[..., 0]) & mask).sum().to(kd.dtype)
    return total_sum / normalizer.to(total_sum.device), metrics


@dataclass(frozen=True)
class KDStep:
    """Distillation as an ``align_core.algorithms.contract.AlgorithmStep`` (see module docstring).

    Attributes:
        config: The distillation knobs.
        vocab_size: The student's real vocabulary size (its tokenizer's).
        data_group: Data-parallel group (labelled tokens are summed over it).
        tensor_group: The student's tensor-parallel group (vocabulary slices), None when unsplit.
        name: ``"kd"``.
        needs_reference: False.
        ref_shape: 0.
    """

    config: KnowledgeDistillationConfig
    vocab_size: int
    data_group: dist.ProcessGroup | None = field(default=None, compare=False)
    tensor_group: dist.ProcessGroup | None = field(default=None, compare=False)
    name: str = "kd"
    needs_reference: bool = False
    ref_shape: int = 0

    def build_packed_micro_batch(
        self, examples: Sequence[KDExample | SFTExample], collate: CollateConfig, capacity: int
    ) -> ModelBatch:
        """Distillation trains on padded rows only.

        Raises:
            ValueError: Always (``model.data.packing`` is refused for ``kd``).
        """
        raise ValueError("model.data.packing is not supported for distillation (kd)")

    def build_micro_batch(
        self, examples: Sequence[KDExample | SFTExample], collate: CollateConfig
    ) -> ModelBatch:
        """Collate examples into one padded model batch.

        `KDExample` s (offline) bring the teacher's top-k; plain SFT examples (online) get it
        from `align_kd.OnlineTeacher` later.

        Raises:
            ValueError: When a stored teacher id is outside the student's vocabulary without
                ``cross_tokenizer``, or the teacher saw other tokens than the student.
        """
        if examples and isinstance(examples[0], KDExample):
            kd_examples: Sequence[Any] = examples
            batch = collate_distillation(
                [e.example for e in kd_examples], [e.teacher for e in kd_examples], collate
            )
            if not self.config.cross_tokenizer:
                top = int(batch.teacher_ids.max())
                if top >= self.vocab_size:
                    raise ValueError(
                        f"the teacher store holds token id {top} but the student's vocabulary "
                        f"has {self.vocab_size} tokens; set "
                        "model.knowledge_distillation.cross_tokenizer=true if the vocabularies "
                        "differ"
                    )
            return kd_model_batch(batch)
        return kd_model_batch(collate_sft(examples, collate))  # type: ignore[arg-type]

    def normalizer(self, micro_batches: Sequence[ModelBatch], global_examples: int) -> Tensor:
        """Labelled tokens of the global batch (all micro-batches, all data-parallel ranks).

        Computed where the micro-batches are: the trainer has moved them to the model's device
        (`align_core.device`), which is where NCCL needs the all-reduced count.
        """
        tokens = torch.stack([(mb["labels"] != IGNORE_INDEX).sum() for mb in micro_batches])
        total = tokens.sum().double()
        if self.data_group is not None and self.data_group.size() > 1:
            dist.all_reduce(total, group=self.data_group)
        return total.clamp(min=1.0).float()

    def loss_fn(self, normalizer: Tensor) -> Any:
        """``(batch, logits) -> (loss, metric sums)`` with ``normalizer`` bound."""
        return functools.partial(
            kd_loss_and_metrics,
            self.config,
            normalizer,
            vocab_size=self.vocab_size,
            group=self.tensor_group,
        )

    def finalize_metrics(self, sums: Mapping[str, float]) -> dict[str, float]:
        """Token means over the global batch.

        Returns:
            ``loss``, ``kd_loss``, ``sft_loss`` and ``top1_agreement`` (when computed); on
            on-policy runs' training steps also ``on_policy`` and, when it is 1,
            ``generated_length_mean``.
        """
        tokens = max(sums.get("tokens", 0.0), 1.0)
        out = {key: sums[key] / tokens for key in ("loss", "kd_loss", "sft_loss") if key in sums}
        if "top1_agree" in sums:
            out["top1_agreement"] = sums["top1_agree"] / tokens
        if "on_policy_examples" in sums:
            generated = sums["on_policy_examples"]
            out["on_policy"] = generated / max(sums["examples"], 1.0)
            if generated > 0:
                out["generated_length_mean"] = sums["generated_tokens"] / generated
        return out

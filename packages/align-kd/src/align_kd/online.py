"""Online distillation: the teacher model lives in the same job, its top-k computed per step.

For users without disk for teacher shards. The teacher is loaded once, frozen (no gradients, eval
mode) and run forward-only through the same pipeline schedule and the same top-k function as the
offline teacher pass (`align_kd.teacher.teacher_topk_outputs`), on the student's own micro-
batches, so the loss and metrics are those of offline distillation over a store written from the
same teacher.

`OnlineTeacherData` wraps the trainer's batch source: every micro-batch it hands out carries the
teacher's top-k (on the last pipeline stage, the only one that computes the loss). Teacher and
student share the parallel layout (the same tensor/pipeline groups; their widths may differ).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from align_core.schedule import forward_backward
from align_kd.forward import logits_forward
from align_kd.step import TEACHER_KEYS
from align_kd.teacher import teacher_topk_outputs

__all__ = ["OnlineTeacher", "OnlineTeacherData", "freeze"]

ModelBatch = dict[str, Tensor]


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """Put ``model`` in eval mode with every parameter's ``requires_grad`` off; returns it."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class OnlineTeacher:
    """A frozen teacher that annotates micro-batches with its top-k.

    Args:
        model: This rank's teacher chunk (built with the student's parallel layout, weights
            loaded); frozen here.
        top_k: Tokens per position to compute.
        vocab_size: The teacher's real vocabulary size (padded ids never enter the top-k).
        group: The teacher's tensor-parallel group (`align_kd.tensor_group_of` of the model),
            None when unsplit.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        top_k: int,
        vocab_size: int,
        group: torch.distributed.ProcessGroup | None,
    ) -> None:
        self.model = freeze(model)
        self.top_k = top_k
        self.vocab_size = vocab_size
        self.group = group if group is not None and group.size() > 1 else None
        self._loss_fn = functools.partial(
            teacher_topk_outputs, top_k=top_k, vocab_size=vocab_size, group=self.group
        )

    def annotate(self, micro_batches: Sequence[ModelBatch]) -> list[ModelBatch]:
        """The micro-batches with ``teacher_logits/ids/logsumexp`` added (collective).

        Call on every rank with the same micro-batches; the teacher's top-k is attached on the
        last pipeline stage (other stages get the batches back unchanged).
        """
        self.model.eval()
        outputs = forward_backward(
            self.model, micro_batches, logits_forward, self._loss_fn, forward_only=True
        )
        if not outputs:
            return list(micro_batches)
        annotated = []
        for batch, out in zip(micro_batches, outputs, strict=True):
            batch = dict(batch)
            for key in TEACHER_KEYS:
                batch[key] = out[key]
            annotated.append(batch)
        return annotated


@dataclass
class OnlineTeacherData:
    """A trainer batch source whose micro-batches carry the online teacher's top-k.

    Attributes:
        inner: The plain source (``align_core.trainer.data.TrainData`` over SFT examples with a
            `align_kd.KDStep`).
        teacher: The online teacher.
    """

    inner: Any
    teacher: OnlineTeacher

    @property
    def train_samples(self) -> int:
        """Training examples per epoch."""
        return int(self.inner.train_samples)

    @property
    def global_batch_size(self) -> int:
        """Examples per optimizer step."""
        return int(self.inner.global_batch_size)

    @property
    def num_val_batches(self) -> int:
        """Validation global batches."""
        return int(self.inner.num_val_batches)

    def train_micro_batches(self, consumed_samples: int) -> list[ModelBatch]:
        """The inner source's micro-batches, annotated by the teacher."""
        return self.teacher.annotate(self.inner.train_micro_batches(consumed_samples))

    def val_micro_batches(self, index: int) -> list[ModelBatch]:
        """The inner source's validation micro-batches, annotated by the teacher."""
        return self.teacher.annotate(self.inner.val_micro_batches(index))

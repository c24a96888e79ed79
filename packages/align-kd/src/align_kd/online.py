"""Online distillation: the teacher model lives in the same job, its top-k computed per step.

For users without disk for teacher shards. The teacher is loaded once, frozen (no gradients, eval
mode) and run forward-only through the same pipeline schedule and the same top-k function as the
offline teacher pass (`align_kd.teacher.teacher_topk_outputs`), on the student's own micro-
batches, so the loss and metrics are those of offline distillation over a store written from the
same teacher.

The teacher's weights either stay on the device (a second resident model) or, with
``teacher.placement=host``, live in host memory between scoring passes (`HostWeights`): each
pass allocates the device storage, copies the weights in, scores, and frees it again, so the
student's backward pass and its on-policy generation run without the teacher's weights on the
device.

`OnlineTeacherData` wraps the trainer's batch source: every micro-batch it hands out carries the
teacher's top-k (on the last pipeline stage, the only one that computes the loss). Teacher and
student share the parallel layout (the same tensor/pipeline groups; their widths may differ).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from align_core.schedule import forward_backward
from align_kd.forward import logits_forward
from align_kd.step import TEACHER_KEYS
from align_kd.teacher import teacher_topk_outputs

__all__ = ["HostWeights", "OnlineTeacher", "OnlineTeacherData", "freeze"]

ModelBatch = dict[str, Tensor]


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """Put ``model`` in eval mode with every parameter's ``requires_grad`` off; returns it."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class HostWeights:
    """A frozen model's parameters held in host memory, on the device only while in use.

    At construction each parameter is copied to a host tensor (pinned when CUDA is present)
    and its device storage is released: the parameter keeps its shape, dtype and device, but
    its storage holds zero bytes, so the memory goes back to the device allocator. `on_device`
    re-allocates every storage, copies the weights in (``non_blocking`` from pinned memory, one
    host-to-device copy per parameter) and releases them again when the block ends. Buffers
    (e.g. rotary frequencies) stay on the device; they are small and never trained.

    The parameters must be distinct tensors, each the whole of its own storage (true of
    megatron-core's parameters); views sharing a storage are refused, since releasing one
    would release the others.

    Args:
        model: The frozen model whose parameters to move (its weights are read once, now).

    Raises:
        ValueError: A parameter shares or only partly covers its storage.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self._params = list(model.parameters())  # deduplicated: tied weights appear once
        seen: dict[int, str] = {}
        for name, p in model.named_parameters():
            storage = p.untyped_storage()
            if storage.data_ptr() in seen:
                problem = f"shares its storage with {seen[storage.data_ptr()]}"
            elif storage.nbytes() != p.numel() * p.element_size():
                problem = "is a view into a larger storage"
            else:
                seen[storage.data_ptr()] = name
                continue
            raise ValueError(
                f"teacher.placement=host: parameter {name} {problem}; host placement needs each "
                "parameter to own its whole storage"
            )
        pin = torch.cuda.is_available()
        self._host = [
            torch.empty(p.shape, dtype=p.dtype, device="cpu", pin_memory=pin).copy_(p.detach())
            for p in self._params
        ]
        self._release()

    @property
    def host_bytes(self) -> int:
        """Host memory holding the weights."""
        return sum(t.numel() * t.element_size() for t in self._host)

    @property
    def device_bytes(self) -> int:
        """Bytes the parameters' storages hold now (0 outside `on_device`)."""
        return sum(p.untyped_storage().nbytes() for p in self._params)

    def _release(self) -> None:
        for p in self._params:
            p.untyped_storage().resize_(0)

    @contextlib.contextmanager
    def on_device(self) -> Iterator[None]:
        """Context in which the parameters hold the weights on their device."""
        with torch.no_grad():
            for p, host in zip(self._params, self._host, strict=True):
                p.untyped_storage().resize_(host.numel() * host.element_size())
                p.detach().copy_(host, non_blocking=True)
        try:
            yield
        finally:
            self._release()


class OnlineTeacher:
    """A frozen teacher that annotates micro-batches with its top-k.

    Args:
        model: This rank's teacher chunk (built with the student's parallel layout, weights
            loaded); frozen here.
        top_k: Tokens per position to compute.
        vocab_size: The teacher's real vocabulary size (padded ids never enter the top-k).
        group: The teacher's tensor-parallel group (`align_kd.tensor_group_of` of the model),
            None when unsplit.
        on_host: Keep the weights in host memory between passes (`HostWeights`;
            ``teacher.placement=host``); False keeps them on the device.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        top_k: int,
        vocab_size: int,
        group: torch.distributed.ProcessGroup | None,
        on_host: bool = False,
    ) -> None:
        self.model = freeze(model)
        self.host_weights = HostWeights(model) if on_host else None
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
        placed = self.host_weights.on_device() if self.host_weights else contextlib.nullcontext()
        with placed:
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

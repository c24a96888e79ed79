"""The reference policy π_ref of DPO-family and KTO training: one protocol, four strategies.

Every strategy answers the same question: the reference's per-sequence *summed* log-probs of
the sequences in a list of model batches (see `align_core.algorithms._common`), on the last
pipeline stage. They differ in where the reference weights live:

============  ====================================================================  =============
strategy      how                                                                   use it for
============  ====================================================================  =============
swap          reference weights in (pinned, with CUDA) CPU memory; around each      full fine-
              reference pass the live policy weights are copied out once into a     tuning,
              preallocated buffer, the reference weights in once, and the policy    memory-bound
              weights back once, with non-blocking copies, under try/finally
adapters      the policy with its LoRA adapters disabled                            LoRA
precompute    one forward pass over the data before training; log-probs cached     offline DPO/
              on disk (align-data's fingerprinted array store, keyed by the         KTO: zero
              reference weights and the data) and read per step                     cost per step
model         a second, frozen copy of the model in device memory                   memory to
                                                                                    spare
============  ====================================================================  =============

`resolve_strategy` implements ``ReferenceConfig.strategy="auto"``: ``adapters`` with LoRA,
otherwise ``precompute``. An explicitly requested strategy that cannot apply raises; nothing ever
falls back silently to another strategy.

All online strategies (swap, adapters, model) run the reference forward through the same
micro-batches and code path as the policy forward, so at step 0 policy and reference log-probs
are bitwise equal and the DPO loss is exactly ln 2. ``precompute`` runs its pass over the same
micro-batches the first epoch will use, with the same result.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from align_core.algorithms._common import ModelBatch, segment_sums, upcast
from align_core.model import unwrap_model
from align_core.schedule import ForwardFn, forward_backward

if TYPE_CHECKING:
    from align_data import ArrayStore

__all__ = [
    "AdapterReference",
    "ModelReference",
    "PrecomputedReference",
    "ReferencePolicy",
    "Strategy",
    "SwapReference",
    "model_fingerprint",
    "precompute_reference",
    "reference_forward",
    "resolve_strategy",
]

Strategy = Literal["swap", "adapters", "precompute", "model"]


@runtime_checkable
class ReferencePolicy(Protocol):
    """Reference log-probs for the trainer.

    Attributes:
        strategy: Which strategy this is.
    """

    strategy: Strategy

    def logps(self, micro_batches: Sequence[ModelBatch], *, split: str) -> list[Tensor]:
        """Reference per-sequence summed log-probs of each micro-batch.

        Called on every rank (collectives inside); results are meaningful on the last pipeline
        stage (empty tensors elsewhere).

        Args:
            micro_batches: This rank's model batches of one global batch.
            split: ``"train"`` or ``"val"`` (which cache to read, for ``precompute``).

        Returns:
            One float32 tensor ``[N_i]`` per micro-batch.
        """
        ...

    def state(self) -> dict[str, str]:
        """What a checkpoint records to check, on resume, that the reference is the same."""
        ...


def resolve_strategy(
    requested: Literal["auto", "swap", "adapters", "precompute", "model"],
    *,
    lora: bool,
    precompute_possible: bool = True,
) -> Strategy:
    """Resolve ``ReferenceConfig.strategy``.

    ``auto`` is ``adapters`` with LoRA, else ``precompute`` (offline data, where the
    reference log-probs of every example can be computed once). An explicit strategy that
    cannot apply raises.

    Args:
        requested: The configured strategy.
        lora: Whether the policy trains LoRA adapters.
        precompute_possible: False when the data cannot be enumerated before training.

    Returns:
        The strategy to build.

    Raises:
        ValueError: ``adapters`` without LoRA; ``precompute`` where it is impossible.
    """
    if requested == "auto":
        if lora:
            return "adapters"
        if not precompute_possible:
            raise ValueError(
                "model.reference.strategy=auto: precompute is not possible here and no other "
                "strategy is chosen implicitly; set swap or model explicitly"
            )
        return "precompute"
    if requested == "adapters" and not lora:
        raise ValueError(
            "model.reference.strategy=adapters needs LoRA (model.peft.peft_scheme=lora); "
            "for full fine-tuning use swap, precompute or model"
        )
    if requested == "precompute" and not precompute_possible:
        raise ValueError("model.reference.strategy=precompute is not possible for this run")
    if requested not in ("swap", "adapters", "precompute", "model"):
        raise ValueError(f"model.reference.strategy: unknown strategy {requested!r}")
    return requested


def _sequence_logps_loss(batch: Mapping[str, Tensor], token_logps: Tensor):
    n = batch["seq_token_counts"].numel()
    return None, {"ref_logps": segment_sums(upcast(token_logps), batch["segment_ids"], n)}


def _merge(micro_batches: Sequence[ModelBatch], keys: Sequence[str]) -> ModelBatch:
    """Concatenate equal-length model batches into one (segment ids offset)."""
    merged: ModelBatch = {}
    offset = 0
    segs = []
    for mb in micro_batches:
        seg = mb["segment_ids"]
        segs.append(torch.where(seg >= 0, seg + offset, seg))
        offset += mb["seq_token_counts"].numel()
    merged["segment_ids"] = torch.cat(segs)
    for key in keys:
        if key == "attention_mask" and micro_batches[0][key].shape[0] == 1:
            merged[key] = micro_batches[0][key]
        else:
            merged[key] = torch.cat([mb[key] for mb in micro_batches])
    return merged


def reference_forward(
    model: torch.nn.Module,
    micro_batches: Sequence[ModelBatch],
    forward_fn: ForwardFn,
    *,
    merge: int = 1,
) -> list[Tensor]:
    """Forward-only pass giving per-sequence summed log-probs of each micro-batch.

    Runs in eval mode (dropout off) and restores the module's mode afterwards.

    Args:
        model: The model (chunk) to run.
        micro_batches: Model batches.
        forward_fn: ``(model, batch) -> token log-probs`` on the last stage.
        merge: Run this many micro-batches per forward (``log_prob_forward_micro_batch_size``
            larger than the training micro-batch); 1 uses the training micro-batches as they are.

    Returns:
        ``[N_i]`` float32 per micro-batch on the last pipeline stage; empty tensors elsewhere.
    """
    if merge > 1:
        keys = [
            k
            for k in ("tokens", "labels", "position_ids", "attention_mask")
            if k in micro_batches[0]
        ]
        keys.append("seq_token_counts")
        groups = [micro_batches[i : i + merge] for i in range(0, len(micro_batches), merge)]
        batches = [_merge(g, keys) for g in groups]
    else:
        groups = [[mb] for mb in micro_batches]
        batches = list(micro_batches)
    training = model.training
    model.eval()
    try:
        outputs = forward_backward(
            model, batches, forward_fn, _sequence_logps_loss, forward_only=True
        )
    finally:
        model.train(training)
    if not outputs:
        return [torch.empty(0) for _ in micro_batches]
    result: list[Tensor] = []
    for group, out in zip(groups, outputs, strict=True):
        sizes = [mb["seq_token_counts"].numel() for mb in group]
        result.extend(torch.split(out["ref_logps"], sizes))
    return result


def _parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return list(unwrap_model(model).named_parameters())


def model_fingerprint(model: torch.nn.Module, *, group: dist.ProcessGroup | None = None) -> str:
    """A hash of the model's weights over all ranks of ``group`` (and of the layout).

    Each rank hashes the bytes of its parameter shards; the hashes are gathered in rank order.

    Args:
        model: The model (chunk).
        group: Ranks holding the model's shards (the world); None: this process only.

    Returns:
        A hex digest.
    """
    h = hashlib.blake2b(digest_size=16)
    for name, p in _parameters(model):
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
        h.update(p.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    local = h.hexdigest()
    if group is None or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return local
    digests: list[str | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(digests, local, group=group)
    return hashlib.blake2b("".join(map(str, digests)).encode(), digest_size=16).hexdigest()


class SwapReference:
    """Reference weights kept on the host and swapped into the live model per reference pass.

    The reference (initial) weights are copied to host memory once, pinned when CUDA is
    present. Each reference pass makes **one host-to-device copy** of them into the live
    parameters, runs the forward, and puts the policy weights back in a ``finally`` block. The
    policy weights are parked meanwhile:

    - on the device, in the parameter's megatron-DDP gradient buffer (``main_grad``, same shape,
      float32 or the parameter's dtype): between ``zero_grad_buffer`` and the backward pass, and
      between steps, that buffer holds nothing needed, so parking costs two device-local copies
      and no host traffic; the buffer is zeroed again afterwards;
    - otherwise (a model not wrapped in megatron DDP) in a second host buffer allocated once:
      one device-to-host copy out and one host-to-device copy back.

    All copies are ``non_blocking`` on the current stream (stream order keeps them correct);
    nothing is allocated per pass; optimizer state and fp32 master weights are not touched.
    NeMo-Aligner's ``cpu_weight_swap`` instead snapshots the live weights into a fresh,
    unpinned CPU copy and loads two full state dicts per pass.
    """

    strategy: Strategy = "swap"

    def __init__(self, model: torch.nn.Module, forward_fn: ForwardFn, *, merge: int = 1) -> None:
        """Snapshot ``model``'s current weights as the reference.

        Args:
            model: The policy (chunk), holding the initial weights now.
            forward_fn: Per-micro-batch forward returning token log-probs.
            merge: Micro-batches per reference forward.
        """
        self._model = model
        self._forward_fn = forward_fn
        self._merge = merge
        self._params = [p for _, p in _parameters(model)]
        self._pin = torch.cuda.is_available()
        self._reference = [self._host_like(p).copy_(p.detach()) for p in self._params]
        self._host_stash: dict[int, Tensor] = {}
        self._fingerprint = model_fingerprint(model)

    def _host_like(self, p: Tensor) -> Tensor:
        return torch.empty(p.shape, dtype=p.dtype, device="cpu", pin_memory=self._pin)

    @staticmethod
    def _device_stash(p: Tensor) -> Tensor | None:
        grad = getattr(p, "main_grad", None)
        if grad is None or grad.shape != p.shape or grad.device != p.device:
            return None
        return grad if grad.dtype in (torch.float32, p.dtype) else None

    def _stash(self, i: int, p: Tensor) -> tuple[Tensor, bool]:
        device = self._device_stash(p)
        if device is not None:
            return device, True
        if i not in self._host_stash:
            self._host_stash[i] = self._host_like(p)
        return self._host_stash[i], False

    @property
    def host_bytes(self) -> int:
        """Host memory held: the reference weights plus any host stash."""
        tensors = [*self._reference, *self._host_stash.values()]
        return sum(t.numel() * t.element_size() for t in tensors)

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """Context in which the live model holds the reference weights."""
        stashes = [self._stash(i, p) for i, p in enumerate(self._params)]
        with torch.no_grad():
            for p, (stash, _) in zip(self._params, stashes, strict=True):
                stash.copy_(p.detach(), non_blocking=True)
            for p, r in zip(self._params, self._reference, strict=True):
                p.detach().copy_(r, non_blocking=True)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, (stash, on_device) in zip(self._params, stashes, strict=True):
                    p.detach().copy_(stash, non_blocking=True)
                    if on_device:
                        stash.zero_()

    def logps(self, micro_batches: Sequence[ModelBatch], *, split: str) -> list[Tensor]:
        """Reference log-probs with the reference weights swapped in."""
        with self.swapped_in():
            return reference_forward(
                self._model, micro_batches, self._forward_fn, merge=self._merge
            )

    def state(self) -> dict[str, str]:
        """Strategy and reference-weight fingerprint (this rank's shard)."""
        return {"strategy": self.strategy, "fingerprint": self._fingerprint}


class ModelReference:
    """A second, frozen copy of the model (no gradients, eval mode) in device memory."""

    strategy: Strategy = "model"

    def __init__(
        self,
        reference_model: torch.nn.Module,
        forward_fn: ForwardFn,
        *,
        merge: int = 1,
    ) -> None:
        """Use ``reference_model`` (already holding the reference weights) as π_ref.

        Args:
            reference_model: A model of the same architecture and layout as the policy, not
                wrapped in DDP; its parameters are frozen here.
            forward_fn: Per-micro-batch forward returning token log-probs.
            merge: Micro-batches per reference forward.
        """
        for p in reference_model.parameters():
            p.requires_grad_(False)
        self._model = reference_model.eval()
        self._forward_fn = forward_fn
        self._merge = merge
        self._fingerprint = model_fingerprint(reference_model)

    def logps(self, micro_batches: Sequence[ModelBatch], *, split: str) -> list[Tensor]:
        """Reference log-probs from the frozen copy."""
        return reference_forward(self._model, micro_batches, self._forward_fn, merge=self._merge)

    def state(self) -> dict[str, str]:
        """Strategy and reference-weight fingerprint (this rank's shard)."""
        return {"strategy": self.strategy, "fingerprint": self._fingerprint}


class AdapterReference:
    """The policy with its LoRA adapters disabled (the base model) as π_ref."""

    strategy: Strategy = "adapters"

    def __init__(
        self,
        model: torch.nn.Module,
        forward_fn: ForwardFn,
        adapters_disabled: Callable[[torch.nn.Module], contextlib.AbstractContextManager],
        *,
        merge: int = 1,
    ) -> None:
        """Use ``model`` without adapters as π_ref.

        Args:
            model: The LoRA policy.
            forward_fn: Per-micro-batch forward returning token log-probs.
            adapters_disabled: Context-manager factory that disables the adapters of a model
                (``align_core.lora``'s).
            merge: Micro-batches per reference forward.
        """
        self._model = model
        self._forward_fn = forward_fn
        self._disabled = adapters_disabled
        self._merge = merge
        self._fingerprint = model_fingerprint(model)

    def logps(self, micro_batches: Sequence[ModelBatch], *, split: str) -> list[Tensor]:
        """Reference log-probs with the adapters disabled (re-enabled in a ``finally``)."""
        with self._disabled(self._model):
            return reference_forward(
                self._model, micro_batches, self._forward_fn, merge=self._merge
            )

    def state(self) -> dict[str, str]:
        """Strategy (the base weights are frozen, so nothing else can differ)."""
        return {"strategy": self.strategy, "fingerprint": self._fingerprint}


class PrecomputedReference:
    """Reference log-probs read from an on-disk cache filled before training.

    The cache is align-data's `ArrayStore` per split, one row ``[2]`` per cache row (the
    reference sums of sequences ``i`` and ``b + i`` of the example's micro-batch: chosen and
    rejected, or a KTO sample and its KL sample), keyed by a fingerprint of the reference
    weights, the data and the batch layout, so a different model or dataset can never read
    stale values. Model batches name their rows in ``cache_rows``.
    """

    strategy: Strategy = "precompute"

    def __init__(self, stores: Mapping[str, ArrayStore], fingerprint: str) -> None:
        """Read from ``stores`` (``"train"``/``"val"``), filled by `precompute_reference`."""
        self._stores = dict(stores)
        self._fingerprint = fingerprint

    def logps(self, micro_batches: Sequence[ModelBatch], *, split: str) -> list[Tensor]:
        """Rows of the micro-batches' examples, laid out as ``[first halves, second halves]``."""
        store = self._stores[split]
        out = []
        for mb in micro_batches:
            rows = store.read(mb["cache_rows"]).to(torch.float32)
            out.append(torch.cat([rows[:, 0], rows[:, 1]]).to(mb["tokens"].device))
        return out

    def state(self) -> dict[str, str]:
        """Strategy and cache fingerprint."""
        return {"strategy": self.strategy, "fingerprint": self._fingerprint}


def precompute_reference(
    model: torch.nn.Module,
    forward_fn: ForwardFn,
    *,
    root: str | Path,
    key: Mapping[str, object],
    splits: Mapping[str, tuple[int, Callable[[], Iterator[list[ModelBatch]]]]],
    writer: bool,
    merge: int = 1,
    progress: bool = False,
    status: Callable[[str], None] | None = None,
    steps: Mapping[str, int] | None = None,
) -> PrecomputedReference:
    """Fill (or reuse) the reference cache with one forward pass of ``model`` over the data.

    Call it on every rank while ``model`` still holds the reference (initial) weights, with the
    same batch sequence the run will train on: the cached values are then bitwise those an
    online reference would compute. Rows already in the cache (an earlier, possibly interrupted
    run with the same key) are not recomputed. Each epoch of batches is an "all rows seen once"
    unit: the filled set is refreshed from disk between epochs, so a row is computed once.

    Args:
        model: The policy chunk holding the reference weights.
        forward_fn: Per-micro-batch forward returning token log-probs.
        root: Cache directory.
        key: What the values depend on (reference fingerprint, data, layout); JSON-able.
        splits: ``split -> (number of rows, factory of an iterator over epochs)``; each epoch is
            an iterator of this rank's per-step micro-batch lists.
        writer: Whether this rank writes (last pipeline stage, tensor-parallel rank 0).
        merge: Micro-batches per forward.
        progress: Print this rank's progress to stderr (`align_data.ProgressPrinter`), once a
            split has rows to compute; give it on one rank only.
        status: Told once, before the first step is computed (not when the cache is full).
        steps: Steps each split's epochs hold in all (the progress total; unknown without).

    Returns:
        The reference reading from the filled cache.
    """
    from align_data import ProgressPrinter

    stores: dict[str, ArrayStore] = {}
    announced = False
    fingerprint = hashlib.blake2b(repr(sorted(key.items())).encode(), digest_size=16).hexdigest()
    for split, (num_rows, epochs) in splits.items():
        store = _open_store(root, {**key, "split": split}, num_rows)
        printer: ProgressPrinter | None = None
        seen = 0
        for epoch in epochs():
            filled = np.ones(num_rows, dtype=bool)
            filled[store.missing()] = False
            for micro_batches in epoch:
                seen += 1
                if printer is not None:
                    printer.update(1)
                rows = torch.cat([mb["cache_rows"] for mb in micro_batches]).numpy()
                if filled[rows].all():
                    continue
                if printer is None:
                    if status is not None and not announced:
                        status(f"precomputing reference log-probs (cache: {root})")
                        announced = True
                    printer = ProgressPrinter(
                        (steps or {}).get(split, 0),
                        desc=f"reference log-probs ({split})",
                        unit="steps",
                        enabled=progress,
                    )
                    printer.done = seen  # steps already cached count as done, unprinted
                logps = reference_forward(model, micro_batches, forward_fn, merge=merge)
                for mb, lp in zip(micro_batches, logps, strict=True):
                    if writer:
                        b = lp.numel() // 2
                        store.write(mb["cache_rows"], torch.stack([lp[:b], lp[b:]], dim=1))
                filled[rows] = True
            store.flush()
            if dist.is_initialized():
                dist.barrier()
        if printer is not None:
            printer.close()
        stores[split] = store
    return PrecomputedReference(stores, fingerprint)


def _open_store(root: str | Path, key: Mapping[str, object], num_rows: int) -> ArrayStore:
    from align_data import ArrayStore

    def open_() -> ArrayStore:
        return ArrayStore.open(root, key=dict(key), num_samples=num_rows, shape=(2,))

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return open_()
    if dist.get_rank() == 0:
        store = open_()
        dist.barrier()
        return store
    dist.barrier()
    return open_()

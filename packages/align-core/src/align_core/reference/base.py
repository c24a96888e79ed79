"""What every reference strategy shares: the protocols, the reference forward, fingerprints.

`ReferencePolicy` is what the trainer asks of a reference; `RefreshableReference` adds what an
algorithm whose reference moves during training needs (SPIN's opponent, TR-DPO's reference):
`~RefreshableReference.refresh`, `~RefreshableReference.weights` and
`~RefreshableReference.checkpoint_state`. `reference_forward` is the forward-only pass every
online strategy runs; `resolve_strategy` implements ``strategy="auto"``.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Literal, Protocol, runtime_checkable

import torch
import torch.distributed as dist
from torch import Tensor

from align_core.algorithms._common import ModelBatch, pad_model_batch, segment_sums, upcast
from align_core.model import unwrap_model
from align_core.schedule import ForwardFn, forward_backward

__all__ = [
    "ReferencePolicy",
    "RefreshableReference",
    "Strategy",
    "check_alpha",
    "model_fingerprint",
    "named_parameters",
    "reference_forward",
    "resolve_strategy",
    "tensors_fingerprint",
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


@runtime_checkable
class RefreshableReference(ReferencePolicy, Protocol):
    """A reference whose weights can follow the policy during training (``swap``, ``model``).

    SPIN makes the trained policy the next iteration's opponent (``refresh()``); TR-DPO moves
    the reference towards the policy every step (``refresh(alpha)``) or replaces it every τ
    steps (``refresh()``). A refreshed reference is no longer the initial model, so a run saves
    it (`checkpoint_state`) with every checkpoint.
    """

    def refresh(self, alpha: float = 1.0) -> None:
        """Move the reference weights towards the policy's current weights.

        ``reference ← α·policy + (1 − α)·reference`` per parameter on this rank's shard
        (no collectives). ``alpha=1`` copies the policy's weights exactly; a soft update
        (``alpha < 1``) is computed in float32 (or the stored dtype, when wider) and rounded
        once to the stored dtype.

        Args:
            alpha: The policy's weight, in ``(0, 1]``.

        Raises:
            ValueError: ``alpha`` outside ``(0, 1]``.
        """
        ...

    def weights(self) -> contextlib.AbstractContextManager[torch.nn.Module]:
        """A context yielding a module (not DDP-wrapped) that holds the reference weights."""
        ...

    def checkpoint_state(self) -> torch.nn.Module | dict[str, Tensor]:
        """The reference weights as a checkpoint extra model (`align_core.checkpoint`).

        `Checkpointer.load` restores into what this returns, in place.
        """
        ...


def check_alpha(alpha: float) -> float:
    """``alpha`` as a float, checked to lie in ``(0, 1]``.

    Raises:
        ValueError: Outside ``(0, 1]`` (or NaN).
    """
    alpha = float(alpha)
    if not 0.0 < alpha <= 1.0:
        raise ValueError(
            f"refresh(alpha={alpha}): alpha is the policy's weight in the new reference and "
            "must be in (0, 1] (1: copy the policy)"
        )
    return alpha


def resolve_strategy(
    requested: Literal["auto", "swap", "adapters", "precompute", "model"],
    *,
    lora: bool,
    precompute_possible: bool = True,
    updated: bool = False,
) -> Strategy:
    """Resolve ``ReferenceConfig.strategy``.

    ``auto`` is ``adapters`` with LoRA, else ``precompute`` (offline data, where the
    reference log-probs of every example can be computed once). An explicit strategy that
    cannot apply raises.

    Args:
        requested: The configured strategy.
        lora: Whether the policy trains LoRA adapters.
        precompute_possible: False when the data cannot be enumerated before training.
        updated: The reference is updated during training (``update_alpha``): it must hold
            weights (``swap``, the choice of ``auto``, or ``model``).

    Returns:
        The strategy to build.

    Raises:
        ValueError: ``adapters`` without LoRA; ``precompute`` where it is impossible.
    """
    if updated:
        if requested == "auto":
            return "swap"
        if requested in ("adapters", "precompute"):
            raise ValueError(
                f"model.reference.update_alpha needs a reference that holds weights (swap or "
                f"model), not model.reference.strategy={requested}"
            )
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
    """Concatenate model batches into one (segment ids offset).

    Padded batches of different lengths are right-padded to the longest first (the padding
    is unscored and, attention being causal, changes no scored position); packed batches,
    which carry their own attention mask, must have one length.
    """
    length = max(mb["tokens"].shape[-1] for mb in micro_batches)
    if "attention_mask" not in keys:
        # The pad token is never scored or attended to by a scored position: any id serves.
        micro_batches = [pad_model_batch(mb, length, pad_id=0) for mb in micro_batches]
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


def named_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """``(name, parameter)`` of the model (chunk) inside any DDP wrapper, in module order."""
    return list(unwrap_model(model).named_parameters())


def tensors_fingerprint(named: Iterable[tuple[str, Tensor]]) -> str:
    """A hash of named tensors: each name, shape, dtype and the tensor's bytes, in order.

    Args:
        named: ``(name, tensor)`` pairs (on any device; device tensors are copied to the host).

    Returns:
        A hex digest.
    """
    h = hashlib.blake2b(digest_size=16)
    for name, t in named:
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def model_fingerprint(model: torch.nn.Module, *, group: dist.ProcessGroup | None = None) -> str:
    """A hash of the model's weights over all ranks of ``group`` (and of the layout).

    Each rank hashes the bytes of its parameter shards (`tensors_fingerprint`); the hashes are
    gathered in rank order.

    Args:
        model: The model (chunk).
        group: Ranks holding the model's shards (the world); None: this process only.

    Returns:
        A hex digest.
    """
    local = tensors_fingerprint(named_parameters(model))
    if group is None or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return local
    digests: list[str | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(digests, local, group=group)
    return hashlib.blake2b("".join(map(str, digests)).encode(), digest_size=16).hexdigest()

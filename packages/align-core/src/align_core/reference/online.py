"""The online reference strategies: weights swapped in, a second model, adapters disabled.

`SwapReference` and `ModelReference` hold weights of their own and can follow the policy
(`align_core.reference.RefreshableReference`: ``refresh``, ``weights``, ``checkpoint_state``);
`AdapterReference` is the policy's frozen base model and cannot. `refreshable_reference` builds
one of the first two holding the policy's current weights (SPIN's opponent, TR-DPO's
reference); `TrainOnlyReference` consults a reference for training batches only (SPIN, whose
validation loss is the SFT NLL).

Soft updates (``refresh(alpha)`` with ``alpha < 1``) are computed per parameter in float32 (or
the stored dtype where it is wider) from the stored reference and the live policy weights, then
rounded once to the stored dtype, which is the policy's: a bf16 reference keeps bf16's 8
mantissa bits, so a step ``α·(p − r)`` smaller than half a bf16 ulp of ``r`` rounds away.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Literal

import torch
from torch import Tensor

from align_core.algorithms._common import ModelBatch
from align_core.model import unwrap_model
from align_core.reference.base import (
    ReferencePolicy,
    Strategy,
    check_alpha,
    model_fingerprint,
    named_parameters,
    reference_forward,
    tensors_fingerprint,
)
from align_core.schedule import ForwardFn

__all__ = [
    "AdapterReference",
    "ModelReference",
    "SwapReference",
    "TrainOnlyReference",
    "refreshable_reference",
]


def _blend_(reference: Tensor, policy: Tensor, alpha: float) -> None:
    """``reference ← α·policy + (1 − α)·reference`` in place (``alpha`` checked by the caller).

    ``alpha == 1`` is an exact copy. Otherwise the blend is computed on ``policy``'s device in
    float32 (or ``reference``'s dtype when wider) and rounded once into ``reference``. Copies
    between devices are non-blocking; the caller synchronises before host reads.
    """
    if alpha == 1.0:
        reference.copy_(policy, non_blocking=True)
        return
    dtype = torch.promote_types(reference.dtype, torch.float32)
    work = reference.to(device=policy.device, dtype=dtype, non_blocking=True, copy=True)
    work.mul_(1.0 - alpha).add_(policy.to(dtype), alpha=alpha)
    reference.copy_(work, non_blocking=True)


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.current_stream().synchronize()


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

    `refresh` moves the host copy towards the live weights (one device-to-host copy per
    parameter for ``alpha=1``; a soft update also copies the reference to the device, one
    parameter at a time, to blend it there). `weights` is the same swap as a reference pass,
    for other uses of the reference weights (SPIN's opponent generating).
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
        named = named_parameters(model)
        self._names = [n for n, _ in named]
        self._params = [p for _, p in named]
        self._pin = torch.cuda.is_available()
        self._reference = [self._host_like(p).copy_(p.detach()) for p in self._params]
        self._host_stash: dict[int, Tensor] = {}
        self._fingerprint: str | None = None

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

    @contextlib.contextmanager
    def weights(self) -> Iterator[torch.nn.Module]:
        """The live policy (unwrapped) with the reference weights swapped in (`swapped_in`).

        The policy's own weights are put back in a ``finally`` block.
        """
        with self.swapped_in():
            yield unwrap_model(self._model)

    def refresh(self, alpha: float = 1.0) -> None:
        """Move the host reference towards the live weights (see `RefreshableReference`).

        Raises:
            ValueError: ``alpha`` outside ``(0, 1]``.
        """
        alpha = check_alpha(alpha)
        with torch.no_grad():
            for r, p in zip(self._reference, self._params, strict=True):
                _blend_(r, p.detach(), alpha)
        _synchronize()  # the host copy is read on the host (checkpoints, fingerprint)
        self._fingerprint = None

    def checkpoint_state(self) -> dict[str, Tensor]:
        """The reference as a state dict keyed like the policy's, for `Checkpointer` extras.

        The host reference tensors themselves (a load overwrites them in place) and the policy's
        own values of any other tensors (buffers, which training does not change).
        """
        self._fingerprint = None  # a checkpoint load may overwrite the host tensors
        out: dict[str, Tensor] = dict(zip(self._names, self._reference, strict=True))
        for key, value in unwrap_model(self._model).state_dict().items():
            if key not in out and isinstance(value, Tensor):
                out[key] = value.detach().clone()
        return out

    def logps(self, micro_batches: Sequence[ModelBatch], *, split: str) -> list[Tensor]:
        """Reference log-probs with the reference weights swapped in."""
        with self.swapped_in():
            return reference_forward(
                self._model, micro_batches, self._forward_fn, merge=self._merge
            )

    def state(self) -> dict[str, str]:
        """Strategy and reference-weight fingerprint (this rank's shard, of the host copy)."""
        if self._fingerprint is None:
            self._fingerprint = tensors_fingerprint(zip(self._names, self._reference, strict=True))
        return {"strategy": self.strategy, "fingerprint": self._fingerprint}


class ModelReference:
    """A second, frozen copy of the model (no gradients, eval mode) in device memory.

    Given the policy (``policy=``), `refresh` moves its weights towards the policy's, on the
    device (parameters by name; buffers, which training does not change, are copied).
    """

    strategy: Strategy = "model"

    def __init__(
        self,
        reference_model: torch.nn.Module,
        forward_fn: ForwardFn,
        *,
        merge: int = 1,
        policy: torch.nn.Module | None = None,
    ) -> None:
        """Use ``reference_model`` (already holding the reference weights) as π_ref.

        Args:
            reference_model: A model of the same architecture and layout as the policy, not
                wrapped in DDP; its parameters are frozen here.
            forward_fn: Per-micro-batch forward returning token log-probs.
            merge: Micro-batches per reference forward.
            policy: The policy (chunk, wrapped or not) that `refresh` copies from; None: the
                reference never changes.

        Raises:
            ValueError: ``policy``'s parameters differ in name or shape from the reference's.
        """
        for p in reference_model.parameters():
            p.requires_grad_(False)
        self._model = unwrap_model(reference_model).eval()
        self._forward_fn = forward_fn
        self._merge = merge
        self._policy = policy
        if policy is not None:
            mine = [(n, tuple(p.shape)) for n, p in named_parameters(self._model)]
            theirs = [(n, tuple(p.shape)) for n, p in named_parameters(policy)]
            if mine != theirs:
                raise ValueError(
                    "the reference model and the policy differ in parameter names or shapes; "
                    "build the reference like the policy (same architecture, layout, no LoRA)"
                )
        self._fingerprint: str | None = None

    @contextlib.contextmanager
    def weights(self) -> Iterator[torch.nn.Module]:
        """The reference model itself."""
        yield self._model

    def refresh(self, alpha: float = 1.0) -> None:
        """Move the reference model towards the policy (see `RefreshableReference`).

        Raises:
            RuntimeError: Built without ``policy``.
            ValueError: ``alpha`` outside ``(0, 1]``.
        """
        alpha = check_alpha(alpha)
        if self._policy is None:
            raise RuntimeError(
                "this ModelReference was built without policy=, so it cannot be refreshed"
            )
        policy = unwrap_model(self._policy)
        with torch.no_grad():
            for (_, r), (_, p) in zip(
                named_parameters(self._model), named_parameters(policy), strict=True
            ):
                _blend_(r.detach(), p.detach(), alpha)
            buffers = dict(policy.named_buffers())
            for name, b in self._model.named_buffers():
                source = buffers.get(name)
                if source is not None and source.shape == b.shape:
                    b.copy_(source)
        self._fingerprint = None

    def checkpoint_state(self) -> torch.nn.Module:
        """The reference model (a checkpoint load writes into it)."""
        self._fingerprint = None
        return self._model

    def logps(self, micro_batches: Sequence[ModelBatch], *, split: str) -> list[Tensor]:
        """Reference log-probs from the frozen copy."""
        return reference_forward(self._model, micro_batches, self._forward_fn, merge=self._merge)

    def state(self) -> dict[str, str]:
        """Strategy and reference-weight fingerprint (this rank's shard)."""
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(self._model)
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

    def refresh(self, alpha: float = 1.0) -> None:
        """Not possible: the reference is the policy's frozen base weights.

        Raises:
            NotImplementedError: Always.
        """
        raise NotImplementedError(
            "the adapters reference is the policy's frozen base model (LoRA adapters disabled) "
            "and cannot be refreshed; a reference that follows the policy (SPIN, TR-DPO) needs "
            "model.reference.strategy=swap or model"
        )

    def state(self) -> dict[str, str]:
        """Strategy (the base weights are frozen, so nothing else can differ)."""
        return {"strategy": self.strategy, "fingerprint": self._fingerprint}


class TrainOnlyReference:
    """A reference consulted for training batches only; other splits get zeros, no forward.

    For an algorithm whose validation loss does not read the reference: SPIN validates with
    the SFT NLL of held-out answers, so its validation batches need no opponent forward.

    Attributes:
        reference: The wrapped reference (refresh it, take its weights, save it, directly).
        strategy: The wrapped reference's strategy.
    """

    def __init__(self, reference: ReferencePolicy) -> None:
        """Wrap ``reference``."""
        self.reference = reference
        self.strategy: Strategy = reference.strategy

    def logps(self, micro_batches: Sequence[ModelBatch], *, split: str) -> list[Tensor]:
        """The reference's log-probs for ``"train"``; float32 zeros ``[N_i]`` otherwise."""
        if split != "train":
            return [torch.zeros(mb["seq_token_counts"].numel()) for mb in micro_batches]
        return self.reference.logps(micro_batches, split=split)

    def state(self) -> dict[str, str]:
        """The wrapped reference's state."""
        return self.reference.state()


def refreshable_reference(
    strategy: Literal["swap", "model"],
    policy: torch.nn.Module,
    forward_fn: ForwardFn,
    *,
    merge: int = 1,
    reference_model: torch.nn.Module | None = None,
) -> SwapReference | ModelReference:
    """A reference that holds ``policy``'s current weights now and can follow it later.

    Args:
        strategy: ``swap`` (host copy swapped in) or ``model`` (second device model).
        policy: This rank's policy chunk (unwrapped or DDP-wrapped).
        forward_fn: Per-micro-batch forward returning token log-probs.
        merge: Training micro-batches per reference forward.
        reference_model: For ``model``: a model of the policy's architecture and layout (its
            weights are overwritten with the policy's).

    Returns:
        The reference, equal to the policy.

    Raises:
        ValueError: Another strategy (``precompute`` and ``adapters`` cannot follow the
            policy), or ``model`` without ``reference_model``.
    """
    if strategy == "swap":
        return SwapReference(unwrap_model(policy), forward_fn, merge=merge)
    if strategy == "model":
        if reference_model is None:
            raise ValueError("the model strategy needs reference_model")
        reference = ModelReference(reference_model, forward_fn, merge=merge, policy=policy)
        reference.refresh()
        return reference
    raise ValueError(
        f"a reference that follows the policy must use strategy swap or model, got {strategy!r} "
        "(precompute caches fixed log-probs; adapters is the frozen base model)"
    )

"""Optimizer state out of device memory while it is not needed (SPIN's generation phase).

Adam keeps two moments per trained parameter and, for bf16/fp16 models, fp32 master weights:
12 bytes per parameter next to the model's 2, idle while SPIN generates its responses. Moving
them to host memory for that time leaves the KV cache and larger rollout batches the room.

`optimizer_state_offloaded` is the context manager the SPIN session wraps its rollouts in (a
no-op without CUDA); `offload_optimizer_state` / `restore_optimizer_state` are its two halves, which
take the device type to move from so the round trip is testable on CPU tensors.

What moves: every tensor in the state of each (chained) megatron optimizer's inner torch
optimizer (Adam moments, step counters held as tensors) and every optimizer parameter that does
not share storage with a model parameter (fp32 master weights, and the distributed optimizer's
fp32 main shards). What stays: the model's parameters and anything viewing their storage (the
fp32 optimizer's parameters *are* the model's; the distributed optimizer's fp32 shards are views
of megatron's parameter buffer), and the gradient buffers. megatron's own
``MegatronOptimizer.offload_to_cpu`` moves every optimizer parameter, the model's included, and
copies to pageable memory synchronously; this module does neither.

Parameters keep their identity (only ``.data`` is swapped), so the optimizer's parameter groups
and megatron's bookkeeping lists stay valid; state entries are replaced in their dicts.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "OffloadedState",
    "inner_optimizers",
    "offload_optimizer_state",
    "optimizer_state_offloaded",
    "restore_optimizer_state",
]


@dataclass
class OffloadedState:
    """What `offload_optimizer_state` moved, and where each tensor came from.

    Attributes:
        params: Optimizer parameters whose ``.data`` now lives on the host, with their device.
        states: ``(state dict, key, device)`` of each state entry now on the host.
    """

    params: list[tuple[Tensor, torch.device]] = field(default_factory=list)
    states: list[tuple[dict[str, Any], str, torch.device]] = field(default_factory=list)

    @property
    def num_bytes(self) -> int:
        """Bytes moved to the host."""
        tensors = [p.data for p, _ in self.params] + [s[k] for s, k, _ in self.states]
        return sum(t.numel() * t.element_size() for t in tensors)


def inner_optimizers(optimizer: Any) -> list[torch.optim.Optimizer]:
    """The torch optimizers inside a megatron optimizer (``ChainedOptimizer`` or single).

    A plain ``torch.optim.Optimizer`` is its own inner optimizer.
    """
    wrappers = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    inners = []
    for wrapper in wrappers:
        inner = wrapper if isinstance(wrapper, torch.optim.Optimizer) else None
        inner = getattr(wrapper, "optimizer", inner)
        if inner is not None:
            inners.append(inner)
    return inners


def _storage(t: Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _host_copy(t: Tensor, pin_memory: bool) -> Tensor:
    host = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=pin_memory)
    return host.copy_(t, non_blocking=pin_memory)


def _device_copy(t: Tensor, device: torch.device) -> Tensor:
    out = torch.empty(t.shape, dtype=t.dtype, device=device)
    return out.copy_(t, non_blocking=t.is_pinned())


def offload_optimizer_state(
    optimizer: Any,
    model: torch.nn.Module,
    *,
    source: str = "cuda",
    pin_memory: bool = False,
) -> OffloadedState:
    """Copy the optimizer's own tensors on ``source`` devices into new host tensors.

    The device tensors are released (nothing references them afterwards), so their memory goes
    back to the caching allocator. With ``pin_memory`` the copies are asynchronous: synchronise
    the device before reading them or freeing device memory for reuse by another stream.

    Args:
        optimizer: A megatron optimizer (``ChainedOptimizer`` or single) or a torch optimizer.
        model: The model; its parameters, and every tensor sharing their storage, stay.
        source: Device type whose tensors move (``"cuda"``; ``"cpu"`` copies host tensors into
            fresh host tensors, which is how the round trip is tested without a GPU).
        pin_memory: Allocate the host copies in page-locked memory (needs CUDA).

    Returns:
        The record `restore_optimizer_state` needs.
    """
    keep = {_storage(p) for p in model.parameters()}
    out = OffloadedState()
    for opt in inner_optimizers(optimizer):
        for group in opt.param_groups:
            for p in group["params"]:
                if p.device.type == source and _storage(p) not in keep:
                    out.params.append((p, p.device))
                    p.data = _host_copy(p.data, pin_memory)
        for state in opt.state.values():
            for key, value in state.items():
                if isinstance(value, Tensor) and value.device.type == source:
                    if _storage(value) in keep:
                        continue
                    out.states.append((state, key, value.device))
                    state[key] = _host_copy(value, pin_memory)
    return out


def restore_optimizer_state(offloaded: OffloadedState) -> None:
    """Copy what `offload_optimizer_state` moved back to the devices it came from.

    Each tensor gets new device memory holding exactly the offloaded bits; parameters keep their
    identity. Copies from pinned memory are asynchronous (stream-ordered before later work).

    Args:
        offloaded: The record of the offload.
    """
    for p, device in offloaded.params:
        p.data = _device_copy(p.data, device)
    for state, key, device in offloaded.states:
        state[key] = _device_copy(state[key], device)


@contextlib.contextmanager
def optimizer_state_offloaded(
    optimizer: Any, model: torch.nn.Module, *, enabled: bool = True
) -> Iterator[OffloadedState | None]:
    """Optimizer state in pinned host memory for the duration of the context (CUDA only).

    Moves (see the module docstring) on entry, frees the device memory to other users
    (``torch.cuda.empty_cache``), and restores on exit, also after an error. A no-op without
    CUDA or with ``enabled=False``.

    Args:
        optimizer: A megatron optimizer (``ChainedOptimizer`` or a single one).
        model: The model whose parameters must stay on the device.
        enabled: Whether to offload at all.

    Yields:
        The `OffloadedState` (None when nothing was done).
    """
    if not enabled or not torch.cuda.is_available():
        yield None
        return
    offloaded = offload_optimizer_state(optimizer, model, source="cuda", pin_memory=True)
    torch.cuda.synchronize()  # the host copies are complete; the device tensors are unused
    torch.cuda.empty_cache()
    try:
        yield offloaded
    finally:
        restore_optimizer_state(offloaded)
        torch.cuda.synchronize()

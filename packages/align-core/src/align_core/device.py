"""The device boundary: where host-built batches move to the model's device.

Batches are built on the host (align-data collates into CPU tensors; the reference cache and the
teacher stores are read on the host). They cross to the device in exactly one function,
`to_device`, which the code paths that compute with them call:

- `align_core.trainer.loop.Trainer` (``train_step`` and ``validate``): after the data source and
  the reference policy (which indexes host-side caches with host-side rows) and before the
  loss normaliser, so normalisers, losses and metric sums are device tensors, as NCCL
  collectives require;
- `align_core.schedule.forward_backward`: every micro-batch of every forward (policy, reference
  passes, the precompute pass, align-kd's teacher pass and online teacher), so a caller outside
  the trainer gets the same behaviour; a batch already on the device is not copied again.

On CUDA the host tensors are pinned and copied with ``non_blocking=True``, so the host goes on
building the next batch while the copy runs; the pinned copy belongs to `to_device`, so the
caller's tensors may be reused at once. Moving to the CPU (or between other devices) is a plain
synchronous copy.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, TypeVar, cast

import torch
from torch import Tensor

__all__ = ["module_device", "to_device"]

T = TypeVar("T")


def module_device(module: torch.nn.Module) -> torch.device:
    """The device of ``module``'s first parameter (or buffer); CPU for a module without either.

    Works through wrappers (megatron DDP, ``Float16Module``), whose parameters are the wrapped
    module's.
    """
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device("cpu")


def _move(tensor: Tensor, device: torch.device) -> Tensor:
    if tensor.device == device:
        return tensor
    if device.type == "cuda" and tensor.device.type == "cpu":
        # Page-locked memory lets the copy run asynchronously; the pinned copy is ours, so the
        # caller may overwrite its tensor right away.
        if not tensor.is_pinned():
            tensor = tensor.pin_memory()
        return tensor.to(device, non_blocking=True)
    return tensor.to(device)


def to_device(obj: T, device: torch.device | str | int) -> T:
    """``obj`` with every tensor it holds on ``device``.

    Walks dicts (and other mappings, returned as dicts of the same type when possible), lists,
    tuples, named tuples and dataclass instances; other values are returned unchanged. Tensors
    already on ``device`` are returned as they are (not copied). Pure apart from the copies: the
    input is never modified.

    Args:
        obj: A tensor, a model batch (``dict[str, Tensor]``), a list of them, an align-data batch
            dataclass, ...
        device: The target device (e.g. `module_device` of the model).

    Returns:
        The same structure on ``device``.
    """
    target = torch.device(device)
    if target.type == "cuda" and target.index is None:
        target = torch.device("cuda", torch.cuda.current_device())
    return _to(obj, target)


def _to(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, Tensor):
        return _move(obj, device)
    if isinstance(obj, Mapping):
        items = {key: _to(value, device) for key, value in obj.items()}
        if type(obj) is dict:
            return items
        rebuild = cast("Callable[..., Any]", type(obj))  # a Mapping class; most take a dict
        try:
            return rebuild(items)
        except TypeError:
            return items
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a NamedTuple
        return type(obj)(*(_to(value, device) for value in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to(value, device) for value in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        changes = {
            f.name: _to(getattr(obj, f.name), device) for f in dataclasses.fields(obj) if f.init
        }
        return dataclasses.replace(obj, **changes)
    return obj

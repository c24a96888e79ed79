"""Capture and restore every random-number generator a training step can touch.

Python's ``random``, NumPy's global generator, torch's CPU generator, every CUDA device's
generator (when CUDA is present) and megatron's model-parallel RNG tracker (the named states
dropout forks into; CPU states under `align_core.cpu_shims`).
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

__all__ = ["capture_rng_state", "restore_rng_state", "seed_all"]


def _tracker() -> Any:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    return get_cuda_rng_tracker()


def seed_all(seed: int) -> None:
    """Seed Python, NumPy, torch (CPU and CUDA) and megatron's tracker from one integer.

    megatron's tracker gets its usual per-tensor-parallel-rank offsets
    (``model_parallel_cuda_manual_seed``), so with ``use_cpu_initialization`` the same seed
    builds the same full weights at any TP size.
    """
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def capture_rng_state() -> dict[str, Any]:
    """A picklable snapshot of this process's RNG states (tensors cloned, on the CPU)."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": [s.cpu() for s in torch.cuda.get_rng_state_all()]
        if torch.cuda.is_available()
        else None,
    }
    tracker = _tracker()
    state["tracker"] = (
        {name: s.clone().cpu() for name, s in tracker.get_states().items()}
        if tracker is not None and tracker.is_initialized()
        else None
    )
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Restore a `capture_rng_state` snapshot.

    Raises:
        ValueError: When the snapshot has CUDA states but this process has no CUDA (or a
            different number of devices).
    """
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None:
        if not torch.cuda.is_available() or torch.cuda.device_count() != len(state["cuda"]):
            raise ValueError("the RNG snapshot holds CUDA states for a different set of devices")
        torch.cuda.set_rng_state_all(state["cuda"])
    if state["tracker"] is not None:
        # The tracker keeps generator states as CPU byte tensors (torch.cuda.get_rng_state's
        # format, or torch's CPU state under the CPU shims).
        _tracker().set_states(dict(state["tracker"]))

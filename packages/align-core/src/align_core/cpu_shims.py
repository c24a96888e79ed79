"""Shims that let megatron-core 0.16.1 run on a machine without CUDA.

Nothing here runs on import. `apply_cpu_shims()` is called explicitly by
`align_core.parallel.init_distributed` when `torch.cuda.is_available()` is False, and is a no-op
when CUDA is present or when it has already been applied. Each shim names the upstream call it
replaces. With CUDA present none of this is needed and none of it is installed.
"""

from __future__ import annotations

import contextlib
import importlib
import types
from collections.abc import Iterator
from typing import Any

import torch

__all__ = ["apply_cpu_shims", "cpu_shims_applied", "tensor_cuda_is_identity"]

_APPLIED = False

# Tensor factories that megatron calls with ``device="cuda"`` or ``torch.cuda.current_device()``.
_FACTORIES = ("zeros", "ones", "empty", "full", "tensor", "arange", "rand", "randn", "randint")

# megatron-core 0.16.1 modules that build tensors on a literal CUDA device (found by grepping for
# "cuda"): pipeline schedules (``total_num_tokens = torch.zeros(..., device="cuda")``), causal-mask
# helpers, gradient clipping, broadcast of data, optimizer and grad scaler bookkeeping tensors,
# gradient buffers and distributed-checkpoint exchange/saving.
_MODULES_WITH_CUDA_FACTORIES = (
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.utils",
    "megatron.core.transformer.utils",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.tensor_parallel.data",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.dist_checkpointing.exchange_utils",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.utils",
)


def _names_cuda(device: Any) -> bool:
    return device is not None and (isinstance(device, int) or str(device).startswith("cuda"))


class _CpuTorch(types.ModuleType):
    """Stands in for ``torch`` inside selected megatron modules; factories land on the CPU."""

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


def _cpu_torch() -> _CpuTorch:
    proxy = _CpuTorch("torch")
    for name in _FACTORIES:
        factory = getattr(torch, name)

        def on_cpu(*args: Any, _factory: Any = factory, **kwargs: Any) -> torch.Tensor:
            if _names_cuda(kwargs.get("device")):
                kwargs["device"] = "cpu"
            return _factory(*args, **kwargs)

        setattr(proxy, name, on_cpu)
    return proxy


class _NoStream:
    """A CUDA stream stand-in: every wait is already satisfied on the CPU."""

    def wait_event(self, *args: Any, **kwargs: Any) -> None:
        """Nothing to wait for."""

    def wait_stream(self, *args: Any, **kwargs: Any) -> None:
        """Nothing to wait for."""

    def synchronize(self) -> None:
        """Nothing to wait for."""


def _install_cpu_rng_tracker() -> None:
    """Replace megatron's CUDA RNG tracker (dropout forks, recompute) with a CPU one."""
    from megatron.core.tensor_parallel import random as mrandom

    class CpuRngStatesTracker(mrandom.CudaRNGStatesTracker):
        """`CudaRNGStatesTracker` whose named states are CPU generator states."""

        def add(self, name: str, seed: int) -> None:
            """Register a named RNG state seeded with ``seed`` (upstream uses the CUDA RNG)."""
            self._is_initialized = True
            if seed in self.seeds_:
                raise RuntimeError(f"seed {seed} already exists")
            if name in self.states_:
                raise RuntimeError(f"rng state {name} already exists")
            self.seeds_.add(seed)
            saved = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(saved)

        @contextlib.contextmanager
        def fork(self, name: str = mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME) -> Iterator[None]:
            """Run the block under the named CPU RNG state, then restore the default one."""
            saved = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(saved)

    # upstream: initialize_rng_tracker() builds a CudaRNGStatesTracker on torch.cuda RNG states.
    mrandom._CUDA_RNG_STATE_TRACKER = CpuRngStatesTracker(
        use_cudagraphable_rng=False, is_inference_rng_tracker=False
    )
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    # upstream: _get_cuda_rng_state/_set_cuda_rng_state read and write torch.cuda's generator
    # (activation recompute saves and restores it around the recomputed forward).
    mrandom._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)


@contextlib.contextmanager
def tensor_cuda_is_identity() -> Iterator[None]:
    """Within the block, ``Tensor.cuda()`` returns the tensor itself when the CPU shims apply.

    upstream: ``LanguageModule.setup_embeddings_and_output_layer`` moves the tied output weight
    of a pipeline's last stage to CUDA (``weight.data.cuda()``) before all-reducing it with the
    first stage's embedding; `align_core.model.build_gpt_model` builds the model inside this
    block. Outside it (and with CUDA) ``Tensor.cuda`` is untouched.
    """
    if not _APPLIED:
        yield
        return
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.cuda = original  # type: ignore[method-assign]


def cpu_shims_applied() -> bool:
    """Whether `apply_cpu_shims` has installed the shims in this process."""
    return _APPLIED


def apply_cpu_shims() -> None:
    """Install the CPU shims for megatron-core (idempotent; no-op when CUDA is available).

    Must run before ``parallel_state.initialize_model_parallel`` and before any model is built.
    """
    global _APPLIED
    if _APPLIED or torch.cuda.is_available():
        return
    # upstream: `device=torch.cuda.current_device()` in GlobalMemoryBuffer.get_tensor and in many
    # buffer allocations.
    torch.cuda.current_device = lambda: torch.device("cpu")
    # upstream: torch.cuda.synchronize() in p2p communication and filesystem_async.preload_tensors
    # (distributed-checkpoint save).
    torch.cuda.synchronize = lambda *args, **kwargs: None
    # upstream: torch.cuda.current_stream().wait_stream(...) around gradient buffers.
    torch.cuda.current_stream = lambda *args, **kwargs: _NoStream()
    proxy = _cpu_torch()
    for module in _MODULES_WITH_CUDA_FACTORIES:
        # Rebinding a megatron module's global; typeshed's ModuleType declares no settable names.
        importlib.import_module(module).torch = proxy  # pyright: ignore[reportAttributeAccessIssue]
    # upstream: the optimizers and clip_grads assert `param.type() == "torch.cuda.FloatTensor"`.
    plain_type = torch.Tensor.type

    def cuda_named_type(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        name = plain_type(self, *args, **kwargs)
        if args or kwargs or not isinstance(name, str):
            return name
        if name.startswith("torch.") and ".cuda." not in name:
            return name.replace("torch.", "torch.cuda.", 1)
        return name

    torch.Tensor.type = cuda_named_type
    _install_cpu_rng_tracker()
    _APPLIED = True

"""Process-group set-up for torchrun, Slurm and single processes.

torch.distributed comes up from the launcher's environment, then megatron's ``parallel_state``
with the configured tensor/pipeline/context sizes (data parallel is the rest).

Works under torchrun (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``),
under Slurm ``srun`` (``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``) and as a plain single
process. NCCL on GPU, gloo on CPU; on CPU the megatron shims are applied here, explicitly.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import cast

import torch
import torch.distributed as dist

from align_core.config import ParallelConfig
from align_core.cpu_shims import apply_cpu_shims

__all__ = [
    "DistributedContext",
    "destroy_distributed",
    "free_port",
    "init_distributed",
    "megatron_data_group",
    "megatron_pipeline_group",
    "megatron_tensor_group",
]


@dataclass(frozen=True)
class DistributedContext:
    """Where this process sits.

    Attributes:
        rank: Global rank.
        world_size: Number of processes.
        local_rank: Rank on this node.
        device: The device this process computes on.
        tensor_rank: Rank within the tensor-parallel group.
        pipeline_rank: Pipeline stage.
        data_rank: Rank within the data-parallel group.
        data_parallel_size: Number of data-parallel replicas.
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    tensor_rank: int
    pipeline_rank: int
    data_rank: int
    data_parallel_size: int

    @property
    def is_main(self) -> bool:
        """True on global rank 0 (the process that logs and writes shared files)."""
        return self.rank == 0


def free_port() -> int:
    """A TCP port that is free on this host right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launcher_env() -> tuple[int, int, int]:
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        rank, world = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
        env.setdefault("RANK", str(rank))
        env.setdefault("WORLD_SIZE", str(world))
        return rank, world, int(env.get("SLURM_LOCALID", 0))
    return 0, 1, 0


def init_distributed(
    parallel: ParallelConfig,
    *,
    seed: int = 1234,
    backend: str | None = None,
    timeout: timedelta = timedelta(minutes=30),
) -> DistributedContext:
    """Initialise torch.distributed and megatron's model-parallel groups.

    Args:
        parallel: Tensor/pipeline/context sizes; data parallel = world / (TP × PP × CP).
        seed: Seed of torch and of megatron's model-parallel RNG tracker.
        backend: ``"nccl"`` or ``"gloo"``; default nccl when CUDA is present, else gloo.
        timeout: Collective timeout.

    Returns:
        This process's `DistributedContext`.

    Raises:
        ValueError: When the world size is not divisible by TP × PP × CP.
    """
    from megatron.core import parallel_state, tensor_parallel

    rank, world_size, local_rank = _launcher_env()
    model_parallel = (
        parallel.tensor_model_parallel_size
        * parallel.pipeline_model_parallel_size
        * parallel.context_parallel_size
    )
    if world_size % model_parallel:
        raise ValueError(
            f"world size {world_size} is not divisible by tensor × pipeline × context parallel "
            f"sizes {parallel.tensor_model_parallel_size} × "
            f"{parallel.pipeline_model_parallel_size} × {parallel.context_parallel_size}"
        )
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        if parallel.sequence_parallel or parallel.context_parallel_size > 1:
            raise ValueError("sequence and context parallelism need CUDA (Transformer Engine)")
        apply_cpu_shims()
        device = torch.device("cpu")
    if not dist.is_initialized():
        backend = backend or ("nccl" if cuda else "gloo")
        if world_size == 1 and "MASTER_PORT" not in os.environ:
            # A world of one needs no TCP rendezvous: an in-process store cannot collide with
            # another process on the host (a probed free port can be taken before it is bound).
            # torch documents HashStore but leaves it out of torch.distributed's __all__.
            store = dist.HashStore()  # pyright: ignore[reportPrivateImportUsage]
            dist.init_process_group(backend, store=store, rank=0, world_size=1, timeout=timeout)
        else:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", "29500")
            dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timeout)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=parallel.tensor_model_parallel_size,
            pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
            context_parallel_size=parallel.context_parallel_size,
        )
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return DistributedContext(
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        device=device,
        tensor_rank=parallel_state.get_tensor_model_parallel_rank(),
        pipeline_rank=parallel_state.get_pipeline_model_parallel_rank(),
        data_rank=parallel_state.get_data_parallel_rank(),
        data_parallel_size=parallel_state.get_data_parallel_world_size(),
    )


def destroy_distributed() -> None:
    """Tear down megatron's groups and the default process group (safe to call twice)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


# megatron's parallel_state getters are unannotated; the type inferred from their module globals
# includes internal sentinels (None before initialisation, which they assert against; a list of
# groups for encoder-decoder pipelines, which align does not build). After `init_distributed`
# each returns one process group.


def megatron_tensor_group() -> dist.ProcessGroup:
    """This rank's tensor-parallel group from megatron's ``parallel_state`` (initialised)."""
    from megatron.core import parallel_state

    return cast(dist.ProcessGroup, parallel_state.get_tensor_model_parallel_group())


def megatron_pipeline_group() -> dist.ProcessGroup:
    """This rank's pipeline-parallel group from megatron's ``parallel_state`` (initialised)."""
    from megatron.core import parallel_state

    return cast(dist.ProcessGroup, parallel_state.get_pipeline_model_parallel_group())


def megatron_data_group() -> dist.ProcessGroup:
    """This rank's data-parallel group from megatron's ``parallel_state`` (initialised)."""
    from megatron.core import parallel_state

    return cast(dist.ProcessGroup, parallel_state.get_data_parallel_group())

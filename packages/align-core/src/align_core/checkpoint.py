"""Training checkpoints with megatron distributed checkpointing (``torch_dist``).

Layout of a run's checkpoint directory::

    <dir>/step_000010/      complete checkpoints (one megatron distributed checkpoint each)
    <dir>/step_000020/
    <dir>/latest            "step_000020": the newest complete checkpoint (written atomically)
    <dir>/tmp.step_000030/  a save in progress (or one that was killed): never read, removed
                            by the next save

A save writes everything into ``tmp.step_N`` (every rank writes its shards; megatron writes the
metadata last), waits for all ranks, and only then renames the directory to ``step_N`` (an atomic
``rename`` on one filesystem) and replaces ``latest``. A process killed at any point before the
rename leaves the previous ``step_*`` untouched and ``latest`` pointing at it; one killed between
the rename and the ``latest`` update resumes from the previous checkpoint, which ``latest`` still
names (``step_*`` directories only ever exist complete). Old checkpoints beyond ``keep_last`` are
deleted after the new one is published.

Contents: the model (any TP/PP layout can load it), the optimizer (the non-distributed optimizer
reshards like the model; the distributed optimizer uses megatron's ``dp_reshardable`` format,
which loads at any data-parallel size but needs the same TP/PP sizes), optional extra models
(e.g. reference weights that differ from the initial policy; a module, or a state dict laid out
like the policy's), the trainer's counters and an arbitrary extra state (the data sampler's
position; both identical on all ranks, stored once), and every process's RNG states (restored
only when the world size is unchanged, since they are per rank). The learning-rate schedule is a
pure function of the step (`align_core.optim.learning_rate`), so the step counter is its state.

Before loading, the checkpoint's files are checked against its metadata
(`align_core.checkpoint_checks`): the newest intact step is loaded, the damaged ones newer than
it are named in `LoadedCheckpoint.skipped`; and the architecture and LoRA adapters recorded in
it are compared with the model's, so a changed ``num_layers`` is one error naming both values.
A full disk during a save is a `align_core.disk_full.DiskFullError` (the previous checkpoint
stays intact).

(Over 600 lines: saving, finding and loading share the directory layout and the sharded-state
template, and belong to one class; the checks and the disk-full handling live in
`align_core.checkpoint_checks` and `align_core.disk_full`.)
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import queue
import re
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from align_core.checkpoint_checks import (
    CheckpointSummary,
    DamagedCheckpointError,
    check_checkpoint_files,
    check_resume_model,
    module_summary,
)
from align_core.disk_full import DiskFullError, dir_bytes, disk_full_guard, tensor_bytes
from align_core.model import unwrap_model
from align_core.rng import capture_rng_state, restore_rng_state
from align_core.run_lock import exclusive_lock
from align_core.safe_load import verify_distributed_checkpoint

__all__ = ["Checkpointer", "LoadedCheckpoint", "check_resume"]

FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step_(\d+)$")
_OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}
_LORA_MARK = "_lora."

# Test hook: called on rank 0 after every rank has written `tmp.step_N` and before it is
# published (renamed). The kill-mid-save tests set it to `os._exit`.
_before_publish: Callable[[Path], None] | None = None

ExtraModel = torch.nn.Module | Mapping[str, torch.Tensor]


def check_resume(
    saved: Mapping[str, Any], now: Mapping[str, Any], path: str | Path, *, needs: str | None = None
) -> None:
    """Refuse to resume from a checkpoint whose recorded run state differs from this run's.

    Args:
        saved: What the checkpoint recorded (e.g. its ``extra_state["data"]``).
        now: This run's values of the same keys; keys the checkpoint lacks are not compared.
        path: The checkpoint, named in the error.
        needs: What resuming needs, appended to the error in parentheses.

    Raises:
        ValueError: Naming the first key whose value differs, with both values.
    """
    for key, value in now.items():
        if key in saved and saved[key] != value:
            hint = f" ({needs})" if needs else ""
            raise ValueError(
                f"cannot resume from {path}: its {key} is {saved[key]!r}, this run has "
                f"{value!r}{hint}"
            )


@dataclass(frozen=True)
class LoadedCheckpoint:
    """What `Checkpointer.load` restored.

    Attributes:
        step: The checkpoint's step.
        path: Its directory.
        trainer_state: The trainer's counters as saved.
        extra_state: The caller's extra state as saved.
        rng_restored: Whether RNG states were restored (same world size and asked for).
        optimizer_restored: Whether optimizer state was restored.
        skipped: One line per newer checkpoint passed over as damaged (``step_000006: ...``).
    """

    step: int
    path: Path
    trainer_state: dict[str, Any]
    extra_state: dict[str, Any]
    rng_restored: bool
    optimizer_restored: bool
    skipped: tuple[str, ...] = ()


def _layout() -> dict[str, int]:
    from megatron.core import parallel_state

    return {
        "world_size": dist.get_world_size(),
        "tensor_model_parallel_size": parallel_state.get_tensor_model_parallel_world_size(),
        "pipeline_model_parallel_size": parallel_state.get_pipeline_model_parallel_world_size(),
        "data_parallel_size": parallel_state.get_data_parallel_world_size(),
    }


def _uses_distributed_optimizer(optimizer: Any) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    inner = getattr(optimizer, "chained_optimizers", [optimizer])
    return any(isinstance(o, DistributedOptimizer) for o in inner)


def _prime_fresh_distributed_optimizer(optimizer: Any) -> None:
    """Give a never-stepped distributed optimizer the state entries loading expects.

    upstream: ``DistributedOptimizer.state_dict()`` (called by its ``sharded_state_dict`` when
    saving and when building the load template) asserts that torch Adam's per-parameter
    ``step`` exists, which it does only after a first step. Zero moments and ``step = 0`` are
    exactly what Adam starts from, so the next step is unchanged; loading overwrites them.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not isinstance(inner, DistributedOptimizer):
            continue
        adam = inner.optimizer
        if not isinstance(adam, torch.optim.Adam | torch.optim.AdamW):
            continue
        for group in adam.param_groups:
            for param in group["params"]:
                state = adam.state[param]
                if not state:
                    state["exp_avg"] = torch.zeros_like(param)
                    state["exp_avg_sq"] = torch.zeros_like(param)
                    state["step"] = torch.tensor(0.0)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _in_process_write_results() -> None:
    """Give megatron's synchronous ``torch_dist`` writer an in-process results queue.

    upstream: ``filesystem_async._get_write_results_queue()`` starts a spawn-context
    ``multiprocessing.Manager`` (a server process that re-imports ``__main__``) the first time a
    process writes a checkpoint. Synchronous saves (the only kind used here) put and get the
    write results in the saving process itself, so a ``queue.Queue`` does the same job without
    the server's start-up cost, without requiring an ``if __name__ == "__main__"`` guard in
    launcher scripts, and without leaving the server orphaned when a training process is killed.
    """
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = queue.Queue()


@contextlib.contextmanager
def _quiet_writer_log() -> Any:
    """Silence the writer's own report of a failed write: the error raised says it all."""
    logger = logging.getLogger("megatron.core.dist_checkpointing.strategies.filesystem_async")
    level = logger.level
    if os.environ.get("ALIGN_DEBUG") != "1":
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _failures_everywhere(failure: BaseException | None) -> list[str]:
    """Every rank's failure message (empty when no rank failed); collective."""
    flag = torch.tensor([0.0 if failure is None else 1.0])
    if dist.get_backend() == "nccl":
        flag = flag.cuda()
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if not flag.item():
        return []
    messages: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(messages, None if failure is None else str(failure))
    return [m for m in messages if m is not None]


def _rebind(template: dict[str, Any], prefix: str, state: Mapping[str, torch.Tensor]) -> dict:
    """The policy's sharded state dict with each tensor replaced by ``state``'s (same key)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    out = {}
    for key, value in template.items():
        if isinstance(value, ShardedTensor | ShardedTensorFactory):
            local = key[len(prefix) :]
            if local not in state:
                raise KeyError(f"extra model state has no {local!r}")
            out[key] = dataclasses.replace(value, data=state[local])
        else:
            out[key] = value
    return out


class Checkpointer:
    """Saves, finds, loads and prunes the checkpoints of one run directory.

    All ranks call `save` and `load` together (they are collective); rank 0 alone renames,
    writes ``latest`` and deletes. The directory must be on a filesystem every rank sees.

    Args:
        directory: The run's checkpoint directory (created when missing).
        keep_last: Complete checkpoints to keep (>= 1); the trainer passes its
            ``keep_last_checkpoints``.
    """

    def __init__(self, directory: str | os.PathLike[str], *, keep_last: int) -> None:
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.directory = Path(directory)
        self.keep_last = keep_last

    # ----------------------------------------------------------------- finding
    def steps(self) -> list[int]:
        """Steps of the complete checkpoints, oldest first."""
        if not self.directory.is_dir():
            return []
        found = (_STEP_DIR.match(p.name) for p in self.directory.iterdir() if p.is_dir())
        return sorted(int(m.group(1)) for m in found if m)

    def path(self, step: int) -> Path:
        """Directory of the complete checkpoint of ``step``."""
        return self.directory / f"step_{step:06d}"

    def latest_step(self) -> int | None:
        """The checkpoint to resume from, or None when there is none.

        That is the one ``latest`` names when it exists and is complete (the most recently
        written, even if a higher step survives from an abandoned branch of the run), else the
        highest complete step (``latest`` is written just after the rename, so a process killed
        in between leaves it one checkpoint behind).
        """
        marker = self.directory / "latest"
        if marker.is_file():
            match = _STEP_DIR.match(marker.read_text().strip())
            if match and self.path(int(match.group(1))).is_dir():
                return int(match.group(1))
        steps = self.steps()
        return steps[-1] if steps else None

    def newest_intact(self) -> tuple[int | None, list[str]]:
        """The checkpoint to resume from, passing over damaged ones; and what was passed over.

        Tries `latest_step`, then every older complete step, newest first, and returns the
        first whose files its metadata fully accounts for (`check_checkpoint_files`).

        Returns:
            The step (None when the directory holds no checkpoint) and one line per damaged
            checkpoint passed over (``step_000006: __0_0.distcp is truncated (...)``).

        Raises:
            DamagedCheckpointError: Checkpoints exist but none is intact (each one named).
            UnsafeCheckpointError: A checkpoint's metadata holds a disallowed pickle.
        """
        latest = self.latest_step()
        if latest is None:
            return None, []
        order = [latest, *(s for s in reversed(self.steps()) if s != latest)]
        skipped = []
        for step in order:
            try:
                check_checkpoint_files(self.path(step))
            except DamagedCheckpointError as exc:
                skipped.append(f"{self.path(step).name}: {exc}")
                continue
            return step, skipped
        raise DamagedCheckpointError(
            f"no intact checkpoint to resume from in {self.directory}: {'; '.join(skipped)}"
        )

    # ------------------------------------------------------------------ saving
    def _sharded_state(
        self,
        model: torch.nn.Module,
        optimizer: Any | None,
        extra_models: Mapping[str, ExtraModel],
        *,
        is_loading: bool,
        with_rng: bool,
    ) -> dict[str, Any]:
        from megatron.core.dist_checkpointing.mapping import ShardedObject

        policy = unwrap_model(model)
        model_sd = policy.sharded_state_dict()
        state: dict[str, Any] = {"model": model_sd}
        if optimizer is not None:
            state["optimizer"] = optimizer.sharded_state_dict(
                model_sd, is_loading=is_loading, metadata=dict(_OPTIMIZER_METADATA)
            )
        for name, extra in extra_models.items():
            prefix = f"extra_models.{name}."
            if isinstance(extra, torch.nn.Module):
                state[f"extra_model_{name}"] = unwrap_model(extra).sharded_state_dict(prefix=prefix)
            else:
                template = policy.sharded_state_dict(prefix=prefix)
                state[f"extra_model_{name}"] = _rebind(template, prefix, extra)
        if with_rng:
            rank, world = dist.get_rank(), dist.get_world_size()
            rng = capture_rng_state() if not is_loading else None
            state["rng"] = ShardedObject("rng_state", rng, (world,), (rank,), replica_id=0)
        return state

    def save(
        self,
        step: int,
        model: torch.nn.Module,
        optimizer: Any | None = None,
        *,
        trainer_state: Mapping[str, Any] | None = None,
        extra_state: Mapping[str, Any] | None = None,
        extra_models: Mapping[str, ExtraModel] | None = None,
    ) -> Path:
        """Write the checkpoint of ``step`` and publish it atomically (collective).

        Args:
            step: Optimizer steps taken so far (names the directory).
            model: This rank's model chunk (DDP-wrapped or not).
            optimizer: The megatron optimizer, or None for weights only.
            trainer_state: The trainer's counters (picklable; identical on all ranks).
            extra_state: Anything else the run needs to resume, e.g. the sampler position
                (picklable; identical on all ranks; rank 0's copy is stored).
            extra_models: Named extra weights: a module, or a state dict with the policy's
                keys and local shapes (e.g. reference weights held on the CPU).

        Returns:
            The published checkpoint directory.

        Raises:
            DiskFullError: A rank ran out of space; the partial save was removed and the
                previous checkpoint is intact.
        """
        _in_process_write_results()
        with contextlib.ExitStack() as lock:
            if dist.get_rank() == 0:
                self.directory.mkdir(parents=True, exist_ok=True)
                # Held from the removal of stale `tmp.*` to the publication, so that another
                # process's save in progress is never removed.
                held = lock.enter_context(exclusive_lock(self.directory, blocking=True))
                self._remove_stale(step, every=held is not None)
            return self._save_locked(
                step,
                model,
                optimizer,
                trainer_state=trainer_state,
                extra_state=extra_state,
                extra_models=dict(extra_models or {}),
            )

    def _remove_stale(self, step: int, *, every: bool) -> None:
        """Delete what killed saves left (rank 0, under the save lock).

        Every ``tmp.*`` when the lock is held (no other save can be in progress), only this
        step's own when the filesystem has no locks.
        """
        stale = self.directory.glob("tmp.*step_*") if every else [self._tmp(step)]
        for path in stale:
            shutil.rmtree(path, ignore_errors=True)

    def _tmp(self, step: int) -> Path:
        return self.directory / f"tmp.step_{step:06d}"

    def _write(self, step: int, state: dict[str, Any], tmp: Path) -> None:
        """Write ``state`` into ``tmp`` on every rank; a full disk on any rank fails all."""
        from megatron.core import dist_checkpointing

        previous = self.latest_step()
        intact = (
            f"the previous checkpoint {self.path(previous).name} is intact"
            if previous is not None
            else "no earlier checkpoint of this run exists"
        )

        def needed() -> int:
            if previous is not None and self.path(previous).is_dir():
                return dir_bytes(self.path(previous))
            return tensor_bytes(state) * dist.get_world_size()

        failure: BaseException | None = None
        try:
            with (
                disk_full_guard(
                    f"checkpoint {self.path(step).name}",
                    self.directory,
                    intact=intact,
                    needed=needed,
                    cleanup=lambda: shutil.rmtree(tmp, ignore_errors=True),
                ),
                _quiet_writer_log(),
            ):
                dist_checkpointing.save(state, str(tmp))
        except DiskFullError as exc:
            failure = exc
        messages = _failures_everywhere(failure)
        if messages:
            if dist.get_rank() == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            raise DiskFullError(messages[0]) from failure

    def _save_locked(
        self,
        step: int,
        model: torch.nn.Module,
        optimizer: Any | None,
        *,
        trainer_state: Mapping[str, Any] | None,
        extra_state: Mapping[str, Any] | None,
        extra_models: dict[str, ExtraModel],
    ) -> Path:
        tmp = self._tmp(step)
        if dist.get_rank() == 0:
            tmp.mkdir()
        dist.barrier()
        if optimizer is not None:
            _prime_fresh_distributed_optimizer(optimizer)
        state = self._sharded_state(model, optimizer, extra_models, is_loading=False, with_rng=True)
        state["common"] = {
            "format_version": FORMAT_VERSION,
            "step": step,
            "layout": _layout(),
            "distributed_optimizer": optimizer is not None
            and _uses_distributed_optimizer(optimizer),
            "has_optimizer": optimizer is not None,
            "extra_models": sorted(extra_models),
            "trainer_state": dict(trainer_state or {}),
            "extra_state": dict(extra_state or {}),
        }
        self._write(step, state, tmp)
        dist.barrier()
        final = self.path(step)
        if dist.get_rank() == 0:
            if _before_publish is not None:
                _before_publish(tmp)
            if final.exists():  # re-saving a step: move the old copy aside, then drop it
                stale = self.directory / f"tmp.replaced.{final.name}"
                os.rename(final, stale)
                os.rename(tmp, final)
                shutil.rmtree(stale, ignore_errors=True)
            else:
                os.rename(tmp, final)
            _fsync_dir(self.directory)
            _write_atomically(self.directory / "latest", final.name + "\n")
            self._prune(keep=step)
        dist.barrier()
        return final

    def _prune(self, keep: int) -> None:
        """Delete all but the ``keep_last`` highest steps, never the one just written."""
        for old in self.steps()[: -self.keep_last]:
            if old != keep:
                shutil.rmtree(self.path(old), ignore_errors=True)

    # ----------------------------------------------------------------- loading
    def load(
        self,
        model: torch.nn.Module,
        optimizer: Any | None = None,
        *,
        step: int | None = None,
        extra_models: Mapping[str, ExtraModel] | None = None,
        load_rng: bool = True,
    ) -> LoadedCheckpoint | None:
        """Restore the newest (or the given) checkpoint into this rank's objects (collective).

        Args:
            model: This rank's model chunk, in any TP/PP layout.
            optimizer: The optimizer to restore, or None to load weights only (e.g. when
                converting between layouts the distributed optimizer cannot follow).
            step: Which checkpoint; default the newest intact one (`newest_intact`: damaged
                newer ones are passed over and listed in `LoadedCheckpoint.skipped`).
            extra_models: Where to load the named extra weights (modules, or state dicts whose
                tensors are overwritten in place).
            load_rng: Restore RNG states (only possible at the saved world size).

        Returns:
            What was restored, or None when the directory holds no complete checkpoint.

        Raises:
            FileNotFoundError: When ``step`` is given and has no complete checkpoint.
            DamagedCheckpointError: When ``step`` is given and its files are missing or
                truncated, or when no checkpoint is intact.
            ValueError: When the optimizer state cannot be loaded into this optimizer or layout,
                a file of the checkpoint is damaged, or the checkpoint holds another
                architecture or other LoRA adapters than ``model`` (naming the key and both
                values).
            UnsafeCheckpointError: When a file of the checkpoint holds a pickle that would run
                code (`align_core.safe_load`); nothing from it has run.
        """
        from megatron.core import dist_checkpointing

        skipped: list[str] = []
        if step is None:
            step, skipped = self.newest_intact()
            if step is None:
                return None
        path = self.path(step)
        if not path.is_dir():
            raise FileNotFoundError(f"no complete checkpoint for step {step} in {self.directory}")
        try:
            metadata = check_checkpoint_files(path)
        except DamagedCheckpointError as exc:
            raise DamagedCheckpointError(f"checkpoint {path} is damaged: {exc}") from None
        verify_distributed_checkpoint(path)  # runs no pickle from the directory
        common = dist_checkpointing.load_common_state_dict(str(path))["common"]
        summary, lora = module_summary(model)
        saved = CheckpointSummary(
            model=dict(common["extra_state"].get("model") or {}),
            lora=any(_LORA_MARK in key for key in metadata.state_dict_metadata),
        )
        check_resume_model(saved, summary, lora=lora, path=path)
        extra_models = dict(extra_models or {})
        missing = set(extra_models) - set(common["extra_models"])
        if missing:
            raise KeyError(f"checkpoint {path} has no extra models {sorted(missing)}")
        if optimizer is not None:
            self._check_optimizer(path, common, optimizer)
            _prime_fresh_distributed_optimizer(optimizer)
        with_rng = load_rng and common["layout"]["world_size"] == dist.get_world_size()
        template = self._sharded_state(
            model, optimizer, extra_models, is_loading=True, with_rng=with_rng
        )
        loaded = dist_checkpointing.load(template, str(path))
        assert isinstance(loaded, dict)  # the default ``strict`` returns the state dict alone
        unwrap_model(model).load_state_dict(loaded["model"])
        if optimizer is not None:
            # The distributed optimizer copies into views of leaf parameters.
            with torch.no_grad():
                optimizer.load_state_dict(loaded["optimizer"])
        for name, extra in extra_models.items():
            prefix = f"extra_models.{name}."
            values = {k[len(prefix) :]: v for k, v in loaded[f"extra_model_{name}"].items()}
            if isinstance(extra, torch.nn.Module):
                unwrap_model(extra).load_state_dict(values)
            else:
                with torch.no_grad():
                    for key, tensor in extra.items():
                        if key in values and isinstance(values[key], torch.Tensor):
                            tensor.copy_(values[key])
        if with_rng:
            restore_rng_state(loaded["rng"])
        return LoadedCheckpoint(
            step=step,
            path=path,
            trainer_state=common["trainer_state"],
            extra_state=common["extra_state"],
            rng_restored=with_rng,
            optimizer_restored=optimizer is not None,
            skipped=tuple(skipped),
        )

    @staticmethod
    def _check_optimizer(path: Path, common: Mapping[str, Any], optimizer: Any) -> None:
        if not common["has_optimizer"]:
            raise ValueError(
                f"checkpoint {path} holds no optimizer state (load with optimizer=None)"
            )
        saved_dist = common["distributed_optimizer"]
        if saved_dist != _uses_distributed_optimizer(optimizer):
            raise ValueError(
                f"checkpoint {path} was saved with use_distributed_optimizer={saved_dist}; "
                "load it with the same setting, or with optimizer=None for the weights only"
            )
        if saved_dist:
            saved, now = common["layout"], _layout()
            for key in ("tensor_model_parallel_size", "pipeline_model_parallel_size"):
                if saved[key] != now[key]:
                    raise ValueError(
                        f"checkpoint {path} holds distributed-optimizer state for {key}="
                        f"{saved[key]}, this run has {now[key]}: it reshards only over data "
                        "parallelism (load with optimizer=None for the weights only)"
                    )

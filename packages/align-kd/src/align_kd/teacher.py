"""The teacher pass: the teacher's top-k at every input position of a dataset, on disk.

`run_teacher_pass` runs a (frozen) teacher over tokenized SFT examples under any tensor /
pipeline / data-parallel layout and writes align-data teacher stores: per input position the
top-k logits (minus the position's maximum, sorted descending), their ids and the log-sum-exp of
the full vocabulary, aligned with the student's label positions (position ``t`` predicts
``labels[t]``).

Layout of the output directory::

    plan.json        number of examples, data fingerprint, top_k, the parts' index ranges
    part-00000/      an align-data teacher store holding examples [a_0, b_0)
    part-00001/      ...

Each data-parallel replica fills its parts (part ``p`` goes to replica ``p mod D``); within a
replica every rank runs the same micro-batches, the last pipeline stage computes the top-k
(vocabulary-parallel: local top-k per slice, merged over the tensor-parallel group) and its
tensor-parallel rank 0 writes. The plan is fixed by the first run.

Resuming. The store commits sample by sample; a rerun reads each part's committed count and
continues there. Micro-batches lie on a fixed grid of the part's indices, so a sample is always
computed in the same micro-batch (same padding, same arithmetic) and a resumed pass writes
exactly the bytes an uninterrupted one would: nothing duplicated, nothing skipped.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from align_core.schedule import forward_backward
from align_data import CollateConfig, ProgressPrinter, SFTExample, collate_sft
from align_data.stores import TeacherTopKReader, TeacherTopKWriter
from align_kd.config import TeacherPassConfig
from align_kd.forward import logits_forward, vocab_start_of
from align_kd.topk import vocab_parallel_topk

__all__ = [
    "TeacherGroups",
    "TeacherPassResult",
    "examples_fingerprint",
    "open_teacher_store",
    "run_teacher_pass",
    "teacher_topk_outputs",
    "teacher_vocab_size",
]

PLAN_FILE = "plan.json"
_PLAN_VERSION = 1


@dataclass(frozen=True)
class TeacherGroups:
    """Where this rank sits for the teacher pass (passed explicitly, never looked up inside).

    Attributes:
        tensor: Tensor-parallel group (vocabulary slices), None when unsplit.
        model_parallel: The ranks of one model replica (tensor × pipeline): they run the same
            micro-batches. None for a single process per replica.
        data: Data-parallel group (throughput sums), None for one replica.
        world: All ranks of the pass (plan creation and completion are synchronised over it),
            None for a single process.
        data_rank: This replica's index.
        data_size: Number of replicas.
        is_last_stage: This rank computes the top-k (last pipeline stage).
        is_writer: This rank writes (last stage, tensor-parallel rank 0).
        is_main: Global rank 0 (prints progress, writes the plan).
        device: Where collective buffers live (CUDA under NCCL, else CPU).
    """

    tensor: dist.ProcessGroup | None = None
    model_parallel: dist.ProcessGroup | None = None
    data: dist.ProcessGroup | None = None
    world: dist.ProcessGroup | None = None
    data_rank: int = 0
    data_size: int = 1
    is_last_stage: bool = True
    is_writer: bool = True
    is_main: bool = True
    device: torch.device = torch.device("cpu")  # noqa: RUF009

    @classmethod
    def from_model(cls, model: torch.nn.Module) -> TeacherGroups:
        """The groups of a megatron-core model chunk (its ``pg_collection``) and its stage."""
        from align_core.model import unwrap_model

        gpt = unwrap_model(model)
        groups = gpt.pg_collection

        def sized(group: dist.ProcessGroup) -> dist.ProcessGroup | None:
            return group if group.size() > 1 else None

        last = bool(gpt.post_process)
        return cls(
            tensor=sized(groups.tp),
            model_parallel=sized(groups.mp),
            data=sized(groups.dp),
            world=dist.group.WORLD if dist.get_world_size() > 1 else None,
            data_rank=groups.dp.rank(),
            data_size=groups.dp.size(),
            is_last_stage=last,
            is_writer=last and groups.tp.rank() == 0,
            is_main=dist.get_rank() == 0,
            device=(
                torch.device("cuda", torch.cuda.current_device())
                if dist.get_backend() == "nccl"
                else torch.device("cpu")
            ),
        )


@dataclass(frozen=True)
class TeacherPassResult:
    """What a teacher pass did.

    Attributes:
        output_dir: The output directory.
        num_examples: Examples in the dataset (all parts).
        samples_computed: Samples written by this run (all replicas; 0 when already complete).
        positions_computed: Input positions of those samples.
        seconds: Wall time of this run's pass.
        positions_per_second: ``positions_computed / seconds`` (teacher-pass tokens/s).
    """

    output_dir: str
    num_examples: int
    samples_computed: int
    positions_computed: int
    seconds: float

    @property
    def positions_per_second(self) -> float:
        """Throughput of this run in input positions (tokens) per second."""
        return self.positions_computed / max(self.seconds, 1e-9)


def examples_fingerprint(examples: Sequence[SFTExample]) -> str:
    """A hash of the examples' token ids (prompt, completion, prompt loss mask) in order."""
    h = hashlib.sha256()
    for e in examples:
        for part in (e.prompt_ids, e.completion_ids, e.prompt_loss_mask):
            arr = np.zeros(0, np.int64) if part is None else np.asarray(part, dtype=np.int64)
            h.update(len(arr).to_bytes(8, "little"))
            h.update(arr.tobytes())
    return h.hexdigest()


def teacher_topk_outputs(
    batch: Mapping[str, Tensor],
    logits: Tensor,
    *,
    top_k: int,
    vocab_size: int | None,
    group: dist.ProcessGroup | None,
) -> tuple[None, dict[str, Tensor]]:
    """The forward-only "loss" of a teacher micro-batch: its top-k, no loss.

    Args:
        batch: The micro-batch (unused; part of the loss-function signature).
        logits: ``[B, S, V_local]`` the teacher's vocabulary slice.
        top_k: Tokens per position.
        vocab_size: The teacher's real vocabulary size (padding excluded).
        group: The teacher's tensor-parallel group.

    Returns:
        ``(None, {"teacher_logits", "teacher_ids", "teacher_logsumexp"})``.
    """
    del batch
    top = vocab_parallel_topk(
        logits, top_k, group=group, vocab_start=vocab_start_of(logits, group), vocab_size=vocab_size
    )
    return None, {
        "teacher_logits": top.logits,
        "teacher_ids": top.ids,
        "teacher_logsumexp": top.logsumexp,
    }


def _plan(
    out: Path,
    examples: Sequence[SFTExample],
    config: TeacherPassConfig,
    vocab_size: int,
    groups: TeacherGroups,
) -> list[tuple[int, int]]:
    """Create (global rank 0) or check the plan; every rank returns the parts."""
    path = out / PLAN_FILE
    fingerprint = examples_fingerprint(examples)
    if groups.is_main and not path.exists():
        out.mkdir(parents=True, exist_ok=True)
        n = len(examples)
        parts = config.num_parts or groups.data_size
        bounds = [round(i * n / parts) for i in range(parts + 1)]
        plan = {
            "version": _PLAN_VERSION,
            "num_examples": n,
            "fingerprint": fingerprint,
            "top_k": config.top_k,
            "dtype": config.dtype,
            "vocab_size": vocab_size,
            "parts": [[a, b] for a, b in itertools.pairwise(bounds)],
        }
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(plan, indent=1))
        tmp.replace(path)
    if groups.world is not None:
        dist.barrier(group=groups.world)
    plan = json.loads(path.read_text())
    wanted = {"num_examples": len(examples), "fingerprint": fingerprint, "top_k": config.top_k}
    wanted.update(dtype=config.dtype, vocab_size=vocab_size)
    different = {k: (plan.get(k), v) for k, v in wanted.items() if plan.get(k) != v}
    if different:
        raise ValueError(
            f"{out} holds a teacher pass with other settings or data (stored, requested): "
            f"{different}; use another output directory"
        )
    return [(int(a), int(b)) for a, b in plan["parts"]]


def _agree(value: int, group: dist.ProcessGroup | None, device: torch.device) -> int:
    """The maximum of ``value`` over ``group`` (ranks that do not know pass -1)."""
    if group is None:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return int(t)


def _micro_batches(
    examples: Sequence[SFTExample], lo: int, hi: int, size: int, collate: CollateConfig
) -> tuple[list[dict[str, Tensor]], list[tuple[int, int]]]:
    """Micro-batches of examples ``[lo, hi)`` and ``(index, positions)`` of their real rows.

    A short last micro-batch is filled by repeating its last example (pipeline stages exchange
    one shape); the repeats are not written.
    """
    rows: list[tuple[int, int]] = []
    batches = []
    for a in range(lo, hi, size):
        idx = list(range(a, min(a + size, hi)))
        rows.extend(
            (i, int(len(examples[i].prompt_ids) + len(examples[i].completion_ids) - 1)) for i in idx
        )
        idx += [idx[-1]] * (size - len(idx))
        batch = collate_sft([examples[i] for i in idx], collate)
        batches.append({"tokens": batch.input_ids, "position_ids": batch.position_ids})
    length = max(b["tokens"].shape[1] for b in batches)
    for b in batches:
        extra = length - b["tokens"].shape[1]
        if extra:
            b["tokens"] = torch.nn.functional.pad(b["tokens"], (0, extra), value=collate.pad_id)
            b["position_ids"] = torch.arange(length).expand(b["tokens"].shape[0], -1)
    return batches, rows


def run_teacher_pass(
    model: Any,
    examples: Sequence[SFTExample],
    config: TeacherPassConfig,
    *,
    vocab_size: int,
    pad_id: int,
    groups: TeacherGroups = TeacherGroups(),
    progress: Callable[[int, int], None] | None = None,
) -> TeacherPassResult:
    """Compute and store the teacher's top-k for every example (resumable; collective).

    Call it on every rank with the same examples (the tokenized dataset, in order: store index
    ``i`` is ``examples[i]``).

    Args:
        model: This rank's teacher chunk (``build_gpt_model`` + weights); put in eval mode.
        examples: The tokenized SFT examples, tokenized exactly as the student will see them.
        config: Output directory, top_k, dtype, batching.
        vocab_size: The teacher's real vocabulary size (its tokenizer's); padded ids are never
            stored. Recorded in the stores for the training-time vocabulary check.
        pad_id: Padding token id.
        groups: The parallel layout (`TeacherGroups.from_model` of ``model``).
        progress: Called after each pipeline call with ``(samples, positions)`` newly written by
            this replica; default: a progress line on global rank 0.

    Returns:
        The `TeacherPassResult` (identical on every rank), once every part is written.

    Raises:
        ValueError: When ``output_dir`` holds a pass over other data or with other settings.
    """
    out = Path(config.output_dir)
    parts = _plan(out, examples, config, vocab_size, groups)
    mine = [p for p in range(len(parts)) if p % groups.data_size == groups.data_rank]
    share = sum(parts[p][1] - parts[p][0] for p in mine)
    printer = ProgressPrinter(
        share, desc="teacher top-k", unit="samples", enabled=groups.is_main and progress is None
    )
    collate = CollateConfig(pad_id=pad_id)
    loss_fn = functools.partial(
        teacher_topk_outputs, top_k=config.top_k, vocab_size=vocab_size, group=groups.tensor
    )
    chunk = config.micro_batch_size * config.micro_batches_per_call
    model.eval()
    samples = positions = 0
    start_time = time.perf_counter()
    for p in mine:
        lo, hi = parts[p]
        writer = None
        if groups.is_writer:
            writer = TeacherTopKWriter(
                out / f"part-{p:05d}",
                top_k=config.top_k,
                dtype=config.dtype,
                start_index=lo,
                vocab_size=vocab_size,
                with_input_ids=config.keep_input_ids,
                shard_positions=config.shard_positions,
                durable=config.durable,
            )
        try:
            done = _agree(writer.next_index if writer else -1, groups.model_parallel, groups.device)
            first = lo + ((done - lo) // chunk) * chunk
            for a in range(first, hi, chunk):
                batches, rows = _micro_batches(
                    examples, a, min(a + chunk, hi), config.micro_batch_size, collate
                )
                outputs = forward_backward(
                    model, batches, logits_forward, loss_fn, forward_only=True
                )
                new = [(i, n) for i, n in rows if i >= done]
                if writer is not None:
                    _write(writer, outputs, batches, rows, done, config)
                samples += len(new)
                positions += sum(n for _, n in new)
                if progress is None:
                    printer.update(len(new))
                else:
                    progress(len(new), sum(n for _, n in new))
        finally:
            if writer is not None:
                writer.close()
    seconds = time.perf_counter() - start_time
    printer.close()
    totals = torch.tensor([samples, positions], dtype=torch.int64, device=groups.device)
    if groups.data is not None:
        dist.all_reduce(totals, group=groups.data)
    if groups.world is not None:  # every part is complete when any rank returns
        dist.barrier(group=groups.world)
    return TeacherPassResult(
        output_dir=str(out),
        num_examples=len(examples),
        samples_computed=int(totals[0]),
        positions_computed=int(totals[1]),
        seconds=seconds,
    )


def _write(
    writer: TeacherTopKWriter,
    outputs: Sequence[Mapping[str, Tensor]],
    batches: Sequence[Mapping[str, Tensor]],
    rows: Sequence[tuple[int, int]],
    done: int,
    config: TeacherPassConfig,
) -> None:
    size = config.micro_batch_size
    for j, (index, n) in enumerate(rows):
        if index < done:
            continue
        out, row = outputs[j // size], j % size
        tokens = batches[j // size]["tokens"][row, :n] if config.keep_input_ids else None
        writer.append(
            index,
            out["teacher_logits"][row, :n].cpu(),
            out["teacher_ids"][row, :n].cpu(),
            out["teacher_logsumexp"][row, :n].cpu(),
            None if tokens is None else tokens.cpu(),
        )


def open_teacher_store(
    directory: str | Path, *, examples: Sequence[SFTExample] | None = None
) -> TeacherTopKReader:
    """Open the output of `run_teacher_pass` (or a single align-data store, e.g. imported).

    Args:
        directory: A teacher-pass output directory (``plan.json`` + ``part-*``) or one store.
        examples: The student's tokenized examples; when given and a plan exists, their count and
            fingerprint must match the teacher pass's.

    Returns:
        A reader over all parts (sample index = example position).

    Raises:
        ValueError: When the pass is incomplete or was run over other examples.
    """
    root = Path(directory)
    plan_path = root / PLAN_FILE
    if not plan_path.exists():
        return TeacherTopKReader(root)
    plan = json.loads(plan_path.read_text())
    parts = [root / f"part-{p:05d}" for p in range(len(plan["parts"]))]
    missing = [str(d) for d in parts if not (d / "meta.json").exists()]
    reader = None if missing else TeacherTopKReader(parts)
    if reader is None or len(reader) != plan["num_examples"]:
        have = 0 if reader is None else len(reader)
        raise ValueError(
            f"{root}: the teacher pass is incomplete ({have} of {plan['num_examples']} samples); "
            "rerun it to finish"
        )
    if examples is not None and (
        len(examples) != plan["num_examples"]
        or examples_fingerprint(examples) != plan["fingerprint"]
    ):
        raise ValueError(
            f"{root}: the teacher pass ran over other examples than the student's "
            f"({plan['num_examples']} stored, {len(examples)} given, or other token ids): the "
            "data files, tokenizer, template and max_length must be the same"
        )
    return reader


def teacher_vocab_size(directory: str | Path) -> int | None:
    """The teacher's vocabulary size recorded by the teacher pass, or None when unknown."""
    root = Path(directory)
    for meta in (root / PLAN_FILE, root / "meta.json"):
        if meta.exists():
            value = json.loads(meta.read_text()).get("vocab_size")
            return None if value is None else int(value)
    return None

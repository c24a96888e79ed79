"""Memory and time of align_losses' memory-lean functions against naive dense versions.

    uv run python bench/losses.py                      # CPU, N = 4096, V = 32000 and 128000
    uv run python bench/losses.py --device cuda        # same on a GPU
    uv run python bench/losses.py --vocab 32000 --only token_logps --reps 5

For each case it runs forward + backward (gradients w.r.t. every float input, upstream gradient
random per token; ``chunked_linear_logps_frozen_weight``: the output weight frozen, gradients
w.r.t. the hidden states only) and reports:

* peak extra memory: the high-water mark of bytes allocated *during* forward + backward, above
  what was allocated before (inputs), gradients included. On CUDA this is
  ``torch.cuda.max_memory_allocated`` after a reset. On CPU torch allocations are invisible to
  ``tracemalloc``, so the run is repeated under ``torch.profiler`` with ``profile_memory=True``,
  which records every allocation and free of the torch CPU allocator with its size and time;
  replaying those events in time order gives the exact high-water mark.
* saved for backward: bytes of the distinct storages autograd keeps between forward and backward
  (``torch.autograd.graph.saved_tensors_hooks``), not counting storages of the inputs.
* forward + backward time: median over ``--reps`` runs after ``--warmup`` runs (no profiler),
  naive and ours alternating so that a change in machine load hits both alike. Wall-clock time,
  and on CPU also the process CPU time (all threads), which other processes competing for the
  cores cannot inflate: on a shared machine its ratio is the reliable one.

Ratios are ours / naive; lower is better. Each case runs in a fresh process, one at a time
(N = 4096 × V = 128000 float32 logits alone are 2 GB).
"""

from __future__ import annotations

import argparse
import gc
import math
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.profiler import ProfilerActivity, profile

from align_losses import chunked_linear_logps, full_vocab_kd_loss, token_logps, topk_kd_loss
from align_losses.logps import sequence_logps
from align_losses.reference_free import orpo_loss, simpo_loss

MiB = 1 << 20


# ----------------------------------------------------------------------------- naive versions


def naive_token_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def naive_linear_logps(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    return naive_token_logps(hidden @ weight.T, labels)


def naive_topk_kd(
    student: torch.Tensor,
    values: torch.Tensor,
    ids: torch.Tensor,
    teacher_lse: torch.Tensor | None,
) -> torch.Tensor:
    """Forward KL as one would write it with stock ops (full log-softmax for the tail)."""
    student = student.float()
    if teacher_lse is None:
        log_q = torch.log_softmax(student.gather(-1, ids), dim=-1)
        log_p = torch.log_softmax(values, dim=-1)
    else:
        log_q_ids = torch.log_softmax(student, dim=-1).gather(-1, ids)
        log_p_ids = values - teacher_lse.unsqueeze(-1)
        q_tail = (1 - log_q_ids.exp().sum(-1, keepdim=True)).clamp(min=1e-30)
        p_tail = (1 - log_p_ids.exp().sum(-1, keepdim=True)).clamp(min=1e-30)
        log_q = torch.cat([log_q_ids, q_tail.log()], dim=-1)
        log_p = torch.cat([log_p_ids, p_tail.log()], dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def _naive_jsd(log_p: torch.Tensor, log_q: torch.Tensor, beta: float) -> torch.Tensor:
    """Generalised JSD as TRL writes it: a stacked log-sum-exp for the mixture, then two KLs."""
    log_m = torch.logsumexp(torch.stack([log_q + math.log1p(-beta), log_p + math.log(beta)]), 0)
    kl_p = torch.nn.functional.kl_div(log_m, log_p, reduction="none", log_target=True)
    kl_q = torch.nn.functional.kl_div(log_m, log_q, reduction="none", log_target=True)
    return (beta * kl_p + (1 - beta) * kl_q).sum(-1)


def naive_topk_jsd(
    student: torch.Tensor,
    values: torch.Tensor,
    ids: torch.Tensor,
    teacher_lse: torch.Tensor | None,
    beta: float,
) -> torch.Tensor:
    """Generalised JSD over the teacher's top-K (+ tail) with stock ops."""
    student = student.float()
    if teacher_lse is None:
        log_q = torch.log_softmax(student.gather(-1, ids), dim=-1)
        log_p = torch.log_softmax(values, dim=-1)
    else:
        log_q_ids = torch.log_softmax(student, dim=-1).gather(-1, ids)
        log_p_ids = values - teacher_lse.unsqueeze(-1)
        q_tail = (1 - log_q_ids.exp().sum(-1, keepdim=True)).clamp(min=1e-30)
        p_tail = (1 - log_p_ids.exp().sum(-1, keepdim=True)).clamp(min=1e-30)
        log_q = torch.cat([log_q_ids, q_tail.log()], dim=-1)
        log_p = torch.cat([log_p_ids, p_tail.log()], dim=-1)
    return _naive_jsd(log_p, log_q, beta)


def naive_full_jsd(student: torch.Tensor, teacher: torch.Tensor, beta: float) -> torch.Tensor:
    """Full-vocabulary generalised JSD (TRL's ``generalized_jsd_loss``, per token)."""
    log_q = torch.log_softmax(student.float(), dim=-1)
    log_p = torch.log_softmax(teacher.float(), dim=-1)
    return _naive_jsd(log_p, log_q, beta)


def _naive_sequence_sums(
    logits: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probs and token counts per sequence, with a full log-softmax."""
    mask = labels != -100
    picked = naive_token_logps(logits, labels.clamp(min=0))
    return torch.where(mask, picked, 0.0).sum(-1), mask.sum(-1).float()


def naive_simpo(
    logits: torch.Tensor, labels: torch.Tensor, beta: float, gamma: float
) -> torch.Tensor:
    """SimPO as written in its paper: length-normalised policy log-probs, margin γ."""
    sums, counts = _naive_sequence_sums(logits, labels)
    b = sums.shape[0] // 2
    avg = sums / counts.clamp(min=1)
    return -torch.nn.functional.logsigmoid(beta * (avg[:b] - avg[b:]) - gamma)


def naive_orpo(logits: torch.Tensor, labels: torch.Tensor, lam: float) -> torch.Tensor:
    """ORPO as written in its paper: chosen NLL + λ·(−log σ(log odds ratio))."""
    sums, counts = _naive_sequence_sums(logits, labels)
    b = sums.shape[0] // 2
    avg = sums / counts.clamp(min=1)
    log_odds = avg - torch.log1p(-torch.exp(avg))
    return -avg[:b] - lam * torch.nn.functional.logsigmoid(log_odds[:b] - log_odds[b:])


# ------------------------------------------------------------------------------- measurement


@dataclass
class Measurement:
    peak: int
    saved: int
    seconds: float
    cpu_seconds: float


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _fwd_bwd(fn: Callable[[], torch.Tensor], inputs: list[torch.Tensor], upstream: torch.Tensor):
    out = fn()
    grads = torch.autograd.grad((out * upstream).sum(), inputs)
    return out, grads


def _saved_bytes(fn: Callable[[], torch.Tensor], inputs: list[torch.Tensor]) -> int:
    own = {t.untyped_storage().data_ptr() for t in inputs}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in own:
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(storages.values())


def _cpu_peak(run: Callable[[], object]) -> int:
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = run()
        del result
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    )
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return peak


def _cuda_peak(run: Callable[[], object], device: torch.device) -> int:
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    result = run()
    _sync(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del result
    return peak


def _time_once(
    fn: Callable[[], torch.Tensor], inputs, upstream: torch.Tensor
) -> tuple[float, float]:
    """Wall-clock and process CPU seconds of one forward + backward."""
    _sync(upstream.device)
    start, cpu_start = time.perf_counter(), time.process_time()
    result = _fwd_bwd(fn, inputs, upstream)
    _sync(upstream.device)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    del result
    return elapsed, cpu


def measure_pair(
    naive: Callable[[], torch.Tensor],
    ours: Callable[[], torch.Tensor],
    inputs: list[torch.Tensor],
    upstream: torch.Tensor,
    *,
    warmup: int,
    reps: int,
) -> tuple[Measurement, Measurement]:
    """Time naive and ours in alternation (so load drift hits both), then measure memory."""
    fns = (naive, ours)
    for _ in range(warmup):
        for fn in fns:
            _time_once(fn, inputs, upstream)
    times: tuple[list[tuple[float, float]], list[tuple[float, float]]] = ([], [])
    for _ in range(reps):
        for fn, bucket in zip(fns, times, strict=True):
            bucket.append(_time_once(fn, inputs, upstream))
            gc.collect()
    out = []
    for fn, bucket in zip(fns, times, strict=True):
        saved = _saved_bytes(fn, inputs)

        def run(fn: Callable[[], torch.Tensor] = fn) -> object:
            return _fwd_bwd(fn, inputs, upstream)

        device = upstream.device
        peak = _cuda_peak(run, device) if device.type == "cuda" else _cpu_peak(run)
        wall = statistics.median(t for t, _ in bucket)
        cpu = statistics.median(c for _, c in bucket)
        out.append(Measurement(peak, saved, wall, cpu))
        gc.collect()
    return out[0], out[1]


# ------------------------------------------------------------------------------------- cases


@dataclass
class Case:
    name: str
    vocab: int
    naive: Callable[[], torch.Tensor]
    ours: Callable[[], torch.Tensor]
    inputs: list[torch.Tensor]
    upstream: torch.Tensor


def _teacher_topk(
    n: int, vocab: int, k: int, device: torch.device, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Synthetic teacher top-K logits, ids and log-sum-exp, built 256 rows at a time."""
    values, ids, lse = [], [], []
    for start in range(0, n, 256):
        rows = min(256, n - start)
        teacher = torch.randn(rows, vocab, device=device, generator=gen) * 2
        top = torch.topk(teacher, k, dim=-1)
        values.append(top.values)
        ids.append(top.indices)
        lse.append(teacher.logsumexp(-1))
    return torch.cat(values), torch.cat(ids), torch.cat(lse)


def _jsd_case(
    name: str, n: int, vocab: int, args: argparse.Namespace, gen: torch.Generator
) -> Case:
    """Generalised JSD (β = 0.5): top-K (K-way or tail bucket) or full vocabulary."""
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    upstream = torch.randn(n, device=device, generator=gen)
    student = torch.randn(n, vocab, device=device, generator=gen).to(dtype).requires_grad_()
    beta = 0.5
    if name == "full_vocab_kd_loss_jsd":
        teacher = (torch.randn(n, vocab, device=device, generator=gen) * 2).to(dtype)
        return Case(
            "full_vocab_kd_loss (jsd, β=0.5)",
            vocab,
            lambda: naive_full_jsd(student, teacher, beta),
            lambda: full_vocab_kd_loss(student, teacher, divergence="jsd", beta=beta),
            [student],
            upstream,
        )
    tail = name == "topk_kd_loss_jsd_tail"
    values, ids, lse = _teacher_topk(n, vocab, args.k, device, gen)
    if not tail:
        lse = None
    return Case(
        f"topk_kd_loss (jsd, β=0.5, K={args.k}, {'tail bucket' if tail else 'K-way'})",
        vocab,
        lambda: naive_topk_jsd(student, values, ids, lse, beta),
        lambda: topk_kd_loss(
            student, values, ids, teacher_logsumexp=lse, divergence="jsd", beta=beta
        ),
        [student],
        upstream,
    )


def _reference_free_case(
    name: str, n: int, vocab: int, args: argparse.Namespace, gen: torch.Generator
) -> Case:
    """SimPO / ORPO from the logits of a batch of pairs: N tokens as 2B sequences of 256."""
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    seq = 256
    rows = max(2, n // seq // 2 * 2)
    logits = torch.randn(rows, seq, vocab, device=device, generator=gen).to(dtype)
    logits.requires_grad_()
    labels = torch.randint(0, vocab, (rows, seq), device=device, generator=gen)
    labels[:, :32] = -100  # prompt
    ends = torch.randint(seq // 2, seq + 1, (rows, 1), device=device, generator=gen)
    labels[torch.arange(seq, device=device) >= ends] = -100  # right padding
    counts = (labels != -100).sum(-1)
    b = rows // 2
    upstream = torch.randn(b, device=device, generator=gen)

    def ours() -> torch.Tensor:
        sums = sequence_logps(logits, labels)
        if name == "simpo_loss":
            return simpo_loss(sums[:b], sums[b:], counts[:b], counts[b:], beta=2.0, gamma=1.0)[0]
        return orpo_loss(sums[:b], sums[b:], counts[:b], counts[b:], odds_ratio_weight=0.1)[0]

    def naive() -> torch.Tensor:
        if name == "simpo_loss":
            return naive_simpo(logits, labels, 2.0, 1.0)
        return naive_orpo(logits, labels, 0.1)

    return Case(
        f"{name} (from logits, {b} pairs × 2 × {seq})", vocab, naive, ours, [logits], upstream
    )


def build(name: str, n: int, vocab: int, args: argparse.Namespace) -> Case:
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    gen = torch.Generator(device=device).manual_seed(0)
    upstream = torch.randn(n, device=device, generator=gen)
    labels = torch.randint(0, vocab, (n,), device=device, generator=gen)
    if name == "token_logps":
        logits = torch.randn(n, vocab, device=device, generator=gen).to(dtype).requires_grad_()
        return Case(
            name,
            vocab,
            lambda: naive_token_logps(logits, labels),
            lambda: token_logps(logits, labels),
            [logits],
            upstream,
        )
    if name in ("chunked_linear_logps", "chunked_linear_logps_frozen_weight"):
        frozen = name.endswith("frozen_weight")
        hidden = torch.randn(n, args.hidden, device=device, generator=gen).to(dtype)
        weight = torch.randn(vocab, args.hidden, device=device, generator=gen) / args.hidden**0.5
        weight = weight.to(dtype).requires_grad_(not frozen)
        hidden.requires_grad_()
        return Case(
            f"chunked_linear_logps (H={args.hidden}, chunk={args.chunk_size}"
            f"{', frozen W' if frozen else ''})",
            vocab,
            lambda: naive_linear_logps(hidden, weight, labels),
            lambda: chunked_linear_logps(hidden, weight, labels, chunk_size=args.chunk_size),
            [hidden] if frozen else [hidden, weight],
            upstream,
        )
    if name in ("topk_kd_loss_jsd", "topk_kd_loss_jsd_tail", "full_vocab_kd_loss_jsd"):
        return _jsd_case(name, n, vocab, args, gen)
    if name in ("simpo_loss", "orpo_loss"):
        return _reference_free_case(name, n, vocab, args, gen)
    tail = name == "topk_kd_loss_tail"
    student = torch.randn(n, vocab, device=device, generator=gen).to(dtype).requires_grad_()
    values, ids, lse = _teacher_topk(n, vocab, args.k, device, gen)
    if not tail:
        lse = None
    return Case(
        f"topk_kd_loss (K={args.k}, {'tail bucket' if tail else 'K-way'})",
        vocab,
        lambda: naive_topk_kd(student, values, ids, lse),
        lambda: topk_kd_loss(student, values, ids, teacher_logsumexp=lse),
        [student],
        upstream,
    )


FUNCTIONS = [
    "token_logps",
    "chunked_linear_logps",
    "chunked_linear_logps_frozen_weight",
    "topk_kd_loss",
    "topk_kd_loss_tail",
    "topk_kd_loss_jsd",
    "topk_kd_loss_jsd_tail",
    "full_vocab_kd_loss_jsd",
    "simpo_loss",
    "orpo_loss",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000, 128000])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--only", nargs="+", choices=FUNCTIONS, default=FUNCTIONS)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--one", nargs=2, metavar=("FUNCTION", "V"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.one is not None:
        name, vocab = args.one[0], int(args.one[1])
        print(row(name, vocab, args), flush=True)
        return

    print(
        f"device={args.device} dtype={args.dtype} N={args.tokens} torch={torch.__version__} "
        f"threads={torch.get_num_threads()}"
    )
    print(HEADER)
    print("|" + "|".join("-" * len(c) for c in HEADER.split("|")[1:-1]) + "|", flush=True)
    # One fresh process per case, so that nothing of one case (allocator caches, fragmented
    # heaps) inflates the next one's memory; N = 4096 × V = 128000 float32 logits are 2 GB.
    for vocab in args.vocab:
        for name in args.only:
            command = [sys.executable, __file__, *sys.argv[1:], "--one", name, str(vocab)]
            done = subprocess.run(command, capture_output=True, text=True)
            lines = [line for line in done.stdout.splitlines() if line.startswith("|")]
            if done.returncode != 0 or not lines:
                print(f"| {name} V={vocab}: failed (exit {done.returncode}) {done.stderr[-300:]}")
            else:
                print(lines[-1], flush=True)


HEADER = (
    f"| {'function':<44} | {'V':>6} | {'peak naive':>10} | {'peak ours':>9} | {'ratio':>5} "
    f"| {'saved naive':>11} | {'saved ours':>10} | {'t naive':>8} | {'t ours':>8} | "
    f"{'ratio':>5} | {'cpu ratio':>9} |"
)


def row(name: str, vocab: int, args: argparse.Namespace) -> str:
    """Measure one case and format it as a table row."""
    case = build(name, args.tokens, vocab, args)
    naive, ours = measure_pair(
        case.naive, case.ours, case.inputs, case.upstream, warmup=args.warmup, reps=args.reps
    )
    # Process CPU time is what a contended CPU cannot distort; it means nothing on a GPU.
    cpu_ratio = "-" if args.device != "cpu" else f"{ours.cpu_seconds / naive.cpu_seconds:.2f}"
    return (
        f"| {case.name:<44} | {vocab:>6} | {naive.peak / MiB:>6.0f} MiB | "
        f"{ours.peak / MiB:>5.0f} MiB | {ours.peak / naive.peak:>5.2f} | "
        f"{naive.saved / MiB:>7.0f} MiB | {ours.saved / MiB:>6.0f} MiB | "
        f"{naive.seconds * 1e3:>6.0f}ms | {ours.seconds * 1e3:>6.0f}ms | "
        f"{ours.seconds / naive.seconds:>5.2f} | {cpu_ratio:>9} |"
    )


if __name__ == "__main__":
    main()

"""Real-model pieces of ``bench/dpo_vs_trl.py --model smollm2``.

- `smollm2_assets`: SmolLM2-135M-Instruct as a Hugging Face directory (``tests/hf_models.py``,
  loaded by file path as ``bench/model.py`` does), 64 synthetic English preference pairs as chat
  messages (a user turn; chosen and rejected assistant turns), and the token ids align-data makes
  of them with the model's own tokenizer and chat template, written next to the data so that the
  TRL worker can check that TRL tokenizes every pair to exactly the same ids.
- `Watched` / `run_watched`: a child process whose memory (its resident set plus the private
  memory of its descendants) and CPU time are polled every 20 ms and which is killed (its whole
  process group) the moment its memory goes above a cap; its kernel-counted peak (``ru_maxrss``
  from ``wait4``) is read afterwards, so a spike of the main process shorter than the polling
  interval is still caught. The CPU samples give each run's CPU seconds between two step ends.
- `largest_fitting`: the largest micro batch a configuration trains under a memory cap.

Only the standard library, psutil (an align-core dependency) and align-data are imported at
module level; transformers/TRL only in the TRL worker.
"""

from __future__ import annotations

import bisect
import contextlib
import importlib.util
import json
import os
import random
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

# Words for the synthetic English text: common enough that SmolLM2's tokenizer spends about one
# token per word, as on ordinary chat data (the toy benchmark's pseudo-words would cost ~3).
_WORD_TEXT = (
    "the of and to in is that it for as with was on be by this are from at or an have not "
    "they which one you were all we can her has there been if more when will would who so "
    "no out up into than them only other new some could time these two may first then do "
    "any like my now over such our man me even most made after also did many before must "
    "through back years where much your way well down should because each just those people "
    "how too little state good very make world still own see men work long get here between "
    "both life being under never day same another know while last might us great old year off "
    "come since against go came right used take three small large water number part place "
    "sound point word answer question model data train learn better simple clear short long "
    "reason example because therefore however first second finally result value function "
    "method system problem solution code test memory speed step batch token sequence loss"
)
_WORDS = tuple(_WORD_TEXT.split())


def _sentence(rng: random.Random) -> str:
    words = [rng.choice(_WORDS) for _ in range(rng.randint(6, 14))]
    return " ".join(words).capitalize() + rng.choice([".", ".", ".", "?", "!"])


def _text(rng: random.Random, count: Callable[[str], int], target: int) -> str:
    """Sentences until the text has at least ``target`` tokens."""
    sentences: list[str] = []
    while not sentences or count(" ".join(sentences)) < target:
        sentences.append(_sentence(rng))
    return " ".join(sentences)


def load_hf_models() -> Any:
    """``tests/hf_models.py`` as a module (it is not importable: tests run in importlib mode)."""
    spec = importlib.util.spec_from_file_location(
        "hf_models", Path(__file__).parents[1] / "tests" / "hf_models.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclass(frozen=True)
class DataShape:
    """The synthetic preference pairs: how many, and their lengths in tokens (of the message
    contents; the chat template adds SmolLM2's default system turn and the turn markers)."""

    rows: int = 64
    prompt_tokens: tuple[int, int] = (12, 40)
    response_tokens: tuple[int, int] = (24, 72)
    seed: int = 0


def smollm2_assets(workdir: Path, shape: DataShape, max_length: int) -> dict[str, Any]:
    """The model directory, the conversational JSONL and align-data's token ids of every pair.

    Raises:
        ValueError: when align-data truncates or drops any pair at ``max_length`` (both
            frameworks must see whole sequences: their truncation rules differ).
    """
    from align_data import HFTokenizer, TokenizeConfig, load_records, tokenize_records

    model_dir = load_hf_models().smollm2_dir()
    tokenizer = HFTokenizer(model_dir)

    def count(text: str) -> int:
        return len(tokenizer.encode(text))

    rng = random.Random(shape.seed)
    rows = []
    for _ in range(shape.rows):
        prompt = _text(rng, count, rng.randint(*shape.prompt_tokens))
        chosen = _text(rng, count, rng.randint(*shape.response_tokens))
        rejected = _text(rng, count, rng.randint(*shape.response_tokens))
        rows.append(
            {
                "prompt": [{"role": "user", "content": prompt}],
                "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}],
            }
        )
    data = workdir / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    records = load_records(data, kind="preference").records
    result = tokenize_records(records, tokenizer, TokenizeConfig(max_length=max_length))
    stats = result.stats
    if result.dropped or len(result.examples) != shape.rows:
        raise ValueError(f"align-data dropped pairs at max_length {max_length}: {result.dropped}")
    if any(
        len(e.prompt_ids) + max(len(e.chosen_ids), len(e.rejected_ids)) > max_length
        for e in result.examples
    ):
        raise ValueError(f"a pair is longer than max_length {max_length}")
    ids = [
        {
            "prompt_ids": e.prompt_ids.tolist(),
            "chosen_ids": e.chosen_ids.tolist(),
            "rejected_ids": e.rejected_ids.tolist(),
        }
        for e in result.examples
    ]
    token_ids = workdir / "token_ids.json"
    token_ids.write_text(json.dumps(ids))
    lengths = [
        (len(r["prompt_ids"]) + len(r["chosen_ids"]), len(r["prompt_ids"]) + len(r["rejected_ids"]))
        for r in ids
    ]
    return {
        "hf_dir": str(model_dir),
        "data": str(data),
        "token_ids": str(token_ids),
        "rows": rows,
        "lengths": lengths,
        "stats": str(stats),
    }


def describe_lengths(lengths: Sequence[tuple[int, int]]) -> str:
    """Sequence lengths of the pairs (prompt + response, special tokens included)."""
    flat = [n for pair in lengths for n in pair]
    return (
        f"{len(lengths)} pairs, sequences of {min(flat)}-{max(flat)} tokens "
        f"(mean {sum(flat) / len(flat):.1f}), {sum(flat)} tokens in all"
    )


def longest_rows(assets: dict[str, Any], count: int, workdir: Path, repeat: int = 2) -> Path:
    """A JSONL of the ``count`` pairs with the most tokens (the worst micro batch of the data),
    in their original order, ``repeat`` times over (one batch per step of a memory probe)."""
    order = sorted(range(len(assets["rows"])), key=lambda i: -sum(assets["lengths"][i]))
    keep = sorted(order[:count])
    path = workdir / f"longest-{count}x{repeat}.jsonl"
    path.write_text("".join(json.dumps(assets["rows"][i]) + "\n" for i in keep) * repeat)
    return path


# ------------------------------------------------------------------------------ memory watch


@dataclass
class Watched:
    """A finished child process.

    Attributes:
        returncode: Exit status (negative: killed by that signal).
        stdout: Its standard output.
        stderr: Its standard error.
        peak_bytes: Kernel-counted peak resident memory (``ru_maxrss`` of the child and the
            descendants it waited for).
        polled_peak_bytes: Highest memory of the process tree seen by polling (RSS of the
            child plus USS of its descendants).
        killed: Whether the watcher killed it for going above the cap.
        cpu: ``(wall time, CPU seconds)`` samples every 20 ms: user + system time of the child
            and its descendants since it started, against ``time.time()``.
    """

    returncode: int
    stdout: str
    stderr: str
    peak_bytes: int
    polled_peak_bytes: int
    killed: bool
    cpu: list[tuple[float, float]]

    def cpu_between(self, begin: float, end: float) -> float:
        """CPU seconds the process tree used between two ``time.time()`` instants."""
        return _interpolate(self.cpu, end) - _interpolate(self.cpu, begin)


def _interpolate(samples: list[tuple[float, float]], t: float) -> float:
    if not samples:
        return float("nan")
    i = bisect.bisect_left(samples, (t, float("-inf")))
    if i == 0:
        return samples[0][1]
    if i == len(samples):
        return samples[-1][1]
    (t0, c0), (t1, c1) = samples[i - 1], samples[i]
    return c0 + (c1 - c0) * (t - t0) / max(t1 - t0, 1e-9)


def _cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def run_watched(
    command: Sequence[str], env: dict[str, str], cap_bytes: int | None = None
) -> Watched:
    """Run ``command``; with ``cap_bytes``, kill it once its memory goes above.

    Every 20 ms the watcher reads the child's resident set and CPU time (cheap: /proc/PID/stat
    and statm); every 0.5 s it also lists the descendants and reads their private memory (USS)
    and CPU time. align forks helper processes that share almost all of the parent's pages, so
    the tree's memory is the child's RSS plus the helpers' USS, not a sum of RSS (which would
    count the model three times).
    """
    with (
        open(os.devnull, "rb") as devnull,
        _tempfile() as out,
        _tempfile() as err,
    ):
        proc = subprocess.Popen(
            list(command), env=env, stdin=devnull, stdout=out, stderr=err, start_new_session=True
        )
        watched = psutil.Process(proc.pid)
        state: dict[str, Any] = {"peak": 0, "killed": False}
        samples: list[tuple[float, float]] = []
        done = threading.Event()

        def poll() -> None:
            helpers_memory, helpers_cpu, last_scan = 0, 0.0, 0.0
            while not done.wait(0.02):
                now = time.time()
                try:
                    if now - last_scan >= 0.5:
                        helpers_memory, helpers_cpu, last_scan = 0, 0.0, now
                        for child in watched.children(recursive=True):
                            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                                helpers_memory += child.memory_full_info().uss
                                helpers_cpu += _cpu_seconds(child)
                    memory = watched.memory_info().rss + helpers_memory
                    samples.append((now, _cpu_seconds(watched) + helpers_cpu))
                except psutil.NoSuchProcess:
                    return
                state["peak"] = max(state["peak"], memory)
                if cap_bytes is not None and memory > cap_bytes and not state["killed"]:
                    state["killed"] = True
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        return

        thread = threading.Thread(target=poll, daemon=True)
        thread.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:  # Ctrl-C: the child has a session of its own, end it too
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            os.wait4(proc.pid, 0)
            raise
        done.set()
        thread.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return Watched(
            returncode=proc.returncode,
            stdout=out.read().decode(errors="replace"),
            stderr=err.read().decode(errors="replace"),
            peak_bytes=usage.ru_maxrss * 1024,
            polled_peak_bytes=state["peak"],
            killed=state["killed"],
            cpu=samples,
        )


def _tempfile() -> Any:
    import tempfile

    return tempfile.TemporaryFile()


# --------------------------------------------------------------------------- largest fitting


@dataclass
class Probe:
    """One micro batch size tried under the cap."""

    micro_batch: int
    fits: bool
    peak_mib: float
    seconds: float
    why: str


def largest_fitting(
    attempt: Callable[[int], Watched],
    cap_bytes: int,
    start: int,
    limit: int,
    log: Callable[[str], None] = print,
    resolution: float = 1 / 8,
) -> tuple[int, int | None, list[Probe]]:
    """The largest micro batch in ``[1, limit]`` that trains within ``cap_bytes``.

    Doubles from ``start`` until a size fails (or ``limit`` is reached), then bisects between
    the largest success and the smallest failure until they are less than an eighth apart
    (``resolution``; 1 = exact). ``attempt(m)`` runs one training step at micro batch ``m`` under
    the cap. A size fits when the process exits cleanly and its kernel-counted peak RSS stayed at
    or below the cap.

    Returns:
        The largest size that fitted (0 if none), the smallest that did not (None if every size
        up to ``limit`` fitted) and every probe in the order run.
    """
    probes: list[Probe] = []

    def fits(m: int) -> bool:
        begin = time.time()
        result = attempt(m)
        ok = result.returncode == 0 and not result.killed and result.peak_bytes <= cap_bytes
        if result.killed:
            why = "killed above the cap"
        elif result.returncode != 0:
            tail = (result.stderr.strip().splitlines() or ["?"])[-1][:120]
            why = f"exit {result.returncode}: {tail}"
        elif result.peak_bytes > cap_bytes:
            why = "peak above the cap (between polls)"
        else:
            why = "ok"
        peak = max(result.peak_bytes, result.polled_peak_bytes) / 2**20
        probes.append(Probe(m, ok, peak, time.time() - begin, why))
        log(f"    micro batch {m}: {why}, peak {peak:.0f} MiB, {probes[-1].seconds:.0f} s")
        return ok

    good, bad = 0, None
    m = start
    while m <= limit:
        if fits(m):
            good = m
            if m == limit:
                break
            m = min(2 * m, limit)
        else:
            bad = m
            break
    if good == 0:  # ``start`` itself failed: go down
        m = start // 2
        while m >= 1 and not fits(m):
            bad, m = m, m // 2
        good = max(m, 0)
    while bad is not None and bad - good > max(1, int(good * resolution)):
        middle = (good + bad) // 2
        if fits(middle):
            good = middle
        else:
            bad = middle
    return good, bad, probes

"""Faults around a run's files and signals, in one process (the CLI's are in tests/).

What is checked: the run-directory lock refuses a second holder naming the first one's pid and
is free again once the holder is killed; a checkpoint save waits for another process's save in
progress instead of deleting it; a truncated or deleted shard is found from the metadata and the
newest intact checkpoint is loaded instead; a changed architecture or added LoRA is refused
naming the key and both values; a full disk (a real size-limited tmpfs, when this process may
mount one) while saving a checkpoint or writing a ``.nemo`` is one `DiskFullError` and the
previous checkpoint stays loadable; SIGINT stops like SIGTERM and a second SIGINT quits; the
sequence length is checked against the model's positions; a non-finite step's message quotes
the logged loss.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

from align_core import Checkpointer, ModelConfig, build_gpt_model, seed_all, wrap_ddp
from align_core.checkpoint_checks import DamagedCheckpointError, check_checkpoint_files
from align_core.disk_full import DiskFullError, is_disk_full
from align_core.positions import check_seq_length
from align_core.run_lock import RunDirBusyError, RunDirLock, check_run_dir_free

_HOLD = textwrap.dedent(
    """
    import sys, time
    from align_core.run_lock import {name}
    with {call}:
        print("held", flush=True)
        time.sleep(600)
    """
)


def _holder(name: str, call: str) -> subprocess.Popen:
    """A process that takes a lock and sleeps holding it (prints ``held`` once it has it)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLD.format(name=name, call=call)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


def test_a_second_run_is_refused_naming_the_holder_until_it_dies(tmp_path):
    run_dir = tmp_path / "run"
    proc = _holder("RunDirLock", f"RunDirLock({str(run_dir)!r})")
    try:
        with (
            pytest.raises(RunDirBusyError, match=f"in use by process {proc.pid} ") as err,
            RunDirLock(run_dir),
        ):
            pass
        assert "\n" not in str(err.value)
        with pytest.raises(RunDirBusyError, match=f"process {proc.pid} "):
            check_run_dir_free(run_dir)
    finally:
        _kill(proc)
    check_run_dir_free(run_dir)
    # A killed holder leaves its pid in the file but no lock: the next run proceeds.
    with RunDirLock(run_dir) as lock:
        assert (run_dir / ".lock").read_text().strip() == str(os.getpid())
        with pytest.raises(RunDirBusyError, match=f"process {os.getpid()} "):
            RunDirLock(run_dir).__enter__()  # a second open file description in this process
    assert lock.path.read_text() == ""  # released: no holder recorded


def _model(num_layers: int = 2):
    seed_all(3)
    return wrap_ddp(build_gpt_model(ModelConfig(num_layers=num_layers)))


def _summary(num_layers: int = 2) -> dict:
    import dataclasses

    return dataclasses.asdict(ModelConfig(num_layers=num_layers))


def test_a_save_waits_for_another_save_in_progress_and_removes_only_dead_ones(dist_ctx, tmp_path):
    ckpt = Checkpointer(tmp_path / "checkpoints", keep_last=2)
    ckpt.directory.mkdir()
    other = ckpt.directory / "tmp.step_000007"  # another process's save, still being written
    other.mkdir()
    proc = _holder("exclusive_lock", f"exclusive_lock({str(ckpt.directory)!r}, blocking=True)")
    seen: dict[str, bool] = {}

    def while_blocked() -> None:
        time.sleep(1.5)
        seen["other_kept"] = other.is_dir()
        seen["not_published"] = not ckpt.path(1).exists()
        _kill(proc)  # the other save dies: its directory is stale from now on

    timer = threading.Thread(target=while_blocked)
    timer.start()
    started = time.monotonic()
    ckpt.save(1, _model())
    timer.join()
    assert time.monotonic() - started >= 1.5
    assert seen == {"other_kept": True, "not_published": True}
    assert ckpt.steps() == [1] and not other.exists()


def _truncate(path: Path, keep: int) -> None:
    with path.open("r+b") as handle:
        handle.truncate(keep)


def test_a_damaged_newest_checkpoint_falls_back_to_the_newest_intact_one(dist_ctx, tmp_path):
    model = _model()
    ckpt = Checkpointer(tmp_path, keep_last=3)
    for step in (1, 2, 3):
        ckpt.save(step, model, extra_state={"model": _summary()})
    check_checkpoint_files(ckpt.path(3))  # intact
    shard = sorted(ckpt.path(3).glob("*.distcp"))[0]
    size = shard.stat().st_size
    _truncate(shard, size // 2)
    next(iter(ckpt.path(2).glob("*.distcp"))).unlink()

    with pytest.raises(DamagedCheckpointError, match=rf"{shard.name} is truncated \(\d+ of"):
        check_checkpoint_files(ckpt.path(3))
    loaded = ckpt.load(_model())
    assert loaded.step == 1
    assert [line.split(":")[0] for line in loaded.skipped] == ["step_000003", "step_000002"]
    assert f"{size // 2} of " in loaded.skipped[0] and "is missing" in loaded.skipped[1]
    with pytest.raises(DamagedCheckpointError, match=r"checkpoint .*step_000003 is damaged"):
        ckpt.load(_model(), step=3)

    (ckpt.path(1) / "common.pt").unlink()
    with pytest.raises(DamagedCheckpointError, match="no intact checkpoint") as err:
        ckpt.load(_model())
    assert "step_000001: common.pt is missing" in str(err.value)


def test_resuming_with_another_architecture_or_lora_names_the_key(dist_ctx, tmp_path):
    from align_core.lora import LoraConfig, add_lora

    ckpt = Checkpointer(tmp_path, keep_last=1)
    ckpt.save(1, _model(), extra_state={"model": _summary()})
    with pytest.raises(ValueError, match=r"num_layers is 2 in the checkpoint, 3 in this run"):
        ckpt.load(_model(num_layers=3))
    with_lora = _model()
    add_lora(with_lora.module, LoraConfig())
    with pytest.raises(ValueError, match="peft_scheme is none in the checkpoint, lora in this"):
        ckpt.load(with_lora)
    assert ckpt.load(_model()).step == 1


def _small_tmpfs(path: Path, size: str) -> Path:
    path.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a size-limited tmpfs needs root")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    return path


@pytest.fixture
def small_disk(tmp_path):
    """A 16 MB tmpfs (`_leave_free` fills it up to what a test wants)."""
    mount = _small_tmpfs(tmp_path / "small", "16m")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def _leave_free(mount: Path, free: int) -> None:
    """Fill ``mount`` until only about ``free`` bytes are left."""
    import shutil

    (mount / "filler").write_bytes(b"\0" * (shutil.disk_usage(mount).free - free))


def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint(dist_ctx, small_disk):
    model = _model()
    ckpt = Checkpointer(small_disk / "checkpoints", keep_last=2)
    ckpt.save(1, model)
    size = sum(f.stat().st_size for f in ckpt.path(1).iterdir())
    _leave_free(small_disk, size // 2)
    with pytest.raises(DiskFullError) as err:
        ckpt.save(2, model)
    message = str(err.value)
    assert message.startswith(f"disk full while writing checkpoint step_000002 in {small_disk}")
    assert re.search(r" \(about [\d.]+ [kM]B needed, [\d.]+ [kM]B free\); ", message)
    assert message.endswith("the previous checkpoint step_000001 is intact")
    assert "\n" not in message
    assert ckpt.steps() == [1] and not list(ckpt.directory.glob("tmp.*"))
    assert ckpt.load(_model()).step == 1


def test_a_full_disk_while_writing_a_nemo_replaces_nothing(dist_ctx, small_disk):
    from align_core.nemo import save_nemo

    _leave_free(small_disk, 100_000)
    target = small_disk / "final.nemo"
    with pytest.raises(DiskFullError, match=r"disk full while writing final\.nemo in .*needed"):
        save_nemo(_model(), target, ModelConfig())
    assert not target.exists() and sorted(p.name for p in small_disk.iterdir()) == ["filler"]


def test_a_full_disk_is_recognised_through_wrappers():
    import errno

    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device", "/x/shard.distcp")
        except OSError as inner:
            raise RuntimeError("Worker failure") from inner
    except RuntimeError as outer:
        assert is_disk_full(outer)
    assert not is_disk_full(RuntimeError("unexpected pos 704 vs 598"))
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"))


_SIGNALS = textwrap.dedent(
    """
    import os, signal, time
    from align_core.trainer.signals import REPEAT_WINDOW_S, StopRequest, stop_signal
    stop = StopRequest()
    stop.install()
    os.kill(os.getpid(), signal.SIGINT)
    os.kill(os.getpid(), signal.SIGINT)  # the same Ctrl-C again (torchrun forwards it)
    print(stop.signalled, stop.reason, stop_signal() == signal.SIGINT, flush=True)
    time.sleep(REPEAT_WINDOW_S + 0.2)
    try:
        os.kill(os.getpid(), signal.SIGINT)
    except KeyboardInterrupt:
        print("quit", flush=True)
    """
)


def test_sigint_stops_like_sigterm_and_a_second_one_quits():
    done = subprocess.run(
        [sys.executable, "-c", _SIGNALS], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "sigint", "True", "quit"]


def test_seq_length_beyond_the_positions():
    learned = ModelConfig(seq_length=256, position_embedding_type="learned_absolute")
    rope = ModelConfig(seq_length=256)
    assert check_seq_length(learned, 256) is None and check_seq_length(rope, 128) is None
    with pytest.raises(ValueError, match="512 is beyond the model's 256 learned positions"):
        check_seq_length(learned, 512)
    warning = check_seq_length(rope, 512, key="model.data.train_ds.max_seq_length")
    assert warning.startswith("model.data.train_ds.max_seq_length: 512 is beyond the 256")


_spec = importlib.util.spec_from_file_location(
    "_align_core_tests_tiny_faults", Path(__file__).parent / "train_scripts" / "tiny.py"
)
T = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(T)


class _InfGrad(torch.autograd.Function):
    """Identity forward, infinite gradient backward: a finite loss with a non-finite step."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


class _InfGradStep:
    """Delegates to an algorithm step; its loss is finite but its gradient is not."""

    def __init__(self, inner):
        self.inner = inner
        self.name, self.needs_reference, self.ref_shape = inner.name, False, inner.ref_shape

    def build_micro_batch(self, examples, collate):
        return self.inner.build_micro_batch(examples, collate)

    def normalizer(self, micro_batches, global_examples):
        return self.inner.normalizer(micro_batches, global_examples)

    def loss_fn(self, normalizer):
        inner = self.inner.loss_fn(normalizer)

        def loss(batch, logps):
            value, sums = inner(batch, logps)
            return _InfGrad.apply(value), sums

        return loss

    def finalize_metrics(self, sums):
        return self.inner.finalize_metrics(sums)


def test_the_nonfinite_message_quotes_the_logged_loss(dist_ctx):
    from align_core.algorithms import SFTConfig
    from align_core.algorithms.sft import SFTStep
    from align_core.trainer import TrainerConfig
    from align_core.trainer.loop import NonFiniteError

    step = _InfGradStep(SFTStep(SFTConfig(loss_reduction="sequence_mean")))
    config = TrainerConfig(max_steps=1, val_check_interval=0, save_interval=0)
    trainer = T.trainer(
        T.fresh_model(), step, T.data(T.sft_examples(16), [], step, mbs=4, gbs=8), config=config
    )
    sums = {}
    original = trainer._reduce
    trainer._reduce = lambda *a, **k: sums.update(original(*a, **k)) or sums
    with pytest.raises(NonFiniteError) as err:
        trainer.train_step()
    logged = step.finalize_metrics(sums)["loss"]
    assert math.isfinite(logged) and sums["loss"] != pytest.approx(logged)  # a sum, not a mean
    assert f"loss={logged}," in str(err.value)


def test_nested_installs_keep_the_handler_until_the_outermost_restore():
    """A run installs the stop request around trainers that install it themselves (SPIN)."""
    import signal

    from align_core.trainer.signals import StopRequest

    before = signal.getsignal(signal.SIGTERM)
    stop = StopRequest()
    stop.install()
    stop.install()
    stop.restore()  # the inner trainer's fit ends
    assert signal.getsignal(signal.SIGTERM) == stop._handle
    stop.restore()
    assert signal.getsignal(signal.SIGTERM) == before

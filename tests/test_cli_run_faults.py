"""Faults around a run directory, through the ``align`` command: each ends in one line.

A run stopped by Ctrl-C (a real SIGINT) saves and exits 130; while it runs, a second run into
its directory is refused naming its pid (exit 2). Resuming it with another architecture,
another ``--restore`` or LoRA added is refused naming the key and both values, before its
``config.yaml`` is touched (exit 2). A truncated newest checkpoint is passed over with a warning
and the run resumes from the one before; with none intact, one line (exit 2). A disk that fills
up during a save (a real size-limited tmpfs; root only, skipped otherwise) ends in one line
saying the previous checkpoint is intact (exit 1). A sequence length beyond a learned-position
model's positions is refused by ``--dry-run`` (exit 2); beyond a RoPE model's, a warning.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

COMMON = [
    "model.data.synthetic.num_train=48",
    "model.data.synthetic.num_validation=16",
    "model.global_batch_size=8",
    "model.micro_batch_size=4",
    "model.optim.sched.style=constant",
    "model.reference.strategy=swap",
    "trainer.kto.max_epochs=100",
    "trainer.kto.val_check_interval=0",
    "exp_manager.create_plots=false",
]


def _start(run_dir: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "align_cli", "run", "kto", "-q", *COMMON, *extra,
         f"exp_manager.explicit_log_dir={run_dir}"],
        cwd=run_dir.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _wait_for(condition, proc: subprocess.Popen, timeout: float = 500) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"run ended early: {proc.communicate()}")
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"not reached in {timeout} s")


def _trained(run_dir: Path, step: int) -> bool:
    path = run_dir / "metrics.jsonl"
    return path.exists() and any(
        json.loads(line).get("step", 0) >= step for line in path.read_text().splitlines()
    )


def _one_error(result, status: int) -> str:
    """The run's single stderr line (asserting it is the only one) and its exit status."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == status, f"{result.stdout}\n{result.stderr}"
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory: pytest.TempPathFactory, align) -> tuple[Path, int]:
    """A KTO run stopped by Ctrl-C after step 2 (checkpoints every step); a second run into its
    directory was refused while it ran."""
    run_dir = tmp_path_factory.mktemp("sigint") / "run"
    proc = _start(run_dir, "trainer.kto.max_steps=500", "trainer.kto.save_interval=1")
    try:
        _wait_for(lambda: _trained(run_dir, 2), proc)
        second = align(
            "run", "kto", "-q", *COMMON, "trainer.kto.max_steps=3",
            f"exp_manager.explicit_log_dir={run_dir}", cwd=run_dir.parent, check=False,
        )  # fmt: skip
        line = _one_error(second, 2)
        assert line.startswith(f"error: {run_dir} is in use by process {proc.pid} ")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, f"{out}\n{err}"
    steps = json.loads((run_dir / "summary.json").read_text())["result"]["steps"]
    assert steps >= 2 and (run_dir / "checkpoints" / f"step_{steps:06d}").is_dir()
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert max(json.loads(line)["step"] for line in lines) == steps  # nothing of the second run
    return run_dir, steps


@pytest.mark.timeout(900)
@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (["model.num_layers=3"], "model.num_layers is 2 in the checkpoint, 3 in this run"),
        (["--restore", "other.nemo"], "pretrained_checkpoint.restore_from_path is None in"),
        (["model.peft.peft_scheme=lora"], "peft_scheme is none in the checkpoint, lora in"),
    ],
    ids=["num_layers", "restore", "lora"],
)
def test_resume_with_another_model_names_the_key(interrupted, align, change, expected) -> None:
    run_dir, _ = interrupted
    config = (run_dir / "config.yaml").read_bytes()
    result = align(
        "run", "kto", "-q", "--resume", *change, f"exp_manager.explicit_log_dir={run_dir}",
        cwd=run_dir.parent, check=False,
    )  # fmt: skip
    assert expected in _one_error(result, 2)
    assert (run_dir / "config.yaml").read_bytes() == config


@pytest.mark.timeout(900)
def test_a_damaged_newest_checkpoint_resumes_from_the_one_before(interrupted, align) -> None:
    run_dir, steps = interrupted
    newest = run_dir / "checkpoints" / f"step_{steps:06d}"
    shard = sorted(newest.glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[:1000])
    result = align(
        "run", "kto", "-q", "--resume", f"trainer.kto.max_steps={steps + 1}",
        f"exp_manager.explicit_log_dir={run_dir}", cwd=run_dir.parent,
    )  # fmt: skip
    assert (
        f"warning: checkpoints/step_{steps:06d} is damaged ({shard.name} is truncated (1000 of "
        in result.stdout
    )
    assert f"from step {steps - 1} (checkpoints/step_{steps - 1:06d})" in result.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["plan"]["start_step"] == steps - 1 and summary["result"]["steps"] == steps + 1

    for checkpoint in (run_dir / "checkpoints").glob("step_*"):
        for shard in checkpoint.glob("*.distcp"):
            shard.unlink()
    result = align(
        "run", "kto", "-q", "--resume", f"exp_manager.explicit_log_dir={run_dir}",
        cwd=run_dir.parent, check=False,
    )  # fmt: skip
    assert "no intact checkpoint to resume from" in _one_error(result, 2)


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 64 MB tmpfs (root only)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a size-limited tmpfs needs root")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.timeout(900)
def test_a_full_disk_during_a_save_is_one_line_and_keeps_the_last_checkpoint(
    small_disk: Path,
) -> None:
    run_dir = small_disk / "run"
    proc = _start(run_dir, "trainer.kto.max_steps=500", "trainer.kto.save_interval=3")
    first = run_dir / "checkpoints" / "step_000003"
    try:
        _wait_for(first.is_dir, proc)
        size = sum(f.stat().st_size for f in first.iterdir())
        free = shutil.disk_usage(small_disk).free
        (small_disk / "filler").write_bytes(b"\0" * (free - size // 2))
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    line = _one_error(subprocess.CompletedProcess(proc.args, proc.returncode, out, err), 1)
    assert line.startswith(
        f"error: disk full while writing checkpoint step_000006 in {run_dir}/checkpoints (about "
    )
    assert line.endswith("; the previous checkpoint step_000003 is intact")
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "latest",
        "step_000003",
    ]


@pytest.mark.timeout(600)
def test_seq_length_beyond_the_positions(tmp_path: Path, align) -> None:
    learned = align(
        "run", "dpo", "--dry-run", "model.position_embedding_type=learned_absolute",
        "model.data.seq_length=512", cwd=tmp_path, check=False,
    )  # fmt: skip
    assert "beyond the model's 256 learned positions" in _one_error(learned, 2)
    rope = align("run", "dpo", "--dry-run", "model.data.seq_length=512", cwd=tmp_path)
    assert "warning: model.data.seq_length: 512 is beyond the 256 positions" in rope.stderr

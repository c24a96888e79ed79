"""One line and exit 2 for user mistakes; checks before launching; resume; help; file modes.

In this process through Typer's test runner: nothing here starts a worker (the mistakes are
caught before launching, or by ``--dry-run``). The runs that fail inside workers, at one and two
processes, are in ``tests/test_cli_errors.py``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from align_cli.errors import UsageError, expected_failure
from align_cli.main import app, report_errors

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


class DataError(ValueError):
    """Stands for align-data's (recognised by class name)."""


class NonFiniteError(RuntimeError):
    """Stands for align-core's."""


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (UsageError("model.x: bad"), (2, "model.x: bad")),
        (DataError("a.jsonl:3: rejected: missing key"), (2, "a.jsonl:3: rejected: missing key")),
        (
            FileNotFoundError(2, "No such file or directory", "train.jsonl"),
            (2, "train.jsonl: no such file or directory"),
        ),
        # What align-core's on_main_then_all raises on the ranks other than 0.
        (RuntimeError("rank 0 failed: DataError: a.jsonl:3: x"), (2, "a.jsonl:3: x")),
        (RuntimeError("rank 0 failed: NonFiniteError: step 3"), (1, "step 3")),
        (NonFiniteError("non-finite training step 3"), (1, "non-finite training step 3")),
        (RuntimeError("rank 0 failed: KeyError: 'x'"), None),
        (RuntimeError("CUDA error"), None),
        (KeyError("x"), None),
    ],
)
def test_expected_failures(exc: Exception, expected: tuple[int, str] | None) -> None:
    assert expected_failure(exc) == expected


def test_only_rank_0_prints(capsys: pytest.CaptureFixture[str]) -> None:
    def fail() -> int:
        raise RuntimeError("rank 0 failed: DataError: a.jsonl:3: x")

    assert report_errors(fail, rank=1) == 2
    assert capsys.readouterr().err == ""
    assert report_errors(fail, rank=0) == 2
    assert capsys.readouterr().err == "error: a.jsonl:3: x\n"
    with pytest.raises(KeyError):
        report_errors(lambda: {}["x"], rank=0)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory):
    from align_data import write_synthetic_dataset

    # 20 prompts: 20 preference pairs, 40 unpaired (KTO) examples.
    return write_synthetic_dataset(tmp_path_factory.mktemp("synthetic"), num_train=20, num_eval=4)


@pytest.mark.parametrize("nproc", ["1", "2"])
def test_missing_files_fail_before_launching_in_one_line(
    tmp_path: Path, tiny_nemo: Path, synthetic, nproc: str
) -> None:
    run_dir = tmp_path / "run"
    common = ("run", "dpo", "--nproc-per-node", nproc, f"exp_manager.explicit_log_dir={run_dir}")
    missing = tmp_path / "nope.jsonl"
    result = invoke(*common, "--restore", str(tiny_nemo), f"model.data.data_prefix={missing}")
    assert result.exit_code == 2
    assert error_lines(result.output) == [f"error: model.data.data_prefix: {missing}: no such file"]
    nemo = tmp_path / "nope.nemo"
    data = f"model.data.data_prefix={synthetic.preference_train}"
    result = invoke(*common, "--restore", str(nemo), data)
    assert result.exit_code == 2
    assert error_lines(result.output) == [f"error: {nemo}: no such file or directory"]
    assert not run_dir.exists()  # nothing was written, no worker started


def test_kto_micro_batch_of_one_fails_before_launching(tmp_path: Path, synthetic) -> None:
    run_dir = tmp_path / "run"
    data = f"model.data.data_prefix={synthetic.unpaired_train}"
    for dry in ((), ("--dry-run",)):
        result = invoke("run", "kto", *dry, data, f"exp_manager.explicit_log_dir={run_dir}")
        assert result.exit_code == 2
        (line,) = error_lines(result.output)
        assert "model.micro_batch_size must be >= 2 (got 1)" in line
        assert not run_dir.exists()


def test_adapters_reference_without_lora_fails_like_training(tmp_path: Path) -> None:
    """The dry run and the launch check use training's own check (`resolve_strategy`)."""
    run_dir = tmp_path / "run"
    for dry in (("--dry-run",), ()):
        result = invoke(
            "run",
            "dpo",
            *dry,
            "model.reference.strategy=adapters",
            f"exp_manager.explicit_log_dir={run_dir}",
        )
        assert result.exit_code == 2
        (line,) = error_lines(result.output)
        assert line.startswith("error: model.reference.strategy=adapters needs LoRA")
        assert not run_dir.exists()


def test_batch_errors_say_what_to_set(synthetic) -> None:
    data = f"model.data.data_prefix={synthetic.unpaired_train}"
    result = invoke("run", "kto", "--dry-run", data, "model.micro_batch_size=2")
    assert result.exit_code == 2
    assert error_lines(result.output) == [
        "error: 40 training examples do not fill one global batch of 64 "
        "(model.global_batch_size); use model.global_batch_size ≤ 40, a multiple of 2 = "
        "micro 2 × DP 1"
    ]
    result = invoke(
        "run", "kto", "--dry-run", data, "model.micro_batch_size=4", "model.global_batch_size=10"
    )
    assert result.exit_code == 2
    assert error_lines(result.output) == [
        "error: model.global_batch_size 10 is not a multiple of model.micro_batch_size 4; "
        "use model.global_batch_size=8 or 12"
    ]
    result = invoke(
        "run", "kto", "--dry-run", data, "--nproc-per-node", "2", "model.micro_batch_size=4",
        "model.global_batch_size=12",
    )  # fmt: skip
    assert result.exit_code == 2
    assert error_lines(result.output) == [
        "error: model.global_batch_size 12 is not a multiple of model.micro_batch_size × "
        "data-parallel size = 4 × 2; use model.global_batch_size=8 or 16"
    ]
    fits = invoke(
        "run", "kto", "--dry-run", data, "model.micro_batch_size=4", "model.global_batch_size=40"
    )
    assert fits.exit_code == 0, fits.output


def test_the_workers_batch_error_gets_the_hint_too() -> None:
    """A worker's error comes from align-core's own step planning: its message, with the hint."""
    from types import SimpleNamespace

    from align_cli.preflight import with_batch_hint
    from align_core.trainer.config import TrainerConfig
    from align_core.trainer.loop import plan_steps

    with pytest.raises(ValueError) as raised:
        plan_steps(TrainerConfig(), train_samples=40, global_batch_size=64, val_batches=0)
    run = SimpleNamespace(
        data=SimpleNamespace(micro_batch_size=4, global_batch_size=64),
        parallel=SimpleNamespace(
            tensor_model_parallel_size=2, pipeline_model_parallel_size=1, context_parallel_size=1
        ),
    )
    hinted = with_batch_hint(raised.value, run, world_size=4)
    assert isinstance(hinted, UsageError)
    hint = "; use model.global_batch_size ≤ 40, a multiple of 8 = micro 4 × DP 2"
    assert str(hinted).endswith(hint)
    other = ValueError("something else")
    assert with_batch_hint(other, run, world_size=4) is other


def _intact_checkpoint(path: Path) -> None:
    """A small checkpoint whose files are all there (resume verifies them before planning)."""
    import pickle

    import torch
    from torch.distributed.checkpoint.metadata import Metadata

    path.mkdir(parents=True)
    (path / ".metadata").write_bytes(
        pickle.dumps(Metadata(state_dict_metadata={}, storage_data={}))
    )
    torch.save({"common": {}}, path / "common.pt")
    (path / "metadata.json").write_text('{"sharded_backend": "torch_dist"}')


def test_resume_names_the_run_and_step(tmp_path: Path) -> None:
    from align_cli.commands.run import RunOptions, prepare, write_run_dir

    def make(name: str, step: int | None) -> Path:
        run_dir = tmp_path / name
        options = RunOptions("dpo", overrides=(f"exp_manager.explicit_log_dir={run_dir}",))
        write_run_dir(run_dir, prepare(options).composed, "dpo")
        if step is not None:
            _intact_checkpoint(run_dir / "checkpoints" / f"step_{step:06d}")
            (run_dir / "checkpoints" / "latest").write_text(f"step_{step:06d}\n")
        return run_dir

    started = make("dpo-1", 4)
    make("dpo-2", None)  # newer, but a failed start: nothing to resume
    result = invoke("run", "dpo", "--resume", "--dry-run", f"exp_manager.exp_dir={tmp_path}")
    assert result.exit_code == 0, result.output
    assert f"resuming {started} from step 4 (checkpoints/step_000004)" in result.output


def test_help_shows_arguments_and_flags_plainly() -> None:
    generate = invoke("generate", "--help").output
    assert "align generate [OPTIONS] PROMPTS.jsonl [KEY=VALUE]..." in generate
    assert "{prompts}" not in generate
    run = invoke("run", "dpo", "--help").output
    assert "align run dpo [OPTIONS] [KEY=VALUE]..." in run
    plot = invoke("plot", "--help").output
    assert "align plot [OPTIONS] RUN_DIR" in plot
    for text in (generate, run, plot, invoke("--help").output, invoke("run", "--help").output):
        assert "<bool>" not in text
    assert "<int>" in run  # options with a value keep their type


def test_nemo_files_follow_the_umask(tmp_path: Path) -> None:
    previous = os.umask(0o027)
    try:
        path = tmp_path / "a.nemo"
        assert invoke("init-model", str(path), "--num-layers", "1").exit_code == 0
        assert path.stat().st_mode & 0o777 == 0o640
        os.chmod(path, 0o604)  # an existing file keeps its mode when written again
        assert invoke("init-model", str(path), "--num-layers", "1").exit_code == 0
        assert path.stat().st_mode & 0o777 == 0o604
    finally:
        os.umask(previous)

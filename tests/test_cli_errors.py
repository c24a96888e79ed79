"""Mistakes found inside the workers: one line and exit 2 at any number of processes.

``align run`` on CPU, in one process and through torchrun (two, gloo). A malformed record or a
file too small for one global batch is found by the workers (the checks before launching do not
read the data): the run still ends with one ``error:`` line and exit status 2, with no traceback
(no ``[rank0]:`` lines, no torchrun failure report), and leaves no run directory behind. ``-q``
prints the same at one process and at two.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest


def _assert_one_line(result, expected: str) -> None:
    """Exit 2; the error is stderr's one line; stdout has at most status lines, no traceback."""
    shown = result.stdout + result.stderr
    assert result.returncode == 2, shown
    assert [line for line in result.stderr.splitlines() if line.strip()] == [expected], shown
    assert "Traceback" not in result.stdout and "[rank" not in result.stdout, shown


@pytest.mark.distributed
@pytest.mark.slow
def test_malformed_record_in_two_workers(tmp_path: Path, align) -> None:
    bad = tmp_path / "pairs.jsonl"
    good = {"prompt": "loud: cat\n", "chosen": "CAT!", "rejected": "cat."}
    rows = [json.dumps(good)] * 4 + ['{"prompt": "quiet: dog\\n", "chosen": "dog."}']
    bad.write_text("\n".join(rows) + "\n")
    run_dir = tmp_path / "run"
    result = align(
        "run", "dpo", "--nproc-per-node", "2", f"model.data.data_prefix={bad}",
        "model.global_batch_size=2", f"exp_manager.explicit_log_dir={run_dir}",
        cwd=tmp_path, check=False,
    )  # fmt: skip
    # Rank 0 reads the file and reports; rank 1 hears of it from rank 0 and exits quietly.
    _assert_one_line(
        result, f"error: {bad}:5: rejected: missing key (record has keys: chosen, prompt)"
    )
    assert not run_dir.exists()  # a failed start leaves nothing for --resume to pick


def test_too_little_data_names_the_batch_to_set(tmp_path: Path, align) -> None:
    from align_data import write_synthetic_dataset

    files = write_synthetic_dataset(tmp_path / "data", num_train=20, num_eval=4)
    result = align(
        "run", "kto", f"model.data.data_prefix={files.unpaired_train}", "model.micro_batch_size=2",
        f"exp_manager.exp_dir={tmp_path / 'runs'}", cwd=tmp_path, check=False,
    )  # fmt: skip
    _assert_one_line(
        result,
        "error: 40 training examples do not fill one global batch of 64 "
        "(model.global_batch_size); use model.global_batch_size ≤ 40, a multiple of 2 = "
        "micro 2 × DP 1",
    )
    assert not list((tmp_path / "runs").glob("*"))


@pytest.mark.distributed
@pytest.mark.slow
def test_quiet_is_quiet_at_any_process_count(tmp_path: Path, align) -> None:
    common = [
        "-q", "model.data.synthetic.num_train=16", "model.data.synthetic.num_validation=4",
        "model.global_batch_size=4", "model.micro_batch_size=2", "trainer.sft.max_steps=1",
        "trainer.sft.val_check_interval=0", "exp_manager.create_plots=false",
        "exp_manager.checkpoint_callback_params.save_nemo_on_train_end=false",
    ]  # fmt: skip
    shown = {}
    for nproc in ("1", "2"):
        run_dir = tmp_path / f"run{nproc}"
        result = align(
            "run", "sft", "--nproc-per-node", nproc, *common,
            f"exp_manager.explicit_log_dir={run_dir}", cwd=tmp_path,
        )  # fmt: skip
        assert (run_dir / "metrics.jsonl").read_text().strip()
        shown[nproc] = result.stdout + result.stderr
    assert shown["1"] == shown["2"]
    assert "ETA" not in shown["2"] and "completed" not in shown["2"]

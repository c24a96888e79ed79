"""End-to-end runs of the ``align`` command on CPU: one process and two (torchrun, gloo).

Each run trains the tiny GPT for a few steps on a small synthetic task. What is checked:
the run directory (config, metrics, TensorBoard events, plots, checkpoint, final ``.nemo``);
the DPO loss at the first step is ln 2 (policy = reference before the first update); a run
stopped by SIGTERM leaves a checkpoint from which ``--resume`` continues, and the resumed run's
next step equals the uninterrupted run's; a malformed data file fails before training with
``file:line: field:``; tensor and pipeline parallel runs (2 processes) give the losses of the
single-process run on the same restored weights.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

SMALL = [
    "model.data.synthetic.num_train=48",
    "model.data.synthetic.num_validation=16",
    "model.global_batch_size=8",
    "model.micro_batch_size=4",
    "model.optim.lr=1e-3",
    "trainer.{algo}.val_check_interval=2",
    "trainer.{algo}.save_interval=2",
]


def small(algo: str) -> list[str]:
    return [item.format(algo=algo) for item in SMALL]


@pytest.fixture(scope="module")
def tiny_nemo(tmp_path_factory: pytest.TempPathFactory, align) -> Path:
    path = tmp_path_factory.mktemp("model") / "tiny.nemo"
    align("init-model", str(path), "--num-layers", "2", "--seed", "3", cwd=path.parent)
    return path


def restored(tiny_nemo: Path) -> list[str]:
    return [
        "--restore", str(tiny_nemo), *small("dpo"), "trainer.dpo.max_steps=3",
        "exp_manager.checkpoint_callback_params.save_nemo_on_train_end=false",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory: pytest.TempPathFactory, tiny_nemo: Path, align) -> Path:
    """A 3-step single-process DPO run from a restored .nemo (shared by the tests below)."""
    run_dir = tmp_path_factory.mktemp("one") / "run"
    result = align(
        "run", "dpo", *restored(tiny_nemo), f"exp_manager.explicit_log_dir={run_dir}",
        cwd=run_dir.parent,
    )  # fmt: skip
    assert "completed" in result.stdout
    return run_dir


def test_single_process_run_directory(
    one_process_run: Path, tiny_nemo: Path, align, metrics
) -> None:
    run_dir = one_process_run
    train = metrics(run_dir)
    assert sorted(train) == [1, 2, 3]
    # Before the first update the policy is the reference: every pair's loss is -log σ(0).
    assert train[1]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert sorted(metrics(run_dir, "val")) == [2, 3]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["result"]["stop_reason"] == "completed"
    assert summary["result"]["steps"] == 3
    assert summary["plan"]["accumulation_steps"] == 2
    assert (run_dir / "config.yaml").is_file() and (run_dir / "run.json").is_file()
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))
    assert (run_dir / "plots" / "loss.png").is_file()
    assert (run_dir / "plots" / "accuracy.png").is_file()
    inspect = align("ckpt", "inspect", str(run_dir), cwd=run_dir)
    assert "step_000003" in inspect.stdout
    exported = run_dir.parent / "exported.nemo"
    align("ckpt", "export", str(run_dir), "--out", str(exported), cwd=run_dir)
    weights = nemo_weights(exported)
    initial = nemo_weights(tiny_nemo)
    assert sorted(weights) == sorted(initial)
    moved = [k for k, v in weights.items() if torch.is_tensor(v) and not torch.equal(v, initial[k])]
    assert moved  # three steps of training changed the weights


def test_restored_run_writes_final_nemo(tmp_path: Path, tiny_nemo: Path, align) -> None:
    from align_core.nemo import build_tokenizer, open_nemo

    run_dir = tmp_path / "run"
    align(
        "run", "sft", "-q", "--restore", str(tiny_nemo), *small("sft"), "trainer.sft.max_steps=1",
        "trainer.sft.val_check_interval=0", f"exp_manager.explicit_log_dir={run_dir}",
        cwd=tmp_path,
    )  # fmt: skip
    final = run_dir / "final.nemo"
    assert final.is_file()
    # The restored archive's tokenizer files travel into final.nemo unchanged.
    assert tokenizer_artifacts(final) == tokenizer_artifacts(tiny_nemo)
    assert sorted(n[33:] for n in tokenizer_artifacts(final)) == ["merges.txt", "vocab.json"]
    with open_nemo(tiny_nemo) as before, open_nemo(final) as after:
        assert after.model_config == before.model_config
        old, new = before.full_state_dict(), after.full_state_dict()
        assert {k: v.shape for k, v in new.items() if torch.is_tensor(v)} == {
            k: v.shape for k, v in old.items() if torch.is_tensor(v)
        }
        assert any(not torch.equal(v, new[k]) for k, v in old.items() if torch.is_tensor(v))
        tokenizer = build_tokenizer(after.tokenizer)
        assert tokenizer.vocab_size <= before.model_config.vocab_size  # padded embedding rows
        assert tokenizer.decode(tokenizer.encode("The policy learns.")) == "The policy learns."


def tokenizer_artifacts(path: Path) -> dict[str, bytes]:
    """A `.nemo`'s tokenizer artifact members (named ``<32 hex>_<file>``), by name."""
    with tarfile.open(path) as archive:
        return {
            name: archive.extractfile(member).read()
            for member in archive.getmembers()
            if member.isfile()
            and re.fullmatch(r"[0-9a-f]{32}_.+", name := member.name.rsplit("/", 1)[-1])
        }


def nemo_weights(path: Path) -> dict:
    with tarfile.open(path) as archive:
        for member in archive.getmembers():
            if member.name.endswith("model_weights.ckpt"):
                data = archive.extractfile(member).read()
                return torch.load(io.BytesIO(data), weights_only=True)
    raise AssertionError(f"{path}: no model_weights.ckpt")


def _wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    path = run_dir / "metrics.jsonl"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"run ended early: {proc.communicate()}")
        if path.exists() and any(
            json.loads(line).get("step", 0) >= step and json.loads(line)["split"] == "train"
            for line in path.read_text().splitlines()
        ):
            return
        time.sleep(0.2)
    raise AssertionError(f"step {step} not reached in {timeout} s")


@pytest.mark.timeout(1200)  # three runs
def test_sigterm_then_resume_matches_the_uninterrupted_run(tmp_path: Path, align, metrics) -> None:
    # A constant learning rate and many epochs: the run's length changes nothing in its steps,
    # so a long run stopped after step k and resumed for one more step can be compared with a
    # fresh run of k + 1 steps. KTO with the swap reference (no per-epoch precompute pass).
    common = [
        *small("kto"),
        "model.optim.sched.style=constant",
        "model.reference.strategy=swap",
        "trainer.kto.max_epochs=100",
        "trainer.kto.save_interval=0",
        "trainer.kto.val_check_interval=0",
    ]
    cut = tmp_path / "cut"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "align_cli", "run", "kto", "-q", *common,
         "trainer.kto.max_steps=500", f"exp_manager.explicit_log_dir={cut}"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    _wait_for_step(cut, 2, proc, timeout=500)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, f"{out}\n{err}"
    summary = json.loads((cut / "summary.json").read_text())["result"]
    assert summary["stop_reason"] == "sigterm"
    k = summary["steps"]
    assert 2 <= k < 500
    assert (cut / "checkpoints" / f"step_{k:06d}").is_dir()

    align(
        "run", "kto", "-q", "--resume", f"trainer.kto.max_steps={k + 1}",
        f"exp_manager.explicit_log_dir={cut}", cwd=tmp_path,
    )  # fmt: skip
    resumed = metrics(cut)
    assert sorted(resumed) == list(range(1, k + 2))
    assert json.loads((cut / "summary.json").read_text())["plan"]["start_step"] == k

    full = tmp_path / "full"
    align(
        "run", "kto", "-q", *common, f"trainer.kto.max_steps={k + 1}",
        f"exp_manager.explicit_log_dir={full}", cwd=tmp_path,
    )  # fmt: skip
    reference = metrics(full)
    for step in (k, k + 1):
        for name in ("loss", "kl", "rewards_chosen_mean", "rewards_rejected_mean", "grad_norm"):
            assert resumed[step][name] == pytest.approx(
                reference[step][name], rel=1e-5, abs=1e-7
            ), (step, name)


def test_malformed_data_fails_before_training(tmp_path: Path, align, metrics) -> None:
    bad = tmp_path / "pairs.jsonl"
    good = {"prompt": "loud: cat\n", "chosen": "CAT!", "rejected": "cat."}
    rows = [json.dumps(good)] * 4 + ['{"prompt": "quiet: dog\\n", "chosen": "dog."}']
    bad.write_text("\n".join(rows) + "\n")
    run_dir = tmp_path / "run"
    result = align(
        "run", "dpo", f"model.data.data_prefix={bad}", "model.global_batch_size=2",
        f"exp_manager.explicit_log_dir={run_dir}", cwd=tmp_path, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert f"error: {bad}:5: rejected:" in result.stderr
    assert not (run_dir / "checkpoints").exists()
    assert not (run_dir / "metrics.jsonl").exists() or not metrics(run_dir)


@pytest.mark.distributed
@pytest.mark.parametrize(
    "layout",
    [
        ["model.tensor_model_parallel_size=2"],
        ["model.pipeline_model_parallel_size=2"],
        [],  # data parallel: 2 replicas, each with one micro-batch of the step
    ],
    ids=["tp2", "pp2", "dp2"],
)
def test_two_process_runs_match_one_process(
    tmp_path: Path,
    tiny_nemo: Path,
    one_process_run: Path,
    layout: list[str],
    align,
    metrics,
) -> None:
    two = tmp_path / "two"
    result = align(
        "run", "dpo", *restored(tiny_nemo), *layout, "--nproc-per-node", "2",
        "exp_manager.create_plots=false",
        "exp_manager.checkpoint_callback_params.save_nemo_on_train_end=false",
        f"exp_manager.explicit_log_dir={two}", cwd=tmp_path,
    )  # fmt: skip
    assert "completed" in result.stdout
    plan = json.loads((two / "summary.json").read_text())["plan"]
    assert plan["world_size"] == 2
    assert plan["data_parallel_size"] == (1 if layout else 2)
    single, double = metrics(one_process_run), metrics(two)
    assert sorted(double) == [1, 2, 3]
    for step in (1, 2, 3):
        for name in ("loss", "acc", "rewards_chosen_mean", "rewards_rejected_mean"):
            assert double[step][name] == pytest.approx(single[step][name], rel=1e-4, abs=1e-6), (
                step,
                name,
            )
    val_single, val_double = metrics(one_process_run, "val"), metrics(two, "val")
    assert val_double[3]["loss"] == pytest.approx(val_single[3]["loss"], rel=1e-4)

"""The ``align`` commands through Typer's test runner (no training)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from align_cli.main import app

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def test_help_imports_no_heavy_modules() -> None:
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from align_cli.main import app\n"
        "result = CliRunner().invoke(app, ['run', 'dpo', '--help'])\n"
        "assert result.exit_code == 0, result.output\n"
        "heavy = [m for m in ('torch', 'megatron', 'hydra', 'omegaconf', 'matplotlib')"
        " if m in sys.modules]\n"
        "print(heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_show_config_prints_the_composed_tree() -> None:
    result = invoke(
        "run", "kto", "--show-config", "model.kto.desirable_loss_weight=2", "model.mcore_gpt=True"
    )
    assert result.exit_code == 0
    assert "desirable_loss_weight: 2.0" in result.output
    assert "note: model.mcore_gpt: NeMo-Aligner key without effect" in result.output


def test_misspelt_key_exits_2_naming_it() -> None:
    result = invoke("run", "kto", "model.kto.desirable_weight=2")
    assert result.exit_code == 2
    assert "error: model.kto.desirable_weight: no such key" in result.output
    assert "did you mean model.kto.desirable_loss_weight?" in result.output


def test_mistyped_option_is_suggested() -> None:
    result = invoke("run", "dpo", "--nproc-per-nod", "2")
    assert result.exit_code == 2
    assert "no such option: --nproc-per-nod; did you mean --nproc-per-node?" in result.output


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory):
    from align_data import write_synthetic_dataset

    return write_synthetic_dataset(tmp_path_factory.mktemp("synthetic"), num_train=40, num_eval=8)


def test_data_validate_counts_records(synthetic) -> None:
    result = invoke("data", "validate", str(synthetic.preference_train))
    assert result.exit_code == 0
    assert f"{synthetic.preference_train}: 40 preference records from 40 rows" in result.output


def _malformed(tmp_path: Path) -> Path:
    path = tmp_path / "bad.jsonl"
    good = {"prompt": "p", "chosen": "a", "rejected": "b"}
    rows = [good, good, {"prompt": "p", "chosen": "a"}]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_data_validate_names_file_line_and_field(tmp_path: Path) -> None:
    bad = _malformed(tmp_path)
    result = invoke("data", "validate", str(bad))
    assert result.exit_code == 2
    assert f"error: {bad}:3: rejected:" in result.output


def test_data_validate_lenient_counts_and_reports(tmp_path: Path) -> None:
    bad = _malformed(tmp_path)
    report = tmp_path / "report.jsonl"
    result = invoke("data", "validate", str(bad), "--lenient", "--report", str(report))
    assert result.exit_code == 1
    assert "2 preference records from 3 rows" in result.output and "1 invalid" in result.output
    lines = report.read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["line"] == 3


def test_data_stats_counts_tokens(synthetic) -> None:
    result = invoke("data", "stats", str(synthetic.sft_train))
    assert result.exit_code == 0
    assert "examples kept" in result.output and "40" in result.output
    # The tokenizer is named; the bins span the data, not a fixed 1-2048.
    assert "tokenizer: byte (ByteTokenizer, vocabulary" in result.output
    assert (
        "the longest sequence" in result.output
        and "2048" not in result.output.split("sequence lengths")[1]
    )
    short = invoke("data", "stats", str(synthetic.sft_train), "--max-length", "64")
    assert short.exit_code == 0 and "1-64: --max-length" in short.output


def test_data_stats_bins_follow_the_models_seq_length(synthetic, tmp_path: Path) -> None:
    model = tmp_path / "tiny.nemo"
    made = invoke("init-model", str(model), "--num-layers", "1", "--hidden-size", "32")
    assert made.exit_code == 0, made.output
    from align_core.pretrained import open_pretrained

    with open_pretrained(model) as ckpt:
        seq = ckpt.model_config.seq_length
    result = invoke("data", "stats", str(synthetic.sft_train), "--tokenizer", str(model))
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert f"1-{seq}: the model's seq_length" in text and f"tokenizer: {model}" in text


def test_dry_run_of_the_demo_prints_the_plan() -> None:
    result = invoke("run", "dpo", "--dry-run", "trainer.dpo.max_steps=5")
    assert result.exit_code == 0, result.output
    assert "synthetic task" in result.output
    assert "TP=1 PP=1 CP=1 DP=1" in result.output
    assert "memory per rank (estimate)" in result.output
    assert "nothing was trained" in result.output


@pytest.mark.parametrize("command", ["simpo", "orpo"])
def test_reference_free_commands_plan_no_reference(command: str) -> None:
    result = invoke("run", command, "--dry-run", "trainer.dpo.max_steps=5")
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "reference │ none (the objective needs no reference)" in text
    assert "reference (device) │ 0.0 MiB" in text and "reference (host, pinned) │ 0.0 MiB" in text
    contradicting = invoke("run", command, "--dry-run", "model.dpo.preference_loss=dpo")
    assert contradicting.exit_code == 2
    assert f"contradicts `align run {command}`" in contradicting.output


def test_dry_run_layout_and_batch_checks(synthetic) -> None:
    data = f"model.data.data_prefix={synthetic.preference_train}"
    result = invoke(
        "run", "dpo", "--dry-run", "--nproc-per-node", "8", data,
        "model.tensor_model_parallel_size=2", "model.pipeline_model_parallel_size=2",
        "model.global_batch_size=8", "model.micro_batch_size=2",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "TP=2 PP=2 CP=1 DP=2" in result.output
    assert "global 8 = micro 2 × accumulation 2 × DP 2" in result.output
    # 40 pairs, 8 per step: 5 steps in the one epoch.
    assert "5 (5 per epoch × 1 epoch(s)" in result.output
    result = invoke("run", "dpo", "--dry-run", "--nproc-per-node", "3", data)
    assert result.exit_code == 2
    assert "global_batch_size 64 is not a multiple" in result.output


def test_dry_run_fails_on_malformed_data_with_file_line(tmp_path: Path) -> None:
    bad = _malformed(tmp_path)
    result = invoke(
        "run", "dpo", "--dry-run", f"model.data.data_prefix={bad}", "model.global_batch_size=1"
    )
    assert result.exit_code == 2
    assert f"{bad}:3: rejected:" in result.output


def test_plot_command(tmp_path: Path) -> None:
    rows = [{"split": "train", "step": s, "loss": 1.0 / s, "kl": 0.1 * s} for s in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = invoke("plot", str(tmp_path))
    assert result.exit_code == 0
    assert (tmp_path / "plots" / "loss.png").is_file()
    assert (tmp_path / "plots" / "kl.png").is_file()
    missing = invoke("plot", str(tmp_path / "nope"))
    assert missing.exit_code == 2 and "no metrics.jsonl" in missing.output


def test_init_model_then_inspect(tmp_path: Path) -> None:
    out = tmp_path / "tiny.nemo"
    result = invoke("init-model", str(out), "--num-layers", "1", "--hidden-size", "32")
    assert result.exit_code == 0, result.output
    assert "vocab_size 320 padded to 384 embedding rows" in " ".join(result.output.split())
    result = invoke("ckpt", "inspect", str(out))
    assert result.exit_code == 0, result.output
    assert "num_layers" in result.output and "single (saved with TP=1, PP=1)" in result.output
    # 1 layer, hidden 32, ffn 256 (SwiGLU), 4 heads, vocabulary 320 padded to 384, untied.
    h, ffn, vocab = 32, 256, 384
    expected = 2 * vocab * h + (2 * h + 3 * h * h + h * h + h * 2 * ffn + ffn * h) + h
    assert f"{expected:,}" in result.output


def test_inspect_a_training_checkpoint(tmp_path: Path) -> None:
    import torch

    run = tmp_path / "runs" / ("dpo-" + "x" * 60)  # a long path: the title must not wrap
    step = run / "checkpoints" / "step_000004"
    step.mkdir(parents=True)
    (run / "config.yaml").write_text("model: {}\n")
    (run / "run.json").write_text("{}\n")
    common = {
        "format_version": 1,
        "step": 4,
        "layout": {
            "world_size": 2,
            "tensor_model_parallel_size": 1,
            "pipeline_model_parallel_size": 1,
            "data_parallel_size": 2,
        },
        "distributed_optimizer": False,
        "has_optimizer": True,
        "extra_models": [],
        "trainer_state": {
            "step": 4,
            "consumed_samples": 64,
            "skipped_steps": 0,
            "epoch": 1,
            "reference": {"strategy": "precompute", "fingerprint": "ab"},
        },
        "extra_state": {
            "data": {"train_samples": 40, "global_batch_size": 16, "data": "x", "seed": 1},
            "plan": {"max_steps": 6},
            "model": {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
                      "vocab_size": 384, "seq_length": 128, "dtype": "fp32"},
        },
    }  # fmt: skip
    torch.save({"optimizer": {"state": {}}, "common": common}, step / "common.pt")
    result = invoke("ckpt", "inspect", str(step))
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == f"checkpoint {step}"  # the whole title on one line
    text = " ".join("".join(c if c.isascii() else " " for c in result.output).split())
    assert "step 4" in text and "epoch 1, 64 examples consumed" in text
    assert "2 layers, hidden size 64, 4 heads, vocab 384, seq 128" in text
    assert "optimizer state yes" in text and "planned steps 6" in text
    assert "reference precompute" in text and "config.yaml" in text.replace(" ", "")
    # A bare step directory (no common.pt): still described, nothing raised.
    bare = tmp_path / "step_000001"
    bare.mkdir()
    result = invoke("ckpt", "inspect", str(bare))
    assert result.exit_code == 0 and "unknown (no common.pt)" in result.output


def test_data_preprocess_writes_then_reuses(synthetic, tmp_path: Path) -> None:
    out = tmp_path / "cache"
    first = invoke("data", "preprocess", str(synthetic.unpaired_train), "--out", str(out))
    assert first.exit_code == 0, first.output
    assert "dataset written:" in first.output
    again = invoke("data", "preprocess", str(synthetic.unpaired_train), "--out", str(out))
    assert "dataset reused:" in again.output
    directory = again.output.split("dataset reused:")[1].split()[0]
    stats = invoke("data", "stats", directory)
    assert stats.exit_code == 0
    assert "unpaired" in stats.output and "80" in stats.output  # 40 pairs -> 80 examples


def test_run_commands_and_help_come_from_the_algorithm_registry() -> None:
    """`align run --help` lists the registry's commands with their help lines, torch-free."""
    import subprocess
    import sys

    from align_core.algorithms import REGISTRY

    result = invoke("run", "--help")
    assert result.exit_code == 0
    for name in REGISTRY:
        assert name in result.output
    # Reading the registry imports neither torch nor megatron-core.
    probe = (
        "import sys, align_cli.main; "
        "print(sorted(m for m in ('torch', 'megatron') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"

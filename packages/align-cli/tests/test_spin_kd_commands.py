"""``align run spin``, ``align run kd``, ``align kd teacher`` and ``align generate`` (no training).

Dry runs print the plan (SPIN's iterations, the distillation teacher, the teacher pass's
stores); the configuration trees take NeMo-Aligner's names, including SPIN's per-iteration
``ref_policy_kl_penalty`` list.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from align_cli.config import compose, to_run_config
from align_cli.main import app

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("sft")
    paths = []
    for name, n in (("train", 12), ("val", 4)):
        path = root / f"{name}.jsonl"
        rows = [{"prompt": f"Repeat {i}.", "completion": f"{i} {i}"} for i in range(n)]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths.append(path)
    return paths[0], paths[1]


def test_spin_dry_run_plans_the_iterations() -> None:
    result = invoke(
        "run", "spin", "--dry-run", "trainer.spin.max_iterations=3",
        "model.data.synthetic.num_train=32", "model.global_batch_size=8",
        "model.micro_batch_size=4",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    # 32 prompts, 8 pairs per step, one epoch: 4 steps in each of the 3 iterations.
    assert "12 over 3 iteration(s) (4, 4, 4); each generates 32 answers" in result.output
    assert "opponent" in result.output
    assert "nothing was trained" in result.output


def test_spin_takes_a_per_iteration_kl_penalty() -> None:
    overrides = ["model.spin.ref_policy_kl_penalty=[0.1,0.05]", "trainer.spin.max_iterations=2"]
    composed = compose("spin", overrides)
    run = to_run_config("spin", composed.tree, "runs/test")
    assert run.spin.ref_policy_kl_penalty == (0.1, 0.05)
    assert [run.spin.beta(t) for t in (0, 1)] == [0.1, 0.05]
    scalar = to_run_config("spin", compose("spin", []).tree, "runs/test")
    assert scalar.spin.beta(5) == scalar.spin.ref_policy_kl_penalty
    result = invoke("run", "spin", "--dry-run", *overrides, "model.data.synthetic.num_train=16")
    assert result.exit_code == 0, result.output
    assert "β 0.1, 0.05" in result.output
    short = invoke(
        "run", "spin", "--dry-run", "model.spin.ref_policy_kl_penalty=[0.1]",
        "trainer.spin.max_iterations=2", "model.data.synthetic.num_train=16",
    )  # fmt: skip
    assert short.exit_code == 2
    assert "ref_policy_kl_penalty has 1 values, iteration 1 needs at least 2" in short.output


def test_spin_uses_nemo_aligner_data_keys(sft_data) -> None:
    train, val = sft_data
    composed = compose(
        "spin",
        [
            f"model.data.train_ds.file_path={train}",
            f"model.data.validation_ds.file_path={val}",
            "model.data.train_ds.max_seq_length=64",
        ],
    )
    run = to_run_config("spin", composed.tree, "runs/test")
    assert run.data.train_files == (str(train),)
    assert run.data.validation_files == (str(val),)
    assert run.data.seq_length == 64


def test_kd_dry_run_names_the_teacher_source(tmp_path: Path, tiny_nemo: Path, sft_data) -> None:
    train, val = sft_data
    data = f"model.data.data_prefix={{train: [{train}], validation: [{val}]}}"
    common = ("run", "kd", "--dry-run", "--restore", str(tiny_nemo), data,
              "model.global_batch_size=4", "model.micro_batch_size=2")  # fmt: skip
    teacher = "model.knowledge_distillation.teacher"
    online = invoke(*common, f"{teacher}.restore_from_path={tiny_nemo}", f"{teacher}.top_k=16")
    assert online.exit_code == 0, online.output
    assert "online, top-16" in online.output
    assert "3 (3 per epoch" in online.output  # 12 examples, 4 per step
    hosted = invoke(
        *common, f"{teacher}.restore_from_path={tiny_nemo}", f"{teacher}.placement=host"
    )
    assert hosted.exit_code == 0, hosted.output
    assert "online, top-100 (weights on the host between passes)" in hosted.output
    wrong = invoke(*common, f"{teacher}.restore_from_path={tiny_nemo}", f"{teacher}.placement=gpu")
    assert wrong.exit_code == 2
    assert "placement" in wrong.output and "gpu" in wrong.output
    missing = invoke(*common, f"{teacher}.directory={tmp_path / 'nope'}")
    assert missing.exit_code == 2
    assert "holds no train/ store" in missing.output
    none = invoke(*common)
    assert none.exit_code == 2
    assert "set exactly one teacher source" in none.output
    too_many = invoke(
        *common,
        f"{teacher}.restore_from_path={tiny_nemo}",
        f"{teacher}.top_k=4",
        "model.knowledge_distillation.top_k=8",
    )
    assert too_many.exit_code == 2
    assert "top_k=8 but the teacher provides only 4" in too_many.output


def test_kd_teacher_dry_run_prints_the_plan(tmp_path: Path, tiny_nemo: Path, sft_data) -> None:
    train, val = sft_data
    out = tmp_path / "topk"
    result = invoke(
        "kd", "teacher", "--dry-run", "--restore", str(tiny_nemo),
        f"model.data.data_prefix={{train: [{train}], validation: [{val}]}}",
        "top_k=8", f"output={out}",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "plan: teacher top-k" in result.output
    assert "12 train, 4 held-out" in result.output
    assert "train: new; validation: new" in result.output
    # Per position: 8 bf16 logits and 8 16-bit ids (vocabulary 320), float32 log-sum-exp and
    # the int32 input id.
    assert f"{8 * (2 + 2) + 4 + 4} bytes/token" in result.output
    assert "nothing was computed" in result.output
    assert not out.exists()


def test_kd_teacher_needs_output_and_a_teacher(tiny_nemo: Path) -> None:
    result = invoke("kd", "teacher", "--restore", str(tiny_nemo))
    assert result.exit_code == 2
    assert "output=DIR is required" in result.output
    result = invoke("kd", "teacher", "output=somewhere")
    assert result.exit_code == 2
    assert "the teacher .nemo is required (--restore)" in result.output


def test_generate_help_lists_its_options() -> None:
    result = invoke("generate", "--help")
    assert result.exit_code == 0
    for option in ("PROMPTS", "--restore", "--out", "--config", "--show-config", "--quiet",
                   "--nproc-per-node", "sampling_params.use_greedy"):  # fmt: skip
        assert option in result.output, option


def test_generate_show_config_has_the_generation_keys(tmp_path: Path) -> None:
    result = invoke(
        "generate", "--show-config", str(tmp_path / "p.jsonl"), "length_params.max_length=7"
    )
    assert result.exit_code == 0, result.output
    assert "max_length: 7" in result.output
    assert "use_greedy:" in result.output
    assert "output_file: p.completions.jsonl" in result.output


def test_kd_show_config_before_a_teacher_is_chosen() -> None:
    result = invoke("run", "kd", "--show-config", "model.knowledge_distillation.kd_loss=bwd_kl")
    assert result.exit_code == 0, result.output
    assert "kd_loss: bwd_kl" in result.output
    assert "restore_from_path: null" in result.output  # teacher source keys, all unset
    assert "nemo_jsonl: null" in result.output


def test_kd_from_nemo_aligner_jsonl_is_not_the_demo() -> None:
    # The KD JSONL brings the examples: data is given, so no demo preset (max_steps 30).
    jsonl = "model.knowledge_distillation.teacher.nemo_jsonl=topk.jsonl"
    result = invoke("run", "kd", "--show-config", jsonl)
    assert result.exit_code == 0, result.output
    assert "max_steps: -1" in result.output
    demo = invoke("run", "kd", "--show-config")
    assert "max_steps: 30" in demo.output


def test_spin_dry_run_names_the_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jsonl"
    result = invoke("run", "spin", "--dry-run", f"model.data.train_ds.file_path={missing}")
    assert result.exit_code == 2
    assert f"model.data.train_ds.file_path: {missing}: no such file" in result.output


def test_kd_dry_run_plans_nemo_aligner_jsonl_examples(tmp_path: Path, tiny_nemo: Path) -> None:
    # NeMo's lines: labels are the tokens shifted by one; the trained positions end the sequence.
    line = {"tokens": [5, 6, 7, 8], "labels": [6, 7, 8, 9], "loss_mask": [0, 1, 1, 1]}
    path = tmp_path / "topk.jsonl"
    path.write_text("".join(json.dumps({**line, "index": i}) + "\n" for i in (1, 0)))
    result = invoke(
        "run", "kd", "--dry-run", "--restore", str(tiny_nemo),
        f"model.knowledge_distillation.teacher.nemo_jsonl={path}",
        "model.global_batch_size=2", "model.micro_batch_size=1",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "NeMo-Aligner KD JSONL" in result.output
    assert "2 train, 0 held-out" in result.output
    assert "mean 5.0/example" in result.output  # four tokens and the last label


def test_store_stats_counts_committed_samples_and_positions(tmp_path: Path) -> None:
    import numpy as np

    from align_cli.commands.kd import store_stats
    from align_data.stores import TeacherTopKWriter

    lengths = {"part-00000": [3, 5], "part-00001": [4]}
    for start, (name, ns) in enumerate(lengths.items()):
        with TeacherTopKWriter(
            tmp_path / name, top_k=2, dtype="fp32", start_index=2 * start, vocab_size=10
        ) as writer:
            for i, n in enumerate(ns):
                logits = np.tile(np.array([[0.0, -1.0]], dtype=np.float32), (n, 1))
                ids = np.tile(np.array([[1, 2]]), (n, 1))
                writer.append(2 * start + i, logits, ids, np.zeros(n, dtype=np.float32))
    stats = store_stats(tmp_path)
    assert (stats.samples, stats.positions) == (3, 12)
    size = sum(p.stat().st_size for p in tmp_path.rglob("*") if p.is_file())
    assert stats.bytes == size
    assert stats.bytes_per_token == size / 12

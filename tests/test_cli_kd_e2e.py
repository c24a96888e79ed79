"""End-to-end runs of ``align kd teacher`` and ``align run kd`` on CPU (one process each).

A two-layer teacher and a one-layer student (random ``.nemo`` files sharing one tokenizer) on a
small prompt/completion JSONL task. What is checked:

- the teacher pass writes one sample per example into its stores and reports their size; the
  reported bytes per token equal the files' size over the positions read back through
  align-data's reader;
- a pass interrupted after three committed samples (the commit log cut there, as a crash leaves
  it) and run again computes only the rest, and its stores are byte for byte those of the
  uninterrupted pass; a third run computes nothing;
- the student's first step distilled offline from those stores (fp32 logits) and online from
  the teacher ``.nemo`` has the same loss, ``loss = kd_loss + w_sft · sft_loss``, and
  validation reports the top-1 agreement;
- a misspelt ``model.knowledge_distillation`` key and a teacher with another vocabulary fail
  with exit status 2 and a message naming the problem.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

TOP_K = 8
TRAIN = [
    ("What is two plus two?", "Four."),
    ("Name a colour.", "Blue is a colour."),
    ("Say hello.", "Hello!"),
    ("Count to three.", "One, two, three."),
    ("What is the opposite of up?", "Down."),
    ("Spell cat.", "C, A, T."),
    ("Give a fruit.", "An apple."),
    ("Which is larger, 3 or 5?", "Five is larger."),
]
VALIDATION = [
    ("Name an animal.", "A horse."),
    ("What is one plus one?", "Two."),
    ("Say goodbye.", "Goodbye!"),
    ("Give a number.", "Seven."),
]


def _write_jsonl(path: Path, pairs: list[tuple[str, str]]) -> Path:
    path.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in pairs))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> str:
    """``model.data.data_prefix`` of the task (train and validation files)."""
    root = tmp_path_factory.mktemp("kd-data")
    train = _write_jsonl(root / "train.jsonl", TRAIN)
    val = _write_jsonl(root / "val.jsonl", VALIDATION)
    return f"model.data.data_prefix={{train: [{train}], validation: [{val}]}}"


@pytest.fixture(scope="module")
def teacher_pass(tmp_path_factory: pytest.TempPathFactory, align, tiny_nemos, data) -> Path:
    """An uninterrupted teacher pass (fp32 logits, so that offline equals online)."""
    root = tmp_path_factory.mktemp("kd-teacher")
    out = root / "topk"
    result = align(
        "kd", "teacher", "--restore", str(tiny_nemos["teacher"]), data,
        f"top_k={TOP_K}", "dtype=fp32", "model.micro_batch_size=4", f"output={out}", cwd=root,
    )  # fmt: skip
    (root / "stdout.txt").write_text(result.stdout)
    return out


def _files(directory: Path) -> dict[str, bytes]:
    """Every file of the stores (not the command's own ``config.yaml``/``run.json``)."""
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for split in ("train", "validation")
        for p in sorted((directory / split).rglob("*"))
        if p.is_file()
    }


def test_teacher_pass_writes_every_example_and_reports_store_size(teacher_pass: Path) -> None:
    from align_data.stores import TeacherTopKReader

    stdout = (teacher_pass.parent / "stdout.txt").read_text()
    for split, examples in (("train", len(TRAIN)), ("validation", len(VALIDATION))):
        parts = sorted((teacher_pass / split).glob("part-*"))
        reader = TeacherTopKReader(parts)
        assert len(reader) == examples
        samples = [reader[i] for i in range(examples)]
        assert all(s.logits.shape[1] == TOP_K and s.ids.shape[1] == TOP_K for s in samples)
        # Logits are stored sorted in descending order per position.
        assert all(bool((s.logits[:, :-1] >= s.logits[:, 1:]).all()) for s in samples)
        positions = sum(s.logits.shape[0] for s in samples)
        size = sum(p.stat().st_size for p in (teacher_pass / split).rglob("*") if p.is_file())
        line = next(x for x in stdout.splitlines() if x.startswith(f"{split}:"))
        assert f"computed {examples} samples ({positions} tokens" in line, line
        assert f"store {examples} samples, {positions} tokens" in line, line
        assert f"= {size / positions:,.0f} bytes/token" in line, line
    assert f"teacher top-k (k={TOP_K}): {teacher_pass}" in stdout


def test_interrupted_teacher_pass_resumes_to_identical_stores(
    tmp_path: Path, align, tiny_nemos, data, teacher_pass: Path
) -> None:
    out = tmp_path / "topk"
    shutil.copytree(teacher_pass, out)
    # A crash after three committed samples: the commit log ends there (the shards may hold
    # more bytes; reopening the store truncates them). The validation pass never started.
    (part,) = (out / "train").glob("part-*")
    index = part / "index.bin"
    index.write_bytes(index.read_bytes()[: 3 * 3 * 8])  # three int64 triples
    shutil.rmtree(out / "validation")
    assert _files(out) != _files(teacher_pass)

    args = ("kd", "teacher", "--restore", str(tiny_nemos["teacher"]), data, f"top_k={TOP_K}",
            "dtype=fp32", "model.micro_batch_size=4", f"output={out}")  # fmt: skip
    resumed = align(*args, cwd=tmp_path)
    assert f"computed {len(TRAIN) - 3} samples" in resumed.stdout
    assert f"computed {len(VALIDATION)} samples" in resumed.stdout
    assert _files(out) == _files(teacher_pass)

    again = align(*args, cwd=tmp_path)
    assert again.stdout.count("already complete, nothing computed") == 2
    assert _files(out) == _files(teacher_pass)


KD = [
    "model.global_batch_size=4",
    "model.micro_batch_size=2",
    "model.knowledge_distillation.sft_loss_weight=0.5",
    "trainer.knowledge_distillation.max_steps=1",
    "trainer.knowledge_distillation.val_check_interval=1",
    "exp_manager.checkpoint_callback_params.save_nemo_on_train_end=false",
]


def test_offline_and_online_distillation_agree(
    tmp_path: Path, align, metrics, tiny_nemos, data, teacher_pass: Path
) -> None:
    student = ("run", "kd", "-q", "--restore", str(tiny_nemos["student"]), data, *KD)
    offline, online = tmp_path / "offline", tmp_path / "online"
    align(
        *student,
        f"model.knowledge_distillation.teacher.directory={teacher_pass}",
        f"exp_manager.explicit_log_dir={offline}",
        cwd=tmp_path,
    )
    align(
        *student,
        f"model.knowledge_distillation.teacher.restore_from_path={tiny_nemos['teacher']}",
        f"model.knowledge_distillation.teacher.top_k={TOP_K}",
        f"exp_manager.explicit_log_dir={online}",
        cwd=tmp_path,
    )
    rows = {"offline": metrics(offline)[1], "online": metrics(online)[1]}
    for row in rows.values():
        assert row["loss"] == pytest.approx(row["kd_loss"] + 0.5 * row["sft_loss"], rel=1e-5)
        assert row["kd_loss"] > 0 and row["sft_loss"] > 0
    for key in ("loss", "kd_loss", "sft_loss"):
        assert rows["offline"][key] == pytest.approx(rows["online"][key], rel=1e-5, abs=1e-6), key
    for run_dir in (offline, online):
        validation = metrics(run_dir, "val")
        assert validation, f"{run_dir}: no validation rows"
        (row,) = validation.values()
        assert 0.0 <= row["top1_agreement"] <= 1.0
        assert np.isfinite(row["kd_loss"])
    assert metrics(offline, "val")[1]["top1_agreement"] == pytest.approx(
        metrics(online, "val")[1]["top1_agreement"], abs=1e-6
    )


def test_misspelt_distillation_key_names_the_closest(tmp_path: Path, align, tiny_nemos) -> None:
    result = align(
        "run", "kd", "--restore", str(tiny_nemos["student"]),
        "model.knowledge_distillation.kd_los=bwd_kl", cwd=tmp_path, check=False,
    )  # fmt: skip
    assert result.returncode == 2, result.stdout + result.stderr
    err = result.stdout + result.stderr
    assert "model.knowledge_distillation.kd_los: no such key" in err
    assert "did you mean model.knowledge_distillation.kd_loss?" in err


def test_teacher_with_another_vocabulary_fails_without_cross_tokenizer(
    tmp_path: Path, align, tiny_nemos, data
) -> None:
    other = tmp_path / "other-vocab.nemo"
    align("init-model", str(other), "--num-layers", "1", "--vocab-size", "300", cwd=tmp_path)
    result = align(
        "run", "kd", "--restore", str(tiny_nemos["student"]), data, *KD,
        f"model.knowledge_distillation.teacher.restore_from_path={other}",
        f"exp_manager.explicit_log_dir={tmp_path / 'run'}", cwd=tmp_path, check=False,
    )  # fmt: skip
    err = result.stdout + result.stderr
    assert result.returncode == 2, err
    assert "the teacher's vocabulary has 300 tokens and the student's" in err
    assert "model.knowledge_distillation.cross_tokenizer=true" in err
    written = tmp_path / "run" / "metrics.jsonl"
    assert not written.exists() or not written.read_text().strip()  # nothing was trained

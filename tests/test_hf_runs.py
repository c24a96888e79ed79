"""Runs that start from a Hugging Face directory, through the `align` command.

A tiny random Llama (`tests/hf_models.py`) is the model: a LoRA DPO run from it writes
``final_hf/`` with the adapters merged (transformers loads it; it has exactly the source's
tensor names) and ``final.nemo`` when asked; ``align ckpt export`` turns the run's step
checkpoints into Hugging Face directories (``--step``, a ``step_*`` directory); the KD teacher
pass reads the same directory. Every check compares against transformers' own forward.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

PAIRS = [
    ("What is the capital of France?", "Paris.", "London."),
    ("Name a primary colour.", "Red.", "Green."),
    ("What is two plus three?", "Five.", "Six."),
    ("Say hello.", "Hello!", "Goodbye."),
]


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for path in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(path)))
    return out


def _logits(directory: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def lora_run(hf_models, tmp_path_factory, align) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("hf-lora-run")
    source = hf_models.tiny_hf_model("llama", root / "llama")
    data = root / "pairs.jsonl"
    hf_models.write_chat_pairs(data, PAIRS)
    run_dir = root / "run"
    align(
        "run", "dpo", "-q", "--restore", str(source),
        f"model.data.data_prefix={{train: [{data}], validation: [{data}]}}",
        "model.global_batch_size=4", "model.micro_batch_size=2", "model.optim.lr=5e-3",
        "model.data.seq_length=64", "trainer.dpo.max_steps=2", "trainer.dpo.val_check_interval=0",
        "trainer.dpo.save_interval=1", "model.peft.peft_scheme=lora",
        "exp_manager.checkpoint_callback_params.save_nemo_on_train_end=true",
        f"exp_manager.explicit_log_dir={run_dir}", cwd=root,
    )  # fmt: skip
    return source, run_dir


def test_lora_run_from_hf_writes_merged_final_hf_and_nemo(lora_run, metrics):
    source, run_dir = lora_run
    assert metrics(run_dir)[1]["loss"] == pytest.approx(0.6931471805599453, abs=1e-4)
    final = run_dir / "final_hf"
    assert (run_dir / "final.nemo").is_file()
    before, after = _tensors(source), _tensors(final)
    assert set(after) == set(before)  # merged: no adapter tensors
    moved = [k for k in before if not torch.equal(before[k], after[k])]
    assert any("proj" in k for k in moved)  # LoRA changed the linear layers
    assert json.loads((final / "config.json").read_text()) == json.loads(
        (source / "config.json").read_text()
    )
    ids = torch.tensor([[1, 40, 41, 42, 43, 44, 2]])
    assert (_logits(final, ids) - _logits(source, ids)).abs().max() > 1e-5


def test_step_checkpoints_export_to_hf(lora_run, tmp_path, align):
    """The run directory (its newest step) and a ``step_*`` directory export alike."""
    source, run_dir = lora_run
    steps = sorted(p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step_"))
    newest = tmp_path / "newest"
    align("ckpt", "export", str(run_dir), "--format", "hf", "--out", str(newest), cwd=tmp_path)
    step = tmp_path / "step"
    align("ckpt", "export", str(steps[-1]), "--format", "hf", "--out", str(step), cwd=tmp_path)
    from_run, from_step, original = _tensors(newest), _tensors(step), _tensors(source)
    assert set(from_run) == set(from_step) == set(original)
    assert all(torch.equal(from_step[k], v) for k, v in from_run.items())
    assert any(not torch.equal(v, original[k]) for k, v in from_run.items())  # trained
    assert (step / "tokenizer.json").read_bytes() == (source / "tokenizer.json").read_bytes()


def test_kd_teacher_reads_an_hf_directory(lora_run, tmp_path, align):
    source, _ = lora_run
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c, _ in PAIRS))
    out = tmp_path / "topk"
    align(
        "kd", "teacher", "--restore", str(source), f"model.data.data_prefix={{train: [{data}]}}",
        "top_k=4", "dtype=fp32", f"output={out}", cwd=tmp_path,
    )  # fmt: skip
    assert any((out / "train").rglob("*"))

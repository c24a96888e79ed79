"""bench/gpu.py's pure parts (FLOPs, MFU, the peak table) with hand-computed numbers, and its
refusal without CUDA. The measurements themselves need a GPU (``python bench/gpu.py``)."""

import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench" / "gpu.py"
_spec = importlib.util.spec_from_file_location("_bench_gpu", BENCH)
G = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(G)

# N = 100 matmul parameters, L = 2 layers, attention width a = 4, s = 8 tokens:
# forward 2·100·8 + 4·2·4·8² = 1600 + 2048; train 6·100·8 + 12·2·4·8² = 4800 + 6144;
# frozen base (LoRA) 4·100·8 + 6144 = 3200 + 6144.
FORWARD, TRAIN, FROZEN = 3648.0, 10944.0, 9344.0


def test_sequence_flops_by_hand():
    assert G.sequence_flops(100, 2, 4, 8, kind="forward") == FORWARD
    assert G.sequence_flops(100, 2, 4, 8, kind="train") == TRAIN
    assert G.sequence_flops(100, 2, 4, 8, kind="frozen") == FROZEN
    with pytest.raises(ValueError, match="kind"):
        G.sequence_flops(100, 2, 4, 8, kind="backward")


def test_step_flops_count_the_reference_forward_where_it_runs():
    pair = [8, 8]  # chosen and rejected
    assert G.step_flops(100, 2, 4, pair, strategy="swap") == 2 * (TRAIN + FORWARD)
    assert G.step_flops(100, 2, 4, pair, strategy="model") == 2 * (TRAIN + FORWARD)
    assert G.step_flops(100, 2, 4, pair, strategy="precompute") == 2 * TRAIN
    assert G.step_flops(100, 2, 4, pair, strategy="adapters") == 2 * (FROZEN + FORWARD)


def test_matmul_params_by_hand():
    # 1 layer, h 4, 2 heads of width 2, 1 KV group, gated ffn 6, vocab 10:
    # qkv 4·(2+2)·2 = 32, proj 2·2·4 = 16, fc1 4·6·2 = 48, fc2 6·4 = 24, output 10·4 = 40.
    small = dict(
        num_layers=1,
        hidden_size=4,
        ffn_hidden_size=6,
        num_attention_heads=2,
        num_query_groups=1,
        kv_channels=None,
        vocab_size=10,
    )
    assert G.matmul_params(**small, gated=True) == 160
    assert G.matmul_params(**small, gated=False) == 160 - 24
    # The bench's Llama-shaped 1B: per layer 2048·3072 + 2048² + 2048·5632·2 + 5632·2048
    # = 45,088,768; 16 layers and a 32000 × 2048 output layer.
    llama = G.matmul_params(
        num_layers=16,
        hidden_size=2048,
        ffn_hidden_size=5632,
        num_attention_heads=32,
        num_query_groups=8,
        kv_channels=None,
        vocab_size=32000,
        gated=True,
    )
    assert llama == 16 * 45_088_768 + 32000 * 2048 == 786_956_288


def test_matmul_params_are_the_models_linear_weights():
    from align_core import ModelConfig, ParallelConfig, build_gpt_model, init_distributed

    init_distributed(ParallelConfig())
    cfg = ModelConfig(num_query_groups=2, vocab_size=256)  # 256 is already a multiple of 128
    model = build_gpt_model(cfg, use_te=False)
    linear = ("linear_qkv.weight", "linear_proj.weight", "linear_fc1.weight", "linear_fc2.weight")
    counted = sum(p.numel() for n, p in model.named_parameters() if n.endswith(linear))
    counted += model.output_layer.weight.numel()
    assert counted == G.matmul_params(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.ffn_hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_query_groups,
        kv_channels=cfg.kv_channels,
        vocab_size=cfg.vocab_size,
        gated=cfg.gated,
    )


@pytest.mark.parametrize(
    ("name", "tflops"),
    [
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H200", 989.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA A100 80GB PCIe", 312.0),
        ("NVIDIA L40S", 362.0),
        ("NVIDIA H100 PCIe", None),
        ("NVIDIA H100 NVL", None),
        ("Tesla T4", None),
    ],
)
def test_peak_table(name, tflops):
    peak = G.peak_bf16_flops(name)
    assert (peak is None) if tflops is None else peak == tflops * 1e12


def test_mfu():
    assert G.mfu(989e12 * 3, 2.0, 989e12) == pytest.approx(1.5)
    assert G.mfu(1e12, 1.0, None) is None
    # a realistic row: the 1B model, 8 pairs of 2048 tokens, swap, 1 s per step on an H100
    n = 786_956_288
    flops = G.step_flops(n, 16, 2048, [2048] * 16, strategy="swap")
    assert flops == 16 * (8 * n * 2048 + 16 * 16 * 2048 * 2048**2)
    assert G.mfu(flops, 1.0, G.peak_bf16_flops("NVIDIA H100 80GB HBM3")) == pytest.approx(
        flops / 989e12
    )
    assert math.isclose(flops / 989e12, 0.2442, rel_tol=1e-3)


def test_markdown_table_rows():
    row = {
        "model": "m",
        "strategy": "swap",
        "params": 852_000_000,
        "seq": 2048,
        "micro_batch_size": 2,
        "accumulation": 4,
        "tokens_per_s": 12345.6,
        "mfu": 0.4123,
        "peak_memory_bytes": 3 * 2**30,
        "step0_loss": math.log(2),
        "precompute_s": None,
    }
    table = G.markdown_table([row, {"model": "s", "strategy": "model", "skipped": "no hf"}])
    lines = table.splitlines()
    assert lines[2] == (
        "| m | 852.0 M | 2048 | swap | 2 × 4 | 12,346 | 41.2 % | 3.0 GiB | 0.693147 |  |"
    )
    assert "no hf" in lines[3]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")
def test_without_cuda_it_says_so_in_one_line_and_exits_2():
    done = subprocess.run([sys.executable, str(BENCH)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "bench/gpu.py needs CUDA: no GPU is visible to torch"
    ]

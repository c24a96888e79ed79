"""torchrun --nproc_per_node=2 script: TP=2 and PP=2 generation equal TP=1 on the same weights.

One launch, three layouts over the same two processes:
1. TP=1 (two data-parallel replicas): the reference. Greedy with and without KV cache, and
   sampling with per-sample seeds; the full state dict is kept.
2. TP=2: the model is built from the same seed (CPU initialisation gives the same full weights at
   any TP size); greedy (cached and not) and sampling must give the reference's tokens.
3. PP=2: each stage loads its layers of the reference state dict; the same checks.

Writes ``rank<r>.json`` into the directory given as the first argument: check name -> None when
it passed, else the failure message.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

from align_core import ModelConfig, ParallelConfig, build_gpt_model, init_distributed
from align_core.generation import GenerationGroups, Generator, LengthConfig, SamplingConfig

SEED = 1234
VOCAB = 200
CFG = ModelConfig(vocab_size=VOCAB, seq_length=48, init_method_std=0.2, num_query_groups=2)
PROMPTS = [[5, 17, 42, 8, 99], [7, 3], [11, 12, 13, 14, 15, 16, 17, 18]]
LENGTH = LengthConfig(max_length=8)
GREEDY = SamplingConfig(use_greedy=True)
SAMPLED = SamplingConfig(temperature=1.2, top_k=50, top_p=0.95, repetition_penalty=1.1)
SEEDS = [101, 202, 303]


def _reinit(tp: int, pp: int) -> None:
    from megatron.core import parallel_state, tensor_parallel

    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp
    )
    tensor_parallel.model_parallel_cuda_manual_seed(SEED)


def _run_all(model: torch.nn.Module) -> dict[str, object]:
    groups = GenerationGroups.from_parallel_state()
    cached = Generator(model, vocab_size=VOCAB, eos_ids=VOCAB - 1, groups=groups)
    plain = Generator(model, vocab_size=VOCAB, eos_ids=VOCAB - 1, groups=groups, use_kv_cache=False)
    greedy = cached.generate(PROMPTS, GREEDY, LENGTH)
    return {
        "greedy": greedy.tokens.tolist(),
        "greedy_lengths": greedy.response_lengths.tolist(),
        "greedy_logprobs": greedy.logprobs,
        "greedy_no_cache": plain.generate(PROMPTS, GREEDY, LENGTH).tokens.tolist(),
        "sampled": cached.generate(PROMPTS, SAMPLED, LENGTH, seed=SEEDS).tokens.tolist(),
    }


def _compare(name: str, got: dict[str, object], ref: dict[str, object]) -> dict[str, str | None]:
    checks: dict[str, str | None] = {}
    for key in ("greedy", "greedy_lengths", "greedy_no_cache", "sampled"):
        checks[f"{name}_{key}"] = (
            None if got[key] == ref[key] else f"{key}: {got[key]} != reference {ref[key]}"
        )
    try:
        torch.testing.assert_close(
            got["greedy_logprobs"], ref["greedy_logprobs"], atol=1e-4, rtol=0
        )
        checks[f"{name}_greedy_logprobs"] = None
    except AssertionError as err:
        checks[f"{name}_greedy_logprobs"] = str(err)
    return checks


def _stage_state_dict(full: dict[str, torch.Tensor], stage: torch.nn.Module) -> dict:
    """This pipeline stage's slice of a full (PP=1) state dict, layers renumbered from 0."""
    from megatron.core import parallel_state

    per_stage = CFG.num_layers // parallel_state.get_pipeline_model_parallel_world_size()
    offset = parallel_state.get_pipeline_model_parallel_rank() * per_stage
    out = {}
    for key, own in stage.state_dict().items():
        if not isinstance(own, torch.Tensor):  # megatron's `_extra_state` entries
            out[key] = own
            continue
        source = key
        if key.startswith("decoder.layers."):
            index, rest = key[len("decoder.layers.") :].split(".", 1)
            source = f"decoder.layers.{int(index) + offset}.{rest}"
        out[key] = full[source]
    return out


def main(out_dir: str) -> None:
    results: dict[str, str | None] = {}
    ctx = init_distributed(ParallelConfig(), seed=SEED)
    try:
        torch.manual_seed(SEED)
        reference_model = build_gpt_model(CFG)
        reference = _run_all(reference_model)
        full_state = {
            k: v.clone()
            for k, v in reference_model.state_dict().items()
            if isinstance(v, torch.Tensor)
        }
        del reference_model
        results["reference_stops_in_range"] = (
            None if max(reference["greedy_lengths"]) <= LENGTH.max_length else "too long"
        )

        _reinit(tp=2, pp=1)
        torch.manual_seed(SEED)
        tp_model = build_gpt_model(CFG, ParallelConfig(tensor_model_parallel_size=2))
        results.update(_compare("tp2", _run_all(tp_model), reference))
        del tp_model

        _reinit(tp=1, pp=2)
        stage = build_gpt_model(CFG, ParallelConfig(pipeline_model_parallel_size=2))
        stage.load_state_dict(_stage_state_dict(full_state, stage))
        results.update(_compare("pp2", _run_all(stage), reference))
    except Exception:
        results["crashed"] = traceback.format_exc()
    finally:
        Path(out_dir, f"rank{ctx.rank}.json").write_text(json.dumps(results, indent=1))
        dist.barrier()
        from align_core import destroy_distributed

        destroy_distributed()


if __name__ == "__main__":
    main(sys.argv[1])

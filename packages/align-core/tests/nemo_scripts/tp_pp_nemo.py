"""Two-process (gloo) checks of `.nemo` loading/saving and LoRA at TP=2, then PP=2.

Run by ``tests/test_nemo_distributed.py`` as
``python -m torch.distributed.run --nproc_per_node=2 tp_pp_nemo.py WORKDIR``. WORKDIR holds what
the test prepared at TP=1 (``src.nemo``, ``ref.pt``, ``adapters.pt``). Each rank writes
``rank<r>.json`` mapping check name → None (passed) or an error message, and leaves files in
WORKDIR that the test then reads back at TP=1.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path


def main(workdir: Path) -> None:
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state, tensor_parallel

    from align_core import ParallelConfig, build_gpt_model, init_distributed
    from align_core.lora import (
        LoraConfig,
        add_lora,
        load_lora,
        lora_adapters,
        lora_disabled,
        merge_lora,
        save_lora,
    )
    from align_core.nemo import (
        load_nemo_weights,
        nemo_config_from_model,
        open_nemo,
        save_nemo,
        split_tensor_parallel,
        write_archive,
    )

    results: dict[str, str | None] = {}
    ref = torch.load(workdir / "ref.pt", weights_only=True)
    ids, pos, mask = ref["ids"], ref["pos"], ref["mask"]

    def check(name, fn):
        try:
            fn()
            results[name] = None
        except Exception:
            results[name] = traceback.format_exc()

    def close(got, want, what):
        if not torch.allclose(got, want, rtol=1e-5, atol=1e-5):
            raise AssertionError(f"{what}: max |diff| {(got - want).abs().max().item():.3e}")

    # ---------------- TP = 2 ----------------
    ctx = init_distributed(ParallelConfig(tensor_model_parallel_size=2), seed=1234)
    rank = ctx.rank

    def tp_logits(model):
        model.eval()
        with torch.no_grad():
            local = model(ids, pos, mask)
        return tensor_parallel.gather_from_tensor_model_parallel_region(local)

    with open_nemo(workdir / "src.nemo") as ckpt:
        cfg = ckpt.model_config_for(2)
        tokenizer = ckpt.tokenizer
        model = build_gpt_model(cfg, ParallelConfig(tensor_model_parallel_size=2))
        load_nemo_weights(model, ckpt)
        check("tp2_load_logits", lambda: close(tp_logits(model), ref["logits"], "TP=2 logits"))
        check(
            "tp2_save_gathered",
            lambda: save_nemo(model, workdir / "tp2_gathered.nemo", cfg, tokenizer=tokenizer),
        )
    check(
        "tp2_save_distributed",
        lambda: save_nemo(model, workdir / "tp2_dist.nemo", cfg, distributed=True),
    )

    def legacy_native():
        # A model initialised by megatron itself at TP=2, saved as NeMo's mp_rank_XX shards.
        torch.manual_seed(77)
        tensor_parallel.model_parallel_cuda_manual_seed(77)
        native = build_gpt_model(cfg, ParallelConfig(tensor_model_parallel_size=2))
        logits = tp_logits(native)
        staging = workdir / "tp2_legacy"
        shard = staging / f"mp_rank_{rank:02d}"
        shard.mkdir(parents=True, exist_ok=True)
        torch.save(
            {"model." + k: v for k, v in native.state_dict().items()},
            shard / "model_weights.ckpt",
        )
        dist.barrier()
        if rank == 0:
            torch.save(logits, workdir / "tp2_legacy_logits.pt")
            nemo_cfg = nemo_config_from_model(cfg, tensor_parallel_size=2)
            import yaml

            (staging / "model_config.yaml").write_text(yaml.safe_dump(nemo_cfg))
            write_archive(staging, workdir / "tp2_legacy.nemo")
        dist.barrier()

    check("tp2_legacy_shards", legacy_native)

    lora = LoraConfig(**{**ref["lora"], "target_modules": tuple(ref["lora"]["target_modules"])})

    def lora_checks():
        add_lora(model, lora)
        load_lora(model, workdir / "adapters.pt")
        close(tp_logits(model), ref["adapted"], "TP=2 adapted logits")
        with lora_disabled(model):
            close(tp_logits(model), ref["logits"], "TP=2 logits with adapters disabled")
        model.train()
        local = model(ids, pos, mask)
        weight = ref["loss_weight"].chunk(2, dim=-1)[ctx.tensor_rank]
        (local * weight).sum().backward()
        full_grads = split_tensor_parallel(ref["grads"], ctx.tensor_rank, 2, gated=cfg.gated)
        for name, adapter in lora_adapters(model).items():
            for part in ("lora_a", "lora_b"):
                got = getattr(adapter, part).grad
                want = full_grads[f"{name}.{part}"]
                scale = want.abs().max().item()
                diff = (got - want).abs().max().item()
                if diff > 1e-5 * scale + 1e-7:  # float32 reduction order differs across TP
                    raise AssertionError(
                        f"grad of {name}.{part}: max |diff| {diff:.3e}, max |grad| {scale:.3e}"
                    )
        model.zero_grad(set_to_none=True)
        save_lora(model, workdir / "tp2_adapters.pt", lora)
        merge_lora(model)
        close(tp_logits(model), ref["adapted"], "TP=2 merged logits")

    check("tp2_lora", lora_checks)

    # ---------------- PP = 2 ----------------
    parallel_state.destroy_model_parallel()
    ctx = init_distributed(ParallelConfig(pipeline_model_parallel_size=2), seed=1234)
    with open_nemo(workdir / "src.nemo") as ckpt:
        cfg = ckpt.model_config
        stage = build_gpt_model(cfg, ParallelConfig(pipeline_model_parallel_size=2))
        load_nemo_weights(stage, ckpt)

    def pp_forward():
        stage.eval()
        with torch.no_grad():
            if ctx.pipeline_rank == 0:
                hidden = stage(ids, pos, mask)
                dist.send(hidden.contiguous(), dst=1)
            else:
                hidden = torch.empty(ids.shape[1], ids.shape[0], cfg.hidden_size)
                dist.recv(hidden, src=0)
                stage.set_input_tensor(hidden)
                close(stage(ids, pos, mask), ref["logits"], "PP=2 logits")

    check("pp2_load_logits", pp_forward)
    check("pp2_save_gathered", lambda: save_nemo(stage, workdir / "pp2_gathered.nemo", cfg))

    def legacy_pp():
        shard = workdir / "pp2_legacy" / f"tp_rank_00_pp_rank_{ctx.pipeline_rank:03d}"
        shard.mkdir(parents=True, exist_ok=True)
        torch.save(
            {"model." + k: v for k, v in stage.state_dict().items()}, shard / "model_weights.ckpt"
        )
        dist.barrier()
        if rank == 0:
            import yaml

            nemo_cfg = nemo_config_from_model(cfg, pipeline_parallel_size=2)
            (workdir / "pp2_legacy" / "model_config.yaml").write_text(yaml.safe_dump(nemo_cfg))
            write_archive(workdir / "pp2_legacy", workdir / "pp2_legacy.nemo")
        dist.barrier()

    check("pp2_legacy_shards", legacy_pp)
    (workdir / f"rank{rank}.json").write_text(json.dumps(results))
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))

"""Logits of a Hugging Face checkpoint imported into align, at TP=1, 2 or 3 or PP=2 (gloo).

Run by ``tests/test_hf_real.py`` as
``python -m torch.distributed.run --nproc_per_node=N logits.py HF_DIR WORKDIR LAYOUT`` with
LAYOUT ``tp1`` (N=1), ``tp2`` or ``pp2`` (N=2), ``tp3`` (N=3). WORKDIR holds ``ids.pt``
(``[B, S]`` token ids); the rank holding the full logits writes ``WORKDIR/<LAYOUT>.pt``
(``[B, S, V]``, fp32).
"""

from __future__ import annotations

import sys
from pathlib import Path


def main(hf_dir: Path, workdir: Path, layout: str) -> None:
    import torch
    import torch.distributed as dist
    from megatron.core import tensor_parallel

    from align_core import ParallelConfig, build_gpt_model, causal_attention_mask, init_distributed
    from align_core.hf import load_hf_weights, open_hf

    ids = torch.load(workdir / "ids.pt", weights_only=True)
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    mask = causal_attention_mask(ids.shape[1])
    sizes = {"tp1": (1, 1), "tp2": (2, 1), "tp3": (3, 1), "pp2": (1, 2)}[layout]
    parallel = ParallelConfig(
        tensor_model_parallel_size=sizes[0], pipeline_model_parallel_size=sizes[1]
    )
    ctx = init_distributed(parallel, seed=1)
    with open_hf(hf_dir) as ckpt:
        config = ckpt.model_config_for(parallel.tensor_model_parallel_size)
        model = build_gpt_model(config, parallel)
        load_hf_weights(model, ckpt)
    model.eval()
    out = workdir / f"{layout}.pt"
    with torch.no_grad():
        if layout == "pp2":
            if ctx.pipeline_rank == 0:
                dist.send(model(ids, positions, mask).contiguous(), dst=1)
                return
            hidden = torch.empty(ids.shape[1], ids.shape[0], config.hidden_size)
            dist.recv(hidden, src=0)
            model.set_input_tensor(hidden)
            torch.save(model(ids, positions, mask), out)
            return
        logits = tensor_parallel.gather_from_tensor_model_parallel_region(
            model(ids, positions, mask)
        )
        if ctx.rank == 0:
            torch.save(logits, out)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3])

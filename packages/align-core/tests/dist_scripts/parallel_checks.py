"""Two-process parallelism checks against one-process references, in one launch.

Usage: python -m torch.distributed.run --nproc-per-node 2 parallel_checks.py WORKDIR

The same two processes re-initialise megatron's parallel state for each layout:

0. TP=1 (DP=2, every rank computes alone): the reference model's token log-probs and gradients
   on the whole batch, saved as a checkpoint.
1. TP=2: the reference checkpoint loaded; log-probs (fused and logits paths) and gradients
   (gathered over TP) equal the reference. The weights are then moved and saved at TP=2.
2. PP=2: micro-batches through megatron's 1F1B schedule; the last stage's per-sequence log-probs
   (broadcast to both stages) and the gradients of both stages equal the reference; a
   ``forward_only`` pass gives the same log-probs.
3. DP=2 (megatron DDP): each rank half of the batch, two micro-batches each; the reduced
   gradients equal the reference. One distributed-optimizer step of the production trainer
   (`align_core.trainer.loop.Trainer`, as runs build it) equals torch AdamW on the reference
   gradients. A distributed-optimizer run saved at step 2 (with the trainer's state) and
   resumed in a fresh trainer, model and optimizer gives the uninterrupted step-3 loss.
4. TP=1: the TP=2 checkpoint from 1 gives the TP=2 model's logits.

Every rank compares; rank 0 writes ``WORKDIR/results.json``: ``{check: {"ok", "detail"}}``
with a check passing only when it passed on both ranks. Comparisons never raise, so one
failure cannot leave the other rank stuck in a collective.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path


def main() -> None:
    warnings.filterwarnings("ignore")
    sys.path.insert(0, os.path.dirname(__file__))
    import _common as c
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from align_core import (
        Checkpointer,
        DDPConfig,
        LogProbConfig,
        ModelConfig,
        OptimizerConfig,
        ParallelConfig,
        broadcast_from_last_stage,
        build_gpt_model,
        build_optimizer,
        causal_attention_mask,
        concat_outputs,
        forward_backward,
        init_distributed,
        seed_all,
        unwrap_model,
        wrap_ddp,
    )

    workdir = Path(sys.argv[1])
    cfg = ModelConfig()
    results: dict[str, list[str]] = {}

    def check(name: str, got, expected, atol: float, rtol: float, what: str = "") -> None:
        problems = results.setdefault(name, [])
        try:
            torch.testing.assert_close(got, expected, atol=atol, rtol=rtol)
        except AssertionError as err:
            problems.append(f"{what} " + " ".join(str(err).split()))

    def check_grads(name: str, grads, expected, atol=2e-5, rtol=1e-4) -> None:
        if grads.keys() != expected.keys():
            results.setdefault(name, []).append(f"names differ: {sorted(grads ^ expected.keys())}")
            return
        for key in expected:
            check(name, grads[key], expected[key], atol, rtol, key)

    def layout(tp: int = 1, pp: int = 1) -> None:
        parallel_state.destroy_model_parallel()
        init_distributed(
            ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
        )

    def full_grads(model) -> dict[str, torch.Tensor]:
        """Gradients by global parameter name, gathered over TP and PP (as TP=PP=1 holds them)."""
        gpt = unwrap_model(model)
        tp = parallel_state.get_tensor_model_parallel_group()
        out = {}
        for name, p in gpt.named_parameters():
            g = p.main_grad if hasattr(p, "main_grad") else p.grad
            if getattr(p, "tensor_model_parallel", False) and tp.size() > 1:
                parts = [torch.empty_like(g) for _ in range(tp.size())]
                dist.all_gather(parts, g.contiguous(), group=tp)
                if name.endswith("linear_fc1.weight") and cfg.gated:
                    # each rank holds [gate_r; up_r]; TP=1 holds [gate; up]
                    halves = [part.chunk(2, dim=0) for part in parts]
                    g = torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
                else:
                    g = torch.cat(parts, dim=p.partition_dim)
            if name.startswith("decoder.layers."):
                local = int(name.split(".")[2])
                number = gpt.decoder.layers[local].layer_number - 1
                name = name.replace(f"decoder.layers.{local}.", f"decoder.layers.{number}.", 1)
            out[name] = g.clone()
        pp = parallel_state.get_pipeline_model_parallel_group()
        if pp.size() > 1:
            stages = [None] * pp.size()
            dist.all_gather_object(stages, out, group=pp)
            out = {k: v for stage in stages for k, v in stage.items()}
        return out

    tokens, labels = c.data(seed=0)
    full_batch = {"tokens": tokens, "labels": labels}

    # ---- 0. reference at TP=1 -------------------------------------------------------------
    init_distributed(ParallelConfig())
    seed_all(1234)
    reference = build_gpt_model(cfg)
    ref_logps = c.forward(config=LogProbConfig(fused=False))(reference, full_batch)
    c.loss_fn(full_batch, ref_logps)[0].backward()
    ref_logps = ref_logps.detach()
    ref_grads = {n: p.grad.clone() for n, p in reference.named_parameters()}
    ref_ckpt = Checkpointer(workdir / "ref", keep_last=1)
    ref_ckpt.save(0, reference)

    # ---- 1. TP=2 ------------------------------------------------------------------------------
    layout(tp=2)
    model = build_gpt_model(cfg)
    ref_ckpt.load(model)
    for fused in (True, False):
        model.zero_grad(set_to_none=True)
        logps = c.forward(config=LogProbConfig(fused=fused))(model, full_batch)
        c.loss_fn(full_batch, logps)[0].backward()
        path = "fused" if fused else "logits"
        check(f"tp2_logps_{path}", logps.detach(), ref_logps, 2e-6, 1e-5)
        check_grads(f"tp2_grads_{path}", full_grads(model), ref_grads)
    with torch.no_grad():
        for p in model.parameters():
            p.sub_(0.5 * p.grad)
        seq = tokens.shape[1]
        mask = causal_attention_mask(seq)
        positions = torch.arange(seq).expand_as(tokens)
        tp2_logits = gather_from_tensor_model_parallel_region(model(tokens, positions, mask))
    Checkpointer(workdir / "tp2", keep_last=1).save(1, model)

    # ---- 2. PP=2 ------------------------------------------------------------------------------
    layout(pp=2)
    model = build_gpt_model(cfg)
    ref_ckpt.load(model)
    pp_group = parallel_state.get_pipeline_model_parallel_group()
    micro = c.micro_batches(tokens, labels, 2)
    outputs = forward_backward(model, micro, c.forward(), c.loss_fn)
    got = broadcast_from_last_stage(concat_outputs(outputs) or None, group=pp_group)
    check("pp2_logps", got["logps"], ref_logps.sum(-1), 2e-5, 1e-5)
    check_grads("pp2_grads", full_grads(model), ref_grads)
    outputs = forward_backward(
        model, micro, c.forward(), lambda b, lp: (None, {"logps": lp.sum(-1)}), forward_only=True
    )
    got = broadcast_from_last_stage(concat_outputs(outputs) or None, group=pp_group)
    check("pp2_forward_only_logps", got["logps"], ref_logps.sum(-1), 2e-5, 1e-5)

    # ---- 3. DP=2 ------------------------------------------------------------------------------
    layout()
    rank = parallel_state.get_data_parallel_rank()
    half = slice(2 * rank, 2 * rank + 2)
    mine = c.micro_batches(tokens[half], labels[half], 1)  # two micro-batches per rank
    model = wrap_ddp(build_gpt_model(cfg))
    ref_ckpt.load(model)
    model.zero_grad_buffer()
    forward_backward(model, mine, c.forward(), c.loss_fn)
    check_grads("dp2_grads", full_grads(model), ref_grads)

    # Adam's first step is lr · g / (|g| + eps): for |g| near eps, float noise from a different
    # summation order moves it visibly, so eps sits well above that noise and the tolerance
    # is 0.1 % of the step size.
    opt_cfg = OptimizerConfig(lr=1e-2, weight_decay=0.1, eps=1e-4)
    model = wrap_ddp(build_gpt_model(cfg), DDPConfig(use_distributed_optimizer=True))
    ref_ckpt.load(model)
    optimizer = build_optimizer(model, opt_cfg, clip_grad=0.0)
    c.train_step(model, optimizer, mine, lr=opt_cfg.lr, clip=0.0)
    params = list(reference.parameters())
    adamw = torch.optim.AdamW(
        [
            {"params": [p for p in params if p.dim() > 1]},
            {"params": [p for p in params if p.dim() == 1], "weight_decay": 0.0},
        ],
        lr=opt_cfg.lr,
        betas=opt_cfg.betas,
        eps=opt_cfg.eps,
        weight_decay=opt_cfg.weight_decay,
    )
    adamw.step()
    expected = dict(reference.named_parameters())
    for name, p in unwrap_model(model).named_parameters():
        check(
            "dp2_distributed_optimizer_step", p.detach(), expected[name].detach(), 1e-5, 1e-5, name
        )

    def rank_batches(data_seed: int):
        t, lab = c.data(seed=data_seed)
        return c.micro_batches(t[half], lab[half], 1)

    # Steps 2 and 3 of one trainer; the trainer's loss is summed over data-parallel ranks.
    run = c.trainer(model, optimizer, [mine, mine, rank_batches(3)], clip=0.0)
    run.state.step, run.state.consumed_samples = 1, c.GLOBAL_BATCH  # step 1 was done above
    run.train_step()  # step 2
    dopt_ckpt = Checkpointer(workdir / "dopt", keep_last=1)
    dopt_ckpt.save(2, model, optimizer, trainer_state=run.state_dict())
    uninterrupted = run.train_step()["loss"]
    seed_all(4321)
    fresh = wrap_ddp(build_gpt_model(cfg), DDPConfig(use_distributed_optimizer=True))
    fresh_opt = build_optimizer(fresh, opt_cfg, clip_grad=0.0)
    info = dopt_ckpt.load(fresh, fresh_opt)
    resumed_run = c.trainer(fresh, fresh_opt, [mine, mine, rank_batches(3)], clip=0.0)
    if info is not None:
        resumed_run.load_state_dict(info.trainer_state)
    resumed = resumed_run.train_step()["loss"]
    if info is None or info.step != 2 or resumed != uninterrupted:
        results.setdefault("dp2_distributed_optimizer_resume", []).append(
            f"resumed loss {resumed!r} != uninterrupted {uninterrupted!r} (info {info})"
        )
    results.setdefault("dp2_distributed_optimizer_resume", [])

    # ---- 4. TP=2 checkpoint at TP=1 ---------------------------------------------------------
    model = build_gpt_model(cfg)
    Checkpointer(workdir / "tp2", keep_last=1).load(model)
    with torch.no_grad():
        logits = model(tokens, positions, mask)
    check("tp2_checkpoint_at_tp1_logits", logits, tp2_logits, 1e-5, 1e-5)

    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, results)
    if dist.get_rank() == 0:
        merged = {}
        for name in results:
            problems = [f"rank {r}: {p}" for r, res in enumerate(everyone) for p in res[name]]
            merged[name] = {"ok": not problems, "detail": "\n".join(problems)}
        (workdir / "results.json").write_text(json.dumps(merged, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

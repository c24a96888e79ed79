"""torchrun --nproc_per_node=2 script: distillation under DP=2, TP=2 and PP=2 equals one process.

One launch, three layouts over the same two processes:
1. TP=1, DP=2: the reference. The teacher pass splits the data over the two replicas (two store
   parts); each rank then computes the KD metrics and the student's full gradients on the same
   micro-batches (offline from the store, online, cross-tokenizer).
2. TP=2: teacher and student built from the same seeds (CPU initialisation gives the same full
   weights at any TP size). The teacher pass (vocabulary-parallel top-k merge) must store the
   reference's top-k; metrics and gathered gradients must equal the reference's.
3. PP=2: each stage loads its layers of the reference weights; the same checks on the last
   stage (the first stage's gradients are checked too).

Writes ``rank<r>.json`` into the directory given as the first argument: check -> None when it
passed, else the failure message.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
from _kd_helpers import TOKENIZER, VOCAB, synthetic_examples

from align_core import ModelConfig, ParallelConfig, build_gpt_model, init_distributed
from align_core.algorithms._common import pad_model_batch
from align_core.schedule import forward_backward
from align_data import CollateConfig
from align_kd import (
    KDStep,
    KnowledgeDistillationConfig,
    OnlineTeacher,
    TeacherExamples,
    TeacherGroups,
    TeacherPassConfig,
    logits_forward,
    open_teacher_store,
    run_teacher_pass,
    tensor_group_of,
)

SEED = 1234
ROWS = dict(vocab_size=384, make_vocab_size_divisible_by=64)  # 384 rows at TP=1 and TP=2
TEACHER = ModelConfig(**ROWS, seq_length=64, activation="gelu", init_method_std=0.2)
STUDENT = TEACHER.replace(hidden_size=32, ffn_hidden_size=64, num_attention_heads=2)
K = 8
COLLATE = CollateConfig(pad_id=TOKENIZER.pad_id)
CONFIGS = {
    "fwd_tail_sft": KnowledgeDistillationConfig(tail=True, sft_loss_weight=0.5),
    "bwd_scaled": KnowledgeDistillationConfig(kd_loss="bwd_kl", logits_scale=0.7, top_k=5),
    "cross": KnowledgeDistillationConfig(cross_tokenizer=True),
}


def _reinit(tp: int, pp: int) -> None:
    from megatron.core import parallel_state, tensor_parallel

    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp
    )
    tensor_parallel.model_parallel_cuda_manual_seed(SEED)


def _build(cfg: ModelConfig, parallel: ParallelConfig, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    from megatron.core import tensor_parallel

    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return build_gpt_model(cfg, parallel)


def _teacher_pass(teacher, examples, out: Path) -> None:
    cfg = TeacherPassConfig(output_dir=str(out), top_k=K, dtype="fp32", micro_batch_size=2)
    run_teacher_pass(
        teacher,
        examples,
        cfg,
        vocab_size=VOCAB,
        pad_id=TOKENIZER.pad_id,
        groups=TeacherGroups.from_model(teacher),
        progress=lambda s, p: None,
    )


def _micro_batches(step: KDStep, items) -> list[dict[str, torch.Tensor]]:
    batches = [step.build_micro_batch(items[i : i + 3], COLLATE) for i in (0, 3)]
    length = max(b["tokens"].shape[1] for b in batches)
    out = []
    for b in batches:
        teacher = {k: b.pop(k) for k in list(b) if k.startswith("teacher_")}
        padded = pad_model_batch(b, length, pad_id=TOKENIZER.pad_id)
        padded.update(teacher)
        out.append(padded)
    return out


def _full_grads(model: torch.nn.Module, layer_offset: int = 0) -> dict[str, torch.Tensor]:
    """Each parameter's gradient, gathered over tensor parallelism, under TP=1 names."""
    out = {}
    for name, p in model.named_parameters():
        g = p.grad.detach().clone()
        if getattr(p, "tensor_model_parallel", False):
            from megatron.core import parallel_state as ps

            group = ps.get_tensor_model_parallel_group()
            parts = [torch.empty_like(g) for _ in range(group.size())]
            dist.all_gather(parts, g.contiguous(), group=group)
            g = torch.cat(parts, dim=p.partition_dim)
        if name.startswith("decoder.layers."):
            index, rest = name[len("decoder.layers.") :].split(".", 1)
            name = f"decoder.layers.{int(index) + layer_offset}.{rest}"
        out[name] = g
    return out


def _kd_results(student, teacher, examples, store) -> dict[str, object]:
    """Metrics (last stage) and gathered gradients of each config, offline and online."""
    results: dict[str, object] = {}
    paired = TeacherExamples(examples, store)
    group = tensor_group_of(student)
    for name, cfg in CONFIGS.items():
        step = KDStep(cfg, vocab_size=VOCAB, tensor_group=group)
        runs = {"offline": _micro_batches(step, paired)}
        if name != "cross":
            online = OnlineTeacher(
                teacher, top_k=K, vocab_size=VOCAB, group=tensor_group_of(teacher)
            )
            runs["online"] = online.annotate(_micro_batches(step, examples))
        for mode, batches in runs.items():
            student.zero_grad()
            normalizer = step.normalizer(batches, global_examples=6)
            outputs = forward_backward(student, batches, logits_forward, step.loss_fn(normalizer))
            if outputs:
                sums = {k: float(sum(o[k] for o in outputs)) for k in outputs[0]}
                results[f"{name}_{mode}_metrics"] = step.finalize_metrics(sums)
            results[f"{name}_{mode}_grads"] = _full_grads(student, _layer_offset(student))
    return results


def _layer_offset(model: torch.nn.Module) -> int:
    from megatron.core import parallel_state as ps

    return ps.get_pipeline_model_parallel_rank() * (
        STUDENT.num_layers // ps.get_pipeline_model_parallel_world_size()
    )


def _stage_state_dict(full: dict[str, torch.Tensor], stage: torch.nn.Module, layers: int) -> dict:
    from megatron.core import parallel_state as ps

    offset = ps.get_pipeline_model_parallel_rank() * (layers // 2)
    out = {}
    for key, own in stage.state_dict().items():
        if not isinstance(own, torch.Tensor):
            out[key] = own
            continue
        source = key
        if key.startswith("decoder.layers."):
            index, rest = key[len("decoder.layers.") :].split(".", 1)
            source = f"decoder.layers.{int(index) + offset}.{rest}"
        out[key] = full[source]
    return out


def _compare_store(name: str, got_dir: Path, ref_dir: Path, n: int) -> dict[str, str | None]:
    got, ref = open_teacher_store(got_dir), open_teacher_store(ref_dir)
    try:
        assert len(got) == len(ref) == n, (len(got), len(ref))
        for i in range(n):
            a, b = got[i], ref[i]
            assert torch.equal(a.ids, b.ids), f"sample {i}: ids differ"
            torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=0)
            torch.testing.assert_close(a.logsumexp, b.logsumexp, atol=1e-5, rtol=0)
            assert torch.equal(a.input_ids, b.input_ids)
        return {f"{name}_store": None}
    except AssertionError as err:
        return {f"{name}_store": str(err)}


def _compare_kd(name: str, got: dict, ref: dict, last_stage: bool) -> dict[str, str | None]:
    checks: dict[str, str | None] = {}
    for key, value in ref.items():
        check = f"{name}_{key}"
        if key.endswith("_metrics"):
            if not last_stage:
                continue
            try:
                assert got[key].keys() == value.keys()
                for m in value:
                    assert abs(got[key][m] - value[m]) <= 1e-5 * max(1.0, abs(value[m])), (
                        m,
                        got[key][m],
                        value[m],
                    )
                checks[check] = None
            except (AssertionError, KeyError) as err:
                checks[check] = repr(err)
        else:
            try:
                mine = got[key]
                assert mine, "no gradients"
                for param, grad in mine.items():
                    torch.testing.assert_close(grad, value[param], atol=2e-6, rtol=2e-4)
                checks[check] = None
            except (AssertionError, KeyError) as err:
                checks[check] = repr(err)[:2000]
    return checks


def main(out_dir: str) -> None:
    out = Path(out_dir)
    results: dict[str, str | None] = {}
    ctx = init_distributed(ParallelConfig(), seed=SEED)
    try:
        examples, _ = synthetic_examples(out / f"data{ctx.rank}", num_train=6)
        # 1. TP=1, DP=2: reference.
        teacher = _build(TEACHER, ParallelConfig(), seed=1)
        student = _build(STUDENT, ParallelConfig(), seed=2)
        _teacher_pass(teacher, examples, out / "ref")
        store = open_teacher_store(out / "ref", examples=examples)
        results["dp2_two_parts"] = None if len(store.indices()) == 2 else str(store.indices())
        ref = _kd_results(student, teacher, examples, store)
        for name in CONFIGS:
            if name != "cross":
                online, offline = ref[f"{name}_online_metrics"], ref[f"{name}_offline_metrics"]
                results[f"ref_{name}_online_equals_offline"] = (
                    None
                    if all(abs(online[m] - offline[m]) < 1e-5 for m in offline)
                    else f"{online} != {offline}"
                )
        t_full = {k: v.clone() for k, v in teacher.state_dict().items() if torch.is_tensor(v)}
        s_full = {k: v.clone() for k, v in student.state_dict().items() if torch.is_tensor(v)}
        del teacher, student

        # 2. TP=2.
        _reinit(tp=2, pp=1)
        tp = ParallelConfig(tensor_model_parallel_size=2)
        teacher, student = _build(TEACHER, tp, seed=1), _build(STUDENT, tp, seed=2)
        _teacher_pass(teacher, examples, out / "tp2")
        results.update(_compare_store("tp2", out / "tp2", out / "ref", len(examples)))
        got = _kd_results(student, teacher, examples, store)
        results.update(_compare_kd("tp2", got, ref, last_stage=True))
        del teacher, student

        # 3. PP=2.
        _reinit(tp=1, pp=2)
        pp = ParallelConfig(pipeline_model_parallel_size=2)
        teacher, student = build_gpt_model(TEACHER, pp), build_gpt_model(STUDENT, pp)
        teacher.load_state_dict(_stage_state_dict(t_full, teacher, TEACHER.num_layers))
        student.load_state_dict(_stage_state_dict(s_full, student, STUDENT.num_layers))
        _teacher_pass(teacher, examples, out / "pp2")
        results.update(_compare_store("pp2", out / "pp2", out / "ref", len(examples)))
        got = _kd_results(student, teacher, examples, store)
        from megatron.core import parallel_state as ps

        results.update(_compare_kd("pp2", got, ref, last_stage=ps.is_pipeline_last_stage()))
    except Exception:
        results["crashed"] = traceback.format_exc()
    finally:
        Path(out_dir, f"rank{ctx.rank}.json").write_text(json.dumps(results, indent=1))
        dist.barrier()
        from align_core import destroy_distributed

        destroy_distributed()


if __name__ == "__main__":
    main(sys.argv[1])

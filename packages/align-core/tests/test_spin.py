"""SPIN's pieces on a tiny GPT in one process: config, masks, loss reduction, opponent, rollouts.

Expected values are derived independently: labels written out by hand, sequence log-probs from a
plain forward of each unpadded sequence, the loss from its formula, and micro-batch/strategy
equivalences between two runs of the trainer.
"""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from _core_scripts import load_tiny

from align_core.algorithms._common import segment_sums
from align_core.algorithms.spin import SPINConfig, SPINStep, spin_loss_and_metrics, spin_model_batch
from align_core.generation import (
    GenerateConfig,
    GenerationRow,
    LengthConfig,
    SamplingConfig,
    generate_jsonl,
    generation_length,
    generation_seeds,
    make_generator,
    read_generations,
    rollout,
    write_generations,
)
from align_core.reference import TrainOnlyReference, refreshable_reference
from align_core.trainer import ReferenceConfig
from align_core.trainer.spin import (
    SPINTrainerConfig,
    plan_iterations,
    resolve_opponent_strategy,
)
from align_data import CollateConfig, DataError, PreferenceExample, generate_pairs

T = load_tiny()

pytestmark = pytest.mark.usefixtures("one_thread")

IGNORE = -100


def _pairs(n: int, seed: int = 0) -> list[PreferenceExample]:
    """Synthetic pairs standing in for (real, generated): chosen = real, rejected = generated."""
    return T.preference_examples(n, seed=seed)


# ----------------------------------------------------------------------------------- config


def test_beta_scalar_or_per_iteration_list():
    assert SPINConfig(ref_policy_kl_penalty=0.3).beta(5) == 0.3
    cfg = SPINConfig(ref_policy_kl_penalty=[0.1, 0.2, 0.4])  # a list, as Hydra hands it over
    assert cfg.ref_policy_kl_penalty == (0.1, 0.2, 0.4)
    assert [cfg.beta(t) for t in range(3)] == [0.1, 0.2, 0.4]
    with pytest.raises(ValueError, match="iteration 3 needs at least 4"):
        cfg.beta(3)
    with pytest.raises(ValueError, match="iteration 3"):
        cfg.check_iterations(4)
    cfg.check_iterations(3)
    with pytest.raises(ValueError, match="> 0"):
        SPINConfig(ref_policy_kl_penalty=[0.1, 0.0])
    with pytest.raises(ValueError, match="rollout_micro_batch_size"):
        SPINConfig(rollout_micro_batch_size=0)
    assert SPINStep(cfg, iteration=2).beta == 0.4


def test_opponent_strategy_resolution():
    assert resolve_opponent_strategy(ReferenceConfig("auto")) == "swap"
    assert resolve_opponent_strategy(ReferenceConfig("model")) == "model"
    for bad in ("precompute", "adapters"):
        with pytest.raises(ValueError, match="cannot be SPIN's opponent"):
            resolve_opponent_strategy(ReferenceConfig(bad))


def test_iteration_plans_count_epochs_per_iteration_and_cap_the_run():
    cfg = SPINTrainerConfig(max_iterations=3, max_epochs=2)
    plans = plan_iterations(
        cfg, prompts=20, global_batch_size=8, val_batches=0, train_on_previous_iteration=False
    )
    # 20 // 8 = 2 steps per epoch, 2 epochs per iteration.
    assert [(p.start_step, p.steps, p.pairs) for p in plans] == [(0, 4, 20), (4, 4, 20), (8, 4, 20)]
    both = plan_iterations(
        cfg, prompts=20, global_batch_size=8, val_batches=0, train_on_previous_iteration=True
    )
    # Iterations t >= 1 train on the pairs of t and t - 1: 40 // 8 = 5 steps per epoch.
    assert [(p.start_step, p.steps, p.pairs) for p in both] == [
        (0, 4, 20),
        (4, 10, 40),
        (14, 10, 40),
    ]
    capped = SPINTrainerConfig(max_iterations=3, max_epochs=2, max_steps=6)
    plans = plan_iterations(
        capped, prompts=20, global_batch_size=8, val_batches=0, train_on_previous_iteration=False
    )
    assert [(p.start_step, p.steps) for p in plans] == [(0, 4), (4, 2)]


def test_generation_length_is_one_limit_for_the_whole_prompt_set():
    prompts = [[1] * 10, [1] * 50]
    assert generation_length(LengthConfig(256, 3), prompts, 64) == LengthConfig(14, 3)
    assert generation_length(LengthConfig(8, 3), prompts, 64) == LengthConfig(8, 3)
    with pytest.raises(ValueError, match="no room"):
        generation_length(LengthConfig(), [[1] * 64], 64)


# ------------------------------------------------------------------------------------ masks


def test_labels_score_exactly_the_response_tokens_including_the_final_eos():
    bos, eos, pad = T.TOK.bos_id, T.TOK.eos_id, T.TOK.pad_id
    prompt, real, generated = [bos, 10, 11, 12], [20, 21, eos], [30, eos]
    pair = PreferenceExample(
        np.array(prompt, np.int32), np.array(real, np.int32), np.array(generated, np.int32)
    )
    batch = spin_model_batch([pair], CollateConfig(pad_id=pad))
    # Position t predicts token t + 1; only response tokens (EOS included) carry a label.
    assert batch["tokens"].tolist() == [[bos, 10, 11, 12, 20, 21], [bos, 10, 11, 12, 30, pad]]
    assert batch["labels"].tolist() == [
        [IGNORE, IGNORE, IGNORE, 20, 21, eos],
        [IGNORE, IGNORE, IGNORE, 30, eos, IGNORE],
    ]
    assert batch["segment_ids"].tolist() == [[-1, -1, -1, 0, 0, 0], [-1, -1, -1, 1, 1, -1]]
    assert batch["seq_token_counts"].tolist() == [3.0, 2.0]
    assert batch["generated_lengths"].tolist() == [2.0]


def test_sequence_log_probs_sum_the_response_tokens_of_a_plain_forward(dist_ctx):
    model = T.fresh_model().eval()
    examples = _pairs(3)
    batch = spin_model_batch(examples, T.COLLATE)
    with torch.no_grad():
        token_logps = T.FORWARD(model, batch)
    got = segment_sums(token_logps, batch["segment_ids"], 6)
    expected = []
    for which in ("chosen_ids", "rejected_ids"):
        for e in examples:
            prompt, response = list(e.prompt_ids), list(getattr(e, which))
            seq = prompt + response
            n = len(seq)
            mask = torch.triu(torch.ones(1, 1, n, n, dtype=torch.bool), 1)
            with torch.no_grad():
                logits = model(torch.tensor([seq]), torch.arange(n)[None], mask)[0].double()
            logp = torch.log_softmax(logits[:, : T.TOK.vocab_size], -1)
            # Token j of the response is predicted at position len(prompt) - 1 + j.
            total = sum(logp[len(prompt) - 1 + j, tok].item() for j, tok in enumerate(response))
            expected.append(total)
    torch.testing.assert_close(
        got.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=1e-4
    )


# ------------------------------------------------------------------------------------- loss


def test_micro_batch_loss_is_the_formula_summed_over_the_global_batch():
    # Two pairs, one token per response: sequence log-probs are the token log-probs.
    batch = {
        "segment_ids": torch.tensor([[0], [1], [2], [3]]),
        "seq_token_counts": torch.ones(4),
        "ref_logps": torch.tensor([-1.0, -2.0, -1.5, -0.5]),
        "generated_lengths": torch.tensor([1.0, 1.0]),
    }
    token_logps = torch.tensor([[-0.5], [-2.5], [-2.0], [-0.25]])
    beta, global_pairs = 0.5, 8
    loss, metrics = spin_loss_and_metrics(
        beta, torch.tensor(float(global_pairs)), batch, token_logps
    )

    def per_pair(pr, pg, rr, rg):
        margin = beta * ((pr - rr) - (pg - rg))
        return math.log1p(math.exp(-margin))

    first, second = per_pair(-0.5, -2.0, -1.0, -1.5), per_pair(-2.5, -0.25, -2.0, -0.5)
    assert loss.item() == pytest.approx((first + second) / global_pairs, rel=1e-6)
    assert metrics["loss"].item() == pytest.approx(first + second, rel=1e-6)
    assert metrics["acc"].item() == 1.0  # pair 0: 0.5·0.5 > 0.5·(-0.5); pair 1: -0.25 < 0.125
    assert metrics["rewards_actual"].item() == pytest.approx(beta * (0.5 - 0.5))
    assert metrics["rewards_generated"].item() == pytest.approx(beta * (-0.5 + 0.25))
    assert metrics["pairs"].item() == 2.0
    step = SPINStep(SPINConfig(ref_policy_kl_penalty=beta), iteration=1)
    sums = {k: v.item() for k, v in metrics.items()}
    out = step.finalize_metrics(sums)
    assert out["rewards_margin"] == pytest.approx(
        out["rewards_actual_mean"] - out["rewards_generated_mean"]
    )
    assert out["iteration"] == 1.0 and out["kl_penalty"] == beta
    assert out["generated_length_mean"] == 1.0


def _spin_trainer(mbs, *, strategy="swap", lpf=None, seed=1234):
    policy = T.fresh_model(seed)
    opponent_model = T.fresh_model(seed + 1) if strategy == "model" else None
    cfg = SPINConfig(ref_policy_kl_penalty=0.5, log_prob_forward_micro_batch_size=lpf)
    step = SPINStep(cfg, iteration=0)
    merge = 1 if lpf is None else lpf // mbs
    opponent = refreshable_reference(
        strategy, policy, T.FORWARD, merge=merge, reference_model=opponent_model
    )
    source = T.data(_pairs(16), [], step, mbs=mbs, gbs=4)
    return T.trainer(policy, step, source, reference=TrainOnlyReference(opponent)), opponent


def test_micro_batch_1_x_accumulation_4_equals_4_x_1_and_starts_at_ln2(dist_ctx):
    (small, _), (large, _) = _spin_trainer(1), _spin_trainer(4)
    a = [small.train_step() for _ in range(3)]
    b = [large.train_step() for _ in range(3)]
    # The opponent is the policy before the first update: every pair's loss is -log σ(0).
    assert a[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert a[0]["acc"] == 0.0 and a[0]["rewards_margin"] == 0.0
    for ma, mb in zip(a, b, strict=True):
        for key in ("loss", "acc", "rewards_margin", "generated_length_mean"):
            # fp32: the output layer sees a different number of rows per call (scored
            # positions only), so sums round differently at the 1e-5 level.
            assert ma[key] == pytest.approx(mb[key], rel=2e-5, abs=1e-6), key
        assert ma["grad_norm"] == pytest.approx(mb["grad_norm"], rel=1e-4)
    for (name, pa), (_, pb) in zip(
        small.model.module.named_parameters(), large.model.module.named_parameters(), strict=True
    ):
        # Adam turns float noise in near-zero gradients into updates of up to lr (1e-3) each
        # step; the parameters agree to a tenth of one update.
        torch.testing.assert_close(pa, pb, rtol=1e-3, atol=1e-4, msg=name)


def test_swap_and_model_opponents_and_merged_reference_forwards_agree(dist_ctx):
    swap, _ = _spin_trainer(2)
    model, _ = _spin_trainer(2, strategy="model")
    merged, _ = _spin_trainer(1, lpf=2)  # two training micro-batches per opponent forward
    for _ in range(2):
        ms, mm, mg = swap.train_step(), model.train_step(), merged.train_step()
        assert ms["loss"] == pytest.approx(mm["loss"], rel=1e-6)
        assert ms["rewards_margin"] == pytest.approx(mm["rewards_margin"], rel=1e-5, abs=1e-6)
        assert ms["loss"] == pytest.approx(mg["loss"], rel=1e-5)


def test_opponent_keeps_its_weights_until_refreshed(dist_ctx):
    trainer, opponent = _spin_trainer(4)
    policy = trainer.model.module
    start = {n: p.detach().clone() for n, p in policy.named_parameters()}
    trainer.train_step()
    trained = {n: p.detach().clone() for n, p in policy.named_parameters()}
    assert any(not torch.equal(start[n], trained[n]) for n in start)
    with opponent.weights() as module:  # swap: the policy holds the opponent's weights
        for n, p in module.named_parameters():
            assert torch.equal(p, start[n]), n
    for n, p in policy.named_parameters():  # and gets its own back
        assert torch.equal(p, trained[n]), n
    saved = opponent.checkpoint_state()
    tensors = {k for k, v in policy.state_dict().items() if isinstance(v, torch.Tensor)}
    assert set(saved) == tensors
    assert torch.equal(
        saved["embedding.word_embeddings.weight"], start["embedding.word_embeddings.weight"]
    )
    opponent.refresh()
    with opponent.weights() as module:
        for n, p in module.named_parameters():
            assert torch.equal(p, trained[n]), n
    # Validation batches (SFT) need no reference: zeros, no forward.
    sft = T.sft_examples(2)
    val = SPINStep(SPINConfig()).build_micro_batch(sft, T.COLLATE)
    assert TrainOnlyReference(opponent).logps([val], split="val")[0].tolist() == [0.0, 0.0]


# ---------------------------------------------------------------------------------- rollouts


def test_rollout_responses_do_not_depend_on_the_rollout_size(dist_ctx):
    model = T.fresh_model(7)
    prompts = [list(e.prompt_ids) for e in T.sft_examples(7)]
    seeds = generation_seeds(1234, 0, range(len(prompts)))
    sampling, length = SamplingConfig(temperature=1.0), LengthConfig(max_length=6)
    outs = [
        rollout(
            make_generator(model, T.TOK, 64),
            prompts,
            seeds,
            sampling=sampling,
            length=length,
            micro_batch_size=size,
            group=None,
        )
        for size in (1, 3, 16)
    ]
    for other in outs[1:]:
        assert other.responses == outs[0].responses
        assert other.finished == outs[0].finished
    assert outs[0].tokens == sum(len(r) for r in outs[0].responses)
    assert all(1 <= len(r) <= 6 for r in outs[0].responses)
    # Seeds: a pure function of (run seed, stream, index), distinct across each.
    assert generation_seeds(1234, 0, [3]) == [seeds[3]]
    assert (
        len({*seeds, *generation_seeds(1234, 1, range(7)), *generation_seeds(5, 0, range(7))}) == 21
    )


def test_generations_file_round_trip_and_key_check(tmp_path):
    rows = [
        GenerationRow(0, [257, 1], [2, 258], [3, 4], False),
        GenerationRow(1, [257], [5], [6, 258], True),
    ]
    texts = {"prompt": ["a", "b"], "real": ["c", "d"], "generated": ["e", "f"]}
    key = {"data": "x", "sampling": {"end_strings": ("</s>",)}}
    path = tmp_path / "iter_0.jsonl"
    assert read_generations(path, key) is None
    write_generations(path, rows, texts, {"key": key, "tokens_per_s": 5.0})
    got, meta = read_generations(path, key)
    assert got == rows and meta["tokens_per_s"] == 5.0
    line = json.loads(path.read_text().splitlines()[1])
    assert line["generated"] == "f" and line["generated_length"] == 2 and line["finished"] is True
    with pytest.raises(ValueError, match="data differ"):
        read_generations(path, {**key, "data": "y"})
    path.with_name("iter_0.meta.json").unlink()  # an incomplete file is not reused
    assert read_generations(path, key) is None


# ---------------------------------------------------------------------------- align generate


def _write_prompts(path: Path, records: list) -> None:
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")


def _greedy_config(tmp_path: Path, max_length: int, **changes) -> GenerateConfig:
    """Greedy generation from ``tmp_path/prompts.jsonl`` into ``tmp_path/out.jsonl``."""
    return GenerateConfig(
        prompts_file=str(tmp_path / "prompts.jsonl"),
        output_file=str(tmp_path / "out.jsonl"),
        model=T.MODEL,
        sampling_params=SamplingConfig(use_greedy=True),
        length_params=LengthConfig(max_length=max_length),
        **changes,
    )


def _output_rows(tmp_path: Path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]


def test_generate_jsonl_answers_every_prompt_in_order(dist_ctx, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    _write_prompts(
        prompts,
        [
            {"prompt": "loud: cat dog\n", "id": 7},
            {"input": "quiet: sun\n"},
            {"prompt": "ask: sea sky\n", "completion": "Sea sky?"},  # an SFT record
            {"messages": [{"role": "user", "content": "loud: red"}]},
        ],
    )
    config = _greedy_config(
        tmp_path,
        max_length=8,
        micro_batch_size=3,
        chat_template=False,  # plain prompts as they are (messages still use the template)
    )
    result = generate_jsonl(config)
    rows = _output_rows(tmp_path)
    assert result.prompts == 4 and [r["index"] for r in rows] == [0, 1, 2, 3]
    assert result.generated_tokens == sum(r["generated_length"] for r in rows)
    texts = ["loud: cat dog\n", "quiet: sun\n", "ask: sea sky\n"]
    assert [r["prompt"] for r in rows[:3]] == texts
    assert rows[3]["prompt"] == [{"role": "user", "content": "loud: red"}]
    # The same fresh weights (same seed) answering [BOS] + bytes directly.
    model = T.fresh_model(config.seed)
    direct = make_generator(model, T.TOK, 64).generate(
        [[T.TOK.bos_id, *T.TOK.encode(t)] for t in texts],
        SamplingConfig(use_greedy=True),
        LengthConfig(max_length=8),
    )
    assert [r["completion"] for r in rows[:3]] == direct.texts
    assert [r["prompt_length"] for r in rows[:3]] == [len(t) + 1 for t in texts]
    assert [r["generated_length"] for r in rows[:3]] == direct.response_lengths.tolist()
    # The chat prompt went through the byte tokenizer's template: "User: loud: red\nAssistant: ".
    assert rows[3]["prompt_length"] == 1 + len("User: loud: red\nAssistant: ")


def test_generate_jsonl_renders_plain_prompts_through_the_chat_template(dist_ctx, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    _write_prompts(prompts, [{"prompt": "loud: red"}])
    config = _greedy_config(tmp_path, max_length=4)
    generate_jsonl(config)
    (row,) = _output_rows(tmp_path)
    rendered = "User: loud: red\nAssistant: "  # SimpleChatTemplate, the byte tokenizer's
    assert row["prompt"] == "loud: red"
    assert row["prompt_length"] == 1 + len(rendered)
    direct = make_generator(T.fresh_model(config.seed), T.TOK, 64).generate(
        [[T.TOK.bos_id, *T.TOK.encode(rendered)]],
        SamplingConfig(use_greedy=True),
        LengthConfig(max_length=4),
    )
    assert row["completion"] == direct.texts[0]


def test_generate_jsonl_sampling_does_not_depend_on_the_batch_size(dist_ctx, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    _write_prompts(prompts, [{"prompt": p.prompt} for p in generate_pairs(5, seed=3)])
    outputs = []
    for size in (1, 4):
        out = tmp_path / f"out{size}.jsonl"
        generate_jsonl(
            GenerateConfig(
                prompts_file=str(prompts),
                output_file=str(out),
                model=T.MODEL,
                length_params=LengthConfig(max_length=6),
                micro_batch_size=size,
            )
        )
        outputs.append(out.read_text())
    assert outputs[0] == outputs[1]


def test_generate_jsonl_names_the_bad_line(dist_ctx, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    _write_prompts(prompts, [{"prompt": "loud: cat\n"}, {"prompt": 3}])
    config = GenerateConfig(str(prompts), str(tmp_path / "out.jsonl"), model=T.MODEL)
    with pytest.raises(DataError, match=r"prompts.jsonl:2: prompt: expected a string"):
        generate_jsonl(config)
    assert not (tmp_path / "out.jsonl").exists()

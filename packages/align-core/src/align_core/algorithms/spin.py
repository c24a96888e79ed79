"""SPIN (self-play fine-tuning): its config, how a micro-batch of pairs is built, its step.

Chen et al. 2024, "Self-Play Fine-Tuning Converts Weak Language Models to Strong Language
Models" (https://arxiv.org/abs/2401.01335). In iteration ``t`` the opponent π_t (the policy as
it was when the iteration started) answers every training prompt ``x`` with ``y'``; the policy
is trained to prefer the real SFT answer ``y`` over ``y'`` with `align_losses.spin_loss` at
β_t (``ref_policy_kl_penalty``), with π_t as the reference; then the trained policy becomes the
next opponent. The iteration loop and checkpointing are in `align_core.trainer.spin`, the
rollouts in `align_core.generation.rollout`, and the opponent is a refreshable reference
strategy (`align_core.reference.refreshable_reference`); this module is the algorithm step of
one iteration:

    loss = Σ_pairs −log σ(β_t·[(π(y|x) − π_t(y|x)) − (π(y'|x) − π_t(y'|x))]) / (pairs in the
           global batch)

so micro-batch 1 × accumulation 4 equals micro-batch 4 × accumulation 1 (NeMo-Aligner returned
the per-sample losses unreduced, which only worked at micro-batch size 1).

Forward layout (DPO's): ``b`` real rows, then the ``b`` generated rows of the same prompts.
Labels come from `align_data.sequence_row`: position ``t`` predicts token ``t + 1`` and exactly
the response tokens are scored, the final EOS included and no prompt token. (NeMo-Aligner's SPIN
mask scored the last prompt token through the second-to-last response token: it dropped the
EOS and added a prompt token.) Log-probs are per-sequence sums, as in NeMo-Aligner.

Validation (NeMo-Aligner's choice): the SFT negative log-likelihood of held-out prompt/answer
examples, per response token (``loss``). `SPINStep` therefore also builds SFT micro-batches for
validation; pair batches are recognised by their ``generated_lengths`` field. The loss of an SFT
batch never reads ``ref_logps``, so the run hands the trainer its opponent wrapped in
`align_core.reference.TrainOnlyReference`: validation batches get zeros without a forward.

Logged rewards are the implicit rewards β·(π − π_ref) that `align_losses` returns (the DPO
paper's convention, used by every algorithm here; NeMo-Aligner logged the unscaled log-ratio).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from align_core.algorithms._common import ModelBatch, batch_device, padded_model_batch, segment_sums
from align_core.algorithms.sft import SFTConfig, SFTStep, sft_loss_and_metrics, sft_model_batch
from align_core.generation.config import LengthConfig, SamplingConfig
from align_core.schedule import LossFn
from align_data.collate import CollateConfig, collate_preference, collate_sft
from align_data.tokenize import PreferenceExample, SFTExample

__all__ = [
    "PAIRS_KEY",
    "SPINConfig",
    "SPINStep",
    "is_pair_batch",
    "spin_loss_and_metrics",
    "spin_model_batch",
]

PAIRS_KEY = "generated_lengths"
"""The model-batch field that marks a batch of (real, generated) pairs: ``[b]`` float32 number
of generated response tokens per pair."""

_VALIDATION_SFT = SFTConfig(loss_reduction="token_mean")


@dataclass
class SPINConfig:
    """``model.spin``: NeMo-Aligner's names, plus what it lacked.

    Attributes:
        ref_policy_kl_penalty: β, a scalar, or one value per iteration (a list at least
            ``max_iterations`` long; iteration ``t`` uses entry ``t``).
        log_prob_forward_micro_batch_size: Pairs per reference forward; None uses the training
            micro-batch size (the same micro-batches as the policy forward, so at the first step
            of an iteration policy and reference log-probs are bitwise equal). Must be a multiple
            of the training micro-batch size that divides a step's pairs per rank.
        rollout_micro_batch_size: Prompts per generation call on each data-parallel rank. Any
            value works with any data-parallel size: prompts are sharded over the data-parallel
            ranks and generated in chunks of this size, and every response depends only on its
            prompt, its seed (derived from the run seed, the iteration and the example index)
            and the opponent's weights.
        offload_optimizer_during_generation: Move the optimizer's state (Adam moments and fp32
            master weights) to host memory while the opponent generates, and back afterwards
            (GPU only; a no-op on CPU, where there is nothing to free).
        sampling_params: How the opponent samples (`SamplingConfig`: greedy or temperature /
            top-k / top-p, repetition penalty, end strings).
        length_params: Most and fewest generated tokens (`LengthConfig`); the most is also
            capped so that the longest training prompt plus its response fits the model's
            sequence length.
        train_on_previous_iteration: Train iteration ``t ≥ 1`` on the pairs of iterations ``t``
            and ``t − 1`` together (the SPIN authors' recipe), so it has twice the pairs;
            iteration 0 has only its own.
        val_generations: Validation prompts answered greedily by the current policy at each
            validation (``sampling_params``' end strings, ``length_params``' limits), written to
            ``run_dir/generations/val_step_<step>.jsonl`` (0: none). Greedy answers are
            deterministic, so successive files show how the policy itself moves.
    """

    ref_policy_kl_penalty: float | tuple[float, ...] = 0.2
    log_prob_forward_micro_batch_size: int | None = None
    rollout_micro_batch_size: int = 32
    offload_optimizer_during_generation: bool = True
    sampling_params: SamplingConfig = field(default_factory=SamplingConfig)
    length_params: LengthConfig = field(default_factory=LengthConfig)
    train_on_previous_iteration: bool = False
    val_generations: int = 8

    def __post_init__(self) -> None:
        if isinstance(self.ref_policy_kl_penalty, list | tuple):
            self.ref_policy_kl_penalty = tuple(float(b) for b in self.ref_policy_kl_penalty)
            betas = self.ref_policy_kl_penalty
            if not betas:
                raise ValueError("model.spin.ref_policy_kl_penalty: the list is empty")
        else:
            betas = (float(self.ref_policy_kl_penalty),)
        if any(not b > 0 for b in betas):
            raise ValueError(f"model.spin.ref_policy_kl_penalty must be > 0, got {betas}")
        if self.rollout_micro_batch_size < 1:
            raise ValueError("model.spin.rollout_micro_batch_size must be >= 1")
        if self.log_prob_forward_micro_batch_size is not None and (
            self.log_prob_forward_micro_batch_size < 1
        ):
            raise ValueError("model.spin.log_prob_forward_micro_batch_size must be >= 1")
        if self.val_generations < 0:
            raise ValueError("model.spin.val_generations must be >= 0")

    def beta(self, iteration: int) -> float:
        """β of ``iteration`` (0-based).

        Raises:
            ValueError: A per-iteration list shorter than ``iteration + 1``.
        """
        kl = self.ref_policy_kl_penalty
        if not isinstance(kl, tuple):
            return float(kl)
        if iteration >= len(kl):
            raise ValueError(
                f"model.spin.ref_policy_kl_penalty has {len(kl)} values, iteration {iteration} "
                f"needs at least {iteration + 1} (one per iteration)"
            )
        return kl[iteration]

    @property
    def validation_sampling(self) -> SamplingConfig:
        """Greedy decoding with the rollouts' end strings (the validation generations)."""
        return SamplingConfig(use_greedy=True, end_strings=self.sampling_params.end_strings)

    def check_iterations(self, max_iterations: int) -> None:
        """Fail early when a per-iteration β list is shorter than ``max_iterations``."""
        if max_iterations >= 1:
            self.beta(max_iterations - 1)


def spin_model_batch(examples: Sequence[PreferenceExample], collate: CollateConfig) -> ModelBatch:
    """The model batch of ``b`` (real, generated) pairs: real rows first, then generated rows.

    Args:
        examples: Pairs with the real answer as ``chosen_ids`` and the generated one as
            ``rejected_ids`` (each ending in EOS unless cut at the length limit).
        collate: Padding settings.

    Returns:
        The padded model batch; ``labels`` score exactly the response tokens (final EOS
        included), ``generated_lengths`` holds each generated response's token count.
    """
    batch = collate_preference(examples, collate)
    out = padded_model_batch(batch.input_ids, batch.labels, batch.position_ids, batch.lengths)
    out["sample_index"] = batch.sample_indices
    out[PAIRS_KEY] = torch.tensor([len(e.rejected_ids) for e in examples], dtype=torch.float32)
    return out


def is_pair_batch(batch: Mapping[str, Tensor]) -> bool:
    """Whether a model batch holds SPIN pairs (else: SFT validation examples)."""
    return PAIRS_KEY in batch


def spin_loss_and_metrics(
    beta: float, normalizer: Tensor, batch: Mapping[str, Tensor], token_logps: Tensor
) -> tuple[Tensor, dict[str, Tensor]]:
    """Loss of one micro-batch of pairs (the `align_core.schedule` loss contract).

    Args:
        beta: β of the current iteration.
        normalizer: Pairs in the global batch.
        batch: The model batch (``segment_ids``, ``seq_token_counts``, ``ref_logps``,
            ``generated_lengths``).
        token_logps: ``[R, S]`` policy token log-probs.

    Returns:
        ``Σ per-pair loss / normalizer`` and detached metric sums over the micro-batch's pairs
        (``loss``, ``acc``, ``rewards_actual``, ``rewards_generated``, ``generated_length``,
        ``pairs``).
    """
    from align_losses import spin_loss

    counts = batch["seq_token_counts"]
    n = counts.numel()
    b = n // 2
    lp = token_logps if token_logps.dtype in (torch.float32, torch.float64) else token_logps.float()
    policy = segment_sums(lp, batch["segment_ids"], n)
    ref = batch["ref_logps"].to(policy.dtype)
    out = spin_loss(policy[:b], policy[b:], ref[:b], ref[b:], beta=beta)
    metrics = {
        "loss": out.losses.detach().sum(),
        "acc": (out.chosen_rewards > out.rejected_rewards).float().sum(),
        "rewards_actual": out.chosen_rewards.sum(),
        "rewards_generated": out.rejected_rewards.sum(),
        "generated_length": batch[PAIRS_KEY].to(policy.device, torch.float32).sum(),
        "pairs": torch.tensor(float(b), device=policy.device),
    }
    return out.losses.sum() / normalizer, metrics


def _micro_batch_loss(
    beta: float, normalizer: Tensor, batch: Mapping[str, Tensor], token_logps: Tensor
) -> tuple[Tensor, dict[str, Tensor]]:
    if is_pair_batch(batch):
        return spin_loss_and_metrics(beta, normalizer, batch, token_logps)
    return sft_loss_and_metrics(_VALIDATION_SFT, normalizer, batch, token_logps)


@dataclass(frozen=True)
class SPINStep:
    """One SPIN iteration as an `align_core.algorithms.contract.AlgorithmStep`.

    Training micro-batches are pairs (`spin_model_batch`); validation micro-batches are SFT
    examples scored by their token-mean NLL (their reference log-probs are not used).

    Attributes:
        config: SPIN settings.
        iteration: The 0-based iteration (selects β).
        group: Data-parallel group (validation token counts are summed over it).
        name: ``"spin"``.
        needs_reference: True (the opponent is the reference).
        ref_shape: 2 (real and generated reference log-prob sums per pair).
    """

    config: SPINConfig
    iteration: int = 0
    group: dist.ProcessGroup | None = field(default=None, compare=False)
    name: str = "spin"
    needs_reference: bool = True
    ref_shape: int = 2

    @property
    def beta(self) -> float:
        """β of this iteration."""
        return self.config.beta(self.iteration)

    def build_micro_batch(self, examples: Sequence[Any], collate: CollateConfig) -> ModelBatch:
        """Pairs (`PreferenceExample`) into a pair batch; SFT examples into an SFT batch.

        Raises:
            TypeError: Examples of another kind.
        """
        if all(isinstance(e, PreferenceExample) for e in examples):
            return spin_model_batch(examples, collate)
        if all(isinstance(e, SFTExample) for e in examples):
            return sft_model_batch(collate_sft(examples, collate))
        raise TypeError("SPIN batches are (real, generated) pairs or SFT validation examples")

    def build_packed_micro_batch(
        self, examples: Sequence[Any], collate: CollateConfig, capacity: int
    ) -> ModelBatch:
        """Not supported: SPIN batches are padded.

        Raises:
            NotImplementedError: Always.
        """
        raise NotImplementedError("sequence packing is not supported for SPIN")

    def normalizer(self, micro_batches: Sequence[ModelBatch], global_examples: int) -> Tensor:
        """Pairs in the global batch; for SFT validation batches, its response tokens."""
        if is_pair_batch(micro_batches[0]):
            return torch.tensor(float(global_examples), device=batch_device(micro_batches))
        return SFTStep(_VALIDATION_SFT, group=self.group).normalizer(micro_batches, global_examples)

    def loss_fn(self, normalizer: Tensor) -> LossFn:
        """The micro-batch loss with β and ``normalizer`` bound."""
        return functools.partial(_micro_batch_loss, self.beta, normalizer)

    def finalize_metrics(self, sums: Mapping[str, float]) -> dict[str, float]:
        """Means over the global batch's pairs (or the SFT validation metrics).

        Training: ``loss``, ``acc``, ``rewards_actual_mean``, ``rewards_generated_mean``,
        ``rewards_margin``, ``generated_length_mean``, ``iteration`` and ``kl_penalty`` (β).
        Validation: ``loss`` = ``sft_loss``, the token-mean NLL of the real answers.
        """
        if "pairs" not in sums:
            return SFTStep(_VALIDATION_SFT).finalize_metrics(sums)
        pairs = max(sums["pairs"], 1.0)
        out = {"loss": sums["loss"] / pairs, "acc": sums["acc"] / pairs}
        out["rewards_actual_mean"] = sums["rewards_actual"] / pairs
        out["rewards_generated_mean"] = sums["rewards_generated"] / pairs
        out["rewards_margin"] = out["rewards_actual_mean"] - out["rewards_generated_mean"]
        out["generated_length_mean"] = sums["generated_length"] / pairs
        out["iteration"] = float(self.iteration)
        out["kl_penalty"] = self.beta
        return out

"""Typed configuration of distillation: the loss knobs and the teacher pass.

`KnowledgeDistillationConfig` is ``model.knowledge_distillation`` with NeMo-Aligner's names and
defaults, plus ours (``tail``, ``top_k`` and on-policy distillation: ``on_policy`` and its
sampling settings, align-core's `SamplingConfig` / `LengthConfig`). `TeacherPassConfig` is
what ``align kd teacher`` needs beyond the model and the data. Every default lives in a
dataclass field here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from align_core.generation.config import LengthConfig, SamplingConfig
from align_data.stores import TeacherDType

__all__ = ["KDLoss", "KnowledgeDistillationConfig", "TeacherPassConfig"]

KDLoss = Literal["fwd_kl", "bwd_kl", "jsd", "skew_fwd_kl", "skew_bwd_kl"]
"""NeMo-Aligner's names ``fwd_kl`` (KL(teacher ‖ student)) and ``bwd_kl`` (KL(student ‖ teacher)),
plus GKD's generalised Jensen-Shannon divergence ``jsd`` and DistiLLM's skewed KLs."""

_DIVERGENCE = {
    "fwd_kl": "forward_kl",
    "bwd_kl": "reverse_kl",
    "jsd": "jsd",
    "skew_fwd_kl": "skew_forward_kl",
    "skew_bwd_kl": "skew_reverse_kl",
}


@dataclass
class KnowledgeDistillationConfig:
    """``model.knowledge_distillation``: the per-token loss ``w_kd·KD + w_sft·NLL``.

    Attributes:
        kd_loss: The divergence over the teacher's top-k tokens (`align_losses.topk_kd_loss`):
            ``fwd_kl`` (KL(teacher ‖ student), mode covering), ``bwd_kl`` (KL(student ‖
            teacher), mode seeking), ``jsd`` (GKD's generalised Jensen-Shannon divergence with
            ``jsd_beta``; β = 0 is ``fwd_kl`` and β = 1 ``bwd_kl`` exactly), ``skew_fwd_kl`` /
            ``skew_bwd_kl`` (DistiLLM's skewed KLs with ``skew_alpha``).
        jsd_beta: β of ``jsd`` in [0, 1], the teacher's weight in the mixture (GKD's default
            0.5: the symmetric JSD).
        skew_alpha: α of the skewed KLs in [0, 1) (DistiLLM's 0.1).
        kd_loss_weight: Weight of the distillation term.
        sft_loss_weight: Weight of the ordinary cross-entropy on the labels (NeMo-Aligner's
            default 0: pure distillation). The NLL is reported as ``sft_loss`` either way.
        logits_scale: Multiplies the student logits before both terms (an inverse temperature).
        target_logits_scale: Multiplies the teacher's top-k logits.
        cross_tokenizer: Teacher and student have different vocabularies: pair the student's
            own top-k (sorted) with the teacher's top-k by rank instead of by token id.
        tail: Add a (k+1)-th class, "every other token", whose teacher probability comes from the
            stored full-vocabulary log-sum-exp; the top-k are then not renormalised. Needs
            ``target_logits_scale == 1`` (the log-sum-exp is of the unscaled logits).
        top_k: Use the first ``top_k`` of the stored (or, online, computed) teacher tokens;
            None uses them all. Must not exceed what the teacher provides.
        on_policy: λ in [0, 1], on-policy distillation (GKD): the expected fraction of
            training steps whose responses the student samples itself (the online teacher
            scores them); the others use the dataset's responses. Which steps is a seeded pure
            function of the run seed and the step (`align_kd.on_policy.is_on_policy_step`).
            0 (default) is plain KD. Needs the online teacher
            (``teacher.restore_from_path``).
        on_policy_sampling: How the student samples on-policy responses (align-core's
            `SamplingConfig`: ``temperature`` 1.0, ``top_k`` 0 = off, ``top_p`` 1.0 = off,
            ``use_greedy``, ``repetition_penalty``, ``end_strings``): by default the student's
            own distribution, as in GKD.
        on_policy_length: Most and fewest new tokens per sample (`LengthConfig`:
            ``max_length`` 256, ``min_length`` 0); ``max_length`` is also capped so that the
            longest training prompt plus its sample fits the sequence length.
        on_policy_micro_batch_size: Prompts per generation call on each data-parallel rank.
    """

    kd_loss: KDLoss = "fwd_kl"
    jsd_beta: float = 0.5
    skew_alpha: float = 0.1
    kd_loss_weight: float = 1.0
    sft_loss_weight: float = 0.0
    logits_scale: float = 1.0
    target_logits_scale: float = 1.0
    cross_tokenizer: bool = False
    tail: bool = False
    top_k: int | None = None
    on_policy: float = 0.0
    on_policy_sampling: SamplingConfig = field(default_factory=SamplingConfig)
    on_policy_length: LengthConfig = field(default_factory=LengthConfig)
    on_policy_micro_batch_size: int = 32

    def __post_init__(self) -> None:
        if self.kd_loss not in _DIVERGENCE:
            raise ValueError(
                f"model.knowledge_distillation.kd_loss must be one of {', '.join(_DIVERGENCE)}, "
                f"got {self.kd_loss!r}"
            )
        if not 0.0 <= self.jsd_beta <= 1.0:
            raise ValueError(
                f"model.knowledge_distillation.jsd_beta must be in [0, 1], got {self.jsd_beta}"
            )
        if not 0.0 <= self.skew_alpha < 1.0:
            raise ValueError(
                f"model.knowledge_distillation.skew_alpha must be in [0, 1), got {self.skew_alpha}"
            )
        if self.kd_loss_weight < 0 or self.sft_loss_weight < 0:
            raise ValueError("kd_loss_weight and sft_loss_weight must be >= 0")
        if self.kd_loss_weight == 0 and self.sft_loss_weight == 0:
            raise ValueError("kd_loss_weight and sft_loss_weight cannot both be 0")
        if not (self.logits_scale > 0 and self.target_logits_scale > 0):
            raise ValueError("logits_scale and target_logits_scale must be > 0")
        if self.tail and self.target_logits_scale != 1.0:
            raise ValueError(
                "model.knowledge_distillation.tail=True needs target_logits_scale=1.0: the "
                "teacher's stored log-sum-exp is of its unscaled logits, so the tail mass of "
                f"scaled logits is unknown (got target_logits_scale={self.target_logits_scale})"
            )
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"model.knowledge_distillation.top_k must be >= 1, got {self.top_k}")
        if not 0.0 <= self.on_policy <= 1.0:
            raise ValueError(
                f"model.knowledge_distillation.on_policy must be in [0, 1], got {self.on_policy}"
            )
        if self.on_policy_micro_batch_size < 1:
            raise ValueError(
                "model.knowledge_distillation.on_policy_micro_batch_size must be >= 1, got "
                f"{self.on_policy_micro_batch_size}"
            )

    @property
    def divergence(self) -> str:
        """The `align_losses.topk_kd_loss` name of ``kd_loss``."""
        return _DIVERGENCE[self.kd_loss]

    @property
    def divergence_options(self) -> dict[str, Any]:
        """The β or α keyword ``topk_kd_loss`` takes for ``kd_loss`` (none for the plain KLs)."""
        if self.kd_loss == "jsd":
            return {"beta": self.jsd_beta}
        if self.kd_loss.startswith("skew_"):
            return {"skew": self.skew_alpha}
        return {}

    def effective_top_k(self, available: int) -> int:
        """The k to use when the teacher provides ``available`` tokens per position.

        Raises:
            ValueError: When ``top_k`` exceeds ``available``.
        """
        if self.top_k is None:
            return available
        if self.top_k > available:
            raise ValueError(
                f"model.knowledge_distillation.top_k={self.top_k} but the teacher provides only "
                f"{available} tokens per position; lower top_k or rerun the teacher pass with a "
                "larger top_k"
            )
        return self.top_k


@dataclass
class TeacherPassConfig:
    """``align kd teacher``: where and how the teacher's top-k are written.

    The dataset is split into ``num_parts`` contiguous index ranges, each its own align-data
    teacher store (``part-00000``, ...); data-parallel rank ``d`` fills the parts ``p`` with
    ``p mod D = d``. The split is fixed by the first run (``plan.json``), so a rerun with another
    data-parallel size still continues every part where it stopped.

    Attributes:
        output_dir: The output directory (created; a rerun resumes it).
        top_k: Tokens kept per position (NeMo-Aligner's default 100).
        dtype: Storage dtype of the logits (ids take 16 bits when the vocabulary has at most
            65,536 entries, else 32, and read back as int32; log-sum-exp float32).
        micro_batch_size: Examples per forward micro-batch.
        micro_batches_per_call: Micro-batches per pipeline call (keeps pipeline stages busy;
            they are padded to one length).
        num_parts: Store parts; None uses the data-parallel size of the first run.
        keep_input_ids: Store the input ids with each sample, so training can check that the
            student's tokenization matches what the teacher saw.
        shard_positions: Positions per shard file.
        durable: fsync after every sample (survives power loss; slower).
    """

    output_dir: str
    top_k: int = 100
    dtype: TeacherDType = "bf16"
    micro_batch_size: int = 4
    micro_batches_per_call: int = 1
    num_parts: int | None = None
    keep_input_ids: bool = True
    shard_positions: int = 1 << 24
    durable: bool = False

    def __post_init__(self) -> None:
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.micro_batch_size < 1 or self.micro_batches_per_call < 1:
            raise ValueError("micro_batch_size and micro_batches_per_call must be >= 1")
        if self.num_parts is not None and self.num_parts < 1:
            raise ValueError(f"num_parts must be >= 1, got {self.num_parts}")

"""Knowledge distillation from teacher top-k logits on megatron-core.

Offline: `run_teacher_pass` writes the teacher's top-k per input position into align-data
teacher stores (resumable, any TP/PP/DP layout); `TeacherExamples` pairs them with the student's
tokenized examples and `KDStep` trains the student with `align_losses.topk_kd_loss` (plus an
optional SFT term) under align-core's trainer loop. Online: `OnlineTeacher` computes the same
top-k on the fly from a frozen teacher in the same job; `OnPolicyTeacherData` lets the student
sample a fraction of the responses itself (on-policy distillation, GKD).
`import_nemo_kd_jsonl` reuses NeMo-Aligner's teacher outputs.
"""

from importlib.metadata import PackageNotFoundError, version

from align_kd.config import KDLoss, KnowledgeDistillationConfig, TeacherPassConfig
from align_kd.data import TeacherExamples, import_nemo_kd_jsonl, nemo_kd_examples
from align_kd.forward import logits_forward, tensor_group_of, vocab_start_of
from align_kd.on_policy import (
    ON_POLICY_KEYS,
    OnPolicyTeacherData,
    is_on_policy_step,
    on_policy_length,
    on_policy_source,
)
from align_kd.online import HostWeights, OnlineTeacher, OnlineTeacherData, freeze
from align_kd.step import (
    TEACHER_KEYS,
    KDExample,
    KDStep,
    check_vocabularies,
    kd_loss_and_metrics,
    kd_model_batch,
)
from align_kd.teacher import (
    TeacherGroups,
    TeacherPassResult,
    examples_fingerprint,
    open_teacher_store,
    run_teacher_pass,
    teacher_topk_outputs,
    teacher_vocab_size,
)
from align_kd.topk import TopK, vocab_parallel_argmax, vocab_parallel_topk
from align_kd.train import (
    KDRunConfig,
    KDTeacherRunConfig,
    TeacherPlacement,
    TeacherSourceConfig,
    run_teacher,
    train_kd,
)

try:
    __version__ = version("align-kd")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0+unknown"

__all__ = [
    "ON_POLICY_KEYS",
    "TEACHER_KEYS",
    "HostWeights",
    "KDExample",
    "KDLoss",
    "KDRunConfig",
    "KDStep",
    "KDTeacherRunConfig",
    "KnowledgeDistillationConfig",
    "OnPolicyTeacherData",
    "OnlineTeacher",
    "OnlineTeacherData",
    "TeacherExamples",
    "TeacherGroups",
    "TeacherPassConfig",
    "TeacherPassResult",
    "TeacherPlacement",
    "TeacherSourceConfig",
    "TopK",
    "__version__",
    "check_vocabularies",
    "examples_fingerprint",
    "freeze",
    "import_nemo_kd_jsonl",
    "is_on_policy_step",
    "kd_loss_and_metrics",
    "kd_model_batch",
    "logits_forward",
    "nemo_kd_examples",
    "on_policy_length",
    "on_policy_source",
    "open_teacher_store",
    "run_teacher",
    "run_teacher_pass",
    "teacher_topk_outputs",
    "teacher_vocab_size",
    "tensor_group_of",
    "train_kd",
    "vocab_parallel_argmax",
    "vocab_parallel_topk",
    "vocab_start_of",
]

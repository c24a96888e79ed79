"""Memory-mapped stores: teacher top-k shards (distillation) and per-sample arrays."""

from align_data.stores.array_store import ArrayStore
from align_data.stores.nemo_import import import_nemo_topk_jsonl
from align_data.stores.teacher_shards import (
    TeacherDType,
    TeacherSample,
    TeacherTopKReader,
    TeacherTopKWriter,
)

__all__ = [
    "ArrayStore",
    "TeacherDType",
    "TeacherSample",
    "TeacherTopKReader",
    "TeacherTopKWriter",
    "import_nemo_topk_jsonl",
]

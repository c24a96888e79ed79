"""Dataset formats, validation, tokenization, collate, packing, samplers and stores for align.

Typical use::

    from align_data import (ByteTokenizer, CollateConfig, DataParallelSampler, PreprocessConfig,
                            TokenizeConfig, collate_preference, preprocess)

    tok = ByteTokenizer()
    ds = preprocess("train.jsonl", tok, "cache/", PreprocessConfig(
        kind="preference", tokenize=TokenizeConfig(max_length=512)))
    sampler = DataParallelSampler(len(ds), micro_batch_size=4, accumulation_steps=2,
                                  data_parallel_rank=rank, data_parallel_size=world, seed=1)
    for indices in sampler:
        batch = collate_preference([ds[i] for i in indices], CollateConfig(pad_id=tok.pad_id))
"""

from importlib.metadata import PackageNotFoundError, version

from align_data.batches import (
    IGNORE_INDEX,
    DistillationBatch,
    KTOBatch,
    PreferenceBatch,
    SFTBatch,
    causal_attention_mask,
    split_pairs,
)
from align_data.chat import (
    ChatTemplate,
    ChatTemplateError,
    JinjaChatTemplate,
    NeMoChatTemplate,
    SimpleChatTemplate,
    conversation_segments,
    split_prompt_response,
)
from align_data.collate import (
    CollateConfig,
    collate_distillation,
    collate_kto,
    collate_preference,
    collate_sft,
    padded_length,
    sequence_row,
)
from align_data.dataset import TokenizedDataset
from align_data.errors import RECORD_FIELD, DataError, SkippedRecord, SkipReportWriter
from align_data.formats import (
    FORMAT_KIND,
    FormatName,
    check_format_kind,
    convert_to_kind,
    detect_format,
    parse_record,
)
from align_data.hf_tokenizer import HFTokenizer
from align_data.nemo_tokenizer import GPT2_EOS, tokenizer_from_nemo_spec
from align_data.packing import (
    PackedBatch,
    PackingAlgorithm,
    PackingPlan,
    collate_packed_preference,
    collate_packed_sft,
    pack_preference,
    pack_sft,
    packing_lengths,
    plan_packs,
    unpack,
)
from align_data.preprocessing import PreprocessConfig, dataset_fingerprint, preprocess
from align_data.progress import ProgressPrinter
from align_data.records import (
    Kind,
    Message,
    PreferenceRecord,
    Record,
    SFTRecord,
    Source,
    Text,
    UnpairedRecord,
)
from align_data.sampler import DataParallelSampler
from align_data.sentencepiece_tokenizer import SentencePieceTokenizer
from align_data.sources import LoadResult, check_source_file, detect_file_format, load_records
from align_data.stores import (
    ArrayStore,
    TeacherDType,
    TeacherSample,
    TeacherTopKReader,
    TeacherTopKWriter,
    import_nemo_topk_jsonl,
)
from align_data.summary import PreprocessSummary, length_histogram
from align_data.synthetic import (
    STYLES,
    SyntheticFiles,
    SyntheticPair,
    expected_response,
    follows_rule,
    generate_pairs,
    render_style,
    score_response,
    write_synthetic_dataset,
)
from align_data.tokenize import (
    Example,
    FitResult,
    PreferenceExample,
    SFTExample,
    TokenizeConfig,
    Tokenized,
    TokenizeResult,
    TokenizeStats,
    UnpairedExample,
    fit_lengths,
    resolve_add_bos,
    tokenize_prompt,
    tokenize_record,
    tokenize_records,
)
from align_data.tokenizer import ByteTokenizer, Tokenizer

try:
    __version__ = version("align-data")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = [
    "FORMAT_KIND",
    "GPT2_EOS",
    "IGNORE_INDEX",
    "RECORD_FIELD",
    "STYLES",
    "ArrayStore",
    "ByteTokenizer",
    "ChatTemplate",
    "ChatTemplateError",
    "CollateConfig",
    "DataError",
    "DataParallelSampler",
    "DistillationBatch",
    "Example",
    "FitResult",
    "FormatName",
    "HFTokenizer",
    "JinjaChatTemplate",
    "KTOBatch",
    "Kind",
    "LoadResult",
    "Message",
    "NeMoChatTemplate",
    "PackedBatch",
    "PackingAlgorithm",
    "PackingPlan",
    "PreferenceBatch",
    "PreferenceExample",
    "PreferenceRecord",
    "PreprocessConfig",
    "PreprocessSummary",
    "ProgressPrinter",
    "Record",
    "SFTBatch",
    "SFTExample",
    "SFTRecord",
    "SentencePieceTokenizer",
    "SimpleChatTemplate",
    "SkipReportWriter",
    "SkippedRecord",
    "Source",
    "SyntheticFiles",
    "SyntheticPair",
    "TeacherDType",
    "TeacherSample",
    "TeacherTopKReader",
    "TeacherTopKWriter",
    "Text",
    "TokenizeConfig",
    "TokenizeResult",
    "TokenizeStats",
    "Tokenized",
    "TokenizedDataset",
    "Tokenizer",
    "UnpairedExample",
    "UnpairedRecord",
    "__version__",
    "causal_attention_mask",
    "check_format_kind",
    "check_source_file",
    "collate_distillation",
    "collate_kto",
    "collate_packed_preference",
    "collate_packed_sft",
    "collate_preference",
    "collate_sft",
    "conversation_segments",
    "convert_to_kind",
    "dataset_fingerprint",
    "detect_file_format",
    "detect_format",
    "expected_response",
    "fit_lengths",
    "follows_rule",
    "generate_pairs",
    "import_nemo_topk_jsonl",
    "length_histogram",
    "load_records",
    "pack_preference",
    "pack_sft",
    "packing_lengths",
    "padded_length",
    "parse_record",
    "plan_packs",
    "preprocess",
    "render_style",
    "resolve_add_bos",
    "score_response",
    "sequence_row",
    "split_pairs",
    "split_prompt_response",
    "tokenize_prompt",
    "tokenize_record",
    "tokenize_records",
    "tokenizer_from_nemo_spec",
    "unpack",
    "write_synthetic_dataset",
]

"""BOS handling follows the tokenizer's own settings, and generation prompts use the chat template.

Tiny word-level tokenizers are built here with the ``tokenizers`` library, so every expected id
below is read off the vocabulary ``VOCAB`` by hand: a Llama-3-like tokenizer (a
``TemplateProcessing`` post-processor prepending ``<|begin_of_text|>``), a SmolLM2-like ChatML
tokenizer (``bos_token`` ``<|im_start|>``, no ``add_bos_token``, no BOS in its post-processor)
and an older Llama-like one (``"add_bos_token": true``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from align_data import (
    ByteTokenizer,
    DataError,
    HFTokenizer,
    JinjaChatTemplate,
    Message,
    PreprocessConfig,
    SFTRecord,
    Source,
    TokenizeConfig,
    dataset_fingerprint,
    resolve_add_bos,
    tokenize_prompt,
    tokenize_record,
)

pytest.importorskip("jinja2")
tokenizers = pytest.importorskip("tokenizers")

VOCAB = {
    "<unk>": 0,
    "<|begin_of_text|>": 1,
    "<|im_start|>": 2,
    "<|im_end|>": 3,
    "<s>": 4,
    "</s>": 5,
    "hello": 6,
    "world": 7,
    "user": 8,
    "assistant": 9,
    "system": 10,
    "you": 11,
    "are": 12,
    "helpful": 13,
    "<|eot_id|>": 14,
    "<|start_header_id|>": 15,
    "<|end_header_id|>": 16,
}
SPECIAL = [t for t in VOCAB if t.startswith("<")]

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
# SmolLM2's template: a default system turn, no bos_token.
CHATML_TEMPLATE = (
    "{% for m in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "<|im_start|>system\nyou are helpful<|im_end|>\n{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SRC = Source("mem.jsonl", 1)

# Hand-derived ids (VOCAB above; whitespace splits words and is not a token).
HELLO_WORLD = [6, 7]  # "hello world"
# Llama-3 prompt: <|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhello world
# <|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n
LLAMA3_PROMPT = [1, 15, 8, 16, 6, 7, 14, 15, 9, 16]
# ChatML prompt: <|im_start|>system\nyou are helpful<|im_end|>\n<|im_start|>user\nhello world
# <|im_end|>\n<|im_start|>assistant\n
CHATML_PROMPT = [2, 10, 11, 12, 13, 3, 2, 8, 6, 7, 3, 2, 9]


def _llama3_processor(wrapped: bool):
    processors = tokenizers.processors
    template = processors.TemplateProcessing(
        single="<|begin_of_text|> $A",
        pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", 1)],
    )
    if not wrapped:
        return template
    # Llama-3's tokenizer.json: Sequence[ByteLevel, TemplateProcessing].
    return processors.Sequence([processors.ByteLevel(trim_offsets=False), template])


def _chatml_processor():
    # SmolLM2's tokenizer.json: a TemplateProcessing that adds nothing.
    return tokenizers.processors.TemplateProcessing(single="$A", pair="$A $B", special_tokens=[])


def make_tokenizer(
    directory: Path,
    *,
    post_processor=None,
    chat_template: str | None = None,
    jinja_file: bool = False,
    **config,
) -> Path:
    """Writes ``tokenizer.json`` and ``tokenizer_config.json`` into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(VOCAB, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.add_special_tokens(SPECIAL)
    if post_processor is not None:
        tok.post_processor = post_processor
    tok.save(str(directory / "tokenizer.json"))
    if chat_template is not None and jinja_file:
        (directory / "chat_template.jinja").write_text(chat_template)
    elif chat_template is not None:
        config["chat_template"] = chat_template
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


def llama3(directory: Path, *, wrapped: bool = True, **config) -> HFTokenizer:
    make_tokenizer(
        directory,
        post_processor=_llama3_processor(wrapped),
        chat_template=LLAMA3_TEMPLATE,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        **config,
    )
    return HFTokenizer(directory)


def chatml(directory: Path, *, post_processor=None, **config) -> HFTokenizer:
    make_tokenizer(
        directory,
        post_processor=post_processor,
        chat_template=CHATML_TEMPLATE,
        jinja_file=True,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        **config,
    )
    return HFTokenizer(directory)


def _sft(tok, prompt, completion, **config):
    ex = tokenize_record(SFTRecord(prompt, completion, SRC), tok, TokenizeConfig(**config)).example
    return ex.prompt_ids.tolist(), ex.completion_ids.tolist()


# ---------------------------------------------------------------------------- adds_bos


@pytest.mark.parametrize("wrapped", [False, True])
def test_llama3_post_processor_adds_bos(tmp_path, wrapped):
    tok = llama3(tmp_path, wrapped=wrapped)
    assert tok.bos_id == 1 and tok.eos_id == 14
    assert tok.adds_bos is True
    assert _sft(tok, "hello world", "you") == ([1, 6, 7], [11, 14])


@pytest.mark.parametrize("processor", [None, "template"])
def test_chatml_bos_only_opens_turns(tmp_path, processor):
    tok = chatml(tmp_path, post_processor=_chatml_processor() if processor else None)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (2, 3, 3)
    assert tok.adds_bos is False
    assert _sft(tok, "hello world", "you") == ([6, 7], [11, 3])


def test_add_bos_token_in_the_config_wins(tmp_path):
    # Older Llama/Mistral: "add_bos_token": true and no BOS in the post-processor.
    old = make_tokenizer(tmp_path / "old", bos_token="<s>", eos_token="</s>", add_bos_token=True)
    tok = HFTokenizer(old)
    assert tok.adds_bos is True
    assert _sft(tok, "hello world", "you") == ([4, 6, 7], [11, 5])
    # A Llama-3 post-processor, overruled by "add_bos_token": false.
    tok = llama3(tmp_path / "llama3", add_bos_token=False)
    assert tok.adds_bos is False
    assert _sft(tok, "hello world", "you") == ([6, 7], [11, 14])
    # ... and the constructor argument overrules the config.
    assert HFTokenizer(tmp_path / "llama3", add_bos_token=True).adds_bos is True
    assert HFTokenizer(old, add_bos_token=False).adds_bos is False


def test_no_bos_token_never_adds_one(tmp_path):
    directory = make_tokenizer(tmp_path, eos_token="</s>", add_bos_token=True)
    tok = HFTokenizer(directory)
    assert tok.bos_id is None and tok.adds_bos is False
    assert resolve_add_bos(True, tok) is False
    assert _sft(tok, "hello world", "you", add_bos=True) == ([6, 7], [11, 5])


def test_gpt2_bpe_files_keep_their_bos_rule(tmp_path):
    vocab = tmp_path / "vocab.json"
    merges = tmp_path / "merges.txt"
    vocab.write_text(json.dumps({"a": 0, "b": 1, "ab": 2, "<|endoftext|>": 3}))
    merges.write_text("#version: 0.2\na b\n")
    with_bos = HFTokenizer.from_bpe_files(vocab, merges, bos_token="<|endoftext|>")
    assert with_bos.adds_bos is True
    assert _sft(with_bos, "ab", "a") == ([3, 2], [0, 3])
    without = HFTokenizer.from_bpe_files(vocab, merges)
    assert without.adds_bos is False
    assert _sft(without, "ab", "a") == ([2], [0, 3])


def test_byte_tokenizer_keeps_its_bos():
    tok = ByteTokenizer()
    assert tok.adds_bos is True
    assert _sft(tok, "hi", "yo") == ([257, 104, 105], [121, 111, 258])


# ---------------------------------------------------------------------------- add_bos override


def test_add_bos_setting_overrides_the_tokenizer(tmp_path):
    smol = chatml(tmp_path / "chatml")
    assert _sft(smol, "hello world", "you", add_bos=True) == ([2, 6, 7], [11, 3])
    assert _sft(smol, "hello world", "you", add_bos=None) == ([6, 7], [11, 3])
    llama = llama3(tmp_path / "llama3")
    assert _sft(llama, "hello world", "you", add_bos=False) == ([6, 7], [11, 14])
    assert _sft(llama, "hello world", "you", add_bos=None) == ([1, 6, 7], [11, 14])


def test_truncation_keeps_the_bos_in_front(tmp_path):
    llama = llama3(tmp_path)
    prompt = "hello world hello world"  # [6, 7, 6, 7]
    ids, completion = _sft(llama, prompt, "you", max_length=5)
    assert (ids, completion) == ([1, 6, 7], [11, 14])
    # Also a BOS the chat template wrote, with add_bos=False.
    record = SFTRecord((Message("user", "hello world"),), "you", SRC)
    config = TokenizeConfig(max_length=6, add_bos=False)
    ex = tokenize_record(record, llama, config).example
    assert ex.prompt_ids.tolist() == [1, 15, 9, 16]  # BOS + <|start_header_id|>assistant<|end..|>
    assert ex.completion_ids.tolist() == [11, 14]


# ---------------------------------------------------------------------------- chat templates


@pytest.fixture
def pair_ids(chat_pair):
    """Prompt, chosen and rejected ids of one chat pair under a tokenizer and settings."""

    def run(tok, **config):
        record = chat_pair("hello world", "you", "hello", SRC)
        ex = tokenize_record(record, tok, TokenizeConfig(**config)).example
        return ex.prompt_ids.tolist(), ex.chosen_ids.tolist(), ex.rejected_ids.tolist()

    return run


@pytest.mark.parametrize("add_bos", [None, True, False])
def test_template_writing_the_bos_gets_exactly_one(tmp_path, pair_ids, add_bos):
    tok = llama3(tmp_path)
    prompt, chosen, rejected = pair_ids(tok, add_bos=add_bos)
    assert prompt == LLAMA3_PROMPT
    assert prompt.count(1) == 1
    assert chosen == [11, 14] and rejected == [6, 14]


@pytest.mark.parametrize("add_bos", [None, True])
def test_chatml_prompt_starts_with_its_turn_token_only(tmp_path, pair_ids, add_bos):
    # The rendered text starts with <|im_start|>, the BOS token: never a second one in front.
    tok = chatml(tmp_path)
    prompt, chosen, rejected = pair_ids(tok, add_bos=add_bos)
    assert prompt == CHATML_PROMPT
    assert chosen == [11, 3] and rejected == [6, 3]


def test_bos_text_written_by_the_template_is_not_doubled():
    # The byte tokenizer does not turn the text "<s>" into its BOS id (257): the rendered
    # text's start decides.
    template = JinjaChatTemplate(
        "{{ bos_token }}{% for m in messages %}{{ m['content'] }}|{% endfor %}", bos_token="<s>"
    )
    tok = ByteTokenizer(template)
    record = SFTRecord((Message("user", "hi"),), "yo", SRC)
    ex = tokenize_record(record, tok, TokenizeConfig()).example
    assert ex.prompt_ids.tolist() == [60, 115, 62, 104, 105, 124]  # "<s>hi|"
    assert ex.completion_ids.tolist() == [121, 111, 124, 258]  # "yo|" + EOS


def test_fingerprint_holds_the_bos_choice(tmp_path, jsonl):
    path = str(jsonl([{"prompt": "hello", "completion": "world"}]))
    tok = chatml(tmp_path / "chatml")

    def key(add_bos):
        config = PreprocessConfig(kind="sft", tokenize=TokenizeConfig(add_bos=add_bos))
        return dataset_fingerprint([path], tok, config)

    assert key(True) != key(False)
    assert key(None) == key(False)  # what the tokenizer asks for, spelt out or not
    byte = PreprocessConfig(kind="sft", tokenize=TokenizeConfig())
    byte_true = PreprocessConfig(kind="sft", tokenize=TokenizeConfig(add_bos=True))
    tok_b = ByteTokenizer()
    assert dataset_fingerprint([path], tok_b, byte) == dataset_fingerprint([path], tok_b, byte_true)


# ---------------------------------------------------------------------------- generation prompts


def test_plain_prompt_is_rendered_through_the_chat_template(tmp_path):
    smol = chatml(tmp_path / "chatml")
    assert tokenize_prompt("hello world", smol) == CHATML_PROMPT
    assert tokenize_prompt("hello world", smol, chat_template=True) == CHATML_PROMPT
    assert tokenize_prompt("hello world", smol, chat_template=False) == HELLO_WORLD
    assert tokenize_prompt("hello world", smol, chat_template=False, add_bos=True) == [2, 6, 7]
    llama = llama3(tmp_path / "llama3")
    assert tokenize_prompt("hello world", llama) == LLAMA3_PROMPT
    assert tokenize_prompt("hello world", llama, add_bos=True) == LLAMA3_PROMPT
    assert tokenize_prompt("hello world", llama, chat_template=False) == [1, 6, 7]
    assert tokenize_prompt("hello world", llama, chat_template=False, add_bos=False) == [6, 7]


def test_messages_prompt_is_rendered_even_without_chat_template_for_text(tmp_path):
    smol = chatml(tmp_path)
    messages = (Message("system", "you are helpful"), Message("user", "hello world"))
    assert tokenize_prompt(messages, smol) == CHATML_PROMPT
    assert tokenize_prompt(messages, smol, chat_template=False) == CHATML_PROMPT


def test_generation_prompt_equals_the_training_prompt(tmp_path):
    # What the model is asked at generation is what training put before the answer.
    for tok in (chatml(tmp_path / "c"), llama3(tmp_path / "l"), ByteTokenizer()):
        messages = (Message("user", "hello world"),)
        trained, _ = _sft(tok, messages, "you")
        assert tokenize_prompt(messages, tok) == trained
        assert tokenize_prompt("hello world", tok) == trained


def test_prompt_without_a_template(tmp_path):
    directory = make_tokenizer(tmp_path, bos_token="<s>", eos_token="</s>", add_bos_token=True)
    tok = HFTokenizer(directory)
    assert tok.chat_template is None
    assert tokenize_prompt("hello world", tok) == [4, 6, 7]
    where = Source("prompts.jsonl", 3)
    with pytest.raises(DataError, match=r"prompts.jsonl:3: prompt: chat_template=true needs"):
        tokenize_prompt("hello world", tok, chat_template=True, source=where)
    with pytest.raises(DataError, match=r"prompts.jsonl:3: prompt: chat messages need"):
        tokenize_prompt((Message("user", "hi"),), tok, source=where)


def test_byte_tokenizer_prompt_uses_its_simple_template():
    tok = ByteTokenizer()
    expected = [257, *b"User: hi\nAssistant: "]
    assert tokenize_prompt("hi", tok) == expected
    assert tokenize_prompt("hi", tok, chat_template=False) == [257, 104, 105]

"""align's prompts for a real chat model are transformers' prompts, token for token.

SmolLM2-135M-Instruct (``smollm2_dir``; skips without the ``hf`` dependency group) has a BOS
token (``<|im_start|>``) that only opens chat turns: plain text gets no BOS, and a prompt is the
ChatML conversation its ``chat_template.jinja`` renders. Here ``transformers.AutoTokenizer`` is
the reference for what ``align generate`` asks the model and for a chat training example.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def tokenizers(smollm2_dir: Path) -> tuple[Any, Any]:
    """(align's `HFTokenizer`, transformers' tokenizer) of SmolLM2."""
    transformers = pytest.importorskip("transformers")
    from align_data import HFTokenizer

    return HFTokenizer(smollm2_dir), transformers.AutoTokenizer.from_pretrained(smollm2_dir)


def _ids(encoded: Any) -> list[int]:
    """Token ids of ``apply_chat_template``'s answer (a list, or a dict-like with input_ids)."""
    return list(encoded["input_ids"] if not isinstance(encoded, list) else encoded)


def test_plain_text_gets_no_bos(tokenizers) -> None:
    ours, theirs = tokenizers
    assert ours.bos_id == theirs.bos_token_id and ours.adds_bos is False
    from align_data import SFTRecord, Source, TokenizeConfig, tokenize_record

    record = SFTRecord("The capital of France is", " Paris.", Source("mem", 1))
    example = tokenize_record(record, ours, TokenizeConfig()).example
    assert example is not None
    assert example.prompt_ids.tolist() == theirs("The capital of France is")["input_ids"]


def test_generate_prompt_is_the_chat_template_rendering(tokenizers) -> None:
    from align_data import tokenize_prompt

    ours, theirs = tokenizers
    messages = [{"role": "user", "content": QUESTION}]
    expected = _ids(theirs.apply_chat_template(messages, add_generation_prompt=True))
    assert tokenize_prompt(QUESTION, ours) == expected
    assert expected.count(ours.bos_id) == 3  # <|im_start|> opens system, user and assistant
    assert tokenize_prompt(QUESTION, ours, chat_template=False) == theirs(QUESTION)["input_ids"]


def test_messages_training_example_is_the_chat_template_rendering(tokenizers) -> None:
    from align_data import Message, SFTRecord, Source, TokenizeConfig, tokenize_record

    ours, theirs = tokenizers
    conversation = [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": QUESTION},
        {"role": "assistant", "content": "Paris."},
    ]
    expected = _ids(theirs.apply_chat_template(conversation, add_generation_prompt=False))
    prompt = tuple(Message(m["role"], m["content"]) for m in conversation[:-1])
    record = SFTRecord(prompt, "Paris.", Source("mem", 1))
    example = tokenize_record(record, ours, TokenizeConfig()).example
    assert example is not None
    ids = [*example.prompt_ids.tolist(), *example.completion_ids.tolist()]
    assert ids == expected
    # The label boundary: the response is "Paris.<|im_end|>\n", EOS included exactly once.
    assert ours.decode(example.completion_ids.tolist()) == "Paris.\n"
    assert example.completion_ids.tolist().count(ours.eos_id) == 1

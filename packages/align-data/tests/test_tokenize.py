"""Prompt/response boundary, BOS/EOS rules, chat templates and the over-long policy."""

from __future__ import annotations

import numpy as np
import pytest

from align_data import (
    ByteTokenizer,
    DataError,
    Message,
    NeMoChatTemplate,
    PreferenceRecord,
    SFTRecord,
    SimpleChatTemplate,
    Source,
    TokenizeConfig,
    UnpairedRecord,
    fit_lengths,
    load_records,
    sequence_row,
    tokenize_record,
    tokenize_records,
)

BOS, EOS = ByteTokenizer.BOS, ByteTokenizer.EOS
SRC = Source("mem.jsonl", 7)
TOK = ByteTokenizer()


def ids(text: str) -> list[int]:
    return list(text.encode())


def pref(prompt, chosen, rejected, **kw) -> PreferenceRecord:
    return PreferenceRecord(prompt, chosen, rejected, kw.get("cr"), kw.get("rr"), SRC)


def test_plain_text_boundary_bos_and_eos():
    item = tokenize_record(pref("ab", "xy", "z"), TOK, TokenizeConfig())
    ex = item.example
    assert ex.prompt_ids.tolist() == [BOS, 97, 98]
    assert ex.chosen_ids.tolist() == [120, 121, EOS]
    assert ex.rejected_ids.tolist() == [122, EOS]
    assert ex.prompt_ids.dtype == np.int32
    assert not item.prompt_truncated and not item.response_truncated


def test_no_bos_no_eos_when_disabled():
    cfg = TokenizeConfig(add_bos=False, add_eos=False)
    ex = tokenize_record(pref("ab", "xy", "z"), TOK, cfg).example
    assert ex.prompt_ids.tolist() == [97, 98]
    assert ex.chosen_ids.tolist() == [120, 121]


def test_labels_exactly_over_response_including_eos():
    # prompt [BOS a b] + response [x y EOS]: 6 tokens, 5 input positions.
    input_ids, labels = sequence_row(np.array([BOS, 97, 98]), np.array([120, 121, EOS]))
    assert input_ids.tolist() == [BOS, 97, 98, 120, 121]
    assert labels.tolist() == [-100, -100, 120, 121, EOS]


def test_sequence_row_with_trained_prompt_tokens_and_empty_response():
    _, labels = sequence_row(
        np.array([BOS, 1, 2, 3]), np.array([4, EOS]), np.array([0, 0, 1, 0], dtype=np.uint8)
    )
    assert labels.tolist() == [-100, 2, -100, 4, EOS]
    with pytest.raises(ValueError, match="empty response"):
        sequence_row(np.array([BOS, 1]), np.array([], dtype=np.int32))


def test_simple_chat_template_split():
    record = pref((Message("user", "hi"),), (Message("assistant", "yo"),), "no")
    ex = tokenize_record(record, TOK, TokenizeConfig()).example
    assert ex.prompt_ids.tolist() == [BOS, *ids("User: hi\nAssistant: ")]
    assert ex.chosen_ids.tolist() == [*ids("yo\n"), EOS]
    assert ex.rejected_ids.tolist() == [*ids("no\n"), EOS]


def test_nemo_extra_id_template():
    template = NeMoChatTemplate()
    prompt = (Message("system", "S"), Message("user", "hi"))
    assert template.render(prompt, add_generation_prompt=True) == (
        "<extra_id_0>System\nS\n<extra_id_1>User\nhi\n<extra_id_1>Assistant\n"
    )
    assert template.render([Message("user", "hi")], add_generation_prompt=False) == (
        "<extra_id_0>System\n\n<extra_id_1>User\nhi\n"
    )
    record = SFTRecord(prompt, (Message("assistant", "ok"),), SRC)
    ex = tokenize_record(record, TOK, TokenizeConfig(), chat_template=template).example
    assert ex.completion_ids.tolist() == [*ids("ok\n"), EOS]
    assert TOK.decode(ex.prompt_ids).endswith("<extra_id_1>Assistant\n")


def test_train_on_all_assistant_turns_masks_only_assistant_text():
    prompt = (Message("user", "a"), Message("assistant", "b"), Message("user", "c"))
    record = SFTRecord(prompt, (Message("assistant", "d"),), SRC)
    cfg = TokenizeConfig(train_on_all_assistant_turns=True)
    ex = tokenize_record(record, TOK, cfg).example
    text = "User: a\nAssistant: b\nUser: c\nAssistant: "
    assert ex.prompt_ids.tolist() == [BOS, *ids(text)]
    trained = [i for i, m in enumerate(ex.prompt_loss_mask.tolist()) if m]
    start = 1 + len("User: a\nAssistant: ")
    assert trained == [start, start + 1]  # "b\n"
    assert TOK.decode(ex.prompt_ids[trained]) == "b\n"
    # Without the option the prompt carries no mask at all.
    assert tokenize_record(record, TOK, TokenizeConfig()).example.prompt_loss_mask is None


def test_chat_records_without_template_are_an_error():
    class NoTemplate(ByteTokenizer):
        @property
        def chat_template(self):
            return None

    record = SFTRecord((Message("user", "a"),), (Message("assistant", "b"),), SRC)
    with pytest.raises(DataError) as err:
        tokenize_record(record, NoTemplate(), TokenizeConfig())
    assert str(err.value).startswith("mem.jsonl:7: prompt: chat messages need a chat template")


def test_template_that_is_not_prefix_consistent():
    class Bad(SimpleChatTemplate):
        def render(self, messages, *, add_generation_prompt):
            text = super().render(messages, add_generation_prompt=add_generation_prompt)
            return text + ("<gen>" if add_generation_prompt else "<end>")

    record = SFTRecord((Message("user", "a"),), (Message("assistant", "b"),), SRC)
    with pytest.raises(DataError) as err:
        tokenize_record(record, TOK, TokenizeConfig(), chat_template=Bad())
    assert str(err.value).startswith(
        "mem.jsonl:7: prompt: the chat template is not prefix-consistent"
    )


# --- over-long policy, by hand -------------------------------------------------------------


def test_fit_lengths_fits_unchanged():
    fit = fit_lengths(4, [3, 5], TokenizeConfig(max_length=9))
    assert (fit.prompt_length, fit.response_lengths, fit.drop_kind) == (4, (3, 5), None)
    assert not fit.prompt_truncated and not fit.response_truncated


def test_fit_lengths_truncates_prompt_first():
    # 6 + 5 = 11 > 9: the prompt gives up 2 tokens; responses untouched.
    fit = fit_lengths(6, [3, 5], TokenizeConfig(max_length=9))
    assert (fit.prompt_length, fit.response_lengths) == (4, (3, 5))
    assert fit.prompt_truncated and not fit.response_truncated


def test_fit_lengths_then_response_from_the_right():
    # Prompt floor 2: 2 + 12 > 9, so responses are cut to 9 - 2 = 7.
    fit = fit_lengths(6, [3, 12], TokenizeConfig(max_length=9, min_prompt_length=2))
    assert (fit.prompt_length, fit.response_lengths) == (2, (3, 7))
    assert fit.prompt_truncated and fit.response_truncated


def test_fit_lengths_max_prompt_length_applies_first():
    fit = fit_lengths(10, [2], TokenizeConfig(max_length=100, max_prompt_length=4))
    assert (fit.prompt_length, fit.response_lengths, fit.prompt_truncated) == (4, (2,), True)


def test_fit_lengths_drops_a_fully_truncated_response():
    fit = fit_lengths(8, [3], TokenizeConfig(max_length=8, min_prompt_length=8))
    assert fit.drop_kind == "empty_response"
    assert "response fully truncated" in fit.drop_reason


def test_fit_lengths_drop_policy():
    cfg = TokenizeConfig(max_length=9, overlong="drop")
    assert fit_lengths(4, [5], cfg).drop_kind is None
    fit = fit_lengths(4, [6], cfg)
    assert (fit.drop_kind, fit.drop_reason) == ("overlong", "over-long: 10 tokens > max_length 9")


def test_truncation_keeps_bos_and_the_end_of_the_prompt():
    # prompt [BOS a b c d e] (6), chosen [x EOS] (2); max 5 -> prompt keeps 3: BOS, d, e.
    ex = tokenize_record(pref("abcde", "x", "y"), TOK, TokenizeConfig(max_length=5)).example
    assert ex.prompt_ids.tolist() == [BOS, 100, 101]
    assert ex.chosen_ids.tolist() == [120, EOS]


def test_response_truncated_from_the_right_loses_eos():
    cfg = TokenizeConfig(max_length=5, min_prompt_length=3)
    item = tokenize_record(pref("ab", "vwxyz", "q"), TOK, cfg)
    assert item.example.prompt_ids.tolist() == [BOS, 97, 98]
    assert item.example.chosen_ids.tolist() == [118, 119]
    assert item.example.rejected_ids.tolist() == [113, EOS]
    assert item.response_truncated


def test_over_long_counts(jsonl):
    rows = [
        {"prompt": "p", "completion": "short", "label": True},  # 1+1 + 5+1 = 8: fits
        {"prompt": "long prompt", "completion": "c", "label": True},  # 12+2=14 > 10: prompt cut
        {"prompt": "p", "completion": "a long completion", "label": False},  # response cut
    ]
    records = load_records(jsonl(rows), kind="unpaired").records
    result = tokenize_records(records, TOK, TokenizeConfig(max_length=10, min_prompt_length=2))
    s = result.stats
    assert (s.records, s.examples, s.truncated, s.prompt_truncated, s.response_truncated) == (
        3,
        3,
        2,
        1,
        1,
    )
    assert [e.index for e in result.examples] == [0, 1, 2]
    for e in result.examples:
        assert len(e.prompt_ids) + len(e.completion_ids) <= 10

    dropped = tokenize_records(records, TOK, TokenizeConfig(max_length=10, overlong="drop"))
    assert (dropped.stats.examples, dropped.stats.dropped_overlong) == (1, 2)
    assert [src.line for src, _ in dropped.dropped] == [2, 3]

    # max_length 3, prompts never below 3 tokens: the 2-token prompts [BOS, p] stay whole and
    # leave 1 token of response; the 12-token prompt keeps 3 and leaves none -> dropped.
    empty = tokenize_records(records, TOK, TokenizeConfig(max_length=3, min_prompt_length=3))
    assert (empty.stats.examples, empty.stats.dropped_empty_response) == (2, 1)
    assert [e.completion_ids.tolist() for e in empty.examples] == [[115], [97]]
    assert empty.stats.response_truncated == 2


def test_never_an_all_masked_example():
    # The prompt cannot shrink below 6 tokens and max_length is 6: every response would be
    # empty, so the example is dropped instead of kept without labels.
    item = tokenize_record(
        UnpairedRecord("abcdefgh", "x", True, SRC),
        TOK,
        TokenizeConfig(max_length=6, min_prompt_length=6),
    )
    assert item.example is None and item.drop_kind == "empty_response"


def test_config_validation():
    with pytest.raises(ValueError):
        TokenizeConfig(max_length=1)
    with pytest.raises(ValueError):
        TokenizeConfig(overlong="cut")
    with pytest.raises(ValueError):
        TokenizeConfig(min_prompt_length=0)
    with pytest.raises(ValueError):
        TokenizeConfig(max_prompt_length=2, min_prompt_length=3)

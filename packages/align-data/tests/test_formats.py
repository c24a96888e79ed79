"""Every supported format parses into the right records; detection, override, conversions."""

from __future__ import annotations

import pytest

from align_data import (
    DataError,
    Message,
    PreferenceRecord,
    SFTRecord,
    UnpairedRecord,
    detect_file_format,
    load_records,
)

U = "user"
A = "assistant"


def msg(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


def test_preference_strings(jsonl):
    path = jsonl(
        [
            {"prompt": "Q: 1+1?\n", "chosen": "2", "rejected": "3", "extra": 5},
            {
                "prompt": "p",
                "chosen": "c",
                "rejected": "r",
                "chosen_reward": 4,
                "rejected_reward": -1.5,
            },
        ]
    )
    result = load_records(path, kind="preference")
    assert result.formats == {str(path): "preference"}
    first, second = result.records
    assert first == PreferenceRecord("Q: 1+1?\n", "2", "3", None, None, first.source)
    assert (first.source.path, first.source.line) == (str(path), 1)
    assert (second.chosen_reward, second.rejected_reward) == (4.0, -1.5)
    assert second.source.line == 2


def test_preference_chat_messages(jsonl):
    path = jsonl(
        [
            {
                "prompt": [msg("system", "be brief"), msg(U, "hi")],
                "chosen": [msg(A, "hello")],
                "rejected": msg(A, "go away"),
            }
        ]
    )
    (record,) = load_records(path, kind="preference").records
    assert record.prompt == (Message("system", "be brief"), Message("user", "hi"))
    assert record.chosen == (Message("assistant", "hello"),)
    assert record.rejected == (Message("assistant", "go away"),)


def test_preference_chat_prompt_with_string_responses(jsonl):
    path = jsonl([{"prompt": [msg(U, "hi")], "chosen": "yes", "rejected": "no"}])
    (record,) = load_records(path, kind="preference").records
    assert record.chosen == (Message("assistant", "yes"),)


def test_preference_implicit_prompt_from_conversations(jsonl):
    shared = [msg(U, "a"), msg(A, "b"), msg(U, "c")]
    path = jsonl(
        [
            {
                "chosen": [*shared, msg(A, "good")],
                "rejected": [*shared, msg(A, "bad")],
            }
        ]
    )
    (record,) = load_records(path, kind="preference").records
    assert record.prompt == (Message(U, "a"), Message(A, "b"), Message(U, "c"))
    assert record.chosen == (Message(A, "good"),)
    assert record.rejected == (Message(A, "bad"),)


def test_nemo_preference_keys(jsonl):
    path = jsonl(
        [
            {
                "prompt": "<extra_id_0>System\n\n<extra_id_1>User\nhi\n<extra_id_1>Assistant\n",
                "chosen_response": "hello\n<extra_id_1>",
                "rejected_response": "bye\n<extra_id_1>",
                "chosen_reward": 1.0,
                "rejected_reward": 0.0,
            }
        ]
    )
    result = load_records(path, kind="preference")
    assert result.formats[str(path)] == "nemo_preference"
    (record,) = result.records
    assert record.chosen == "hello\n<extra_id_1>"
    assert record.rejected == "bye\n<extra_id_1>"


def test_nemo_new_preference_format_with_message_responses(jsonl):
    path = jsonl(
        [
            {
                "prompt": [msg(U, "hi")],
                "chosen_response": msg(A, "hello"),
                "rejected_response": msg(A, "no"),
            }
        ]
    )
    (record,) = load_records(path, kind="preference").records
    assert record.chosen == (Message(A, "hello"),)


def test_unpaired_trl_format(jsonl):
    path = jsonl(
        [
            {"prompt": "p1", "completion": "good", "label": True},
            {"prompt": "p2", "completion": "bad", "label": False},
        ]
    )
    result = load_records(path, kind="unpaired")
    assert result.formats[str(path)] == "unpaired"
    assert [(r.prompt, r.completion, r.desirable) for r in result.records] == [
        ("p1", "good", True),
        ("p2", "bad", False),
    ]


def test_unpaired_nemo_kto_format(jsonl):
    path = jsonl(
        [
            {"prompt": "p1", "response": "good", "preference": "chosen"},
            {"prompt": "p2", "response": "bad", "preference": "rejected"},
        ]
    )
    result = load_records(path, kind="unpaired")
    assert result.formats[str(path)] == "nemo_kto"
    assert [r.desirable for r in result.records] == [True, False]


def test_sft_prompt_completion(jsonl):
    path = jsonl([{"prompt": "2+2=", "completion": "4"}])
    result = load_records(path, kind="sft")
    assert result.formats[str(path)] == "prompt_completion"
    assert result.records[0] == SFTRecord("2+2=", "4", result.records[0].source)


def test_sft_messages_split_at_last_assistant_turn(jsonl):
    turns = [msg("system", "s"), msg(U, "a"), msg(A, "b"), msg(U, "c"), msg(A, "d")]
    path = jsonl([{"messages": turns}])
    (record,) = load_records(path, kind="sft").records
    assert record.prompt == (
        Message("system", "s"),
        Message(U, "a"),
        Message(A, "b"),
        Message(U, "c"),
    )
    assert record.completion == (Message(A, "d"),)


def test_sft_nemo_input_output(jsonl):
    path = jsonl([{"input": "Translate: chat", "output": "cat"}])
    result = load_records(path, kind="sft")
    assert result.formats[str(path)] == "nemo_input_output"
    assert (result.records[0].prompt, result.records[0].completion) == ("Translate: chat", "cat")


def test_sft_nemo_conversations_with_system(jsonl):
    path = jsonl(
        [
            {
                "system": "be kind",
                "mask": "User",
                "type": "VALUE_TO_TEXT",
                "conversations": [
                    {"from": "User", "value": "hi"},
                    {"from": "Assistant", "value": "hello"},
                ],
            },
            {
                "system": "",
                "conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}],
            },
        ]
    )
    result = load_records(path, kind="sft")
    assert result.formats[str(path)] == "nemo_conversations"
    first, second = result.records
    assert first.prompt == (Message("system", "be kind"), Message(U, "hi"))
    assert first.completion == (Message(A, "hello"),)
    assert second.prompt == (Message(U, "x"),)  # an empty system text adds no turn


def test_preference_file_feeds_unpaired_and_sft(jsonl):
    path = jsonl([{"prompt": "p", "chosen": "c", "rejected": "r"}])
    unpaired = load_records(path, kind="unpaired").records
    assert unpaired == [
        UnpairedRecord("p", "c", True, unpaired[0].source),
        UnpairedRecord("p", "r", False, unpaired[0].source),
    ]
    (sft,) = load_records(path, kind="sft").records
    assert (sft.prompt, sft.completion) == ("p", "c")


def test_kind_none_uses_the_format_kind(jsonl):
    path = jsonl([{"prompt": "p", "completion": "c", "label": True}])
    assert isinstance(load_records(path).records[0], UnpairedRecord)


def test_format_override_beats_detection(jsonl):
    # Keys of both the unpaired and the prompt/completion format: detection says unpaired.
    path = jsonl([{"prompt": "p", "completion": "c", "label": False}])
    assert detect_file_format(path) == "unpaired"
    result = load_records(path, kind="sft", format="prompt_completion")
    assert result.formats[str(path)] == "prompt_completion"
    assert isinstance(result.records[0], SFTRecord)


def test_detection_per_file(jsonl):
    a = jsonl([{"prompt": "p", "chosen_response": "c", "rejected_response": "r"}])
    b = jsonl([{"prompt": "p", "chosen": "c", "rejected": "r"}])
    result = load_records([a, b], kind="preference")
    assert result.formats == {str(a): "nemo_preference", str(b): "preference"}
    assert len(result.records) == 2


def test_blank_lines_crlf_and_bom(tmp_path):
    path = tmp_path / "crlf.jsonl"
    path.write_bytes(
        b'\xef\xbb\xbf{"prompt": "p", "completion": "c"}\r\n\r\n   \n'
        b'{"prompt": "q", "completion": "d"}'
    )
    result = load_records(path, kind="sft")
    assert [(r.prompt, r.source.line) for r in result.records] == [("p", 1), ("q", 4)]
    assert result.num_rows == 2


def test_parquet_all_shapes(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "pref.parquet"
    table = pa.Table.from_pylist(
        [
            {
                "prompt": [msg(U, "hi")],
                "chosen": [msg(A, "yes")],
                "rejected": [msg(A, "no")],
            },
            {
                "prompt": [msg(U, "ho")],
                "chosen": [msg(A, "ok")],
                "rejected": [msg(A, "ko")],
            },
        ]
    )
    pq.write_table(table, path, row_group_size=1)
    result = load_records(path, kind="preference")
    assert result.formats[str(path)] == "preference"
    assert [r.source.line for r in result.records] == [1, 2]
    assert result.records[1].chosen == (Message(A, "ok"),)


def test_parquet_errors_name_the_row(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "kto.parquet"
    pq.write_table(
        pa.Table.from_pylist(
            [
                {"prompt": "p", "completion": "c", "label": True},
                {"prompt": "p", "completion": "", "label": False},
            ]
        ),
        path,
    )
    with pytest.raises(DataError) as err:
        load_records(path, kind="unpaired")
    assert str(err.value) == f"{path}:2: completion: empty text"

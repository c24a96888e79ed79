"""Every validation error names file, line and field; lenient mode skips, counts and reports."""

from __future__ import annotations

import json

import pytest

from align_data import DataError, load_records

U = {"role": "user", "content": "q"}
A = {"role": "assistant", "content": "a"}
OK_PREF = {"prompt": "p", "chosen": "c", "rejected": "r"}

# (rows, kind, line, field, message)
CASES = [
    pytest.param(
        [OK_PREF, '{"prompt": "p", "chosen": "c",, }'],
        "preference",
        2,
        "<record>",
        "invalid JSON: Expecting property name enclosed in double quotes (column 31)",
        id="invalid-json",
    ),
    pytest.param(
        [OK_PREF, b'{"prompt": "p\xff", "chosen": "c", "rejected": "r"}'],
        "preference",
        2,
        "<record>",
        "not valid UTF-8 (byte 0xff at column 14)",
        id="non-utf8",
    ),
    pytest.param(
        [OK_PREF, [1, 2]],
        "preference",
        2,
        "<record>",
        "expected a JSON object, got list",
        id="not-an-object",
    ),
    pytest.param(
        [OK_PREF, {"prompt": "p", "chosen": "c", "rejected_": "r"}],
        "preference",
        2,
        "rejected",
        "missing key (record has keys: chosen, prompt, rejected_)",
        id="missing-key",
    ),
    pytest.param(
        [OK_PREF, {"prompt": 7, "chosen": "c", "rejected": "r"}],
        "preference",
        2,
        "prompt",
        "expected a string or a list of messages, got number",
        id="mistyped-prompt",
    ),
    pytest.param(
        [OK_PREF, OK_PREF, {"prompt": "p", "chosen": ["c"], "rejected": "r"}],
        "preference",
        3,
        "chosen",
        "expected a string (the prompt is a string), got list",
        id="mistyped-response",
    ),
    pytest.param(
        [{"prompt": "p", "chosen": "   ", "rejected": "r"}],
        "preference",
        1,
        "chosen",
        "empty text",
        id="empty-text",
    ),
    pytest.param(
        [{**OK_PREF, "chosen_reward": "high", "rejected_reward": 0}],
        "preference",
        1,
        "chosen_reward",
        "expected a number, got string",
        id="mistyped-reward",
    ),
    pytest.param(
        [{**OK_PREF, "chosen_reward": 1.0}],
        "preference",
        1,
        "rejected_reward",
        "missing key (chosen_reward is given; give both rewards or neither)",
        id="one-reward",
    ),
    pytest.param(
        [
            '{"prompt": "p", "chosen": "c", "rejected": "r", "chosen_reward": NaN, '
            '"rejected_reward": 0}'
        ],
        "preference",
        1,
        "chosen_reward",
        "must be a finite number, got nan",
        id="nan-reward",
    ),
    pytest.param(
        [
            {"prompt": "p", "completion": "c", "label": True},
            {"prompt": "p", "completion": "c", "label": "yes"},
        ],
        "unpaired",
        2,
        "label",
        'expected true or false, got "yes"',
        id="bad-label",
    ),
    pytest.param(
        [{"prompt": "p", "completion": "c", "label": 1}],
        "unpaired",
        1,
        "label",
        "expected true or false, got 1",
        id="label-not-bool",
    ),
    pytest.param(
        [{"prompt": "p", "response": "c", "preference": "good"}],
        "unpaired",
        1,
        "preference",
        'expected "chosen" or "rejected", got "good"',
        id="bad-nemo-preference",
    ),
    pytest.param(
        [{"messages": [U, A]}, {"messages": [U, U, A]}],
        "sft",
        2,
        "messages[1].role",
        'wrong role order: expected "assistant" after "user", got "user"',
        id="role-order",
    ),
    pytest.param(
        [{"messages": [A, U, A]}],
        "sft",
        1,
        "messages[0].role",
        'wrong role order: expected "user" first, got "assistant"',
        id="assistant-first",
    ),
    pytest.param(
        [{"messages": [U, {"role": "bot", "content": "x"}]}],
        "sft",
        1,
        "messages[1].role",
        'unknown role "bot" (expected system, user or assistant)',
        id="unknown-role",
    ),
    pytest.param(
        [{"messages": [U, A, {"role": "system", "content": "late"}, U, A]}],
        "sft",
        1,
        "messages[2].role",
        "a system turn may only come first",
        id="late-system",
    ),
    pytest.param(
        [{"messages": [U, {"role": "assistant", "content": ""}]}],
        "sft",
        1,
        "messages[1].content",
        "empty text",
        id="empty-message",
    ),
    pytest.param(
        [{"messages": [U, {"role": "assistant"}]}],
        "sft",
        1,
        "messages[1].content",
        "missing key",
        id="message-without-content",
    ),
    pytest.param(
        [{"messages": [U, A, U]}],
        "sft",
        1,
        "messages",
        'must end with a "assistant" turn, ends with "user"',
        id="ends-with-user",
    ),
    pytest.param(
        [{"prompt": [U, A], "chosen": "c", "rejected": "r"}],
        "preference",
        1,
        "prompt",
        'must end with a "user" turn, ends with "assistant"',
        id="prompt-ends-with-assistant",
    ),
    pytest.param(
        [{"prompt": [U], "chosen": [U], "rejected": "r"}],
        "preference",
        1,
        "chosen[0].role",
        'wrong role order: expected "assistant" after "user", got "user"',
        id="response-role",
    ),
    pytest.param(
        [{"conversations": [{"from": "User", "value": "x"}, {"from": "Bob", "value": "y"}]}],
        "sft",
        1,
        "conversations[1].from",
        'unknown speaker "Bob" (expected User or Assistant)',
        id="unknown-speaker",
    ),
    pytest.param(
        [{"input": "x", "output": 3}],
        "sft",
        1,
        "output",
        "expected a string, got number",
        id="mistyped-output",
    ),
    pytest.param(
        [
            {
                "chosen": [{"role": "user", "content": "a"}, A],
                "rejected": [{"role": "user", "content": "b"}, A],
            }
        ],
        "preference",
        1,
        "prompt",
        "missing key, and chosen/rejected share no prompt turns to infer it",
        id="no-implicit-prompt",
    ),
    pytest.param(
        [OK_PREF, {"prompt": "a\ud800b", "chosen": "c", "rejected": "r"}],
        "preference",
        2,
        "prompt",
        "not valid Unicode: lone surrogate \\ud800 at character 2 "
        "(a \\uD800-\\uDFFF escape without its pair)",
        id="lone-surrogate",
    ),
    pytest.param(
        [{"messages": [U, {"role": "assistant", "content": "x\udc00"}]}],
        "sft",
        1,
        "messages[1].content",
        "not valid Unicode: lone surrogate \\udc00 at character 2 "
        "(a \\uD800-\\uDFFF escape without its pair)",
        id="lone-surrogate-in-chat",
    ),
    pytest.param(
        [OK_PREF, '{"prompt": ' + "[" * 100_000 + "]" * 100_000 + "}"],
        "preference",
        2,
        "<record>",
        "invalid JSON: nested too deeply (more levels of lists and objects than the parser's "
        "recursion limit allows)",
        id="deep-nesting",
    ),
]


@pytest.mark.parametrize(("rows", "kind", "line", "field", "message"), CASES)
def test_strict_error_names_file_line_field(jsonl, rows, kind, line, field, message):
    path = jsonl(rows)
    with pytest.raises(DataError) as err:
        load_records(path, kind=kind)
    assert (err.value.path, err.value.line, err.value.field) == (str(path), line, field)
    assert err.value.message == message
    assert str(err.value) == f"{path}:{line}: {field}: {message}"


def test_undetectable_format(jsonl):
    path = jsonl([{"question": "q", "answer": "a"}])
    with pytest.raises(DataError) as err:
        load_records(path, kind="sft")
    text = str(err.value)
    assert text.startswith(
        f"{path}:1: <record>: cannot detect the format from the keys (answer, question)"
    )
    assert "pass format=" in text


def test_nemo_kd_output_is_recognised(jsonl):
    path = jsonl([{"tokens": [1], "topk_logits": [[0.0]]}])
    with pytest.raises(DataError, match="import_nemo_topk_jsonl"):
        load_records(path, kind="sft")


def test_format_that_cannot_feed_the_kind(jsonl):
    path = jsonl([{"messages": [U, A]}])
    with pytest.raises(DataError) as err:
        load_records(path, kind="preference")
    assert str(err.value).startswith(
        f"{path}:1: <record>: format 'messages' provides sft records "
        "but preference records are needed"
    )


def test_empty_file(jsonl):
    path = jsonl([])
    with pytest.raises(DataError) as err:
        load_records(path, kind="sft")
    assert str(err.value) == f"{path}:1: <record>: no records: the file is empty"


def test_lenient_skips_counts_and_reports(jsonl, tmp_path):
    rows = [
        OK_PREF,
        "{broken",
        {"prompt": "p", "chosen": "", "rejected": "r"},
        {**OK_PREF, "prompt": "p2"},
        b"\xfe\xfe",
        {"prompt": "p", "chosen": "c"},
    ]
    path = jsonl(rows)
    report = tmp_path / "skipped.jsonl"
    result = load_records(path, kind="preference", strict=False, report_path=report)
    assert [r.prompt for r in result.records] == ["p", "p2"]
    assert result.num_rows == 6
    assert [(s.error.line, s.error.field) for s in result.skipped] == [
        (2, "<record>"),
        (3, "chosen"),
        (5, "<record>"),
        (6, "rejected"),
    ]
    lines = [json.loads(line) for line in report.read_text().splitlines()]
    assert [(e["line"], e["field"]) for e in lines] == [
        (2, "<record>"),
        (3, "chosen"),
        (5, "<record>"),
        (6, "rejected"),
    ]
    assert lines[0]["raw"] == "{broken"
    assert lines[1]["reason"] == f"{path}:3: chosen: empty text"
    assert lines[2]["raw"] == "\\xfe\\xfe"
    assert all(e["file"] == str(path) for e in lines)


def test_lenient_detection_passes_over_leading_bad_rows(jsonl):
    path = jsonl(["not json", {"prompt": "p", "completion": "c"}])
    result = load_records(path, kind="sft", strict=False)
    assert result.formats[str(path)] == "prompt_completion"
    assert len(result.records) == 1
    assert result.skipped[0].error.line == 1

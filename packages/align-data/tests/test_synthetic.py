"""The synthetic rule task: rendering and scoring by hand, determinism, files for every kind."""

from __future__ import annotations

import json

import pytest

from align_data import (
    ByteTokenizer,
    Message,
    PreprocessConfig,
    TokenizeConfig,
    expected_response,
    follows_rule,
    generate_pairs,
    load_records,
    preprocess,
    render_style,
    score_response,
    write_synthetic_dataset,
)


def test_render_styles():
    words = ("cat", "sun", "dog")
    assert render_style(words, "loud") == "CAT SUN DOG!"
    assert render_style(words, "quiet") == "cat sun dog."
    assert render_style(words, "ask") == "Cat sun dog?"
    with pytest.raises(ValueError, match="unknown style"):
        render_style(words, "sing")


def test_scoring_by_hand():
    prompt = "loud: cat sun\n"
    assert expected_response(prompt) == "CAT SUN!"
    assert score_response(prompt, "CAT SUN!") == 1.0
    assert follows_rule(prompt, " CAT SUN! ")
    # quiet rendering: no upper-case letter (case 0), wrong mark (0), both words (1) -> 1/3.
    assert score_response(prompt, "cat sun.") == pytest.approx(1 / 3)
    # 3 of 6 letters upper, right mark, both words -> (0.5 + 1 + 1) / 3.
    assert score_response(prompt, "CAT sun!") == pytest.approx(2.5 / 3)
    # One word of two, in order; all upper; mark right -> (1 + 1 + 0.5) / 3.
    assert score_response(prompt, "CAT!") == pytest.approx(2.5 / 3)
    # Words out of order count only as far as they stay in order: "sun" then "cat" -> 1 of 2.
    assert score_response(prompt, "SUN CAT!") == pytest.approx(2.5 / 3)
    # An extra mark of another style breaks the mark check.
    assert score_response(prompt, "CAT. SUN!") == pytest.approx(2 / 3)
    assert score_response(prompt, "") == 0.0
    # ask: first letter upper, the rest lower.
    assert score_response("ask: red sky", "Red sky?") == 1.0
    assert score_response("ask: red sky", "red sky?") == pytest.approx((5 / 6 + 1 + 1) / 3)
    # Chat prompts are scored on the last user turn.
    assert score_response([{"role": "user", "content": "quiet: a b"}], "a b.") == 1.0
    assert follows_rule((Message("user", "ask: a"),), "A?")
    with pytest.raises(ValueError, match="not a synthetic-task prompt"):
        score_response("hello", "x")


def test_pairs_are_deterministic_distinct_and_short():
    a = generate_pairs(300, seed=4)
    assert a == generate_pairs(300, seed=4)
    assert a != generate_pairs(300, seed=5)
    assert len({p.prompt for p in a}) == 300
    for p in a:
        assert follows_rule(p.prompt, p.chosen)
        assert score_response(p.prompt, p.chosen) == 1.0
        assert not follows_rule(p.prompt, p.rejected)
        assert score_response(p.prompt, p.rejected) < 1.0
        assert 20 <= len(p.prompt) + len(p.chosen) <= 60


def test_files_from_one_seed(tmp_path):
    files = write_synthetic_dataset(tmp_path / "a", seed=1, num_train=40, num_eval=10)
    again = write_synthetic_dataset(tmp_path / "b", seed=1, num_train=40, num_eval=10)
    assert files.preference_train.read_text() == again.preference_train.read_text()
    pref = load_records(files.preference_train, kind="preference").records
    held = load_records(files.preference_eval, kind="preference").records
    assert (len(pref), len(held)) == (40, 10)
    assert not {r.prompt for r in pref} & {r.prompt for r in held}
    unpaired = load_records(files.unpaired_train, kind="unpaired").records
    assert len(unpaired) == 80 and sum(r.desirable for r in unpaired) == 40
    sft = load_records(files.sft_eval, kind="sft").records
    assert [r.completion for r in sft] == [r.chosen for r in held]
    chat = write_synthetic_dataset(tmp_path / "c", seed=1, num_train=5, num_eval=1, chat=True)
    row = json.loads(chat.preference_train.read_text().splitlines()[0])
    assert row["prompt"][0]["role"] == "user" and follows_rule(row["prompt"], row["chosen"])


def test_synthetic_files_preprocess_with_the_byte_tokenizer(tmp_path):
    files = write_synthetic_dataset(tmp_path, seed=0, num_train=64, num_eval=8)
    ds = preprocess(
        files.preference_train,
        ByteTokenizer(),
        tmp_path / "cache",
        PreprocessConfig(kind="preference", progress=False, tokenize=TokenizeConfig(max_length=64)),
    )
    assert len(ds) == 64 and ds.summary.truncated == 0
    assert ds.sequence_lengths().max() <= 64

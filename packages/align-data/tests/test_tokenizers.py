"""HF tokenizers and sentencepiece adapters (tiny models built in the test), Jinja templates."""

from __future__ import annotations

import io
import json
import pickle

import pytest

from align_data import (
    ByteTokenizer,
    ChatTemplateError,
    HFTokenizer,
    JinjaChatTemplate,
    Message,
    NeMoChatTemplate,
    SentencePieceTokenizer,
    SFTRecord,
    Source,
    TokenizeConfig,
    sequence_row,
    tokenize_record,
)
from align_data import (
    Tokenizer as TokenizerProtocol,
)

spm = pytest.importorskip("sentencepiece")
pytest.importorskip("jinja2")
tokenizers = pytest.importorskip("tokenizers")
Tokenizer = tokenizers.Tokenizer
decoders, models = tokenizers.decoders, tokenizers.models
pre_tokenizers, trainers = tokenizers.pre_tokenizers, tokenizers.trainers

CHATML = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('bad role ' + m['role']) }}{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
CORPUS = ["the cat sat on the mat", "hello world", "a quick brown fox", "yes no maybe"] * 20
SRC = Source("mem.jsonl", 3)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hf")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    tok.save(str(directory / "tokenizer.json"))
    config = {
        "bos_token": "<s>",
        "eos_token": {"content": "<|im_end|>", "special": True},
        "pad_token": "<pad>",
        "chat_template": CHATML,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


def test_hf_adapter_ids_and_specials(hf_dir):
    raw = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    tok = HFTokenizer(hf_dir)
    assert isinstance(tok, TokenizerProtocol)
    assert tok.bos_id == raw.token_to_id("<s>")
    assert tok.eos_id == raw.token_to_id("<|im_end|>")
    assert tok.pad_id == raw.token_to_id("<pad>")
    assert tok.vocab_size == raw.get_vocab_size(with_added_tokens=True)
    text = "the cat sat"
    assert tok.encode(text) == raw.encode(text, add_special_tokens=False).ids
    assert tok.decode([tok.bos_id, *tok.encode(text), tok.eos_id, tok.pad_id]) == text
    # Special tokens written in the text are single tokens.
    assert tok.encode("<|im_start|>") == [raw.token_to_id("<|im_start|>")]
    assert pickle.loads(pickle.dumps(tok)).encode(text) == tok.encode(text)


def test_hf_adapter_overrides_and_missing_eos(hf_dir, tmp_path):
    tok = HFTokenizer(hf_dir / "tokenizer.json", eos_token="</s>", pad_token=None)
    assert tok.eos_id == Tokenizer.from_file(str(hf_dir / "tokenizer.json")).token_to_id("</s>")
    bare = tmp_path / "tokenizer.json"
    bare.write_bytes((hf_dir / "tokenizer.json").read_bytes())
    with pytest.raises(ValueError, match="no EOS token"):
        HFTokenizer(bare)
    no_pad = HFTokenizer(bare, eos_token="</s>")
    assert no_pad.pad_id == no_pad.eos_id and no_pad.bos_id is None
    assert no_pad.chat_template is None
    with pytest.raises(ValueError, match="not in the tokenizer's vocabulary"):
        HFTokenizer(bare, eos_token="<missing>")


def test_hf_chat_record_boundary(hf_dir, chat_pair):
    tok = HFTokenizer(hf_dir)
    record = chat_pair("hello world", "yes", "no", SRC)
    ex = tokenize_record(record, tok, TokenizeConfig()).example
    prompt_text = "<s><|im_start|>user\nhello world<|im_end|>\n<|im_start|>assistant\n"
    # The template writes the BOS itself: it is not added twice.
    assert ex.prompt_ids.tolist() == tok.encode(prompt_text)
    assert ex.prompt_ids.tolist().count(tok.bos_id) == 1
    # The response ends with the end-of-turn token, which is the EOS: no second EOS.
    assert ex.chosen_ids.tolist() == tok.encode("yes<|im_end|>\n")
    assert ex.chosen_ids.tolist().count(tok.eos_id) == 1
    _, labels = sequence_row(ex.prompt_ids, ex.chosen_ids)
    assert [x for x in labels.tolist() if x != -100] == tok.encode("yes<|im_end|>\n")


def test_hf_plain_text_gets_bos_and_eos(hf_dir):
    # hf_dir's config has no add_bos_token and tokenizer.json no post-processor: plain text
    # gets a BOS only when asked (test_bos_convention.py covers the default).
    tok = HFTokenizer(hf_dir)
    record = SFTRecord("the cat", " sat", SRC)
    ex = tokenize_record(record, tok, TokenizeConfig(add_bos=True)).example
    assert ex.prompt_ids.tolist() == [tok.bos_id, *tok.encode("the cat")]
    assert ex.completion_ids.tolist() == [*tok.encode(" sat"), tok.eos_id]


def test_jinja_template_from_tokenizer_config(hf_dir):
    template = JinjaChatTemplate.from_tokenizer_config(hf_dir / "tokenizer_config.json")
    text = template.render(
        [Message("system", "s"), Message("user", "u")], add_generation_prompt=True
    )
    assert text == (
        "<s><|im_start|>system\ns<|im_end|>\n<|im_start|>user\nu<|im_end|>\n<|im_start|>assistant\n"
    )
    with pytest.raises(ChatTemplateError, match="bad role tool"):
        template.render([Message("tool", "x")], add_generation_prompt=False)  # type: ignore[arg-type]
    clone = pickle.loads(pickle.dumps(template))
    assert clone.render([Message("user", "u")], add_generation_prompt=False) == template.render(
        [Message("user", "u")], add_generation_prompt=False
    )
    assert clone.fingerprint == template.fingerprint


def test_jinja_named_templates_tojson_and_extra(tmp_path):
    config = {
        "eos_token": "</s>",
        "chat_template": [
            {"name": "default", "template": "{{ messages | tojson }}{{ flag }}"},
            {"name": "tool_use", "template": "tools"},
        ],
    }
    path = tmp_path / "tokenizer_config.json"
    path.write_text(json.dumps(config))
    template = JinjaChatTemplate.from_tokenizer_config(tmp_path, extra={"flag": "!"})
    out = template.render([Message("user", "é")], add_generation_prompt=False)
    assert out == '[{"role": "user", "content": "é"}]!'
    assert (
        JinjaChatTemplate.from_tokenizer_config(path, name="tool_use").render(
            [], add_generation_prompt=False
        )
        == "tools"
    )
    with pytest.raises(FileNotFoundError):
        JinjaChatTemplate.from_tokenizer_config(path, name="nope")
    # A separate chat_template.jinja file is used when the config has none.
    other = tmp_path / "other"
    other.mkdir()
    (other / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    (other / "chat_template.jinja").write_text("J{{ eos_token }}")
    assert (
        JinjaChatTemplate.from_tokenizer_config(other).render([], add_generation_prompt=False)
        == "J</s>"
    )


def test_jinja_template_in_sandbox():
    template = JinjaChatTemplate("{{ ''.__class__.__mro__ }}")
    with pytest.raises(Exception, match=r"unsafe|access"):
        template.render([], add_generation_prompt=False)


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS),
        model_writer=model,
        vocab_size=60,
        model_type="bpe",
        user_defined_symbols=["<extra_id_0>", "<extra_id_1>"],
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        hard_vocab_limit=False,
        minloglevel=3,
    )
    path = tmp_path_factory.mktemp("sp") / "tokenizer.model"
    path.write_bytes(model.getvalue())
    return path


def test_sentencepiece_adapter(sp_model):
    proc = spm.SentencePieceProcessor(model_file=str(sp_model))
    tok = SentencePieceTokenizer(sp_model, chat_template=NeMoChatTemplate())
    assert isinstance(tok, TokenizerProtocol)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 3)
    assert tok.vocab_size == proc.get_piece_size()
    assert tok.encode("the cat") == proc.encode("the cat")
    assert tok.decode([1, *tok.encode("the cat"), 2, 3]) == "the cat"
    assert tok.encode("<extra_id_1>") == proc.encode("<extra_id_1>")
    assert proc.id_to_piece(tok.encode("<extra_id_1>")[-1]) == "<extra_id_1>"
    assert pickle.loads(pickle.dumps(tok)).encode("hello") == tok.encode("hello")


def test_sentencepiece_with_nemo_template(sp_model):
    tok = SentencePieceTokenizer(sp_model, chat_template=NeMoChatTemplate())
    record = SFTRecord((Message("user", "hello world"),), (Message("assistant", "yes"),), SRC)
    ex = tokenize_record(record, tok, TokenizeConfig()).example
    prompt_text = "<extra_id_0>System\n\n<extra_id_1>User\nhello world\n<extra_id_1>Assistant\n"
    assert ex.prompt_ids.tolist() == [1, *tok.encode(prompt_text)]
    assert ex.completion_ids.tolist() == [*tok.encode("yes\n"), 2]


def test_fingerprints_distinguish_tokenizers(hf_dir, sp_model):
    prints = {
        ByteTokenizer().fingerprint,
        HFTokenizer(hf_dir).fingerprint,
        HFTokenizer(hf_dir, eos_token="</s>").fingerprint,
        SentencePieceTokenizer(sp_model).fingerprint,
    }
    assert len(prints) == 4


def gpt2_byte_symbols() -> list[str]:
    """GPT-2's printable stand-in for each byte (the published bytes-to-unicode table)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return [out[b] for b in range(256)]


@pytest.fixture(scope="module")
def gpt2_files(tmp_path_factory):
    directory = tmp_path_factory.mktemp("gpt2")
    symbols = gpt2_byte_symbols()
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab["ca"] = 256  # one merge: "c" + "a"
    vocab["<|endoftext|>"] = 257
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\nc a\n")
    return directory / "vocab.json", directory / "merges.txt"


def test_gpt2_bpe_files_and_nemo_spec(gpt2_files, hf_dir, sp_model):
    from types import SimpleNamespace

    from align_data import tokenizer_from_nemo_spec

    vocab, merges = gpt2_files
    tok = HFTokenizer.from_bpe_files(vocab, merges)
    # "cat" -> "ca" (merged, id 256) + "t" (byte 116); " " is byte 32 -> symbol "Ġ" (id 32).
    assert tok.encode("cat cat") == [256, 116, 32, 256, 116]
    assert tok.eos_id == 257 and tok.pad_id == 257 and tok.bos_id is None
    assert tok.decode([256, 116, 257]) == "cat"

    megatron = tokenizer_from_nemo_spec(
        SimpleNamespace(
            library="megatron",
            type="GPT2BPETokenizer",
            model=None,
            vocab_file=vocab,
            merge_file=merges,
        )
    )
    assert (megatron.bos_id, megatron.eos_id, megatron.pad_id) == (257, 257, 257)
    assert megatron.encode("ca") == [256]
    sp = tokenizer_from_nemo_spec(SimpleNamespace(library="sentencepiece", model=sp_model))
    assert isinstance(sp, SentencePieceTokenizer)
    hf = tokenizer_from_nemo_spec(SimpleNamespace(library="huggingface", model=hf_dir))
    assert isinstance(hf, HFTokenizer) and hf.chat_template is not None
    assert isinstance(tokenizer_from_nemo_spec(None), ByteTokenizer)
    with pytest.raises(ValueError, match="cannot build a tokenizer for library='huggingface'"):
        tokenizer_from_nemo_spec(SimpleNamespace(library="huggingface", type="gpt2", model=None))

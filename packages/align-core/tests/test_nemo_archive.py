"""Safe tar handling, config/tokenizer reading and error messages for malformed `.nemo` files."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from pathlib import Path

import pytest
import torch
import yaml

from align_core import ModelConfig
from align_core.nemo import (
    NemoFormatError,
    TokenizerSpec,
    UnsupportedNemoConfigError,
    extract_nemo,
    list_members,
    open_nemo,
    random_state_dict,
    tokenizer_from_nemo,
    write_byte_bpe_files,
    write_nemo,
    write_tiny_nemo,
)

SMALL = ModelConfig(
    num_layers=1,
    hidden_size=32,
    ffn_hidden_size=64,
    num_attention_heads=2,
    vocab_size=260,
    make_vocab_size_divisible_by=4,
)


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _tar_with(path: Path, extra: tarfile.TarInfo | None = None, name: str | None = None) -> Path:
    with tarfile.open(path, "w:") as tar:
        _add(tar, "./model_config.yaml", b"num_layers: 1\n")
        if extra is not None:
            tar.addfile(extra)
        if name is not None:
            _add(tar, name, b"evil")
    return path


@pytest.mark.parametrize("bad", ["/etc/evil", "../evil", "./a/../../evil"])
def test_rejects_escaping_member_paths(tmp_path, bad):
    path = _tar_with(tmp_path / "bad.nemo", name=bad)
    with pytest.raises(NemoFormatError, match=r"unsafe member") as err:
        extract_nemo(path, tmp_path / "out")
    assert bad in str(err.value)
    assert not (tmp_path / "evil").exists()


@pytest.mark.parametrize(
    "kind", [tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE, tarfile.FIFOTYPE]
)
def test_rejects_links_and_devices(tmp_path, kind):
    info = tarfile.TarInfo("./model_weights.ckpt")
    info.type = kind
    info.linkname = "/etc/passwd"
    path = _tar_with(tmp_path / "link.nemo", extra=info)
    with pytest.raises(NemoFormatError, match=r"unsafe member '\./model_weights\.ckpt'"):
        list_members(path)


def test_truncated_file_names_the_member(tmp_path):
    path = write_tiny_nemo(tmp_path / "ok.nemo", SMALL)
    data = path.read_bytes()
    with tarfile.open(path) as tar:
        members = {m.name: m for m in tar.getmembers()}
    weights = members["./model_weights.ckpt"]
    cut = tmp_path / "cut.nemo"
    cut.write_bytes(data[: weights.offset_data + weights.size // 2])
    with pytest.raises(NemoFormatError, match=r"truncated.*model_weights\.ckpt"), open_nemo(cut):
        pass
    # Cut inside the header area: the members after the cut are reported missing by name.
    cut.write_bytes(data[: members["./model_config.yaml"].offset])
    with (
        pytest.raises(NemoFormatError, match=r"missing model_config\.yaml|truncated"),
        open_nemo(cut),
    ):
        pass


def test_not_a_tar_and_missing_file(tmp_path):
    junk = tmp_path / "junk.nemo"
    junk.write_bytes(b"definitely not a tar archive" * 40)
    with pytest.raises(NemoFormatError, match=r"not a readable \.nemo"):
        extract_nemo(junk, tmp_path / "out")
    with pytest.raises(FileNotFoundError), open_nemo(tmp_path / "absent.nemo"):
        pass


def test_missing_weights_and_shards_are_named(tmp_path):
    cfg = yaml.safe_dump(
        {
            "num_layers": 1,
            "hidden_size": 32,
            "ffn_hidden_size": 64,
            "num_attention_heads": 2,
            "encoder_seq_length": 16,
        }
    ).encode()
    for layout, message in [
        ([], r"no weights found"),
        (["mp_rank_00/model_weights.ckpt", "mp_rank_02/model_weights.ckpt"], r"mp_rank_.*\[1\]"),
        (
            ["tp_rank_00_pp_rank_000/model_weights.ckpt", "tp_rank_00_pp_rank_001/other"],
            r"missing tp_rank_00_pp_rank_001/model_weights\.ckpt",
        ),
    ]:
        path = tmp_path / "w.nemo"
        with tarfile.open(path, "w:") as tar:
            _add(tar, "./model_config.yaml", cfg)
            for name in layout:
                _add(tar, "./" + name, b"x")
        with pytest.raises(NemoFormatError, match=message), open_nemo(path):
            pass


def test_corrupt_weights_and_yaml(tmp_path):
    path = tmp_path / "c.nemo"
    with tarfile.open(path, "w:") as tar:
        _add(tar, "./model_config.yaml", b"num_layers: [1\n")
        _add(tar, "./model_weights.ckpt", b"garbage")
    with pytest.raises(NemoFormatError, match=r"model_config\.yaml is not valid YAML"):
        open_nemo(path).__enter__()


def test_gzip_archive_reads_like_plain(tmp_path):
    plain = write_tiny_nemo(tmp_path / "p.nemo", SMALL, seed=3)
    gz = tmp_path / "g.nemo"
    gz.write_bytes(gzip.compress(plain.read_bytes()))
    with open_nemo(plain) as a, open_nemo(gz) as b:
        assert a.model_config == b.model_config
        sa, sb = a.full_state_dict(), b.full_state_dict()
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa if sa[k] is not None)


def test_archive_layout_matches_nemo(tmp_path):
    path = write_tiny_nemo(tmp_path / "t.nemo", SMALL)
    with tarfile.open(path, "r:") as tar:  # plain tar, members under "./"
        names = tar.getnames()
        cfg = yaml.safe_load(tar.extractfile("./model_config.yaml"))
        weights = torch.load(
            io.BytesIO(tar.extractfile("./model_weights.ckpt").read()), weights_only=True
        )
    assert names[0] == "."
    assert all(n.startswith("./") for n in names[1:])
    assert (
        cfg["target"]
        == "nemo.collections.nlp.models.language_modeling.megatron_gpt_model.MegatronGPTModel"
    )
    assert cfg["mcore_gpt"] is True
    assert all(k.startswith("model.") for k in weights)
    for key in ("vocab_file", "merge_file"):
        ref = cfg["tokenizer"][key]
        assert ref.startswith("nemo:")
        artifact = ref[len("nemo:") :]
        assert "./" + artifact in names
        uuid_hex, _, base = artifact.partition("_")
        assert len(uuid_hex) == 32 and int(uuid_hex, 16) >= 0
        assert base in ("vocab.json", "merges.txt")


def test_tokenizer_artifacts_resolve(tmp_path):
    path = write_tiny_nemo(tmp_path / "t.nemo", SMALL)
    with open_nemo(path) as ckpt:
        spec = ckpt.tokenizer
        assert spec.library == "megatron" and spec.type == "GPT2BPETokenizer"
        vocab = json.loads(spec.vocab_file.read_text())
        assert len(vocab) == SMALL.vocab_size
        assert spec.merge_file.read_text().startswith("#version")
    root = tmp_path / "root"
    root.mkdir()
    (root / "abc_tok.model").write_bytes(b"m")
    # a path from the machine that wrote the file falls back to the copied artifact
    spec = tokenizer_from_nemo({"library": "sentencepiece", "model": "/elsewhere/tok.model"}, root)
    assert spec.model == root / "abc_tok.model"
    with pytest.raises(NemoFormatError, match=r"tokenizer\.model refers to artifact 'nemo:gone'"):
        tokenizer_from_nemo({"library": "sentencepiece", "model": "nemo:gone"}, root)
    # a file of this machine outside the archive is never read (it would be copied on export)
    host_file = tmp_path / "secret.model"
    host_file.write_bytes(b"secret")
    with pytest.raises(NemoFormatError, match=r"tokenizer\.model refers to '.*secret\.model', wh"):
        tokenizer_from_nemo({"library": "sentencepiece", "model": str(host_file)}, root)


def _artifacts(path: Path) -> dict[str, bytes]:
    """Tokenizer artifact members of a `.nemo`, by base name (``vocab.json``, ...)."""
    with tarfile.open(path) as tar:
        return {
            m.name.rsplit("/", 1)[-1].partition("_")[2]: tar.extractfile(m).read()
            for m in tar.getmembers()
            if m.isfile() and not m.name.endswith(("model_config.yaml", "model_weights.ckpt"))
        }


def test_a_detached_tokenizer_is_exported_after_the_archive_is_closed(tmp_path):
    files = write_byte_bpe_files(tmp_path / "files", SMALL.vocab_size)
    source = write_tiny_nemo(tmp_path / "source.nemo", SMALL, tokenizer=files)
    with open_nemo(source) as ckpt:
        kept, plain = ckpt.tokenizer.detached(), ckpt.tokenizer
        names = {key: p.name for key, p in plain.files().items()}
    assert not plain.vocab_file.exists()  # the extraction is gone
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.vocab_file: .*detached\(\)"):
        write_nemo(tmp_path / "lost.nemo", random_state_dict(SMALL), SMALL, tokenizer=plain)

    out = write_nemo(tmp_path / "out.nemo", random_state_dict(SMALL), SMALL, tokenizer=kept)
    assert _artifacts(out) == {
        "vocab.json": files.vocab_file.read_bytes(),
        "merges.txt": files.merge_file.read_bytes(),
    }
    with open_nemo(out) as ckpt:  # same artifact names as the source, and loadable again
        assert {key: p.name for key, p in ckpt.tokenizer.files().items()} == names
        assert len(json.loads(ckpt.tokenizer.vocab_file.read_text())) == SMALL.vocab_size
    assert "contents" not in repr(kept)  # the bytes stay out of logs


def test_byte_bpe_tokenizer_loads_in_hf_tokenizers(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    spec = write_byte_bpe_files(tmp_path, 300)
    tok = tokenizers.ByteLevelBPETokenizer(str(spec.vocab_file), str(spec.merge_file))
    assert tok.get_vocab_size() == 300
    ids = tok.encode("The policy prefers the chosen answer.").ids
    assert tok.decode(ids) == "The policy prefers the chosen answer."
    assert len(ids) < len("The policy prefers the chosen answer.")  # merges are used


def test_write_is_atomic_on_failure(tmp_path):
    path = write_tiny_nemo(tmp_path / "keep.nemo", SMALL)
    before = path.read_bytes()
    bad = TokenizerSpec(library="sentencepiece", model=tmp_path / "missing.model")
    with pytest.raises(FileNotFoundError):
        write_nemo(path, random_state_dict(SMALL), SMALL, tokenizer=bad)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_unsupported_architecture_is_an_error(tmp_path):
    path = write_tiny_nemo(tmp_path / "t.nemo", SMALL)
    root = extract_nemo(path, tmp_path / "x")
    cfg = yaml.safe_load((root / "model_config.yaml").read_text())
    cfg["num_moe_experts"] = 8
    (root / "model_config.yaml").write_text(yaml.safe_dump({"model": cfg}))
    with pytest.raises(UnsupportedNemoConfigError, match="num_moe_experts=8"), open_nemo(root):
        pass


def test_build_tokenizer_through_align_data(tmp_path):
    pytest.importorskip("tokenizers")
    from align_core.nemo import build_tokenizer

    path = write_tiny_nemo(tmp_path / "t.nemo", SMALL)
    with open_nemo(path) as ckpt:
        tok = build_tokenizer(ckpt.tokenizer)
    assert tok.vocab_size == SMALL.vocab_size
    vocab = json.loads(
        write_byte_bpe_files(tmp_path / "v", SMALL.vocab_size).vocab_file.read_text()
    )
    assert tok.eos_id == vocab["<|endoftext|>"] == SMALL.vocab_size - 1
    text = "The reference policy stays fixed."
    assert tok.decode(tok.encode(text)) == text

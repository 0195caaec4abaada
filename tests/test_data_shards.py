"""Shard format, writer, readers, byte tokenizer and the embedded stdlib corpus."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from dist_llm.data import (
    FORMAT,
    ByteTokenizer,
    ShardWriter,
    load_tokenizer,
    read_manifest,
    read_shard,
    verify_shard,
)
from dist_llm.prepare import build_stdlib_corpus

SEQ = 16


def _samples(n: int, vocab: int = 1000, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=(n, SEQ + 1))


def _write(d: Path, samples: np.ndarray, vocab: int = 1000, per_shard: int = 10) -> dict:
    with ShardWriter(d, SEQ, vocab, per_shard, eos_id=0, tokenizer_meta={"kind": "byte"},
                     extra={"note": "test"}) as w:
        for s in samples:
            w.add(s)
    assert w.manifest is not None
    return w.manifest


def test_round_trip_and_manifest(tmp_path: Path) -> None:
    data = _samples(25)
    m = _write(tmp_path / "train", data)
    assert m == read_manifest(tmp_path / "train")
    assert m["format"] == FORMAT and m["seq_len"] == SEQ and m["sample_len"] == SEQ + 1
    assert m["dtype"] == "uint16" and m["vocab_size"] == 1000 and m["eos_id"] == 0
    assert m["num_samples"] == 25 and m["num_tokens"] == 25 * (SEQ + 1)
    assert [s["file"] for s in m["shards"]] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert [s["num_samples"] for s in m["shards"]] == [10, 10, 5]
    assert m["tokenizer"] == {"kind": "byte"} and m["extra"] == {"note": "test"}
    text = (tmp_path / "train" / "manifest.json").read_text()
    assert text == json.dumps(m, sort_keys=True, indent=1) + "\n"
    rows = [read_shard(tmp_path / "train" / s["file"], SEQ + 1, m["dtype"], sha256=s["sha256"]) for s in m["shards"]]
    assert all(r.dtype == np.uint16 for r in rows)
    np.testing.assert_array_equal(np.concatenate(rows), data)
    for s in m["shards"]:
        verify_shard(tmp_path / "train" / s["file"], s["sha256"])
    with tarfile.open(tmp_path / "train" / "shard-000001.tar") as tar:
        infos = tar.getmembers()
    assert [i.name for i in infos] == [f"{k:010d}.tokens.npy" for k in range(10, 20)]
    assert all(i.mtime == 0 and i.uid == 0 and i.gid == 0 and i.mode == 0o644 and i.uname == "" for i in infos)


def test_large_vocab_uses_uint32(tmp_path: Path) -> None:
    m = _write(tmp_path / "s", _samples(3, vocab=70000), vocab=70000)
    assert m["dtype"] == "uint32"
    assert read_shard(tmp_path / "s" / "shard-000000.tar", SEQ + 1, "uint32").max() >= 65536


def test_rewrite_is_byte_identical_and_drops_stale_shards(tmp_path: Path) -> None:
    data = _samples(35)
    m1 = _write(tmp_path / "a", data)
    m2 = _write(tmp_path / "b", data)
    assert m1 == m2
    for s in m1["shards"]:
        assert (tmp_path / "a" / s["file"]).read_bytes() == (tmp_path / "b" / s["file"]).read_bytes()
    assert (tmp_path / "a" / "manifest.json").read_bytes() == (tmp_path / "b" / "manifest.json").read_bytes()
    m3 = _write(tmp_path / "a", data[:12])  # rewrite in place, smaller
    assert len(m3["shards"]) == 2
    assert sorted(p.name for p in (tmp_path / "a").glob("*.tar")) == ["shard-000000.tar", "shard-000001.tar"]
    assert (tmp_path / "a" / "shard-000000.tar").read_bytes() == (tmp_path / "b" / "shard-000000.tar").read_bytes()


def test_webdataset_reads_our_shards(tmp_path: Path) -> None:
    import webdataset as wds

    data = _samples(25)
    m = _write(tmp_path / "s", data)
    urls = [str(tmp_path / "s" / s["file"]) for s in m["shards"]]
    got = list(wds.WebDataset(urls, shardshuffle=False))
    assert [g["__key__"] for g in got] == [f"{k:010d}" for k in range(25)]
    arrs = np.stack([np.load(io.BytesIO(g["tokens.npy"])) for g in got])
    np.testing.assert_array_equal(arrs, data)
    decoded = list(wds.WebDataset(urls, shardshuffle=False).decode())
    np.testing.assert_array_equal(decoded[7]["tokens.npy"], data[7])


def test_bad_samples_are_rejected(tmp_path: Path) -> None:
    w = ShardWriter(tmp_path / "s", SEQ, 100, 10)
    with pytest.raises(ValueError, match=r"expected \(17,\) = seq_len \+ 1"):
        w.add(np.zeros(SEQ, dtype=np.int64))
    with pytest.raises(ValueError, match="shape"):
        w.add(np.zeros((2, SEQ + 1), dtype=np.int64))
    with pytest.raises(ValueError, match=r"token id 100 outside \[0, vocab_size=100\)"):
        w.add(np.full(SEQ + 1, 100))
    with pytest.raises(ValueError, match="token id -1"):
        w.add(np.full(SEQ + 1, -1))
    with pytest.raises(ValueError, match="integer"):
        w.add(np.full(SEQ + 1, 1.5))
    w.add(np.arange(SEQ + 1))
    assert w.close()["num_samples"] == 1
    with pytest.raises(RuntimeError, match="closed"):
        w.add(np.arange(SEQ + 1))
    with pytest.raises(ValueError, match="eos_id"):
        ShardWriter(tmp_path / "t", SEQ, 100, 10, eos_id=100)


def test_failed_write_leaves_no_manifest(tmp_path: Path) -> None:
    _write(tmp_path / "s", _samples(5))
    with pytest.raises(ZeroDivisionError):
        with ShardWriter(tmp_path / "s", SEQ, 1000, 10) as w:
            w.add(_samples(1)[0])
            1 / 0
    with pytest.raises(FileNotFoundError, match="no manifest.json in .*incomplete.*dist-llm prepare"):
        read_manifest(tmp_path / "s")


def test_read_manifest_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_manifest(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        read_manifest(tmp_path / "empty")
    (tmp_path / "empty" / "manifest.json").write_text(json.dumps({"format": "other/9"}))
    with pytest.raises(ValueError, match="format 'other/9'"):
        read_manifest(tmp_path / "empty")


def test_checksums_catch_corruption(tmp_path: Path) -> None:
    m = _write(tmp_path / "s", _samples(10))
    shard = tmp_path / "s" / m["shards"][0]["file"]
    raw = bytearray(shard.read_bytes())
    raw[600] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="checksum mismatch"):
        verify_shard(shard, m["shards"][0]["sha256"])
    with pytest.raises(ValueError, match="checksum mismatch"):
        read_shard(shard, SEQ + 1, "uint16", sha256=m["shards"][0]["sha256"])
    with pytest.raises(ValueError, match="shape"):
        read_shard(tmp_path / "s" / m["shards"][0]["file"], SEQ + 2, "uint16")


def test_byte_tokenizer() -> None:
    tok = ByteTokenizer()
    assert (tok.vocab_size, tok.eos_id, tok.pad_id) == (258, 256, 257)
    ids = tok.encode("héllo ✓")
    assert max(ids) < 256 and tok.decode(ids) == "héllo ✓"
    assert tok.decode(ids + [256, 257] + ids) == "héllo ✓héllo ✓"
    assert tok.decode([0xC3]) == "\ufffd"
    assert isinstance(load_tokenizer(tok.meta(), "."), ByteTokenizer)
    with pytest.raises(NotImplementedError, match="'bpe'"):
        load_tokenizer({"kind": "bpe"}, ".")


def test_embedded_corpus(tmp_path: Path) -> None:
    a = build_stdlib_corpus(tmp_path / "a", seq_len=64, max_bytes=200_000, samples_per_shard=64, val_every=5)
    assert a["built"] and a["train"]["num_samples"] > 1000 and a["val"]["num_samples"] > 50
    assert json.loads((tmp_path / "a" / "tokenizer.json").read_text()) == {"kind": "byte"}
    again = build_stdlib_corpus(tmp_path / "a", seq_len=64, max_bytes=200_000, samples_per_shard=64, val_every=5)
    assert not again["built"] and again["train"] == a["train"]
    b = build_stdlib_corpus(tmp_path / "b", seq_len=64, max_bytes=200_000, samples_per_shard=64, val_every=5)
    assert b["train"] == a["train"] and b["val"] == a["val"]  # same sha256s: deterministic
    m = read_manifest(tmp_path / "a" / "train")
    assert m["vocab_size"] == 258 and m["eos_id"] == 256 and m["tokenizer"] == {"kind": "byte"}
    rows = read_shard(tmp_path / "a" / "train" / m["shards"][0]["file"], 65, m["dtype"])
    text = ByteTokenizer().decode(rows.reshape(-1))
    assert "import " in text and "def " in text
    assert (rows == 256).any()  # documents are separated by EOS
    c = build_stdlib_corpus(tmp_path / "a", seq_len=32, max_bytes=50_000, samples_per_shard=64)
    assert c["built"] and read_manifest(tmp_path / "a" / "val")["seq_len"] == 32

"""Readers, malformed input, config checks, cleaning, filters, dedup pieces and tokenizers."""
from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import numpy as np
import pytest

from dist_llm.cli.main import main as cli_main
from dist_llm.config.prepare_schema import PrepareConfigError
from dist_llm.config.store import compose_prepare
from dist_llm.data import load_tokenizer, read_manifest
from dist_llm.prepare import BadInputError, run_prepare
from dist_llm.prepare.clean import make_cleaner
from dist_llm.prepare.dedup import (MinHasher, U64Set, chunk_shingles, shingle_hashes, word_table,
                                         words_and_hashes)
from dist_llm.prepare.filters import QualityFilter, alpha_counts, dup_ngram_fraction, top_ngram_fraction
from dist_llm.data.shards import IMAGES_FORMAT

GOOD = "the quick brown fox jumps over the lazy dog and keeps running far away"


def _base(inp: str, out: Path, *extra: str) -> list:
    return [f"input=files", f"input.paths=[{inp}]", f"output_dir={out}", "pack.seq_len=16",
            "pack.samples_per_shard=50", "split.val_fraction=0", "workers=1", "dedup=none", *extra]


def _malformed_tree(root: Path) -> Path:
    d = root / "in"
    d.mkdir(parents=True)
    lines = [json.dumps({"text": f"{GOOD} {i}"}) for i in range(40)]
    lines[3] = '{"text": "broken'  # line 4
    lines[7] = json.dumps({"body": "no text field"})  # line 8
    (d / "a.jsonl").write_text("\n".join(lines) + "\n")
    with gzip.open(d / "b.jsonl.gz", "wb") as f:
        f.write(b'{"text": "fine gz line"}\n' + b'{"text": "bad \xff\xfe utf8"}\n')
    (d / "c.txt").write_bytes(b"")
    (d / "d.txt").write_bytes(b"valid start \xc3\x28 invalid")
    (d / "e.txt").write_text("a normal text document\n")
    (d / "notes.md").write_text("ignored: unknown suffix inside a directory")
    return d


def test_malformed_counted_with_file_and_line(tmp_path: Path) -> None:
    d = _malformed_tree(tmp_path)
    r = run_prepare(compose_prepare(_base(str(d), tmp_path / "out", "input.max_bad_fraction=0.2")))
    st = r["stats"]
    assert st["records"] == 40 + 2 + 1 + 1 + 1 and st["malformed"] == 5
    ex = st["malformed_examples"]
    assert any(e.startswith(f"{d / 'a.jsonl'}:4: broken JSON") for e in ex)
    assert any(e.startswith(f"{d / 'a.jsonl'}:8: missing text field 'text'") for e in ex)
    assert any(e.startswith(f"{d / 'b.jsonl.gz'}:2: invalid UTF-8") for e in ex)
    assert f"{d / 'c.txt'}:1: empty file" in ex
    assert any(e.startswith(f"{d / 'd.txt'}:1: invalid UTF-8 at byte 12") for e in ex)
    assert sum(st["documents"].values()) == 40 - 2 + 1 + 1
    # the same input under a stricter limit stops before writing anything
    with pytest.raises(BadInputError, match=r"5 of 45 input records are malformed .*max_bad_fraction=0.05"):
        run_prepare(compose_prepare(_base(str(d), tmp_path / "strict", "input.max_bad_fraction=0.05")))
    assert not (tmp_path / "strict" / "train" / "manifest.json").exists()


def test_missing_path_and_bad_config_are_clear(tmp_path: Path, capsys) -> None:
    missing = tmp_path / "nope" / "*.jsonl"
    with pytest.raises(PrepareConfigError, match=r"input.paths entry '.*nope/\*.jsonl' does not exist"):
        run_prepare(compose_prepare(_base(str(missing), tmp_path / "o")))
    rc = cli_main(["prepare", *_base(str(tmp_path / "absent.txt"), tmp_path / "o"), "tokenizer=bpe",
                   "tokenizer.vocab_size=10", "pack=bert", "dedup.threshold=1.5"])
    err = capsys.readouterr().err
    assert rc == 2 and "absent.txt' does not exist" in err
    assert "tokenizer.vocab_size=10 must be >= 262" in err and "dedup.threshold=1.5" in err
    assert not (tmp_path / "o").exists()  # nothing ran


def test_parquet_zst_and_line_mode(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    zstd = pytest.importorskip("zstandard")
    d = tmp_path / "in"
    d.mkdir()
    pq.write_table(pa.table({"content": [f"{GOOD} p{i}" for i in range(5)] + [None]}), d / "a.parquet")
    (d / "b.jsonl.zst").write_bytes(zstd.ZstdCompressor().compress(
        "".join(json.dumps({"content": f"{GOOD} z{i}"}) + "\n" for i in range(4)).encode()))
    (d / "c.txt").write_text(f"{GOOD} l1\n\n{GOOD} l2\n")
    r = run_prepare(compose_prepare(_base(str(d), tmp_path / "out", "input.text_field=content",
                                          "input.txt_mode=line", "input.max_bad_fraction=0.2")))
    st = r["stats"]
    assert st["records"] == 6 + 4 + 2 and st["malformed"] == 1
    assert st["malformed_examples"] == [f"{d / 'a.parquet'}:6: field 'content' is NoneType, not text"]
    assert st["documents"]["train"] == 11


def test_image_folder_with_unreadable_file(tmp_path: Path) -> None:
    Image = pytest.importorskip("PIL.Image")
    for c in ("cat", "dog"):
        (tmp_path / "img" / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((6, 6, 3), 40 * i + (c == "dog") * 100, np.uint8)).save(tmp_path / "img" / c / f"{i}.png")
    (tmp_path / "img" / "dog" / "broken.png").write_bytes(b"not a png")
    r = run_prepare(compose_prepare([f"output_dir={tmp_path / 'out'}", "input=files", f"input.paths=[{tmp_path / 'img'}]",
                                     "input.format=images", "pack=image", "split.val_fraction=0", "workers=1",
                                     "input.max_bad_fraction=0.5"]))
    assert r["stats"]["malformed"] == 1 and "broken.png:1: unreadable image" in r["stats"]["malformed_examples"][0]
    m = read_manifest(tmp_path / "out" / "train", expect=IMAGES_FORMAT)
    assert m["num_samples"] == 6 and m["classes"] == ["cat", "dog"] and m["image_shape"] == [6, 6, 3]


def test_cleaning_steps() -> None:
    clean = make_cleaner(["strip_html", "nfc", "strip_control", "normalize_whitespace"])
    raw = "<p>Cafe\u0301&amp;bar</p><script>x()</script>\x07\r\n\r\n\r\n\r\n  def f():\u00a0\n        return 1   \n"
    assert clean(raw) == "Caf\u00e9&bar\n\n  def f():\n        return 1"
    with pytest.raises(ValueError, match="unknown clean.steps"):
        make_cleaner(["nfc", "lowercase"])


def test_whitespace_shortcuts_change_nothing() -> None:
    """normalize_whitespace skips substitutions that cannot match; the result must not change."""
    from dist_llm.prepare import clean as C

    def reference(text: str) -> str:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        text = C._ZERO_WIDTH.sub("", C._UNICODE_SPACES.sub(" ", text))
        return C._BLANK_RUNS.sub("\n\n", C._TRAILING.sub("", text)).strip()

    rng = np.random.default_rng(2)
    alphabet = [" ", "\t", "\n", "\r", "a", "\u00a0", "\u200b", "\u3000", "\ufeff", "\x0b", "\x85", "\u2028", "\u00e9"]
    for _ in range(20000):
        s = "".join(alphabet[k] for k in rng.integers(0, len(alphabet), size=int(rng.integers(0, 14))))
        assert C.normalize_whitespace(s) == reference(s), repr(s)


def test_ngram_rules_and_minhash() -> None:
    words, wh = words_and_hashes("a b c a b c a b c x")
    lens = np.array([len(w) for w in words])
    assert top_ngram_fraction(wh, lens, 3) == pytest.approx(9 / 10)  # "a b c" x3 of 10 chars
    assert dup_ngram_fraction(wh, lens, 3) == pytest.approx(9 / 10)
    _, u = words_and_hashes(" ".join(f"w{i}" for i in range(40)))
    assert dup_ngram_fraction(u, np.full(40, 2), 5) == 0.0 and top_ngram_fraction(u, np.full(40, 2), 2) == 0.0
    mh = MinHasher(128, threshold=0.7)
    base = [f"word{i}" for i in range(200)]
    near = list(base)
    near[50] = "changed"
    other = [f"other{i}" for i in range(200)]
    sh = [shingle_hashes(words_and_hashes(" ".join(x))[1], 5) for x in (base, near, other)]
    sig = mh.signatures(sh, max_cells=128 * 150)  # forces several blocks
    est = lambda a, b: float((sig[a] == sig[b]).mean())  # noqa: E731
    assert est(0, 1) > 0.85 and est(0, 2) < 0.05
    keys = mh.band_keys(sig)
    assert np.isin(keys[1], keys[0]).any() and not np.isin(keys[2], keys[0]).any()


def _mixed_docs(n: int = 600) -> list:
    """Documents from repetitive to unique, short and empty, ASCII and not: every rule fires."""
    rng = np.random.default_rng(5)
    docs = ["", " ", "a", "a a", "\u3000 x", "Caf\u00e9 na\u00efve \u00b2 \u0661 _ x1 \x1c y", "ab\n" * 12]
    for i in range(n):
        vocab = ["".join(chr(97 + int(c)) for c in rng.integers(0, 26, size=int(rng.integers(1, 8))))
                 for _ in range(int(rng.integers(1, 300)))]
        words = [vocab[k] for k in rng.integers(0, len(vocab), size=int(rng.integers(0, 400)))]
        if i % 7 == 0:
            words = words[:10] * 4 + words
        sep = "\n" if i % 5 == 0 else " "
        docs.append(sep.join(words) + (" 12 34 \u00e9t\u00e9" if i % 3 == 0 else ""))
    return docs


def test_chunk_filters_equal_per_document_rules() -> None:
    """check_many (whole chunk, vectorised) == check (one document) == the one-document functions."""
    docs = _mixed_docs()
    for s in docs[:50]:
        want = (sum(len(w) for w in s.split()), sum(len(m) for m in re.findall(r"[^\W\d_]+", s)))
        assert alpha_counts(s) == want
    overrides = [["filter=gopher"],
                 ["filter=gopher", "filter.min_chars=0", "filter.min_words=0", "filter.min_alpha_fraction=0",
                  "filter.max_dup_line_fraction=1.0", "filter.top_ngram_n=[3,1,2]",
                  "filter.top_ngram_max=[0.1,0.5,0.3]", "filter.dup_ngram_n=[7,2,5]",
                  "filter.dup_ngram_max=[0.2,0.6,0.3]", "filter.blocklist=[ab]"]]
    table = word_table(docs)
    for ov in overrides:
        f = QualityFilter(compose_prepare(["input=stdlib", *ov]).filter)
        one = [f.check(d, *words_and_hashes(d)) for d in docs]
        assert f.check_many(docs, table) == one
        assert len(set(one)) >= 5  # the corpus exercises several rules
    for i, d in enumerate(docs):
        words, wh = words_and_hashes(d)
        lens = np.array([len(w) for w in words], np.int64)
        sub = table.take(np.array([i]))
        assert (sub.hashes == wh).all() and (sub.lens == lens).all()
    # the batched n-gram statistics themselves, against the one-document definitions
    from dist_llm.prepare.filters import _Grams

    for n in (1, 2, 3, 5):
        top, dup = _Grams(table, n).top_fraction(), _Grams(table, n).dup_fraction()
        for i, d in enumerate(docs):
            words, wh = words_and_hashes(d)
            lens = np.array([len(w) for w in words], np.int64)
            assert top[i] == top_ngram_fraction(wh, lens, n) and dup[i] == dup_ngram_fraction(wh, lens, n)


def test_chunk_minhash_equals_per_document() -> None:
    docs = _mixed_docs(300)
    mh = MinHasher(128, threshold=0.8)
    for n in (1, 5):
        want = mh.signatures([shingle_hashes(words_and_hashes(d)[1], n) for d in docs])
        hv, starts = chunk_shingles(word_table(docs), n)
        assert (mh.signatures_flat(hv, starts) == want).all()
        assert (mh.signatures_flat(hv, starts, max_cells=128 * 40) == want).all()


def test_u64set_matches_python_set() -> None:
    rng = np.random.default_rng(0)
    s, ref = U64Set(16), set()
    for _ in range(20):
        batch = rng.integers(2, 5000, size=300).astype(np.uint64)  # many repeats and collisions
        probe = rng.integers(2, 5000, size=200).astype(np.uint64)
        assert s.contains(probe).tolist() == [int(p) in ref for p in probe]
        s.add(batch)
        ref.update(int(b) for b in batch)
    assert len(s) == len(ref)
    s.add(np.array([0], np.uint64))  # 0 marks empty slots, so key 0 is stored as 1 (documented)
    assert s.contains(np.array([1, 0], np.uint64)).all()


def test_tokenizer_kinds_round_trip(tmp_path: Path) -> None:
    d = tmp_path / "in"
    d.mkdir()
    (d / "a.txt").write_text("héllo wörld ✓ " * 20)
    run_prepare(compose_prepare(_base(str(d), tmp_path / "bpe", "tokenizer=bpe", "tokenizer.vocab_size=300")))
    hf = tmp_path / "bpe" / "tokenizer.json"
    run_prepare(compose_prepare(_base(str(d), tmp_path / "file", "tokenizer=file", f"tokenizer.path={hf}",
                                      "tokenizer.eos_token='<|eos|>'")))
    run_prepare(compose_prepare(_base(str(d), tmp_path / "char", "tokenizer=char")))
    for name in ("bpe", "file", "char"):
        m = read_manifest(tmp_path / name / "train")
        tok = load_tokenizer(m["tokenizer"], tmp_path / name)
        text = "wörld ✓ <|eos|>" if name != "char" else "wörld ✓"  # specials in text stay text
        assert tok.decode(tok.encode(text)) == text
        assert m["eos_id"] == 2 and m["vocab_size"] == tok.vocab_size
    assert (tmp_path / "file" / "tokenizer.json").read_bytes() == hf.read_bytes()
    hf.write_text(hf.read_text().replace('"<|mask|>"', '"<|MASK|>"'))
    with pytest.raises(ValueError, match="was replaced"):
        load_tokenizer(read_manifest(tmp_path / "bpe" / "train")["tokenizer"], tmp_path / "bpe")


def test_every_pack_kind_has_a_packer_and_choices_act_as_strings() -> None:
    from dist_llm.config.prepare_schema import PackKind, TokenizerKind
    from dist_llm.prepare.packers import PACKERS, packer_class

    assert set(PACKERS) == set(PackKind)
    assert packer_class("bert") is packer_class(PackKind.bert) is PACKERS[PackKind.bert]
    with pytest.raises(ValueError, match="'nope' is not a valid PackKind"):
        packer_class("nope")
    # str-mixin enums: compare, hash, format and serialise as their value (old code paths rely on it)
    kind = TokenizerKind.bpe
    assert kind == "bpe" and {"bpe": 1}[kind] == 1 and f"{kind}" == str(kind) == "bpe"
    assert json.dumps({"k": kind}) == '{"k": "bpe"}'

"""Data faults on real tar shards written by the shard writer and then damaged: a truncated or
empty shard, a sample missing its member, a duplicated key, zero tokens, paths that escape the
split directory, a manifest without checksums, more lanes than shards. The default names the
shard and the key; ``data.bad_samples=skip`` skips exactly the bad samples and counts them."""
from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest

from dist_llm.data import ShardWriter, TrainLoader, ValLoader, load_tokenizer
from dist_llm.data.shard_scan import read_shard
from dist_llm.data.shards import _npy_bytes, _tar_bytes, sha256_bytes
from dist_llm.fileio import UnsafePathError

SEQ, VOCAB, PER_SHARD, SHARDS = 8, 1000, 4, 4
N = PER_SHARD * SHARDS


def _sample(i: int) -> np.ndarray:
    return np.full(SEQ + 1, i + 1, dtype=np.int64)  # row i is all (i + 1): identifiable, never 0


@pytest.fixture
def split(tmp_path: Path) -> Path:
    d = tmp_path / "train"
    with ShardWriter(d, seq_len=SEQ, vocab_size=VOCAB, samples_per_shard=PER_SHARD) as w:
        for i in range(N):
            w.add(_sample(i))
    return d


def _members(path: Path) -> list:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def _rewrite(split: Path, shard: int, data: bytes, update_manifest: bool = True) -> Path:
    """Replace a shard's bytes; by default also its sha256 (a writer bug: shard and manifest agree)."""
    m = json.loads((split / "manifest.json").read_text())
    entry = m["shards"][shard]
    (split / entry["file"]).write_bytes(data)
    if update_manifest:
        entry["sha256"] = sha256_bytes(data)
        (split / "manifest.json").write_text(json.dumps(m))
    return split / entry["file"]


def _loader(split: Path, **kw) -> TrainLoader:
    return TrainLoader([(str(split), 1.0)], seq_len=SEQ, lanes=1, dp_rank=0, dp_size=1, micro_batch_size=PER_SHARD,
                       grad_accum=1, seed=0, **kw)


def _epoch(loader: TrainLoader) -> np.ndarray:
    return np.concatenate([loader.next_step()[0].numpy() for _ in range(SHARDS)])


def _damage(split: Path, kind: str) -> tuple[Path, list]:
    """Damage shard 1 (samples 4..7); returns the shard and the sample indices made bad."""
    path = split / "shard-000001.tar"
    mem = _members(path)
    if kind == "truncated":  # cut inside the third member: samples 6 and 7 are lost
        data = _tar_bytes(mem)
        return _rewrite(split, 1, data[: 512 * 5 + 100]), [6, 7]
    if kind == "empty":
        return _rewrite(split, 1, b""), [4, 5, 6, 7]
    if kind == "missing_member":
        return _rewrite(split, 1, _tar_bytes([m for m in mem if not m[0].startswith("0000000005.")])), [5]
    if kind == "wrong_member":
        mem[1] = ("0000000005.tokens.bin", mem[1][1])
        return _rewrite(split, 1, _tar_bytes(mem)), [5]
    if kind == "duplicated_key":
        return _rewrite(split, 1, _tar_bytes(mem[:3] + [mem[1]])), [5, 7]
    if kind == "zero_tokens":
        mem[2] = (mem[2][0], _npy_bytes(np.zeros(0, dtype=np.uint16)))
        return _rewrite(split, 1, _tar_bytes(mem)), [6]
    raise AssertionError(kind)


KINDS = ["truncated", "empty", "missing_member", "wrong_member", "duplicated_key", "zero_tokens"]


def test_undamaged_split_reads_every_sample_once(split):
    rows = _epoch(_loader(split))
    assert sorted(rows[:, 0].tolist()) == list(range(1, N + 1))


@pytest.mark.parametrize("kind", KINDS)
def test_bad_shard_default_error_names_shard_and_key(split, kind):
    path, bad = _damage(split, kind)
    loader = _loader(split)
    with pytest.raises(ValueError) as e:
        _epoch(loader)
    msg = str(e.value)
    assert str(path) in msg, msg
    if kind == "empty":
        assert "empty" in msg
    elif kind == "truncated":
        assert "truncated" in msg and "0000000005" in msg  # the last intact key
    else:
        assert f"{bad[0]:010d}" in msg, msg
    assert "data.bad_samples=skip" in msg  # the error says the way out


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "empty"])
def test_skip_mode_skips_exactly_the_bad_samples_and_counts_them(split, kind):
    _, bad = _damage(split, kind)
    loader = _loader(split, bad_samples="skip", max_bad_fraction=0.5)
    rows = _epoch(loader)
    seen = set(rows[:, 0].tolist())
    good = {i + 1 for i in range(N) if i not in bad}
    assert seen == good, (kind, sorted(seen))  # every good sample, no bad one
    assert rows.shape == (N, SEQ + 1)  # fixed-shape batches: bad slots take a good sample of the shard
    assert loader.data_metrics() == {"data/bad_samples": len(bad), "data/samples_read": N}


def test_skip_mode_aborts_above_the_bad_fraction(split):
    _damage(split, "missing_member")  # 1 of 16
    loader = _loader(split, bad_samples="skip", max_bad_fraction=0.05)
    with pytest.raises(ValueError, match="max_bad_fraction=0.05"):
        _epoch(loader)


def test_skip_mode_refuses_a_shard_with_no_good_sample(split):
    path, _ = _damage(split, "empty")
    with pytest.raises(ValueError, match="no readable sample") as e:
        _epoch(_loader(split, bad_samples="skip", max_bad_fraction=0.9))
    assert str(path) in str(e.value)


def test_checksum_mismatch_is_never_skipped(split):
    path = _rewrite(split, 2, b"garbage", update_manifest=False)
    with pytest.raises(ValueError, match="checksum mismatch") as e:
        _epoch(_loader(split, bad_samples="skip", max_bad_fraction=0.9))
    assert str(path) in str(e.value)


def test_out_of_order_keys_are_refused(split):
    path = split / "shard-000000.tar"
    mem = _members(path)
    _rewrite(split, 0, _tar_bytes([mem[1], mem[0], *mem[2:]]))
    with pytest.raises(ValueError, match=r"key 000000000[01]"):
        read_shard(path, SEQ + 1, "uint16", first_index=0, num_samples=PER_SHARD)


def test_val_loader_checks_structure_too(split):
    _damage(split, "duplicated_key")
    with pytest.raises(ValueError, match="0000000005"):
        ValLoader(str(split), SEQ, 0, 1, 4, N).batches()


@pytest.mark.parametrize("bad", ["../outside.tar", "/etc/passwd", "sub/../../x.tar"])
def test_shard_paths_that_escape_are_refused(split, bad):
    m = json.loads((split / "manifest.json").read_text())
    m["shards"][0]["file"] = bad
    (split / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(UnsafePathError, match="manifest.json") as e:
        _loader(split)
    assert bad in str(e.value)


def test_shard_symlink_leaving_the_directory_is_refused(split, tmp_path):
    outside = tmp_path / "elsewhere.tar"
    os.replace(split / "shard-000000.tar", outside)
    os.symlink(outside, split / "shard-000000.tar")
    with pytest.raises(UnsafePathError, match="outside"):
        _loader(split)


def test_manifest_without_checksums_is_refused_unless_opted_out(split):
    m = json.loads((split / "manifest.json").read_text())
    for s in m["shards"]:
        del s["sha256"]
    (split / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match="data.require_checksums=false"):
        _loader(split)
    with pytest.raises(ValueError, match="data.require_checksums=false"):
        ValLoader(str(split), SEQ, 0, 1, 4, N)
    assert sorted(_epoch(_loader(split, require_checksums=False))[:, 0].tolist()) == list(range(1, N + 1))


@pytest.mark.parametrize("dp_rank", [0, 1])
def test_fewer_shards_than_lanes_fails_on_every_rank(split, dp_rank):
    """Lanes keep every rank in lockstep (each epoch is as long as the shortest lane), so no rank can
    run out while others have data; a source too small for its lanes is refused up front, on every
    rank alike, instead of one rank hanging or ending early."""
    with pytest.raises(ValueError, match="non-empty shard"):
        TrainLoader([(str(split), 1.0)], seq_len=SEQ, lanes=8, dp_rank=dp_rank, dp_size=2, micro_batch_size=2,
                    grad_accum=2, seed=0)


def test_tokenizer_file_that_escapes_is_refused(tmp_path):
    (tmp_path / "tok.json").write_text("{}")
    data = tmp_path / "data"
    data.mkdir()
    with pytest.raises(UnsafePathError, match="tokenizer"):
        load_tokenizer({"kind": "hf", "file": "../tok.json"}, data)


def _pairs_shard(tmp_path: Path, members_of) -> Path:
    from dist_llm.data.shards import write_shard

    members = []
    for i in range(3):
        key = f"{10 + 2 * i:010d}"  # BERT keys increase but may have gaps between shards
        members += members_of(key, i)
    entry = write_shard(tmp_path, 0, members, 3)
    return tmp_path / entry["file"]


def _pair(key: str, i: int) -> list:
    return [(f"{key}.tokens.npy", _npy_bytes(np.arange(8, dtype=np.uint16))),
            (f"{key}.segments.npy", _npy_bytes(np.zeros(8, dtype=np.uint8))), (f"{key}.nsp.cls", b"0")]


def test_pairs_shard_with_exact_members_reads(tmp_path):
    from dist_llm.data.shard_scan import read_checked_records
    from dist_llm.data.shards import PAIRS_FORMAT

    recs = read_checked_records(_pairs_shard(tmp_path, _pair), PAIRS_FORMAT, 3)
    assert [r["__key__"] for r in recs] == [b"0000000010", b"0000000012", b"0000000014"]
    assert all(set(r) == {"__key__", "tokens.npy", "segments.npy", "nsp.cls"} for r in recs)


def test_pairs_shard_sample_missing_a_member_names_shard_and_key(tmp_path):
    from dist_llm.data.shard_scan import read_checked_records
    from dist_llm.data.shards import PAIRS_FORMAT

    path = _pairs_shard(tmp_path, lambda key, i: [m for m in _pair(key, i) if not (i == 1 and "segments" in m[0])])
    with pytest.raises(ValueError, match="0000000012") as e:
        read_checked_records(path, PAIRS_FORMAT, 3)
    assert str(path) in str(e.value) and "segments.npy" in str(e.value)

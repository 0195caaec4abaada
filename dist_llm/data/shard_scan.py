"""Structural reading of shards: every sample of a shard must be what its manifest promises
(keys unique, in order and exactly the manifest's; exactly the format's members; arrays of the
manifest's shape and dtype). Problems name the shard and the key; the loader raises on them or,
with ``data.bad_samples=skip``, counts and skips exactly those samples."""
from __future__ import annotations

import io
import tarfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from dist_llm.data.shards import (CLASSIFY_FORMAT, FORMAT, IMAGES_FORMAT, PAIRS_FORMAT, SFT_FORMAT, PathLike, is_url,
                                  sample_key, sha256_bytes)

# The members every sample of a format has, exactly (a sample with more or fewer is refused).
MEMBERS = {FORMAT: ("tokens.npy",), PAIRS_FORMAT: ("nsp.cls", "segments.npy", "tokens.npy"),
           IMAGES_FORMAT: ("cls", "npy"), CLASSIFY_FORMAT: ("cls", "len", "tokens.npy"),
           SFT_FORMAT: ("mask.npy", "tokens.npy")}


def _tar_records(data: bytes, p: Any) -> tuple[List[tuple], List[str], set]:
    """``[(key, {field: bytes})]`` in member order and the problems found while parsing.

    Parsing stops at a truncated or garbled tar (the samples before it are kept). A key seen
    again after another key, or a field repeated within a key, is reported as duplicated.
    """
    recs: List[tuple] = []
    problems: List[str] = []
    seen: Dict[str, int] = {}
    dup: set = set()
    if not data:
        return recs, [f"shard {p} is empty (0 bytes)"], dup
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for info in tar:
                if not info.isreg():
                    continue
                f = tar.extractfile(info)
                blob = f.read() if f is not None else b""
                if len(blob) != info.size:
                    raise tarfile.ReadError(f"member {info.name} is cut short")
                key, _, fld = info.name.partition(".")
                if recs and recs[-1][0] == key:
                    if fld in recs[-1][1]:
                        dup.add(key)
                        problems.append(f"shard {p} key {key}: member {info.name} appears twice")
                    recs[-1][1][fld] = blob
                    continue
                if key in seen:
                    dup.add(key)
                    problems.append(f"shard {p} key {key}: duplicated key (appears again after other samples)")
                seen[key] = len(recs)
                recs.append((key, {fld: blob}))
    except (tarfile.TarError, EOFError, OSError) as e:
        where = f"after key {recs[-1][0]}" if recs else "before the first sample"
        problems.append(f"shard {p} is truncated or not a tar ({e}) {where}")
    return recs, problems, dup


def _where(path: PathLike) -> Any:
    """How a shard is named in messages: its path, or its URL as given (``Path`` would fold ``//``)."""
    return str(path) if is_url(str(path)) else Path(path)


def scan_shard(data: bytes, path: PathLike, members: Sequence[str], first_index: Optional[int],
               num_samples: Optional[int]) -> tuple[List[Optional[Dict[str, bytes]]], List[str]]:
    """Match a shard's samples against what its manifest promises.

    With ``first_index`` the keys must be exactly ``first_index .. first_index + num_samples - 1``
    in order (causal token shards); without it they must be unique and strictly increasing.
    Returns one entry per expected sample (its fields, or None when it is bad) and one message
    per problem, each naming the shard and the key.
    """
    p = _where(path)
    recs, problems, dup = _tar_records(data, p)
    want = set(members)
    if first_index is not None and num_samples is not None:
        expected: List[Optional[str]] = [sample_key(first_index + i) for i in range(num_samples)]
    else:  # keys unknown: take them as found (unique, increasing), as many as the manifest says
        found = list(dict.fromkeys(k for k, _ in recs))
        for a, b in zip(found, found[1:]):
            if b <= a:
                problems.append(f"shard {p} key {b}: out of order (after {a}; keys must increase)")
                dup.add(b)
        n = len(found) if num_samples is None else num_samples
        expected = (found + [None] * n)[:n]
    pos = {k: i for i, k in enumerate(expected) if k is not None}
    out: List[Optional[Dict[str, bytes]]] = [None] * len(expected)
    last = -1
    for key, fields in recs:
        i = pos.get(key)
        if i is None:
            problems.append(f"shard {p} key {key}: not a sample of this shard per its manifest "
                            f"(expected keys {expected[0] if expected else '-'}..{expected[-1] if expected else '-'})")
            continue
        if i <= last and key not in dup:
            problems.append(f"shard {p} key {key}: out of order (keys must increase)")
            continue
        last = max(last, i)
        if key in dup:
            continue
        if set(fields) != want:
            problems.append(f"shard {p} key {key}: members {sorted(fields)}, expected exactly {sorted(want)}")
            continue
        out[i] = fields
    for i, k in enumerate(expected):
        if out[i] is None and not any(f" key {k}:" in m for m in problems):
            problems.append(f"shard {p} key {k or f'#{i}'}: missing (the manifest lists {len(expected)} samples)")
    return out, problems


def read_token_shard(path: PathLike, sample_len: int, dtype: str, sha256: Optional[str] = None,
                     first_index: Optional[int] = None, num_samples: Optional[int] = None,
                     data: Optional[bytes] = None) -> tuple[np.ndarray, np.ndarray, List[str]]:
    """A causal token shard as ``(rows [n, sample_len], good [n] bool, problems)``.

    ``n`` is ``num_samples`` when given (bad rows are zeros, ``good`` False), else the samples
    found. A checksum mismatch always raises: that is corruption, not a bad sample. ``data``:
    the shard's bytes when already fetched (a URL source, :mod:`dist_llm.data.sources`).
    """
    p = _where(path)
    try:
        data = Path(path).read_bytes() if data is None else data
    except FileNotFoundError as e:
        raise FileNotFoundError(
            f"shard {p} is listed in the manifest but missing; re-run `dist-llm prepare`"
        ) from e
    if sha256 is not None and sha256_bytes(data) != sha256:
        raise ValueError(
            f"checksum mismatch for {p}: manifest says {sha256}, file has {sha256_bytes(data)}; "
            f"the shard is corrupt or was rewritten without its manifest: re-run `dist-llm prepare`"
        )
    want = np.dtype(dtype)
    recs, problems = scan_shard(data, p, MEMBERS[FORMAT], first_index, num_samples)
    rows = np.zeros((len(recs), sample_len), dtype=want)
    good = np.zeros(len(recs), dtype=bool)
    for i, fields in enumerate(recs):
        if fields is None:
            continue
        key = sample_key(first_index + i) if first_index is not None else f"#{i}"
        try:
            arr = np.load(io.BytesIO(fields["tokens.npy"]), allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            problems.append(f"shard {p} key {key}: tokens.npy is not a valid .npy array ({e})")
            continue
        if arr.shape != (sample_len,) or arr.dtype != want:
            problems.append(f"shard {p} key {key}: tokens.npy holds shape {arr.shape} {arr.dtype}, expected "
                            f"({sample_len},) {want}" + (" (zero tokens)" if arr.size == 0 else ""))
            continue
        rows[i], good[i] = arr, True
    return rows, good, problems


def read_shard(path: PathLike, sample_len: int, dtype: str, sha256: Optional[str] = None,
               first_index: Optional[int] = None, num_samples: Optional[int] = None,
               data: Optional[bytes] = None) -> np.ndarray:
    """Read a whole shard into an array ``[num_samples, sample_len]`` of ``dtype``.

    Shards are small and read whole, so when ``sha256`` is given the bytes already in memory
    are checked against it at no extra I/O cost. Every sample must have exactly the member
    ``tokens.npy`` with the manifest's shape and dtype, keys unique and in order (exactly the
    manifest's keys when ``first_index``/``num_samples`` are given); otherwise ValueError naming
    the shard and the key.
    """
    rows, good, problems = read_token_shard(path, sample_len, dtype, sha256, first_index, num_samples, data)
    if problems:
        raise ValueError(f"{problems[0]}; the shard does not match its manifest: re-run `dist-llm prepare`, or "
                         f"skip such samples with data.bad_samples=skip" + (f" ({len(problems)} problems)"
                                                                            if len(problems) > 1 else ""))
    return rows


def read_checked_records(path: PathLike, fmt: str, num_samples: int, sha256: Optional[str] = None,
                         data: Optional[bytes] = None) -> List[Dict[str, bytes]]:
    """Every sample of a shard of format ``fmt`` (pairs, images, tokens) as ``{"__key__": key,
    field: bytes}``, after checking it against the manifest: the checksum, ``num_samples``
    samples with unique increasing keys, each with exactly the format's members (``MEMBERS``).
    ValueError names the shard and the key. For the loaders of non-causal packs."""
    if fmt not in MEMBERS:
        raise ValueError(f"unknown shard format {fmt!r}; known: {', '.join(MEMBERS)}")
    p = _where(path)
    data = Path(path).read_bytes() if data is None else data
    if sha256 is not None and sha256_bytes(data) != sha256:
        raise ValueError(f"checksum mismatch for {p}: manifest says {sha256}, file has {sha256_bytes(data)}; "
                         f"re-run `dist-llm prepare`")
    recs, problems = scan_shard(data, p, MEMBERS[fmt], None, num_samples)
    if problems:
        raise ValueError(f"{problems[0]}; the shard does not match its manifest: re-run `dist-llm prepare`")
    keys = list(dict.fromkeys(k for k, _ in _tar_records(data, p)[0]))
    return [{"__key__": k.encode(), **fields} for k, fields in zip(keys, recs) if fields is not None]

"""The embedded default corpus: the running interpreter's standard-library Python sources.

Why: the demo and the tests need real text without a download. Python's stdlib is on every
machine that runs us, is a few MB of genuine code, and sorted paths make the build
deterministic for a given interpreter. Documents are files; every ``val_every``-th document
goes to validation, so val is disjoint text from the same distribution.
"""
from __future__ import annotations

import json
import os
import platform
import sysconfig
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np

from dist_llm.data.shards import MANIFEST, ShardWriter, read_manifest
from dist_llm.data.tokenizer import ByteTokenizer

_SKIP_DIRS = {"site-packages", "test", "tests", "idlelib", "__pycache__"}


def stdlib_documents(max_bytes: int, stdlib_dir: Optional[str] = None) -> List[Tuple[str, bytes]]:
    """``(relative path, UTF-8 bytes)`` of stdlib ``.py`` files in sorted path order, up to ``max_bytes``."""
    root = Path(stdlib_dir or sysconfig.get_paths()["stdlib"])
    paths: List[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        rel = Path(dirpath).relative_to(root)
        paths.extend((rel / f).as_posix() for f in filenames if f.endswith(".py"))
    docs: List[Tuple[str, bytes]] = []
    total = 0
    for rel in sorted(paths):
        try:
            data = (root / rel).read_bytes()
            data.decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if not data:
            continue
        if total + len(data) > max_bytes:
            break
        docs.append((rel, data))
        total += len(data)
    return docs


def _windows(docs: List[bytes], eos_id: int, sample_len: int) -> np.ndarray:
    """Join documents with EOS after each, cut into ``sample_len`` windows, drop the tail."""
    parts: List[np.ndarray] = []
    eos = np.array([eos_id], dtype=np.uint16)
    for d in docs:
        parts.append(np.frombuffer(d, dtype=np.uint8).astype(np.uint16))
        parts.append(eos)
    stream = np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint16)
    n = len(stream) // sample_len
    return stream[: n * sample_len].reshape(n, sample_len)


def _complete(out: Path, seq_len: int) -> Optional[Dict[str, Any]]:
    try:
        train, val = read_manifest(out / "train"), read_manifest(out / "val")
        meta = json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if train["seq_len"] != seq_len or val["seq_len"] != seq_len:
        return None
    return {"train": train, "val": val, "tokenizer": meta, "built": False}


def build_stdlib_corpus(
    out_dir: Union[str, "os.PathLike[str]"],
    seq_len: int,
    max_bytes: int = 3_000_000,
    samples_per_shard: int = 256,
    val_every: int = 20,
) -> Dict[str, Any]:
    """Write ``out_dir/{train,val}`` shards and ``out_dir/tokenizer.json``; skip if already built.

    Returns ``{"train": manifest, "val": manifest, "tokenizer": meta, "built": bool}``.
    """
    if val_every < 1:
        raise ValueError(f"val_every must be >= 1, got {val_every}")
    out = Path(out_dir)
    done = _complete(out, seq_len)
    if done is not None:
        return done
    tok = ByteTokenizer()
    docs = stdlib_documents(max_bytes)
    if not docs:
        raise RuntimeError(f"found no readable .py files under {sysconfig.get_paths()['stdlib']} to build "
                           f"the embedded corpus; point data.train at a prepared dataset instead")
    out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):  # a rebuild must not leave a stale, complete-looking split
        stale = out / split / MANIFEST
        if stale.exists():
            stale.unlink()
    (out / "tokenizer.json").write_text(json.dumps(tok.meta(), sort_keys=True, indent=1) + "\n")
    result: Dict[str, Any] = {"tokenizer": tok.meta(), "built": True}
    for split in ("train", "val"):
        picked = [d for i, (_, d) in enumerate(docs) if (i % val_every == 0) == (split == "val")]
        samples = _windows(picked, tok.eos_id, seq_len + 1)
        extra = {
            "source": "python-stdlib", "python": platform.python_version(), "split": split,
            "documents": len(picked), "bytes": sum(len(d) for d in picked),
            "max_bytes": max_bytes, "val_every": val_every,
        }
        with ShardWriter(out / split, seq_len, tok.vocab_size, samples_per_shard, eos_id=tok.eos_id,
                         tokenizer_meta=tok.meta(), extra=extra) as w:
            for row in samples:
                w.add(row)
        result[split] = w.manifest
    return result

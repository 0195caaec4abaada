"""Build the embedded default corpus: the running interpreter's standard-library Python sources.

Why: the demo and the tests need real text without a download. Python's stdlib is on every
machine that runs us, is a few MB of genuine code, and sorted paths make the build
deterministic for a given interpreter. Documents are files; every ``val_every``-th document
goes to validation, so val is disjoint text from the same distribution. The shards are written
by the ``dist-llm prepare`` pipeline (``input=stdlib``) with cleaning, filters and dedup off.
"""
from __future__ import annotations

import json
import os
import sysconfig
from pathlib import Path
from typing import Any, Dict, Optional, Union

from dist_llm.config.prepare_schema import (CleanConfig, DedupConfig, EmbeddedInput, FilterConfig, PackConfig,
                                            PackKind, PrepareConfig, PrepareInputConfig, SplitConfig,
                                            TokenizerKind, TokenizerPrepConfig)
from dist_llm.data.shards import read_manifest
from dist_llm.data.tokenizer import ByteTokenizer
from dist_llm.prepare.pipeline import run_prepare
from dist_llm.prepare.readers import stdlib_documents


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
    if not stdlib_documents(max_bytes):
        raise RuntimeError(f"found no readable .py files under {sysconfig.get_paths()['stdlib']} to build "
                           f"the embedded corpus; point data.train at a prepared dataset instead")
    # The pipeline with every transformation off: byte tokens of the files exactly as they are,
    # so the shards are byte-identical to what this function wrote before the pipeline existed.
    cfg = PrepareConfig(
        output_dir=str(out), workers=1, progress="off",
        input=PrepareInputConfig(embedded=EmbeddedInput.stdlib, embedded_max_bytes=max_bytes),
        clean=CleanConfig(steps=[]), filter=FilterConfig(enabled=False), dedup=DedupConfig(exact=False, near=False),
        tokenizer=TokenizerPrepConfig(kind=TokenizerKind.byte),
        pack=PackConfig(kind=PackKind.causal, seq_len=seq_len, samples_per_shard=samples_per_shard),
        split=SplitConfig(val_fraction=0.0, val_every=val_every),
    )
    run_prepare(cfg)
    return {"train": read_manifest(out / "train"), "val": read_manifest(out / "val"),
            "tokenizer": ByteTokenizer().meta(), "built": True}


def _complete_records(out: Path, fmt: str, seq_len: Optional[int], vocab: Optional[int] = None) -> bool:
    try:
        for split in ("train", "val"):
            m = read_manifest(out / split, expect=fmt)
            if m.get("format") != fmt or (seq_len is not None and m.get("seq_len") != seq_len):
                return False
            if vocab is not None and m.get("vocab_size") != vocab:  # e.g. an old char-token set: rebuild
                return False
    except (OSError, ValueError):
        return False
    return True


# BPE, not chars: NSP only transfers to unseen files when a shared identifier is one token (a
# 2-layer char model memorises which file a segment came from instead; docs/model-path.md).
# 512 matches model=bert_tiny's vocab_size.
BERT_EMBEDDED_VOCAB = 512


def build_embedded_set(out_dir: Union[str, "os.PathLike[str]"], kind: str, seq_len: int,
                       max_bytes: int = 3_000_000, samples_per_shard: Optional[int] = None) -> bool:
    """The embedded data set ``kind`` under ``out_dir/{train,val}`` (skipped when complete; returns
    whether it was built):

    * ``stdlib``: byte tokens, causal windows (:func:`build_stdlib_corpus`);
    * ``stdlib_bert``: BPE tokenizer of :data:`BERT_EMBEDDED_VOCAB` tokens, ``[CLS] A [SEP] B [SEP]`` pairs of ``seq_len`` for task=mlm_nsp;
      every 5th file is validation (stdlib files are large: 400 kB is ~13 files), so the val
      split holds several documents and its random-next pairs (NSP label 1) exist;
    * ``digits``: scikit-learn's 8x8 digits as (image, label) for task=classify; every 5th image
      is validation (1437 train / 360 val).
    """
    from dist_llm.data.shards import IMAGES_FORMAT, PAIRS_FORMAT

    out = Path(out_dir)
    if samples_per_shard is None:
        # stdlib_bert: small shards, so data=stdlib_bert's 16 lanes mix ~16 shards (files) per
        # batch; with 256 a lane stays on one or two files for ~25 steps and val NSP lagged.
        samples_per_shard = 32 if kind == "stdlib_bert" else 256
    if kind == "stdlib":
        return bool(build_stdlib_corpus(out, seq_len, max_bytes, samples_per_shard)["built"])
    off = dict(clean=CleanConfig(steps=[]), filter=FilterConfig(enabled=False),
               dedup=DedupConfig(exact=False, near=False))
    if kind == "stdlib_bert":
        if _complete_records(out, PAIRS_FORMAT, seq_len, vocab=BERT_EMBEDDED_VOCAB):
            return False
        cfg = PrepareConfig(output_dir=str(out), workers=1, progress="off",
                            input=PrepareInputConfig(embedded=EmbeddedInput.stdlib, embedded_max_bytes=max_bytes),
                            tokenizer=TokenizerPrepConfig(kind=TokenizerKind.bpe, vocab_size=BERT_EMBEDDED_VOCAB),
                            pack=PackConfig(kind=PackKind.bert, seq_len=seq_len, samples_per_shard=samples_per_shard),
                            split=SplitConfig(val_fraction=0.0, val_every=5), **off)
    elif kind == "digits":
        if _complete_records(out, IMAGES_FORMAT, None):
            return False
        cfg = PrepareConfig(output_dir=str(out), workers=1, progress="off",
                            input=PrepareInputConfig(embedded=EmbeddedInput.digits),
                            pack=PackConfig(kind=PackKind.image, samples_per_shard=samples_per_shard),
                            split=SplitConfig(val_fraction=0.0, val_every=5), **off)
    else:
        raise ValueError(f"data.embedded={kind!r} is not one of stdlib, stdlib_bert, digits")
    run_prepare(cfg)
    return True

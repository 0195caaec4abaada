"""Read ``pack=classify`` and ``pack=sft`` splits into tensors (fine-tuning sets are small: a
split is read whole, checksum-verified, and batched by index).

classify: ``input_ids`` [N, L] (padded), ``lengths`` [N], ``labels`` [N], ``attention_mask`` [N, L].
sft: ``input_ids`` [N, L], ``targets`` [N, L] with -100 wherever the next token is not a response
token (prompt, template headers, padding), ``attention_mask`` [N, L].
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import torch

from dist_llm.data.shards import CLASSIFY_FORMAT, SFT_FORMAT, read_manifest, read_records, shard_path, verify_shard

IGNORE_INDEX = -100


def _npy(blob: bytes) -> np.ndarray:
    return np.load(io.BytesIO(blob), allow_pickle=False)


def _samples(split_dir: Path, fmt: str) -> tuple:
    m = read_manifest(split_dir, expect=fmt)
    if m.get("format") != fmt:
        raise ValueError(f"{split_dir}/manifest.json has format {m.get('format')!r}, expected {fmt!r}: prepare it "
                         f"with pack={'classify' if fmt == CLASSIFY_FORMAT else 'sft'}")
    recs: List[Dict[str, bytes]] = []
    for entry in m["shards"]:
        path = shard_path(split_dir, entry)
        if entry.get("sha256"):
            verify_shard(path, entry["sha256"])
        recs.extend(read_records(path))
    return m, recs


def load_classify(split_dir: Any) -> Dict[str, Any]:
    """A classify split as tensors plus its ``classes`` and manifest."""
    m, recs = _samples(Path(split_dir), CLASSIFY_FORMAT)
    L = int(m["seq_len"])
    ids = torch.from_numpy(np.stack([_npy(r["tokens.npy"]).astype(np.int64) for r in recs])) if recs \
        else torch.zeros(0, L, dtype=torch.long)
    lengths = torch.tensor([int(r["len"]) for r in recs], dtype=torch.long)
    labels = torch.tensor([int(r["cls"]) for r in recs], dtype=torch.long)
    mask = torch.arange(L)[None, :] < lengths[:, None]
    return {"input_ids": ids, "lengths": lengths, "labels": labels, "attention_mask": mask,
            "classes": list(m["classes"]), "manifest": m}


def sft_targets(tokens: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Next-token targets of ``tokens`` [N, L+1] where ``loss_mask`` marks response tokens; -100 elsewhere."""
    targets = tokens[:, 1:].clone()
    targets[~loss_mask[:, 1:].bool()] = IGNORE_INDEX
    return targets


def load_sft(split_dir: Any) -> Dict[str, Any]:
    """An SFT split as tensors (``input_ids``/``targets`` already shifted) plus its manifest."""
    m, recs = _samples(Path(split_dir), SFT_FORMAT)
    L = int(m["seq_len"]) + 1
    toks = torch.from_numpy(np.stack([_npy(r["tokens.npy"]).astype(np.int64) for r in recs])) if recs \
        else torch.zeros(0, L, dtype=torch.long)
    lm = torch.from_numpy(np.stack([_npy(r["mask.npy"]) for r in recs])) if recs else torch.zeros(0, L, dtype=torch.uint8)
    pad = m["special_ids"].get("pad")
    real = toks[:, :-1] != pad if pad is not None else torch.ones_like(toks[:, :-1], dtype=torch.bool)
    return {"input_ids": toks[:, :-1].contiguous(), "targets": sft_targets(toks, lm),
            "attention_mask": real, "manifest": m}


__all__ = ["load_classify", "load_sft", "sft_targets", "IGNORE_INDEX"]

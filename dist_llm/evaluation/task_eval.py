"""Evaluate a model on a shard split with its task's loss and metrics, on one rank or many.

Each rank takes a disjoint contiguous slice of the first ``max_samples`` samples (no sample is
dropped to even out the slices) and adds its ``(sum, count)`` pairs and, for classification, its
confusion matrix; one all-reduce sums them. Record formats are decoded with the task's
``decode_eval_batch`` from **global** sample indices (BERT masking is a function of the index),
so a 2-rank evaluation sees exactly the samples and masks of a 1-rank one and gives the same
figures: accuracies exactly (integer counts), losses to float32 rounding (tasks return per-batch
means, and the batches differ with the world size).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from dist_llm.data.shard_scan import read_checked_records, read_shard
from dist_llm.data.shards import is_url
from dist_llm.data.sources import location, read_split_manifest, remote_bytes
from dist_llm.evaluation.classes import class_figures, confusion_update
from dist_llm.parallel.engine import accumulate, batch_to
from dist_llm.train.tasks.base import TOKENS, Task


def rank_slice(total: int, rank: int, world: int) -> Tuple[int, int]:
    """``[lo, hi)`` of rank ``rank``: contiguous, disjoint, covering ``[0, total)``."""
    return total * rank // world, total * (rank + 1) // world


def _read_samples(split_dir: str, manifest: Dict[str, Any], fmt: str, lo: int, hi: int) -> Any:
    """Samples ``[lo, hi)`` of the split in shard order: an int64 array (tokens) or record dicts."""
    rows: List[Any] = []
    seen = 0
    for sh in manifest["shards"]:
        n = int(sh["num_samples"])
        if seen >= hi:
            break
        if seen + n > lo and n:
            path = location(split_dir, sh["file"])  # a local file or a URL (dist_llm/data/sources.py)
            data = remote_bytes(path, sh.get("sha256"), None)
            if fmt == TOKENS:
                arr = read_shard(path, manifest["sample_len"], manifest["dtype"], sha256=sh.get("sha256"),
                                 first_index=seen, num_samples=n, data=data)
                rows.append(arr[max(lo - seen, 0):hi - seen])
            else:
                rows.extend(read_checked_records(path, fmt, n, sha256=sh.get("sha256"), data=data)[max(lo - seen, 0):hi - seen])
        seen += n
    if fmt == TOKENS:
        return np.concatenate(rows).astype(np.int64) if rows else np.zeros((0, manifest["sample_len"]), np.int64)
    return rows


def _batches(task: Task, split_dir: str, manifest: Dict[str, Any], lo: int, hi: int, batch_size: int,
             seq_len: Optional[int]):
    fmt = task.sample_format
    data = _read_samples(split_dir, manifest, fmt, lo, hi)
    for i in range(0, hi - lo, batch_size):
        if fmt == TOKENS:
            x = torch.from_numpy(data[i:i + batch_size])
            yield x if seq_len is None else x[:, :seq_len + 1]
        else:
            chunk = data[i:i + batch_size]
            yield task.decode_eval_batch(chunk, list(range(lo + i, lo + i + len(chunk))))


def evaluate_task(task: Task, model: torch.nn.Module, split_dir: str, rank: int = 0, world: int = 1,
                  max_samples: int = 0, batch_size: int = 32, device: str = "cpu",
                  seq_len: Optional[int] = None, all_reduce=None) -> Dict[str, Any]:
    """Figures of ``model`` on ``split_dir`` under ``task``: ``{"loss", metrics..., "samples"}``
    plus ``ppl`` (causal LM) or ``macro_f1`` and ``confusion`` (classification).

    ``all_reduce(tensor)`` sums a float64 tensor over ranks in place (None on one rank).
    """
    manifest = read_split_manifest(split_dir, task.sample_format)
    task.setup_data(manifest)
    total = int(manifest["num_samples"]) if max_samples <= 0 else min(max_samples, int(manifest["num_samples"]))
    lo, hi = rank_slice(total, rank, world)
    dev = torch.device(device)
    num_classes = _num_classes(task, model)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.float64) if num_classes else None
    sums: Dict[str, torch.Tensor] = {}
    loss_sum = torch.zeros(2, dtype=torch.float64, device=dev)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in _batches(task, split_dir, manifest, lo, hi, batch_size, seq_len):
                batch = batch_to(batch, dev)
                loss, metrics = task.loss(model, batch)
                n = _loss_count(task, batch)
                loss_sum += torch.stack([loss.detach().double() * n, torch.tensor(float(n), dtype=torch.float64,
                                                                                   device=dev)])
                accumulate(sums, metrics, dev)
                if confusion is not None:
                    dtype = next(iter(model.parameters())).dtype
                    confusion_update(confusion, model(batch["pixel_values"].to(dtype)), batch["labels"])
    finally:
        model.train(was_training)
    return _reduce(task, sums, loss_sum, confusion, all_reduce, total)


def _num_classes(task: Task, model: torch.nn.Module) -> int:
    if str(task.kind) != "classify" or task.sample_format == TOKENS:
        return 0
    return int(task.cfg.model.num_classes)


def _loss_count(task: Task, batch: Any) -> int:
    """What the task's mean loss averages over: predicted tokens for a causal LM, else samples."""
    if isinstance(batch, torch.Tensor):
        return int(batch[:, 1:].numel())
    return task.batch_size(batch)


def _reduce(task: Task, sums: Dict[str, torch.Tensor], loss_sum: torch.Tensor, confusion: Optional[torch.Tensor],
            all_reduce, total: int) -> Dict[str, Any]:
    names = sorted(sums)
    parts = [loss_sum.cpu()] + [sums[k].cpu() for k in names]
    if confusion is not None:
        parts.append(confusion.reshape(-1))
    flat = torch.cat(parts)
    if all_reduce is not None:
        all_reduce(flat)  # one collective for every figure
    out: Dict[str, Any] = {"task": str(task.kind), "samples": total}
    out["loss"] = float(flat[0] / flat[1]) if float(flat[1]) else float("nan")
    for i, k in enumerate(names):
        s, c = flat[2 + 2 * i], flat[3 + 2 * i]
        out[k] = float(s / c) if float(c) else float("nan")
    if "mlm_loss" in out and "nsp_loss" in out:
        # BERT's loss is MLM mean (per masked token) + NSP mean: over the whole split, not a
        # sample-weighted mean of per-batch sums, which depends on how many masked tokens each
        # batch holds and so on the world size (3e-5 relative on padded BPE pairs).
        out["loss"] = out["mlm_loss"] + out["nsp_loss"]
    if task.sample_format == TOKENS:
        out["ppl"] = math.exp(min(out["loss"], 50.0))
        out["tokens"] = int(flat[1])
    if confusion is not None:
        k = confusion.shape[0]
        matrix = flat[-k * k:].reshape(k, k)
        out.update(class_figures(matrix))
        out["confusion"] = matrix.long().tolist()
    return out


def split_path(path: str) -> str:
    if not is_url(path) and not (Path(path) / "manifest.json").is_file():
        raise FileNotFoundError(f"{path} has no manifest.json: pass a shard split written by `dist-llm prepare` "
                                f"(data.val=<dir>)")
    return path

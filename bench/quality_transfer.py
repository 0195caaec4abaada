"""Does pretraining pay? A text classifier on the embedded labelled task (which stdlib package a
snippet comes from, 6 balanced classes) fine-tuned from a GPT pretrained on the embedded stdlib
corpus vs the same classifier from random init: same steps, data, batches and head; accuracy
on the held-out split, mean and spread over seeds.

In process on CPU (plain torch AdamW, the task's own loss), so it runs in a few minutes on 2
cores; ``bench/quality.py`` calls :func:`transfer_gain`. Standalone:

    PYTHONPATH=. python bench/quality_transfer.py --work /tmp/transfer [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any, Dict, Sequence

import torch

from dist_llm.config.schema import JobConfig
from dist_llm.data.labelled import load_classify

SEQ_LEN = 64


def _cfg(num_classes: int) -> JobConfig:
    cfg = JobConfig()
    cfg.task.kind = "classify"
    m = cfg.model
    m.preset, m.vocab_size, m.d_model, m.n_layers, m.n_heads, m.max_seq_len = "gpt2", 258, 64, 2, 4, SEQ_LEN
    m.num_classes, m.dropout = num_classes, 0.0
    return cfg


def _prepare(work: Path) -> Dict[str, Any]:
    from dist_llm.config.store import compose_prepare
    from dist_llm.prepare import run_prepare
    from dist_llm.prepare.embedded import build_stdlib_corpus

    build_stdlib_corpus(work / "corpus", SEQ_LEN)
    run_prepare(compose_prepare([f"output_dir={work / 'labelled'}", "input=stdlib_classify", "pack=classify",
                                 f"pack.seq_len={SEQ_LEN}", "tokenizer=byte", "dedup=none", "workers=1",
                                 "progress=off", "split.val_every=5"]))
    return {"train": load_classify(work / "labelled" / "train"), "val": load_classify(work / "labelled" / "val")}


def pretrain(work: Path, steps: int, batch: int = 16, lr: float = 3e-3, seed: int = 0) -> Dict[str, torch.Tensor]:
    """A small GPT trained as a causal LM on the embedded corpus; its state dict (cached)."""
    from dist_llm.data.labelled import _samples  # reads and verifies shards
    from dist_llm.data.shards import FORMAT
    from dist_llm.models import GPT

    cache = work / f"pretrained-{steps}.pt"
    if cache.is_file():
        return torch.load(cache, weights_only=True)
    import io

    import numpy as np

    _, recs = _samples(work / "corpus" / "train", FORMAT)
    data = torch.from_numpy(np.stack([np.load(io.BytesIO(r["tokens.npy"])).astype(np.int64) for r in recs]))
    torch.manual_seed(seed)
    model = GPT(_cfg(2).model)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        for grp in opt.param_groups:
            grp["lr"] = lr * min(1.0, (step + 1) / 20)
        x = data[torch.randint(0, len(data), (batch,), generator=g)]
        loss = model(x[:, :-1], x[:, 1:])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    torch.save(state, cache)
    return state


def finetune(data: Dict[str, Any], init: Dict[str, torch.Tensor] | None, seed: int, steps: int,
             batch: int = 16, lr: float = 1e-3) -> float:
    """Val accuracy of the classifier after ``steps`` of AdamW from ``init`` (None = random)."""
    from dist_llm.train.tasks.finetune import TextClassifyTask

    cfg = _cfg(len(data["train"]["classes"]))
    task = TextClassifyTask(cfg)
    torch.manual_seed(seed)
    model = task.build_model(cfg)  # same seed: same head (and same random backbone) in both arms
    if init is not None:
        missing, unexpected = model.load_state_dict(init, strict=False)
        assert not unexpected and all(k.startswith("cls_head.") for k in missing), (missing, unexpected)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    tr = data["train"]
    g = torch.Generator().manual_seed(1000 + seed)  # same batches in both arms
    keys = ("input_ids", "lengths", "labels", "attention_mask")
    for _ in range(steps):
        idx = torch.randint(0, len(tr["labels"]), (batch,), generator=g)
        loss, _ = task.loss(model, {k: tr[k][idx] for k in keys})
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    va = data["val"]
    with torch.no_grad():
        _, m = task.loss(model, {k: va[k] for k in keys})
    return float(m["accuracy"][0]) / float(m["accuracy"][1])


def transfer_gain(work: Any, seeds: Sequence[int] = (0, 1, 2), pretrain_steps: int = 300,
                  finetune_steps: int = 100, finetune_lr: float = 1e-3) -> Dict[str, Any]:
    """The figure: ``{"pretrained": {mean, std, runs}, "random": {...}, "transfer_gain": mean diff, ...}``."""
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    data = _prepare(work)
    state = pretrain(work, pretrain_steps)
    out: Dict[str, Any] = {}
    for arm, init in (("pretrained", state), ("random", None)):
        runs = [finetune(data, init, s, finetune_steps, lr=finetune_lr) for s in seeds]
        out[arm] = {"mean": statistics.mean(runs), "std": statistics.stdev(runs) if len(runs) > 1 else 0.0,
                    "runs": runs}
    out["transfer_gain"] = out["pretrained"]["mean"] - out["random"]["mean"]
    out["classes"] = data["train"]["classes"]
    out["chance"] = 1.0 / len(out["classes"])
    out["setup"] = {"pretrain_steps": pretrain_steps, "finetune_steps": finetune_steps, "seeds": list(seeds), "finetune_lr": finetune_lr,
                    "train_rows": len(data["train"]["labels"]), "val_rows": len(data["val"]["labels"]),
                    "seq_len": SEQ_LEN, "model": "gpt2 d64 L2 H4, byte tokens"}
    out["seconds"] = round(time.time() - t0, 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/dist-llm-transfer")
    ap.add_argument("--json", default=None)
    ap.add_argument("--pretrain-steps", type=int, default=300)
    ap.add_argument("--finetune-steps", type=int, default=100)
    ap.add_argument("--finetune-lr", type=float, default=1e-3)
    a = ap.parse_args()
    r = transfer_gain(a.work, pretrain_steps=a.pretrain_steps, finetune_steps=a.finetune_steps,
                      finetune_lr=a.finetune_lr)
    print(f"transfer_pretrained_accuracy {r['pretrained']['mean']:.3f} ± {r['pretrained']['std']:.3f}")
    print(f"transfer_random_accuracy {r['random']['mean']:.3f} ± {r['random']['std']:.3f}")
    print(f"transfer_gain {r['transfer_gain']:.3f}")
    if a.json:
        Path(a.json).write_text(json.dumps(r, indent=1) + "\n")
    print(json.dumps(r))


if __name__ == "__main__":
    main()

"""Model-quality figures: ``python -m bench.quality`` prints one ``name value`` line per figure and
writes them (with spreads and timings) to ``bench/results/quality.json``.

* ``vit_digits_accuracy``: ViT (``experiment=vit_digits``) on the held-out 360 digits, mean of 3 seeds;
* ``bert_mlm_accuracy`` / ``bert_nsp_accuracy``: BERT (``experiment=bert_stdlib``) on held-out pairs,
  next to their baselines (majority token; NSP chance 0.5);
* ``transfer_gain``: ``bench/quality_transfer.transfer_gain`` when present (fine-tuning helper);
* ``distill_*``: quoted from ``bench/distill.json`` when present (``bench/distill.py`` has no
  function to call).

Training path: an in-process single-rank loop (so it fits a 2-core box in a few minutes) over the
*same* pieces ``dist-llm train`` uses: the config composed from the experiment, the task object
(``build_task``: ``build_model``, ``decode_batch`` with global sample indices, ``loss``),
``param_groups`` + AdamW with the config's betas/eps/weight decay and ``lr_at`` (warm-up + cosine).
What differs from the trainer: no DeepSpeed engine (ZeRO-0 on one rank is plain AdamW) and the
sample order (a seeded permutation per epoch instead of the lane loader's). Evaluation is
``dist_llm.evaluation.evaluate_task``, the code behind ``dist-llm eval``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any, Dict, List

import torch

RESULTS = Path(__file__).resolve().parent / "results" / "quality.json"


def _cfg(experiment: str, seed: int, extra: List[str]):
    from dist_llm.config.store import compose

    return compose([f"experiment={experiment}", f"train.seed={seed}", "logging=none", *extra])


def train_and_eval(experiment: str, seed: int, extra: List[str] = (), max_eval: int = 0) -> Dict[str, Any]:
    """Train ``experiment`` for its ``train.max_steps`` in this process, then evaluate on its val split."""
    from dist_llm.data.shards import read_manifest
    from dist_llm.evaluation.task_eval import _read_samples, evaluate_task
    from dist_llm.parallel.deepspeed_common import param_groups
    from dist_llm.prepare.embedded import build_embedded_set
    from dist_llm.train.schedule import lr_at
    from dist_llm.train.tasks import build_task

    cfg = _cfg(experiment, seed, list(extra))
    d, tr, opt = cfg.data, cfg.train, cfg.optim
    build_embedded_set(d.embedded_dir, str(d.embedded), tr.seq_len, max_bytes=d.embedded_max_bytes)
    train_dir, val_dir = str(Path(d.embedded_dir) / "train"), str(Path(d.embedded_dir) / "val")
    torch.manual_seed(tr.seed)
    task = build_task(cfg)
    manifest = read_manifest(train_dir, expect=task.sample_format)
    task.setup_data(manifest)
    model = task.build_model(cfg)
    optim = torch.optim.AdamW(param_groups(model, opt.weight_decay), lr=opt.lr, betas=(opt.beta1, opt.beta2),
                              eps=opt.eps)
    records = _read_samples(train_dir, manifest, task.sample_format, 0, int(manifest["num_samples"]))
    gen = torch.Generator().manual_seed(tr.seed)
    order: List[int] = []
    bs = tr.global_batch_size
    t0 = time.perf_counter()
    model.train()
    for step in range(tr.max_steps):
        while len(order) < bs:
            order += torch.randperm(len(records), generator=gen).tolist()
        idx, order = order[:bs], order[bs:]
        batch = task.decode_batch([records[i] for i in idx], step, list(range(step * bs, (step + 1) * bs)))
        for g in optim.param_groups:
            g["lr"] = lr_at(step, opt, tr.max_steps) * g.get("lr_scale", 1.0)
        loss, _ = task.loss(model, batch)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        if opt.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), opt.grad_clip)
        optim.step()
    train_s = time.perf_counter() - t0
    res = evaluate_task(task, model, val_dir, max_samples=max_eval, batch_size=64)
    res.update(seed=seed, steps=tr.max_steps, train_s=round(train_s, 1))
    return res


def _mean_spread(values: List[float]) -> Dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values)}


def vit_figures(seeds: List[int]) -> Dict[str, Any]:
    runs = [train_and_eval("vit_digits", s) for s in seeds]
    acc = [r["accuracy"] for r in runs]
    return {"vit_digits_accuracy": _mean_spread(acc), "vit_digits_macro_f1": _mean_spread([r["macro_f1"] for r in runs]),
            "vit_runs": [{k: r[k] for k in ("seed", "accuracy", "macro_f1", "loss", "train_s")} for r in runs]}


def _majority_token_share(val_dir: str, task) -> float:
    """Accuracy of always predicting the most frequent masked token (the MLM baseline)."""
    from dist_llm.data.shards import read_manifest
    from dist_llm.evaluation.task_eval import _read_samples
    from dist_llm.models.bert import IGNORE_INDEX

    m = read_manifest(val_dir, expect=task.sample_format)
    recs = _read_samples(val_dir, m, task.sample_format, 0, int(m["num_samples"]))
    labels = task.decode_eval_batch(recs, list(range(len(recs))))["mlm_labels"]
    keep = labels[labels != IGNORE_INDEX]
    return float(torch.bincount(keep).max()) / max(int(keep.numel()), 1)


def bert_figures(seed: int) -> Dict[str, Any]:
    from dist_llm.train.tasks import build_task

    r = train_and_eval("bert_stdlib", seed)
    cfg = _cfg("bert_stdlib", seed, [])
    task = build_task(cfg)
    val_dir = str(Path(cfg.data.embedded_dir) / "val")
    from dist_llm.data.shards import read_manifest

    task.setup_data(read_manifest(val_dir, expect=task.sample_format))
    return {"bert_mlm_accuracy": r["mlm_accuracy"], "bert_mlm_majority_baseline": _majority_token_share(val_dir, task),
            "bert_nsp_accuracy": r["nsp_accuracy"], "bert_nsp_chance": 0.5,
            "bert_run": {k: r[k] for k in ("seed", "steps", "samples", "loss", "mlm_loss", "nsp_loss", "train_s")}}


def transfer_figures(work: str) -> Dict[str, Any]:
    """``transfer_gain`` from the fine-tuning helper's ``bench/quality_transfer.py`` when present."""
    if not (Path(__file__).resolve().parent / "quality_transfer.py").is_file():
        try:
            from bench.quality_transfer import transfer_gain  # another checkout on the path
        except ImportError as e:
            return {"skipped": [f"transfer_gain: bench/quality_transfer.py is not in this checkout ({e})"]}
    from bench.quality_transfer import transfer_gain
    r = transfer_gain(work)
    return {"transfer_gain": {"mean": r["transfer_gain"], "pretrained": r["pretrained"], "random": r["random"],
                              "chance": r.get("chance"), "setup": r.get("setup"), "seconds": r.get("seconds")}}


def distill_figures() -> Dict[str, Any]:
    """``bench/distill.py`` (a ``main()`` only) records its figures in ``bench/distill.json``: quoted
    from there, not re-run (its run is ~40 s: ``python -m bench.distill`` to refresh)."""
    path = Path(__file__).resolve().parent / "distill.json"
    if not path.is_file():
        return {"skipped": ["distill_*: bench/distill.json is not in this checkout"]}
    summ = json.loads(path.read_text()).get("summary", {})
    return {"distill_gap_recovered": summ.get("gap_recovered"),
            "distill_student_ppl": summ.get("student_distilled_ppl_mean"),
            "distill_student_alone_ppl": summ.get("student_alone_ppl_mean"),
            "distill_teacher_ppl": summ.get("teacher_ppl"), "distill_source": "bench/distill.json (quoted)"}


def optional_figures(work: str) -> Dict[str, Any]:
    out = transfer_figures(work)
    for k, v in distill_figures().items():
        if k == "skipped":
            out.setdefault("skipped", []).extend(v)
        else:
            out[k] = v
    return out


def main(argv: List[str] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--skip", nargs="*", default=[], choices=["vit", "bert", "other"])
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--work", default="/tmp/dist-llm-quality", help="scratch folder of the transfer bench")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    results: Dict[str, Any] = {}
    if Path(args.out).is_file():  # a run updates the figures it measures, keeps the others
        results = json.loads(Path(args.out).read_text())
    if "vit" not in args.skip:
        results.update(vit_figures(args.seeds))
        print(f"vit_digits_accuracy {results['vit_digits_accuracy']['mean']:.3f}", flush=True)
    if "bert" not in args.skip:
        results.update(bert_figures(args.seeds[0]))
        print(f"bert_mlm_accuracy {results['bert_mlm_accuracy']:.3f}  (majority token "
              f"{results['bert_mlm_majority_baseline']:.3f})", flush=True)
        print(f"bert_nsp_accuracy {results['bert_nsp_accuracy']:.3f}  (chance 0.500)", flush=True)
    if "other" not in args.skip:
        other = optional_figures(args.work)
        for k, v in other.items():
            if isinstance(v, (int, float)):
                print(f"{k} {v:.4f}", flush=True)
            elif k == "transfer_gain":
                p, r = v["pretrained"], v["random"]
                print(f"transfer_gain {v['mean']:.3f}  (pretrained {p['mean']:.3f}±{p['std']:.3f} vs random "
                      f"{r['mean']:.3f}±{r['std']:.3f}, 3 seeds)", flush=True)
        results.update(other)
    parts = "+".join(x for x in ("vit", "bert", "other") if x not in args.skip)
    results[f"wall_s_{parts}"] = round(time.perf_counter() - t0, 1)
    results["training_path"] = "in-process single-rank loop over build_task/task.loss/param_groups/lr_at"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1, default=str) + "\n")
    print(f"wall_s_{parts} {results[f'wall_s_{parts}']}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""``dist-llm prune``: the whole pipeline from a checkpoint to a pruned checkpoint and a report."""
from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any, Dict

from dist_llm.compress.finetune import finetune, train_batches
from dist_llm.compress.report import format_table, model_figures
from dist_llm.compress.source import data_dir, load_checkpoint_model, seq_len_of, write_checkpoint
from dist_llm.compress.structured import prune_structured
from dist_llm.compress.unstructured import apply_masks, magnitude_masks, masks_to_tensors, sparsity_of
from dist_llm.config.compress_schema import Importance, PruneConfig, PruneMethod, validate_prune
from dist_llm.evaluation import evaluate_lm

COLUMNS = ["stage", "params", "nonzero_params", "prunable_sparsity", "safetensors_bytes", "n_heads", "d_ff",
           "val_loss", "ppl"]


def run_prune(cfg: PruneConfig) -> Dict[str, Any]:
    validate_prune(cfg)
    src = load_checkpoint_model(cfg.source)
    ev = cfg.eval
    val_dir = data_dir(src.run_config, "val", ev.val_dir, "--val-data")
    seq = seq_len_of(src.run_config, ev.seq_len, src.cfg, val_dir)
    needs_train = cfg.finetune.steps > 0 or (cfg.method == PruneMethod.STRUCTURED and cfg.importance == Importance.TAYLOR)
    train_dir = data_dir(src.run_config, "train", cfg.finetune.train_dir, "--train-data") if needs_train else None

    def measure(model, stage: str) -> Dict[str, Any]:
        ppl = evaluate_lm(model.to(ev.device), val_dir, seq, ev.batch_size, ev.max_batches, ev.device)
        return {"stage": stage, **model_figures(model.cpu(), ppl)}

    stages = [measure(src.model, "original")]
    note: Dict[str, Any] = {"kind": f"prune-{cfg.method.value}", "source": str(src.path)}
    extra = None
    masks = None
    if cfg.method == PruneMethod.UNSTRUCTURED:
        model = src.model
        masks = magnitude_masks(model, cfg.sparsity, cfg.scope)
        apply_masks(model, masks)
        extra = {"masks.safetensors": masks_to_tensors(masks)}
        note.update(sparsity=cfg.sparsity, scope=cfg.scope.value)
    else:
        def batches():
            return itertools.islice(train_batches(train_dir, seq, cfg.finetune.batch_size, cfg.finetune.seed),
                                    cfg.importance_batches)
        result = prune_structured(src.model, cfg.head_fraction, cfg.mlp_fraction, cfg.importance, batches)
        model = result.pop("model")
        note.update(head_fraction=cfg.head_fraction, mlp_fraction=cfg.mlp_fraction,
                    importance=cfg.importance.value, **result)
    stages.append(measure(model, "pruned"))
    losses = []
    if cfg.finetune.steps:
        ft = cfg.finetune
        losses = finetune(model, train_dir, seq, ft.steps, ft.lr, ft.batch_size, ft.weight_decay, ft.seed,
                          masks=masks, device=ev.device)
        stages.append(measure(model, f"pruned+finetune({ft.steps})"))
        note["finetune"] = {"steps": ft.steps, "lr": ft.lr, "batch_size": ft.batch_size,
                            "first_loss": losses[0], "last_loss": losses[-1]}
    out = write_checkpoint(cfg.out, model.cpu(), src.run_config, note, extra=extra, overwrite=cfg.overwrite)
    stages[-1]["safetensors_bytes_on_disk"] = (out / "model.safetensors").stat().st_size
    report = {"out": str(out), "method": cfg.method.value, "source": str(src.path), "val_dir": val_dir,
              "seq_len": seq, "stages": stages, "final_sparsity": sparsity_of(model)["sparsity"],
              "finetune_losses": losses, "model": {"n_heads": model.cfg.n_heads, "n_kv_heads": model.cfg.n_kv_heads,
                                                   "head_dim": model.cfg.head_dim, "d_ff": model.cfg.d_ff}}
    (Path(out) / "compress_report.json").write_text(json.dumps(report, indent=1, default=str))
    report["table"] = format_table(stages, COLUMNS)
    return report

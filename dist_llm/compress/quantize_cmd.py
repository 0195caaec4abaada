"""``dist-llm quantize``: checkpoint -> int8 directory, with size and perplexity before/after."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict

from dist_llm.compress.quantize import linear_weight_bytes, load_quantized, quantize_model, save_quantized
from dist_llm.compress.report import format_table
from dist_llm.compress.source import data_dir, load_checkpoint_model, seq_len_of
from dist_llm.config.compress_schema import QuantizeConfig, validate_quantize
from dist_llm.evaluation import evaluate_lm

COLUMNS = ["stage", "linears_int8", "linear_weight_bytes", "file_bytes", "val_loss", "ppl"]


def run_quantize(cfg: QuantizeConfig) -> Dict[str, Any]:
    validate_quantize(cfg)
    src = load_checkpoint_model(cfg.source)
    ev = cfg.eval
    val_dir = data_dir(src.run_config, "val", ev.val_dir, "--val-data")
    seq = seq_len_of(src.run_config, ev.seq_len, src.cfg, val_dir)
    model = src.model.to(ev.device)
    fp32 = evaluate_lm(model, val_dir, seq, ev.batch_size, ev.max_batches, ev.device)
    before_bytes = linear_weight_bytes(model)
    info = quantize_model(model, cfg.mode)
    int8 = evaluate_lm(model, val_dir, seq, ev.batch_size, ev.max_batches, ev.device)
    after_bytes = linear_weight_bytes(model)
    extra = {"source": str(src.path), "ppl_fp32": fp32["ppl"], "ppl_int8": int8["ppl"]}
    out = save_quantized(model.cpu(), cfg.mode, cfg.out, src.run_config, extra, overwrite=cfg.overwrite)
    reloaded = evaluate_lm(load_quantized(str(out)).to(ev.device), val_dir, seq, ev.batch_size, ev.max_batches,
                           ev.device)
    stages = [
        {"stage": "fp32", "linears_int8": 0, "linear_weight_bytes": before_bytes, "file_bytes": src.weights_bytes,
         "val_loss": fp32["loss"], "ppl": fp32["ppl"]},
        {"stage": f"int8 {cfg.mode.value}", "linears_int8": info["converted"], "linear_weight_bytes": after_bytes,
         "file_bytes": (out / "quantized.safetensors").stat().st_size, "val_loss": int8["loss"], "ppl": int8["ppl"]},
        {"stage": "int8 reloaded", "linears_int8": info["converted"], "linear_weight_bytes": after_bytes,
         "file_bytes": (out / "quantized.safetensors").stat().st_size, "val_loss": reloaded["loss"],
         "ppl": reloaded["ppl"]},
    ]
    report = {"out": str(out), "mode": cfg.mode.value, "source": str(src.path), "val_dir": val_dir, "seq_len": seq,
              "linears": info["linears"], "converted": info["converted"],
              "bytes_ratio": before_bytes / after_bytes, "ppl_rel_change": int8["ppl"] / fp32["ppl"] - 1.0,
              "reload_matches": reloaded["loss"] == int8["loss"], "stages": stages}
    (Path(out) / "compress_report.json").write_text(json.dumps(report, indent=1))
    report["table"] = format_table(stages, COLUMNS)
    return report

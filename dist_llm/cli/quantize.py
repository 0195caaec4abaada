"""``dist-llm quantize <checkpoint | run dir> --out DIR --mode weight_only|dynamic``: int8 + report.

Exit codes: 0 done, 2 bad flags or input (the message names the fix), 1 the quality/size check
asked for with --check failed.
"""
from __future__ import annotations

import argparse
from typing import List

from dist_llm.cli.prune import add_eval_flags, eval_config, run_compress_command
from dist_llm.config.compress_schema import QuantizeConfig, QuantMode


def parse(argv: List[str]) -> QuantizeConfig:
    p = argparse.ArgumentParser(prog="dist-llm quantize", description=(
        "Post-training int8 quantization (torchao) of every linear layer of one of our checkpoints; saved as "
        "safetensors + quantization.json (load with dist_llm.compress.quantize.load_quantized)."))
    p.add_argument("source", help="checkpoint directory, best/ or run directory")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--mode", choices=[m.value for m in QuantMode], default="weight_only")
    add_eval_flags(p)
    a = p.parse_args(argv)
    return QuantizeConfig(source=a.source, out=a.out, mode=QuantMode(a.mode), eval=eval_config(a), overwrite=a.force)


def main(argv: List[str]) -> int:
    from dist_llm.compress.quantize_cmd import run_quantize

    return run_compress_command("quantize", run_quantize, parse(argv),
                                ("out", "mode", "linears", "bytes_ratio", "ppl_rel_change"))

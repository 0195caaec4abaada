"""``dist-llm export <checkpoint | run dir | best dir> --format hf --out DIR``."""
from __future__ import annotations

import argparse
import json
import sys
from typing import List


def main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(prog="dist-llm export", description=(
        "Export one of our checkpoints (step-N/, best/ or a run dir: its latest checkpoint) for another "
        "ecosystem. --format hf: a transformers directory (GPT2LMHeadModel / LlamaForCausalLM / "
        "BertForPreTraining / ViTForImageClassification)."))
    parser.add_argument("source", help="checkpoint directory, best/ or run directory")
    parser.add_argument("--format", default="hf", choices=["hf"], help="output format (hf = Hugging Face)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--tokenizer", default=None,
                        help="HF tokenizer dir or tokenizer.json (default: the run's, from its data manifest)")
    parser.add_argument("--no-tokenizer", action="store_true", help="write the model only")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")
    args = parser.parse_args(argv)

    from dist_llm.interop import InteropError
    from dist_llm.interop.export import export_hf

    try:
        result = export_hf(args.source, args.out, tokenizer=args.tokenizer, with_tokenizer=not args.no_tokenizer,
                           overwrite=args.force)
    except (InteropError, FileNotFoundError) as e:
        print(f"dist-llm export: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0

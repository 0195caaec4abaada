"""``dist-llm report <run dir> [<run dir> ...] [--out DIR]``: plots + Markdown from metrics.jsonl."""
from __future__ import annotations

import argparse
import json
import sys
from typing import List


def main(argv: List[str]) -> int:
    ap = argparse.ArgumentParser(prog="dist-llm report",
                                 description="PNG plots (loss vs tokens, LR, tokens/s, MFU, memory, "
                                             "step-time breakdown) and a Markdown summary of a run "
                                             "directory, or of several (a sweep) side by side.")
    ap.add_argument("runs", nargs="+", help="run directories, or a folder holding several")
    ap.add_argument("--out", default=None, help="output folder (default: <run dir>/report)")
    args = ap.parse_args(argv)
    from dist_llm.observability.report import ReportError, make_report

    try:
        result = make_report(args.runs, args.out)
    except ReportError as e:
        print(f"dist-llm report: {e}", file=sys.stderr)
        return 2
    for p in result["plots"]:
        print(p)
    print(result["summary"])
    print(json.dumps(result))
    return 0

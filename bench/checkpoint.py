"""Checkpoint save/load seconds and MB/s for one rank, with and without the sha256 pass.

    python -m bench.checkpoint [--layers 8] [--width 768] [--repeats 3] [--dir /path/on/the/disk]

A ~57M-parameter GPT (fp32: ~230 MB of weights, ~460 MB of AdamW state after one step) behind
the Engine interface (plain model + torch AdamW, world 1), saved and loaded by the real
CheckpointManager. The manager always hashes (save: writes the manifest's sha256s; load:
verifies them before unpickling anything), so the hash pass is timed on its own over the same
files and "without" is the total minus it. The figures depend on the disk and the page cache
(the files are read right after being written). Writes bench/results/checkpoint.json.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench._loops import write_result


def _engine(layers: int, width: int):
    from dist_llm.config.schema import ModelConfig
    from dist_llm.models import build_model
    from dist_llm.parallel.engine import Engine

    class PlainEngine(Engine):
        def __init__(self):
            torch.manual_seed(0)
            self.model = build_model(ModelConfig(n_layers=layers, d_model=width, n_heads=12, vocab_size=320,
                                                 max_seq_len=64))
            self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
            x = torch.randint(0, 320, (1, 17))
            self.model(x[:, :-1], x[:, 1:]).backward()
            self.opt.step()  # creates the Adam state

        def model_state_dict(self):
            return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

        def load_model_state_dict(self, state):
            self.model.load_state_dict(state)

        def optimizer_state(self):
            return self.opt.state_dict()

        def load_optimizer_state(self, state):
            self.opt.load_state_dict(state)

    return PlainEngine()


def main() -> None:
    from dist_llm.checkpoint.manager import CheckpointManager
    from dist_llm.fileio import sha256_file
    from dist_llm.parallel.layout import ParallelLayout

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    args = ap.parse_args()
    engine = _engine(args.layers, args.width)
    layout = ParallelLayout(rank=0, world_size=1, local_rank=0, dp=1, tp=1, pp=1, device=torch.device("cpu"),
                            backend="gloo")
    runs = []
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        for i in range(args.repeats):
            root = Path(d) / f"r{i}"
            mgr = CheckpointManager(root, layout, keep_last=1)
            t0 = time.perf_counter()
            path = mgr.save(1, engine, {"step": 1}, {}, {})
            save_s = time.perf_counter() - t0
            files = [p for p in path.rglob("*") if p.is_file()]
            size = sum(p.stat().st_size for p in files)
            t0 = time.perf_counter()
            for p in files:
                sha256_file(p)
            hash_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            mgr.load(path, engine)
            load_s = time.perf_counter() - t0
            runs.append({"bytes": size, "save_s": save_s, "load_s": load_s, "hash_s": hash_s})
            shutil.rmtree(root)
    med = {k: statistics.median(r[k] for r in runs) for k in ("save_s", "load_s", "hash_s")}
    mb = runs[0]["bytes"] / 2**20
    rows = {"MB": mb, **med, "save_MBps": mb / med["save_s"], "load_MBps": mb / med["load_s"],
            "save_nohash_MBps": mb / max(med["save_s"] - med["hash_s"], 1e-9),
            "load_nohash_MBps": mb / max(med["load_s"] - med["hash_s"], 1e-9), "hash_MBps": mb / med["hash_s"]}
    print(f"checkpoint {mb:.0f} MB (1 rank, median of {args.repeats})")
    print(f"{'':<6} {'with sha256 s':>13} {'MB/s':>7} {'without s':>10} {'MB/s':>7}")
    for op in ("save", "load"):
        print(f"{op:<6} {med[f'{op}_s']:>13.2f} {rows[f'{op}_MBps']:>7.0f} {med[f'{op}_s'] - med['hash_s']:>10.2f} "
              f"{rows[f'{op}_nohash_MBps']:>7.0f}")
    print(f"sha256 pass alone: {med['hash_s']:.2f} s ({rows['hash_MBps']:.0f} MB/s)")
    print(f"results: {write_result('checkpoint', {'args': vars(args), 'rows': rows, 'runs': runs})}")


if __name__ == "__main__":
    main()

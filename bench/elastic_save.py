"""Seconds one rank spends saving its optimizer state: the elastic form (each rank's slices as
safetensors + a JSON index, dist_llm/parallel/deepspeed_elastic.py) against the form it replaced
(DeepSpeed's state_dict of the partition in a ``weights_only`` torch file).

    DS_ACCELERATOR=cpu python -m bench.elastic_save [--layers 4] [--width 512] [--stage 2] [--repeats 3]

One process, a world-1 gloo group, a GPT behind real DeepSpeed ZeRO (fp32, one optimizer step
so the Adam state exists). Both forms copy the partition to CPU and fsync; neither gathers
anything. Writes bench/results/elastic_save.json.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench._loops import write_result


def _ds_engine(layers: int, width: int, stage: int):
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    for k, v in (("LOCAL_RANK", "0"), ("RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(k, v)
    import deepspeed
    import torch.distributed as dist

    from dist_llm.config.schema import JobConfig, ModelConfig
    from dist_llm.models import build_model
    from dist_llm.parallel.deepspeed_common import deepspeed_config, param_groups
    from dist_llm.parallel.deepspeed_engine import _skip_shm_comm_op

    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method="tcp://127.0.0.1:29533", rank=0, world_size=1)
    _skip_shm_comm_op()
    cfg = JobConfig()
    cfg.parallel.zero_stage = stage
    cfg.train.micro_batch_size, cfg.train.global_batch_size = 1, 1
    torch.manual_seed(0)
    model = build_model(ModelConfig(n_layers=layers, d_model=width, n_heads=8, vocab_size=320, max_seq_len=64))
    engine, opt, _, _ = deepspeed.initialize(model=model, model_parameters=param_groups(model, 0.1),
                                             config=deepspeed_config(cfg, 1), dist_init_required=False)
    x = torch.randint(0, 320, (1, 17))
    engine.backward(engine(x[:, :-1], x[:, 1:]))
    engine.step()
    return engine, opt, sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    from dist_llm.parallel.deepspeed_elastic import save_rank_state
    from dist_llm.parallel.deepspeed_engine import _plain

    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--stage", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    engine, opt, n_params = _ds_engine(args.layers, args.width, args.stage)
    root = Path(tempfile.mkdtemp(prefix="elastic-bench-"))

    def old_form():
        path = root / "rank-00000.pt"
        torch.save({"optimizer": _plain(opt.state_dict())}, path)
        with open(path, "rb") as f:
            os.fsync(f.fileno())

    def elastic_form():
        save_rank_state(root / "elastic", opt, engine.module, 0, 1, args.stage)

    runs = []
    try:
        for _ in range(args.repeats):
            runs.append({"state_dict_pt_s": _timed(old_form), "elastic_s": _timed(elastic_form),
                         "state_dict_pt_MB": (root / "rank-00000.pt").stat().st_size / 2**20,
                         "elastic_MB": sum(p.stat().st_size for p in (root / "elastic").iterdir()) / 2**20})
    finally:
        shutil.rmtree(root, ignore_errors=True)
    rows = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    rows["params"] = n_params
    print(rows)
    write_result("elastic_save", {"args": vars(args), "rows": rows, "runs": runs})


if __name__ == "__main__":
    main()

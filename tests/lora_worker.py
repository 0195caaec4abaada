"""One rank of the LoRA-under-DeepSpeed check (run by tests/test_lora.py through spawn_local).

argv: out_dir zero_stage. Trains a tiny GPT with adapters for a few steps on fixed data (the same
global batch at any world size), then writes ``adapter-<world>`` (via the engine's gathered,
full state dict) and ``stats-<world>.json`` (optimizer state size, base/adapter numels).
"""
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402

from dist_llm.config.schema import JobConfig  # noqa: E402
from dist_llm.launch.env import read_launch_env  # noqa: E402
from dist_llm.models import GPT  # noqa: E402
from dist_llm.models.lora import LoraSpec, adapter_state_dict, apply_lora, save_adapter  # noqa: E402
from dist_llm.parallel.build import build_engine  # noqa: E402
from dist_llm.parallel.layout import init_layout, shutdown  # noqa: E402


def main() -> None:
    out, stage = Path(sys.argv[1]), int(sys.argv[2])
    cfg = JobConfig()
    m = cfg.model
    m.vocab_size, m.d_model, m.n_layers, m.n_heads, m.max_seq_len = 64, 32, 2, 4, 16
    cfg.parallel.zero_stage, cfg.parallel.device = stage, "cpu"
    cfg.train.global_batch_size, cfg.train.micro_batch_size = 8, 8
    le = read_launch_env()
    cfg.train.micro_batch_size = 8 // le.world_size
    layout = init_layout(cfg.parallel, le)
    torch.manual_seed(0)
    model = GPT(m)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    spec = LoraSpec(rank=4, alpha=8.0, target_modules=["*attn.qkv", "*mlp.fc_in"])
    apply_lora(model, spec)
    engine = build_engine(cfg, model, layout)
    g = torch.Generator().manual_seed(1)
    data = torch.randint(0, 64, (5, 8, 17), generator=g)
    per = 8 // layout.dp
    for step in range(5):
        engine.train_step([data[step, layout.dp_rank * per:(layout.dp_rank + 1) * per]], lr=1e-2)
    full = engine.model_state_dict()  # collective: gathers ZeRO-3 partitions
    opt = engine.optimizer
    flat = getattr(opt, "fp32_partitioned_groups_flat", None) or getattr(opt, "single_partition_of_fp32_groups", None)
    local = sum(t.numel() for t in flat) if flat is not None else sum(
        p.numel() for grp in opt.param_groups for p in grp["params"])
    total = torch.tensor([float(local)])
    layout.all_reduce_sum(total)
    if layout.rank == 0:
        adapter = adapter_state_dict(full, spec)
        save_adapter(out / f"adapter-{layout.world_size}", adapter, spec)
        changed = sorted(k for k in base if not torch.equal(base[k], full[k]))
        stats = {"optimizer_numel": float(total), "adapter_numel": sum(v.numel() for v in adapter.values()),
                 "model_numel": sum(v.numel() for v in base.values()), "changed_base": changed,
                 "num_adapters": len(adapter)}
        (out / f"stats-{layout.world_size}.json").write_text(json.dumps(stats))
    layout.barrier()
    shutdown()


if __name__ == "__main__":
    main()

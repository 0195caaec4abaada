"""The parallel layout: the one object that owns ranks, device and process groups.

It is built once per process after validation, passed explicitly to whoever needs it (engine,
trainer, checkpointing), and never stored in a module global.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

from dist_llm.config.schema import ParallelConfig
from dist_llm.launch.env import LaunchEnv, export_torch_env


@dataclass
class ParallelLayout:
    rank: int
    world_size: int
    local_rank: int
    dp: int
    tp: int
    pp: int
    device: torch.device
    backend: str
    dp_group: Optional[dist.ProcessGroup] = None  # None = the world group (data-parallel only)

    @property
    def dp_rank(self) -> int:
        # With tp = pp = 1 every rank is its own data-parallel replica.
        return self.rank // (self.tp * self.pp)

    @property
    def is_logging_rank(self) -> bool:
        return self.rank == 0

    # --- small collectives used by the trainer; no-ops on one process ---
    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.dp_group)
        return t

    def all_reduce_max(self, t: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t

    def broadcast_object(self, obj, src: int = 0):
        if self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]


def pick_device(cfg: ParallelConfig, local_rank: int) -> torch.device:
    want = cfg.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("parallel.device=cuda but no CUDA device is visible: use parallel.device=cpu (or auto)")
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_layout(cfg: ParallelConfig, le: LaunchEnv) -> ParallelLayout:
    """Start the process group (unless a launcher such as Ray Train already did) and describe it."""
    device = pick_device(cfg, le.local_rank)
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cpu":
        # DeepSpeed picks its accelerator at import time; it must see this first.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if not dist.is_initialized():
        export_torch_env(le)
        dist.init_process_group(backend=backend, rank=le.rank, world_size=le.world_size,
                                timeout=timedelta(seconds=cfg.timeout_s))
    world = dist.get_world_size()
    rank = dist.get_rank()
    if world != le.world_size:
        raise RuntimeError(f"process group has {world} ranks but the launcher reported {le.world_size}")
    tp, pp = cfg.tp, cfg.pp
    return ParallelLayout(rank=rank, world_size=world, local_rank=le.local_rank, dp=world // (tp * pp),
                          tp=tp, pp=pp, device=device, backend=backend)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()

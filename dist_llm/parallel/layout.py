"""The parallel layout: the one object that owns ranks, device and process groups.

It is built once per process after validation, passed explicitly to whoever needs it (engine,
trainer, checkpointing), and never stored in a module global. For the Megatron engine it also
initialises ``megatron.core.parallel_state`` (Megatron reads its groups from there) and keeps the
resulting groups; rank order is Megatron's ``tp-dp-pp``: ``rank = tp_rank + tp*(dp_rank + dp*pp_rank)``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Optional

import torch
import torch.distributed as dist

from dist_llm.config.schema import ParallelConfig
from dist_llm.launch.env import LaunchEnv, export_torch_env
from dist_llm.parallel.rendezvous import attempt_store


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
    vpp: int = 1
    sp: bool = False
    tp_group: Optional[dist.ProcessGroup] = None  # set by init_megatron()
    pp_group: Optional[dist.ProcessGroup] = None
    mp_group: Optional[dist.ProcessGroup] = None  # tensor x pipeline ("model parallel")

    @property
    def dp_rank(self) -> int:
        # Megatron's order tp-dp-pp; with tp = pp = 1 every rank is its own data-parallel replica.
        return (self.rank // self.tp) % self.dp

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def pp_rank(self) -> int:
        return self.rank // (self.tp * self.dp)

    def init_megatron(self):
        """Initialise ``megatron.core.parallel_state`` from this layout; returns that module."""
        from dist_llm.parallel.megatron import import_parallel_state

        ps = import_parallel_state()
        if not ps.model_parallel_is_initialized():
            ps.initialize_model_parallel(tensor_model_parallel_size=self.tp, pipeline_model_parallel_size=self.pp,
                                         virtual_pipeline_model_parallel_size=self.vpp if self.vpp > 1 else None,
                                         order="tp-cp-ep-dp-pp")
        got = (ps.get_tensor_model_parallel_rank(), ps.get_data_parallel_rank(), ps.get_pipeline_model_parallel_rank())
        if got != (self.tp_rank, self.dp_rank, self.pp_rank) or ps.get_data_parallel_world_size() != self.dp:
            raise RuntimeError(f"megatron parallel_state disagrees with the layout: (tp, dp, pp) ranks {got}, "
                               f"expected {(self.tp_rank, self.dp_rank, self.pp_rank)}")
        self.tp_group = ps.get_tensor_model_parallel_group()
        self.pp_group = ps.get_pipeline_model_parallel_group()
        self.dp_group = ps.get_data_parallel_group()
        self.mp_group = ps.get_model_parallel_group()
        return ps

    def mpu(self) -> "DeepSpeedMPU":
        return DeepSpeedMPU(self)

    @property
    def is_logging_rank(self) -> bool:
        return self.rank == 0

    # --- every collective our code issues goes through these (no-ops on one process) ---
    # NCCL only moves tensors on the rank's GPU, gloo only CPU tensors: a tensor built with a bare
    # torch.tensor(...) works on the CPU mock cluster and fails at the first step on GPUs. Helpers
    # that build their own tensor put it on self.device; helpers that take one refuse another
    # device with an error naming it (tests/test_collective_devices.py records every call).
    def check_device(self, t: torch.Tensor, what: str) -> torch.Tensor:
        if t.device != self.device:
            raise CollectiveDeviceError(
                f"{what}: tensor on {t.device} but this rank's collectives run on {self.device} "
                f"(backend {self.backend}); create it with device=layout.device")
        return t

    def barrier(self) -> None:
        if self.world_size > 1:
            if self.device.type == "cuda":  # NCCL: the rank's own GPU, not a guess from the rank
                dist.barrier(device_ids=[self.device.index])
            else:
                dist.barrier()

    def all_reduce(self, t: torch.Tensor, op=dist.ReduceOp.SUM, group=None) -> torch.Tensor:
        """In place over ``group`` (None = the world)."""
        if self.world_size > 1:
            dist.all_reduce(self.check_device(t, "all_reduce"), op=op, group=group)
        return t

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        return self.all_reduce(t, dist.ReduceOp.SUM, self.dp_group)

    def all_reduce_sum_later(self, t: torch.Tensor) -> Callable[[], torch.Tensor]:
        """:meth:`all_reduce_sum` (over the data-parallel group) without waiting."""
        return self.all_reduce_later(t, dist.ReduceOp.SUM, self.dp_group)

    def all_reduce_world_sum(self, t: torch.Tensor) -> torch.Tensor:
        return self.all_reduce(t, dist.ReduceOp.SUM)

    def all_reduce_max(self, t: torch.Tensor) -> torch.Tensor:
        return self.all_reduce(t, dist.ReduceOp.MAX)

    def all_reduce_scalar(self, value: float, op=dist.ReduceOp.SUM, group=None) -> float:
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        return float(self.all_reduce(t, op, group).item())

    def agree(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any rank (one tiny all-reduce), so all
        ranks take the same branch and none waits in a collective the others skipped."""
        if self.world_size == 1:
            return bool(flag)
        return self.all_reduce_scalar(1.0 if flag else 0.0, dist.ReduceOp.MAX) > 0

    def all_reduce_later(self, t: torch.Tensor, op=dist.ReduceOp.SUM, group=None) -> Callable[[], torch.Tensor]:
        """:meth:`all_reduce` without waiting: issued now, it runs while the caller works; the
        returned function waits for it and gives ``t`` reduced (call it exactly once, on every
        rank, before the process group is torn down)."""
        if self.world_size == 1:
            return lambda: t
        work = dist.all_reduce(self.check_device(t, "all_reduce"), op=op, group=group, async_op=True)

        def wait() -> torch.Tensor:
            work.wait()
            return t

        return wait

    def agree_later(self, flag: bool) -> Callable[[], bool]:
        """:meth:`agree` without waiting (see :meth:`all_reduce_later`)."""
        t = torch.tensor([1.0 if flag else 0.0], dtype=torch.float64, device=self.device)
        reduced = self.all_reduce_later(t, dist.ReduceOp.MAX)
        return lambda: float(reduced().item()) > 0

    def all_gather(self, parts: list, t: torch.Tensor, group=None) -> list:
        if self.world_size > 1:
            for p in parts:
                self.check_device(p, "all_gather output")
            dist.all_gather(parts, self.check_device(t, "all_gather"), group=group)
        else:
            parts[0].copy_(t)
        return parts

    def broadcast(self, t: torch.Tensor, src: int, group=None) -> torch.Tensor:
        if self.world_size > 1:
            dist.broadcast(self.check_device(t, "broadcast"), src=src, group=group)
        return t

    def all_gather_object(self, obj, group=None) -> list:
        """One entry per rank of ``group``; objects are pickled through a tensor on the device
        torch picks for the backend (``torch.cuda.current_device()``, set by pick_device)."""
        if self.world_size == 1:
            return [obj]
        out = [None] * dist.get_world_size(group)
        dist.all_gather_object(out, obj, group=group)
        return out


class CollectiveDeviceError(RuntimeError):
    """A tensor handed to a collective lives on another device than the rank's collectives."""


class DeepSpeedMPU:
    """DeepSpeed's ``mpu`` interface over the layout's Megatron groups (pp = 1: the "model
    parallel" group DeepSpeed knows is the tensor-parallel group). DeepSpeed uses it to shard ZeRO
    state over the data-parallel group only and to count each tensor-parallel slice once in the
    global gradient norm."""

    def __init__(self, layout: ParallelLayout):
        self.layout = layout

    def get_model_parallel_group(self):
        return self.layout.mp_group

    def get_model_parallel_rank(self) -> int:
        return dist.get_rank(self.layout.mp_group)

    def get_model_parallel_world_size(self) -> int:
        return self.layout.tp * self.layout.pp

    def get_tensor_model_parallel_group(self):
        return self.layout.tp_group

    def get_tensor_model_parallel_rank(self) -> int:
        return self.layout.tp_rank

    def get_tensor_model_parallel_world_size(self) -> int:
        return self.layout.tp

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self.layout.rank - self.layout.tp_rank

    def get_data_parallel_group(self):
        return self.layout.dp_group

    def get_data_parallel_rank(self) -> int:
        return self.layout.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.layout.dp


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
    if backend == "nccl" and le.local_world_size > torch.cuda.device_count():
        # NCCL refuses two ranks on one GPU. The mock cluster on a single GPU needs gloo, which
        # DeepSpeed's collectives support only in part: say so instead of failing inside NCCL.
        raise RuntimeError(
            f"{le.local_world_size} ranks on this node but {torch.cuda.device_count()} GPU(s): NCCL needs one GPU "
            f"per rank. Use launcher.nproc <= {torch.cuda.device_count()}, or parallel.device=cpu for a CPU mock "
            f"cluster, or parallel.backend=gloo to try sharing the GPU (unverified)")
    if device.type == "cpu":
        # DeepSpeed picks its accelerator at import time; it must see this first.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if not dist.is_initialized():
        export_torch_env(le)
        # Start-up (first compile, checkpoint load) gets the long allowance; the watchdog drops it to
        # parallel.timeout_s after the first step (set_collective_timeout).
        timeout = timedelta(seconds=max(cfg.timeout_s, cfg.first_step_timeout_s))
        # Under torchrun: a namespace of this attempt in the agent's store, else a restarted
        # attempt reads the dead attempt's keys (see parallel/rendezvous.py).
        dist.init_process_group(backend=backend, rank=le.rank, world_size=le.world_size, timeout=timeout,
                                store=attempt_store(le, timeout))
    world = dist.get_world_size()
    rank = dist.get_rank()
    if world != le.world_size:
        raise RuntimeError(f"process group has {world} ranks but the launcher reported {le.world_size}")
    tp, pp = cfg.tp, cfg.pp
    layout = ParallelLayout(rank=rank, world_size=world, local_rank=le.local_rank, dp=world // (tp * pp),
                            tp=tp, pp=pp, device=device, backend=backend, vpp=cfg.vpp, sp=cfg.sp)
    if cfg.engine == "megatron":
        layout.init_megatron()
    return layout


def shutdown() -> None:
    import sys

    if "megatron.core.parallel_state" in sys.modules:
        sys.modules["megatron.core.parallel_state"].destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def set_collective_timeout(seconds: float) -> None:
    """Change the default group's collective timeout (after the first step: start-up is done, so a
    peer that does not answer within ``parallel.timeout_s`` is dead or hung). Gloo honours it per
    operation; NCCL through its watchdog."""
    from torch.distributed.distributed_c10d import _set_pg_timeout

    if dist.is_initialized():
        _set_pg_timeout(timedelta(seconds=seconds))

"""Predicted step time of a layout: FLOPs at an assumed MFU plus communication volume over
bandwidths, with no overlap assumed (a conservative ranking, docs/planner.md).
"""
from __future__ import annotations

from dataclasses import dataclass

from dist_llm.config.plan import grad_accum_steps
from dist_llm.planner.memory import BYTES, Layout
from dist_llm.planner.params import count_params, resolved


@dataclass
class Hardware:
    gpus_per_node: int = 8
    nodes: int = 1
    gpu_mem_bytes: float = 80e9
    peak_flops: float = 989e12  # per device, dense bf16 (H100 SXM)
    mfu: float = 0.40  # fraction of the peak the matmuls reach
    intra_bw: float = 150e9  # bytes/s per GPU inside a node (NVLink, algorithm bandwidth)
    inter_bw: float = 25e9  # bytes/s per GPU across nodes (e.g. 200 Gb/s InfiniBand)
    host_bw: float = 20e9  # bytes/s GPU <-> host (PCIe) for offload
    host_adam_params_per_s: float = 1e9  # CPU Adam throughput per rank for offloaded optimizer
    # Fixed cost of one micro-batch through one pipeline stage (kernel launches, small-matmul
    # inefficiency): what makes bigger micro-batches faster at equal FLOPs.
    micro_batch_overhead_s: float = 0.005

    @property
    def world(self) -> int:
        return self.gpus_per_node * self.nodes


def train_flops_per_token(model_cfg, seq_len: int) -> float:
    """6N + 12*L*h*s + 6*h*V (the formula of dist_llm.models.flops, without importing torch)."""
    m = resolved(model_cfg)
    head_dim = m.d_model // m.n_heads
    matmul = 2 * m.d_model ** 2 + 2 * m.d_model * m.n_kv_heads * head_dim
    matmul += (3 if m.preset == "llama" else 2) * m.d_model * m.d_ff
    return float(6 * m.n_layers * matmul + 12 * m.n_layers * m.d_model * seq_len + 6 * m.d_model * m.vocab_size)


def _group_bw(hw: Hardware, span: int) -> float:
    """A group of ``span`` consecutive ranks stays inside a node when it fits in one."""
    return hw.intra_bw if span <= hw.gpus_per_node else hw.inter_bw


def step_time(model_cfg, seq_len: int, global_batch: int, layout: Layout, hw: Hardware,
              precision: str = "bf16") -> dict:
    """Seconds per optimizer step, split into compute, bubble and communication."""
    m = resolved(model_cfg)
    mp = count_params(m)
    b = BYTES[precision]
    tokens = global_batch * seq_len
    flops = train_flops_per_token(m, seq_len) * tokens
    if layout.activation_checkpointing:  # the forward runs twice: 8/6 of the matmul work
        flops *= 8 / 6
    compute = flops / (layout.world * hw.peak_flops * hw.mfu)
    n_micro = max(1, grad_accum_steps(global_batch, layout.micro_batch_size, layout.dp))
    bubble = compute * (layout.pp - 1) / (layout.vpp * n_micro) if layout.pp > 1 else 0.0
    # rank order tp-dp-pp: tp innermost, then dp
    n_rank = mp.total / (layout.tp * layout.pp)
    dp_bw = _group_bw(hw, layout.tp * layout.dp)
    grad_bytes = n_rank * b
    dp_comm = 0.0
    if layout.dp > 1:
        ring = (layout.dp - 1) / layout.dp
        volume = 2 * ring * grad_bytes  # all-reduce = reduce-scatter + all-gather
        if layout.zero_stage == 3:
            volume = 3 * ring * grad_bytes  # params gathered in forward and backward, grads reduce-scattered
        dp_comm = volume / dp_bw
    tp_comm = 0.0
    if layout.tp > 1:
        per_mb = 4 * seq_len * layout.micro_batch_size * m.d_model * b  # 2 all-reduces fwd + 2 bwd per layer
        if layout.activation_checkpointing:
            per_mb *= 1.5
        tp_comm = (2 * (layout.tp - 1) / layout.tp) * per_mb * (m.n_layers / layout.pp) * n_micro / _group_bw(hw, layout.tp)
    pp_comm = 0.0
    if layout.pp > 1:
        act = seq_len * layout.micro_batch_size * m.d_model * b / (layout.tp if layout.sp else 1)
        pp_comm = 2 * act * n_micro * layout.vpp / _group_bw(hw, layout.world)
    offload = 0.0
    if layout.offload_optimizer:
        shard = n_rank / (layout.dp if layout.zero_stage >= 1 else 1)
        offload += 2 * shard * b / hw.host_bw + shard / hw.host_adam_params_per_s
    if layout.offload_params:
        offload += 2 * n_rank * b / hw.host_bw
    overhead = hw.micro_batch_overhead_s * n_micro * layout.vpp
    total = overhead + compute + bubble + dp_comm + tp_comm + pp_comm + offload
    return {"total": total, "compute": compute, "bubble": bubble, "dp_comm": dp_comm, "tp_comm": tp_comm,
            "pp_comm": pp_comm, "offload": offload, "micro_batch_overhead": overhead, "flops": flops}

"""Peak memory per rank of one training layout: pure arithmetic over the typed configs.

The formulas are the standard ones (docs/planner.md gives the derivations and sources):

* parameters counted exactly from the model config (the same shapes ``dist_llm.models.gpt``
  builds), split over tensor-parallel ranks (column/row-parallel matmuls and the vocab-parallel
  embedding; norms and row-parallel biases replicated) and over pipeline stages (the token
  embedding on the first stage, the final norm and LM head on the last; a tied head is a second
  copy on the last stage when pp > 1, as in Megatron);
* ZeRO (Rajbhandari et al. 2020): per parameter 4 + 4 + 8 bytes in fp32 (weights, gradients,
  Adam moments), 2 + 2 + 12 in mixed precision (the fp32 master joins the optimizer states);
  stage 1 shards the optimizer states over dp, stage 2 also the gradients, stage 3 also the
  weights; CPU offload moves the optimizer states (and stage-3 weights) to the host;
* activations (Korthikanti et al. 2022, "Reducing Activation Recomputation"): the tensors
  autograd keeps per layer, counted from our blocks (16 s*b*h elements for a GPT-2 block without
  dropout = the paper's 34 bytes less its two dropout-mask bytes); the a*s^2*b scores only when
  attention scores are materialised (SDPA / flash attention keeps none); divided by tp where the
  tensors are tensor-parallel (all of them with sequence parallelism); 1 s*b*h per layer with
  full activation checkpointing plus one layer recomputed; under 1F1B the first stage keeps
  ``min(pp, micro-batches)`` micro-batches in flight (times 1 + (pp-1)/(pp*vpp) interleaved);
* logits in fp32 for the loss: the saved log-softmax and its gradient, s*b*V*4 bytes each;
* communication buffers: DeepSpeed's gradient/all-gather buckets (``parallel.zero.*``,
  DeepSpeed's defaults unless set) or Megatron DDP's fp32 gradient buffer;
* the allocator's overhead as a fraction of the rest (caching allocator fragmentation on GPU).

On the CPU mock cluster there is no caching allocator and DeepSpeed keeps extra fp32 copies;
:data:`CPU_CONSTANTS` holds those terms (bench/planner_check.py measures them).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Dict, Optional

from dist_llm.config.plan import grad_accum_steps
from dist_llm.planner.params import ModelParams, count_params, resolved

# DeepSpeed ZeRO defaults, which parallel.zero.* keeps unless set: elements, not bytes.
DS_REDUCE_BUCKET = 500_000_000
DS_ALLGATHER_BUCKET = 500_000_000
DS_STAGE3_PREFETCH_BUCKET = 50_000_000
DS_STAGE3_MAX_LIVE_PARAMS = 1_000_000_000

BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass
class Layout:
    """One candidate layout (the fields of ``parallel.*`` plus checkpointing and micro-batch)."""

    dp: int = 1
    tp: int = 1
    pp: int = 1
    vpp: int = 1
    sp: bool = False
    zero_stage: int = 0
    offload_optimizer: bool = False
    offload_params: bool = False
    activation_checkpointing: bool = False
    micro_batch_size: int = 1
    # DeepSpeed's buffers (parallel.zero.*), elements
    reduce_bucket: int = DS_REDUCE_BUCKET
    allgather_bucket: int = DS_ALLGATHER_BUCKET
    prefetch_bucket: int = DS_STAGE3_PREFETCH_BUCKET
    max_live_params: int = DS_STAGE3_MAX_LIVE_PARAMS

    @property
    def engine(self) -> str:
        return "deepspeed" if self.tp == 1 and self.pp == 1 else "megatron"

    @property
    def world(self) -> int:
        return self.dp * self.tp * self.pp


@dataclass
class MemoryModel:
    """Constants of the memory model that depend on the machine, not on the layout."""

    device: str = "cuda"  # cuda | cpu
    precision: str = "bf16"  # fp32 | bf16 | fp16
    allocator_overhead: float = 0.10  # fraction added on top (fragmentation of the caching allocator)
    flash_attention: bool = True  # SDPA keeps no s x s score matrix
    dropout: bool = False  # dropout masks add 1 byte per element where applied


@dataclass
class MemoryEstimate:
    """Peak bytes on the busiest rank, per component (``host`` is offloaded, not on the device)."""

    params: float = 0.0
    grads: float = 0.0
    optimizer: float = 0.0
    activations: float = 0.0
    logits: float = 0.0
    comm_buffers: float = 0.0
    overhead: float = 0.0
    host: float = 0.0
    stage: str = "first"  # which pipeline stage is the busiest

    @property
    def device_total(self) -> float:
        return (self.params + self.grads + self.optimizer + self.activations + self.logits
                + self.comm_buffers + self.overhead)

    def as_dict(self) -> Dict[str, float]:
        out = {k: v for k, v in dataclasses.asdict(self).items() if k != "stage"}
        out["device_total"] = self.device_total
        return out


def stage_params(mp: ModelParams, tp: int, pp: int, first: bool, last: bool) -> float:
    """Parameters held by one rank of a (first and/or last) pipeline stage."""
    layers = mp.n_layers / pp
    n = layers * (mp.layer_sharded / tp + mp.layer_replicated)
    if first:
        n += mp.tok_emb / tp + mp.pos_emb
    if last:
        n += mp.final_norm
        if mp.lm_head or (pp > 1 and mp.tied):  # pp>1 keeps a tied head's copy on the last stage
            n += mp.tok_emb / tp
    return n


def activation_elements_per_layer(model_cfg, tp: int, sp: bool) -> float:
    """Elements (in units of s*b*h) one block keeps for backward, no dropout, flash attention.

    Counted from what autograd saves in our blocks (tests/test_planner.py checks it with saved-
    tensor hooks): each norm its input (LayerNorm; RMSNorm also its normalised output) and the
    next matmul's input; the fused qkv output 1 + 2*kv/h (SDPA keeps q, k, v views of it); with
    RoPE the rotated q and k (1 + kv/h); the SDPA output (= the proj input); the MLP hidden:
    GELU input and output 2*f/h, SwiGLU gate, silu(gate), up and their product 4*f/h. A GPT-2
    block: 16 elements = 32 bytes at 2 bytes, the paper's 34 less its two dropout-mask bytes.
    """
    m = resolved(model_cfg)
    h = m.d_model
    norm = 2.0 if m.preset == "llama" else 1.0
    kv = m.n_kv_heads * (h // m.n_heads) / h
    hidden = (4.0 if m.preset == "llama" else 2.0) * m.d_ff / h
    rope = (1 + kv) if m.preset == "llama" else 0.0
    replicated = 2 * norm + 2  # norm tensors, qkv and MLP inputs: whole on every tp rank without sp
    sharded = (1 + 2 * kv) + rope + 1 + hidden
    if sp:
        return (replicated + sharded) / tp
    return replicated + sharded / tp


def activation_bytes(model_cfg, seq: int, layout: Layout, mm: MemoryModel, n_micro: int,
                     last_stage: bool = True) -> float:
    """Activations of one stage at its peak: the first stage of 1F1B holds the most micro-batches."""
    m = resolved(model_cfg)
    act = BYTES[mm.precision]
    sbh = seq * layout.micro_batch_size * m.d_model
    split = layout.tp if layout.sp else 1
    per_layer = activation_elements_per_layer(m, layout.tp, layout.sp) * sbh * act
    if not mm.flash_attention:
        # softmax output (+ its dropout mask and output with dropout): the paper's 5*a*s^2*b bytes
        per_layer += m.n_heads * seq * seq * layout.micro_batch_size * act * (2.5 if mm.dropout else 1.0) / layout.tp
    if mm.dropout:
        per_layer += 2 * sbh / split
    layers = m.n_layers / layout.pp
    # In backward the gradients of one layer's activations coexist with what is still saved
    # (about one layer's worth); with checkpointing that layer's activations are recomputed first.
    if layout.activation_checkpointing:
        one_stage = layers * sbh * act / split  # the block inputs
        recompute = 2 * per_layer
    else:
        one_stage = layers * per_layer
        recompute = per_layer
    if last_stage:  # final norm's tensors and the LM head's input
        one_stage += ((2.0 if m.preset == "llama" else 1.0) + 1) * sbh * act / split
    return in_flight(layout, n_micro) * one_stage + recompute


def in_flight(layout: Layout, n_micro: int) -> float:
    """Micro-batches whose activations the first stage holds at once (1 without pipelining)."""
    if layout.pp == 1:
        return 1.0
    if layout.vpp > 1:
        return min(layout.pp * (1 + (layout.pp - 1) / (layout.pp * layout.vpp)), n_micro)
    return float(min(layout.pp, n_micro))


def logits_bytes(model_cfg, seq: int, layout: Layout) -> float:
    """fp32 log-softmax saved for the loss plus its gradient in backward (vocab-parallel over tp)."""
    m = resolved(model_cfg)
    return 2 * seq * layout.micro_batch_size * m.vocab_size * 4 / layout.tp


@dataclass
class CpuConstants:
    """Extra copies the CPU mock cluster holds (bench/planner_check.py measures them).

    DeepSpeed's ZeRO-1/2 optimizer keeps an fp32 master partition even for an fp32 model and
    reduces gradients through flat buckets; the Megatron engine keeps the plain model it was
    built from. Values are bytes per parameter.
    """

    ds_master_copy: float = 4.0  # ZeRO-1/2 fp32 partition beside the fp32 model weights
    stage0_flat_grads: float = 4.0  # stage-0 all-reduce flattens the gradients into one bucket
    megatron_plain_model: float = 4.0  # the full plain model kept by the Megatron engine (per full param)
    activation_factor: float = 1.0
    # Not derived: fitted on bench/planner_check.py's measurements (2 ranks, seq 256, micro-batch
    # 4), bytes per full-model parameter (+ attention-score copies for Megatron); ZeRO-3 fitted
    # on the 20M model and checked on 50M, Megatron fitted on 20M and 50M and checked on 35M
    # (docs/planner.md). ZeRO-3 on CPU keeps every gathered
    # parameter (reuse distance below the 1e9 default), the full-size gradients of backward and
    # its flat gather buffers; the Megatron engine's start-up (the converted full state dict,
    # Megatron's full-size CPU init of each weight, DeepSpeed's flattening copy) sets the heap's
    # high-water mark, which glibc does not give back for tensors under its 32 MiB mmap threshold.
    zero3_extra: float = 14.9
    megatron_tp_extra: float = 6.04
    megatron_pp_extra: float = 0.58
    # Megatron's local (non-Transformer-Engine) attention on CPU materialises the a*s^2*b
    # scores: copies of that kept per layer in flight (fp32).
    megatron_tp_scores: float = 9.73
    megatron_pp_scores: float = 4.22


CPU_CONSTANTS = CpuConstants()


def _weights_grads_optimizer(n: float, layout: Layout, mm: MemoryModel):
    """(weights, grads, optimizer, host) bytes for ``n`` parameters on this rank under ZeRO."""
    mixed = mm.precision != "fp32"
    w_b, g_b, o_b = (2, 2, 12) if mixed else (4, 4, 8)
    if layout.engine == "megatron" and layout.pp > 1:
        g_b = 4  # Megatron DDP's grad buffer (grad_reduce_in_fp32)
    dp, z = layout.dp, layout.zero_stage
    weights = n * w_b / (dp if z >= 3 else 1)
    grads = n * g_b / (dp if z >= 2 else 1)
    optim = n * o_b / (dp if z >= 1 else 1)
    host = 0.0
    if layout.offload_optimizer:
        host += optim
        optim = 0.0
        if z >= 2:  # ZeRO-Offload keeps the fp32 gradient partition on the host too
            host += grads
            grads = 0.0
    if layout.offload_params and z == 3:
        host += weights
        weights = 0.0
    return weights, grads, optim, host


def _comm_buffers(n_rank: float, mp: ModelParams, layout: Layout, mm: MemoryModel) -> float:
    b = BYTES[mm.precision]
    z = layout.zero_stage
    if layout.engine == "megatron" and layout.pp > 1:
        return 0.0  # Megatron DDP reduces in place in its grad buffer (counted as grads)
    if layout.dp == 1 and z == 0:
        return 0.0
    if z == 0:  # DeepSpeed's stage-0 all-reduce buffer is fixed at 5e8 elements
        return min(n_rank, DS_REDUCE_BUCKET) * b
    if z in (1, 2):
        return min(n_rank, layout.reduce_bucket) * b + min(n_rank, layout.allgather_bucket) * b / layout.dp
    # stage 3: the gathered working set: the layer being computed plus the prefetch bucket
    layer = mp.layer_sharded + mp.layer_replicated
    live = min(layer + layout.prefetch_bucket, max(layer, layout.max_live_params), mp.total)
    return live * b + min(n_rank * layout.dp, layout.reduce_bucket) * b / layout.dp


def estimate_layout(model_cfg, seq_len: int, global_batch: int, layout: Layout,
                    mm: Optional[MemoryModel] = None) -> MemoryEstimate:
    """Peak memory of the busiest rank of ``layout`` (max over the first and last stage)."""
    mm = mm or MemoryModel()
    mp = count_params(model_cfg)
    n_micro = max(1, grad_accum_steps(global_batch, layout.micro_batch_size, layout.dp))
    best: Optional[MemoryEstimate] = None
    for stage in ("first", "last") if layout.pp > 1 else ("only",):
        first, last = stage in ("first", "only"), stage in ("last", "only")
        n = stage_params(mp, layout.tp, layout.pp, first, last)
        w, g, o, host = _weights_grads_optimizer(n, layout, mm)
        est = MemoryEstimate(params=w, grads=g, optimizer=o, host=host, stage=stage)
        act = activation_bytes(model_cfg, seq_len, layout, mm, n_micro, last_stage=last)
        if not first:  # the last stage holds one micro-batch in flight under 1F1B
            act = act / in_flight(layout, n_micro)
        est.activations = act
        est.logits = logits_bytes(model_cfg, seq_len, layout) if last else 0.0
        est.comm_buffers = _comm_buffers(n, mp, layout, mm)
        if mm.device == "cpu":
            m = resolved(model_cfg)
            layers_held = mp.n_layers / layout.pp * (in_flight(layout, n_micro) if first else 1)
            scores = layers_held * m.n_heads / layout.tp * seq_len ** 2 * layout.micro_batch_size * 4
            _apply_cpu_terms(est, n, mp, layout, scores)
        est.overhead = mm.allocator_overhead * est.device_total
        if best is None or est.device_total > best.device_total:
            best = est
    assert best is not None
    return best


def _apply_cpu_terms(est: MemoryEstimate, n: float, mp: ModelParams, layout: Layout,
                     scores_bytes: float = 0.0) -> None:
    """The CPU mock cluster's extra copies (see :class:`CpuConstants`); fp32 only."""
    c = CPU_CONSTANTS
    est.activations *= c.activation_factor
    if layout.engine == "megatron":
        est.params += mp.total * c.megatron_plain_model
    if layout.pp == 1 and layout.zero_stage in (1, 2):
        est.optimizer += n * c.ds_master_copy / layout.dp
    if layout.pp == 1 and layout.zero_stage == 0:
        est.comm_buffers = n * c.stage0_flat_grads if layout.dp > 1 else 0.0
    if layout.engine == "deepspeed" and layout.zero_stage == 3:
        est.comm_buffers += mp.total * c.zero3_extra
    if layout.engine == "megatron":
        per_param, copies = ((c.megatron_tp_extra, c.megatron_tp_scores) if layout.pp == 1
                             else (c.megatron_pp_extra, c.megatron_pp_scores))
        est.comm_buffers += mp.total * per_param
        est.activations += copies * scores_bytes


def layout_from_job(job_config, world_size: int) -> Layout:
    par, tr = job_config.parallel, job_config.train
    tp, pp = max(1, par.tp), max(1, par.pp)
    return Layout(dp=max(1, world_size // (tp * pp)), tp=tp, pp=pp, vpp=max(1, par.vpp), sp=bool(par.sp),
                  zero_stage=par.zero_stage, offload_optimizer=par.offload_optimizer,
                  offload_params=par.offload_params,
                  activation_checkpointing=bool(job_config.model.activation_checkpointing),
                  micro_batch_size=tr.micro_batch_size, reduce_bucket=par.zero.reduce_bucket_size,
                  allgather_bucket=par.zero.allgather_bucket_size, prefetch_bucket=par.zero.prefetch_bucket_size,
                  max_live_params=par.zero.max_live_parameters)


def memory_model_for(job_config, device: Optional[str] = None) -> MemoryModel:
    par = job_config.parallel
    dev = device or (par.device if par.device != "auto" else _auto_device())
    mm = MemoryModel(device=dev, precision=par.precision, dropout=job_config.model.dropout > 0)
    if dev == "cpu":
        mm.allocator_overhead = 0.0
    return mm


def _auto_device() -> str:
    import importlib.util

    # Decided without importing torch: a CUDA build of torch ships the nvidia libraries.
    return "cuda" if importlib.util.find_spec("nvidia") is not None else "cpu"


def estimate_peak_memory(job_config, world_size: int, device: Optional[str] = None) -> MemoryEstimate:
    """The peak memory per rank ``job_config`` will need at ``world_size`` ranks (validate/doctor)."""
    layout = layout_from_job(job_config, world_size)
    return estimate_layout(job_config.model, job_config.train.seq_len, job_config.train.global_batch_size,
                           layout, memory_model_for(job_config, device))


__all__ = ["Layout", "MemoryModel", "MemoryEstimate", "CpuConstants", "CPU_CONSTANTS",
           "estimate_layout", "estimate_peak_memory", "layout_from_job", "stage_params"]

"""Resharding checkpoints of the Megatron engine through ``megatron.core.dist_checkpointing``.

Weights are Megatron's own sharded state dict (global keys, each TP/PP slice with its offsets),
so a checkpoint saved at one (tp, pp, vpp, dp) loads at any other. Optimizer moments are saved
per parameter with exactly the sharding of that parameter (same offsets, key prefixed by
``optimizer.<moment>.``), which is what makes them reshard too; both optimizer paths produce
that form:

* DeepSpeed ZeRO (pp = 1): ``safe_get_full_optimizer_state`` assembles a parameter's moments
  from the DP partitions (every DP rank gets them; DP rank 0 is the main replica that writes);
* :class:`~dist_llm.parallel.megatron.optimizer.DPShardedAdamW` (pp > 1): each parameter's
  owner writes its moments as the main replica; the other DP ranks hold none.

The AdamW step count (the same for every parameter) goes to ``engine.json``, written by rank 0.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

MOMENTS = ("exp_avg", "exp_avg_sq")
FORMAT = "dist-llm-megatron/1"


def _model_sharded(engine) -> Dict[str, dict]:
    return {f"chunk{i}": c.sharded_state_dict() for i, c in enumerate(engine.chunks)}


def _by_param(msd: dict) -> Dict[int, object]:
    """id(parameter) -> its ShardedTensor, or ShardedTensorFactory (SwiGLU's fc1 is saved as two
    tensors, gate and up, so that it reshards over TP); sharded state dicts hold the Parameters."""
    from megatron.core.dist_checkpointing import ShardedTensor
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    return {id(v.data): v for v in nested_values(msd) if isinstance(v, (ShardedTensor, ShardedTensorFactory))}


def _zero_inner(engine):
    """DeepSpeed ZeRO-1/2's torch optimizer over the flat fp32 partitions, else None."""
    return engine.optimizer.optimizer if hasattr(engine.optimizer, "single_partition_of_fp32_groups") else None


def _link_zero_state(engine, step: Optional[int]) -> None:
    """Make every ZeRO-1/2 flat partition have AdamW state (torch creates it at the first step;
    zeros with step 0 are what it would create) and link each parameter's fragment to it.

    DeepSpeed 0.19 links fragments once, right after the *first param group's* first step, so
    the second group (no weight decay) is linked to an empty state; relinking here fixes that.
    """
    ds_opt, zero = engine.optimizer, _zero_inner(engine)
    for flat in ds_opt.single_partition_of_fp32_groups:
        st = zero.state[flat]
        st.setdefault("step", torch.tensor(0.0))
        if step is not None:
            st["step"] = torch.tensor(float(step))
        for k in MOMENTS:
            st.setdefault(k, torch.zeros_like(flat))
    ds_opt._hp_optimizer_states_linked = False
    ds_opt._lazy_init_hp_params_optimizer_state()


def _optimizer_step(engine) -> int:
    if engine.ds is None:
        return engine.optimizer.step_count
    inner = _zero_inner(engine) or engine.optimizer
    for st in inner.state.values():
        if "step" in st:
            return int(st["step"])
    return 0


def _moments(engine) -> Dict[str, Tuple[torch.nn.Parameter, Dict[str, torch.Tensor], bool]]:
    """name -> (param, {moment: tensor}, owned-by-this-DP-rank-alone). Collective under ZeRO."""
    out = {}
    local = engine._local()
    if engine.ds is None:
        for name, mom in engine.optimizer.moments().items():
            out[name] = (local[name], mom, engine.optimizer.shard_dp > 1)
        return out
    from deepspeed.utils import safe_get_full_optimizer_state

    zero = _zero_inner(engine)
    if zero is not None:
        _link_zero_state(engine, step=None)
    for name, p in local.items():
        if zero is not None:
            got = {k: safe_get_full_optimizer_state(p, k) for k in MOMENTS}
        else:
            st = engine.optimizer.state.get(p, {})
            got = {k: st.get(k, torch.zeros_like(p)) for k in MOMENTS}
        out[name] = (p, {k: v.detach().float().reshape(p.shape) for k, v in got.items()}, False)
    return out


def _optimizer_sharded(engine, moments, msd) -> Dict[str, object]:
    by_param = _by_param(msd)
    osd = {}
    for name, (p, mom, owned) in moments.items():
        sh = by_param[id(p)]
        rid = sh.replica_id
        if owned:  # this DP rank alone has the moments: it is the main replica along DP
            rid = (*rid[:-1], 0) if isinstance(rid, tuple) else 0
        for k, t in mom.items():
            extra = {"dtype": t.dtype} if hasattr(sh, "dtype") else {}  # factories have no dtype field
            osd[f"{k}.{name}"] = dataclasses.replace(sh, key=f"optimizer.{k}.{sh.key}", data=t, replica_id=rid,
                                                     **extra)
    return osd


def save_sharded(engine, directory) -> None:
    from megatron.core import dist_checkpointing

    d = Path(directory)
    if engine.layout.rank == 0:
        d.mkdir(parents=True, exist_ok=True)
    engine.layout.barrier()
    msd = _model_sharded(engine)
    osd = _optimizer_sharded(engine, _moments(engine), msd)
    dist_checkpointing.save({"model": msd, "optimizer": osd}, str(d))
    if engine.layout.rank == 0:
        lay = engine.layout
        meta = {"format": FORMAT, "optimizer_step": _optimizer_step(engine), "tp": lay.tp, "pp": lay.pp,
                "vpp": lay.vpp, "dp": lay.dp, "zero_stage": engine.cfg.parallel.zero_stage}
        (d / "engine.json").write_text(json.dumps(meta, indent=1))
    engine.layout.barrier()


def read_meta(directory) -> Optional[dict]:
    p = Path(directory) / "engine.json"
    return json.loads(p.read_text()) if p.is_file() else None


@torch.no_grad()
def load_sharded(engine, directory) -> None:
    from megatron.core import dist_checkpointing

    meta = read_meta(directory)
    if meta is None or meta.get("format") != FORMAT:
        raise RuntimeError(f"{directory} is not a {FORMAT} checkpoint (engine.json missing or of another format)")
    step = int(meta["optimizer_step"])
    msd = _model_sharded(engine)
    local = engine._local()
    if engine.ds is None:  # destination buffers: the owned parameters' shapes
        moments = {n: (local[n], {k: torch.zeros_like(local[n]) for k in MOMENTS}, engine.optimizer.shard_dp > 1)
                   for n in engine.optimizer.moments()}
    else:
        moments = {n: (p, {k: torch.zeros_like(p, dtype=torch.float32) for k in MOMENTS}, False)
                   for n, p in local.items()}
    osd = _optimizer_sharded(engine, moments, msd)
    loaded = dist_checkpointing.load({"model": msd, "optimizer": osd}, str(directory))
    for i, c in enumerate(engine.chunks):
        c.load_state_dict(loaded["model"][f"chunk{i}"])
    got = {n: {k: loaded["optimizer"][f"{k}.{n}"] for k in MOMENTS} for n in moments}
    if engine.ds is None:
        engine.optimizer.set_moments(got, step)
        return
    _load_deepspeed_optimizer(engine, got, step)


def _load_deepspeed_optimizer(engine, got, step: int) -> None:
    local = engine._local()
    zero = _zero_inner(engine)
    if zero is None:  # ZeRO-0: torch AdamW keyed by the parameters themselves
        for name, mom in got.items():
            engine.optimizer.state[local[name]] = {"step": torch.tensor(float(step)),
                                                   **{k: v.clone().to(local[name].dtype) for k, v in mom.items()}}
        return
    from deepspeed.utils import safe_set_full_optimizer_state

    engine.optimizer._restore_from_bit16_weights()  # fp32 master partitions from the loaded weights
    _link_zero_state(engine, step)
    for name, mom in got.items():
        for k, v in mom.items():
            safe_set_full_optimizer_state(local[name], v, k)

"""Resharding checkpoints of the Megatron engines through ``megatron.core.dist_checkpointing``.

Weights are Megatron's own sharded state dict (global keys, each TP/PP slice with its offsets),
so a checkpoint saved at one (tp, pp, vpp, dp) loads at any other. Optimizer moments are saved
per parameter with exactly the sharding of that parameter (same offsets, key prefixed by
``optimizer.<moment>.``), which is what makes them reshard too. Each engine hands its moments
over in that one form (:data:`Moments`), so a checkpoint moves between the two optimizer paths:

* DeepSpeed ZeRO (``pp = 1``, :mod:`~dist_llm.parallel.megatron.zero_state`) assembles a
  parameter's moments from the DP partitions (every DP rank gets them; DP rank 0 is the main
  replica that writes);
* :class:`~dist_llm.parallel.megatron.optimizer.DPShardedAdamW` (``pp > 1``): each parameter's
  owner writes its moments as the main replica; the other DP ranks hold none.

The AdamW step count (the same for every parameter) goes to ``engine.json``, written by rank 0.
With bf16 parameters the fp32 master weights are saved too (``optimizer.master.<key>``, sharded
like the parameter, replicated over DP), so a resume continues from the exact fp32 values.
This module knows no engine: it receives the model chunks, the moments and the layout.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch

MOMENTS = ("exp_avg", "exp_avg_sq")
FORMAT = "dist-llm-megatron/1"

# parameter name -> (parameter, {moment: tensor shaped like it}, owned by this DP rank alone)
Moments = Dict[str, Tuple[torch.nn.Parameter, Dict[str, torch.Tensor], bool]]
# parameter name -> (parameter, its fp32 master copy); replicated over DP
Masters = Dict[str, Tuple[torch.nn.Parameter, torch.Tensor]]


def _as_moments(masters: Optional[Masters]) -> Moments:
    """Masters in the moments form (moment ``master``, not owned: DP rank 0's copy is written)."""
    return {n: (p, {"master": m}, False) for n, (p, m) in (masters or {}).items()}


def _model_sharded(chunks: List[torch.nn.Module]) -> Dict[str, dict]:
    return {f"chunk{i}": c.sharded_state_dict() for i, c in enumerate(chunks)}


def _by_param(msd: dict) -> Dict[int, object]:
    """id(parameter) -> its ShardedTensor, or ShardedTensorFactory (SwiGLU's fc1 is saved as two
    tensors, gate and up, so that it reshards over TP); sharded state dicts hold the Parameters."""
    from megatron.core.dist_checkpointing import ShardedTensor
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    return {id(v.data): v for v in nested_values(msd) if isinstance(v, (ShardedTensor, ShardedTensorFactory))}


def _optimizer_sharded(moments: Moments, msd: dict) -> Dict[str, object]:
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


def save_sharded(directory, layout, chunks: List[torch.nn.Module], gather_moments: Callable[[], Moments],
                 optimizer_step: int, zero_stage: int, masters: Optional[Masters] = None) -> None:
    """Collective. ``gather_moments`` runs on every rank after the directory exists (it may be
    collective itself, as under ZeRO)."""
    from megatron.core import dist_checkpointing

    d = Path(directory)
    if layout.rank == 0:
        d.mkdir(parents=True, exist_ok=True)
    layout.barrier()
    msd = _model_sharded(chunks)
    osd = _optimizer_sharded(gather_moments(), msd)
    osd.update(_optimizer_sharded(_as_moments(masters), msd))
    dist_checkpointing.save({"model": msd, "optimizer": osd}, str(d))
    if layout.rank == 0:
        meta = {"format": FORMAT, "optimizer_step": optimizer_step, "tp": layout.tp, "pp": layout.pp,
                "vpp": layout.vpp, "dp": layout.dp, "zero_stage": zero_stage,
                "master_weights": bool(masters)}
        (d / "engine.json").write_text(json.dumps(meta, indent=1))
    layout.barrier()


def read_meta(directory) -> Optional[dict]:
    p = Path(directory) / "engine.json"
    return json.loads(p.read_text()) if p.is_file() else None


@torch.no_grad()
def load_sharded(directory, chunks: List[torch.nn.Module], buffers: Moments, masters: Optional[Masters] = None
                 ) -> Tuple[Dict[str, Dict[str, torch.Tensor]], int, Optional[Dict[str, torch.Tensor]]]:
    """Load the weights into ``chunks`` and the moments of the parameters in ``buffers``
    (destination tensors, zeros shaped like what this rank keeps), and the fp32 masters into
    ``masters`` when given and the checkpoint has them. Returns ``({name: {moment: tensor}},
    optimizer step, {name: master} or None)``. Collective."""
    from megatron.core import dist_checkpointing

    meta = read_meta(directory)
    if meta is None or meta.get("format") != FORMAT:
        raise RuntimeError(f"{directory} is not a {FORMAT} checkpoint (engine.json missing or of another format)")
    step = int(meta["optimizer_step"])
    msd = _model_sharded(chunks)
    osd = _optimizer_sharded(buffers, msd)
    want_masters = bool(masters) and bool(meta.get("master_weights"))  # else: masters from the weights
    if want_masters:
        osd.update(_optimizer_sharded(_as_moments(masters), msd))
    loaded = dist_checkpointing.load({"model": msd, "optimizer": osd}, str(directory))
    for i, c in enumerate(chunks):
        c.load_state_dict(loaded["model"][f"chunk{i}"])
    got = {n: {k: loaded["optimizer"][f"{k}.{n}"] for k in MOMENTS} for n in buffers}
    got_masters = {n: loaded["optimizer"][f"master.{n}"] for n in masters} if want_masters else None
    return got, step, got_masters

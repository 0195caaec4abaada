"""DeepSpeed's optimizer state as per-parameter AdamW moments (the form of
:data:`~dist_llm.parallel.megatron.checkpoint.Moments`), and back, for the ``pp = 1`` engine.

ZeRO-1/2 keep the moments in flat fp32 partitions over the DP group; DeepSpeed's
``safe_get/set_full_optimizer_state`` move one parameter's moments in and out of them
(collective over DP). ZeRO-0 is a torch AdamW keyed by the parameters themselves.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch

from dist_llm.parallel.megatron.checkpoint import MOMENTS, Moments

Params = Dict[str, torch.nn.Parameter]


def _zero_inner(ds_optimizer):
    """DeepSpeed ZeRO-1/2's torch optimizer over the flat fp32 partitions, else None."""
    return ds_optimizer.optimizer if hasattr(ds_optimizer, "single_partition_of_fp32_groups") else None


def _link_zero_state(ds_optimizer, step: Optional[int]) -> None:
    """Make every ZeRO-1/2 flat partition have AdamW state (torch creates it at the first step;
    zeros with step 0 are what it would create) and link each parameter's fragment to it.

    DeepSpeed 0.19 links fragments once, right after the *first param group's* first step, so
    the second group (no weight decay) is linked to an empty state; relinking here fixes that.
    """
    zero = _zero_inner(ds_optimizer)
    for flat in ds_optimizer.single_partition_of_fp32_groups:
        st = zero.state[flat]
        st.setdefault("step", torch.tensor(0.0))
        if step is not None:
            st["step"] = torch.tensor(float(step))
        for k in MOMENTS:
            st.setdefault(k, torch.zeros_like(flat))
    ds_optimizer._hp_optimizer_states_linked = False
    ds_optimizer._lazy_init_hp_params_optimizer_state()


def optimizer_step(ds_optimizer) -> int:
    """The AdamW step count (0 before the first step)."""
    inner = _zero_inner(ds_optimizer) or ds_optimizer
    for st in inner.state.values():
        if "step" in st:
            return int(st["step"])
    return 0


def gather_moments(ds_optimizer, params: Params) -> Moments:
    """Every parameter's full moments on every DP rank. Collective over DP under ZeRO-1/2."""
    from deepspeed.utils import safe_get_full_optimizer_state

    zero = _zero_inner(ds_optimizer)
    if zero is not None:
        _link_zero_state(ds_optimizer, step=None)
    out = {}
    for name, p in params.items():
        if zero is not None:
            got = {k: safe_get_full_optimizer_state(p, k) for k in MOMENTS}
        else:
            st = ds_optimizer.state.get(p, {})
            got = {k: st.get(k, torch.zeros_like(p)) for k in MOMENTS}
        out[name] = (p, {k: v.detach().float().reshape(p.shape) for k, v in got.items()}, False)
    return out


def moment_buffers(params: Params) -> Moments:
    """Destination tensors for :func:`~dist_llm.parallel.megatron.checkpoint.load_sharded`."""
    return {n: (p, {k: torch.zeros_like(p, dtype=torch.float32) for k in MOMENTS}, False) for n, p in params.items()}


def set_moments(ds_optimizer, params: Params, got: Dict[str, Dict[str, torch.Tensor]], step: int) -> None:
    """Install loaded moments and step; the weights must be loaded already (ZeRO-1/2 rebuild
    their fp32 master partitions from them). Collective over DP under ZeRO-1/2."""
    zero = _zero_inner(ds_optimizer)
    if zero is None:  # ZeRO-0: torch AdamW keyed by the parameters themselves
        for name, mom in got.items():
            ds_optimizer.state[params[name]] = {"step": torch.tensor(float(step)),
                                                **{k: v.clone().to(params[name].dtype) for k, v in mom.items()}}
        return
    from deepspeed.utils import safe_set_full_optimizer_state

    ds_optimizer._restore_from_bit16_weights()  # fp32 master partitions from the loaded weights
    _link_zero_state(ds_optimizer, step)
    for name, mom in got.items():
        for k, v in mom.items():
            safe_set_full_optimizer_state(params[name], v, k)


def set_fp32_masters(ds_optimizer, params: Params, masters: Dict[str, torch.Tensor]) -> None:
    """Exact fp32 masters into ZeRO-1/2's partitions (low-precision parameters round them).
    Collective over DP."""
    from deepspeed.utils import safe_set_full_fp32_param

    for name, m in masters.items():
        safe_set_full_fp32_param(params[name], m)

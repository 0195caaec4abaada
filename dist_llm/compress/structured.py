"""Structured pruning: remove whole attention heads (key/value groups under GQA) and MLP channels.

The tensors really shrink and a smaller ``ModelConfig`` comes out. Our GPT has the same head
count and MLP width in every layer, so each layer loses the same number of heads/channels: its
least important ones. d_model is kept, so after head pruning ``n_heads * head_dim < d_model`` and
the config records ``head_dim`` explicitly.

Importance of a head group (one kv head with its ``n_heads/n_kv_heads`` query heads; one query
head without GQA) sums a per-weight saliency over every weight that only that group uses: its q
rows, its k and v rows in the fused ``qkv`` (with biases) and its columns of ``proj``. An MLP
channel owns its ``fc_in`` (and ``fc_gate``) row and bias and its ``fc_out`` column.

* ``l2``: saliency ``w**2`` (the group's squared L2 norm; no data).
* ``taylor``: saliency ``w * dL/dw`` averaged over a few training batches; the group score is
  ``|sum|``, the first-order estimate of the loss change when the group is removed (Molchanov et
  al. 2019).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Iterable, List, Optional

import torch

from dist_llm.compress import CompressError
from dist_llm.config.compress_schema import Importance
from dist_llm.models.gpt import GPT

Saliency = Dict[str, torch.Tensor]  # parameter name -> tensor of its shape


def saliency(model: GPT, importance: Importance, batches: Optional[Iterable[torch.Tensor]] = None) -> Saliency:
    params = dict(model.named_parameters())
    if importance == Importance.L2:
        return {n: p.detach() ** 2 for n, p in params.items()}
    if batches is None:
        raise CompressError("--importance taylor needs training batches (--train-data)")
    model.zero_grad(set_to_none=True)
    was_training = model.training
    model.eval()  # no dropout: the gradient of the deployed function
    count = 0
    for batch in batches:
        model(batch[:, :-1], batch[:, 1:]).backward()
        count += 1
    model.train(was_training)
    out = {n: (p.detach() * p.grad / count) if p.grad is not None else torch.zeros_like(p) for n, p in params.items()}
    model.zero_grad(set_to_none=True)
    return out


def _rows(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return t.index_select(0, idx)


def head_group_rows(model: GPT, group: int) -> torch.Tensor:
    """The fused-qkv output rows owned by kv group ``group`` (q rows of its query heads, k and v rows)."""
    attn = model.blocks[0].attn
    hd, per = attn.head_dim, attn.n_heads // attn.n_kv_heads
    q = torch.arange(group * per * hd, (group + 1) * per * hd)
    k = attn.n_heads * hd + torch.arange(group * hd, (group + 1) * hd)
    v = k + attn.n_kv_heads * hd
    return torch.cat([q, k, v])


def head_group_cols(model: GPT, group: int) -> torch.Tensor:
    attn = model.blocks[0].attn
    width = (attn.n_heads // attn.n_kv_heads) * attn.head_dim
    return torch.arange(group * width, (group + 1) * width)


def _score(sal: Saliency, importance: Importance, parts: List[torch.Tensor]) -> float:
    total = sum(float(p.sum()) for p in parts)
    return abs(total) if importance == Importance.TAYLOR else total


def head_scores(model: GPT, sal: Saliency, importance: Importance) -> torch.Tensor:
    """[n_layers, n_kv_heads] importance of each head group."""
    n_kv = model.blocks[0].attn.n_kv_heads
    out = torch.zeros(len(model.blocks), n_kv)
    for i, _ in enumerate(model.blocks):
        pre = f"blocks.{i}.attn."
        for g in range(n_kv):
            rows, cols = head_group_rows(model, g), head_group_cols(model, g)
            parts = [_rows(sal[pre + "qkv.weight"], rows), sal[pre + "proj.weight"][:, cols]]
            if pre + "qkv.bias" in sal:
                parts.append(sal[pre + "qkv.bias"][rows])
            out[i, g] = _score(sal, importance, parts)
    return out


def channel_scores(model: GPT, sal: Saliency, importance: Importance) -> torch.Tensor:
    """[n_layers, d_ff] importance of each MLP channel."""
    rows = []
    for i, _ in enumerate(model.blocks):
        pre = f"blocks.{i}.mlp."
        parts = [sal[pre + "fc_in.weight"].sum(1), sal[pre + "fc_out.weight"].sum(0)]
        for extra in ("fc_gate.weight", "fc_in.bias", "fc_gate.bias"):
            if pre + extra in sal:
                t = sal[pre + extra]
                parts.append(t.sum(1) if t.dim() == 2 else t)
        total = torch.stack(parts).sum(0)
        rows.append(total.abs() if importance == Importance.TAYLOR else total)
    return torch.stack(rows)


def _keep(scores: torch.Tensor, n_keep: int) -> List[torch.Tensor]:
    """Per layer: indices of the ``n_keep`` highest scores, in their original order."""
    return [torch.sort(torch.topk(row, n_keep).indices).values for row in scores]


def _removed(total: int, fraction: float, what: str, flag: str) -> int:
    n = round(total * fraction)
    if fraction > 0 and n == 0:
        raise CompressError(f"{flag}={fraction} removes no {what} of {total}; raise it to at least {1 / total:.3f}")
    if n >= total:
        raise CompressError(f"{flag}={fraction} would remove all {total} {what}; lower it")
    return n


def prune_structured(model: GPT, head_fraction: float, mlp_fraction: float, importance: Importance,
                     batches_fn: Optional[Callable[[], Iterable[torch.Tensor]]] = None) -> Dict[str, object]:
    """A new, smaller GPT (and what was kept) from ``model``, which is left unchanged."""
    cfg = model.cfg
    attn = model.blocks[0].attn
    sal = saliency(model, importance, batches_fn() if importance == Importance.TAYLOR and batches_fn else None)
    n_kv, per = attn.n_kv_heads, attn.n_heads // attn.n_kv_heads
    drop_groups = _removed(n_kv, head_fraction, "head groups" if per > 1 else "heads", "--heads")
    drop_ch = _removed(cfg.d_ff, mlp_fraction, "MLP channels", "--mlp")
    keep_groups = _keep(head_scores(model, sal, importance), n_kv - drop_groups)
    keep_ch = _keep(channel_scores(model, sal, importance), cfg.d_ff - drop_ch)
    new_kv = n_kv - drop_groups
    new_cfg = dataclasses.replace(
        cfg, n_heads=new_kv * per, n_kv_heads=new_kv, d_ff=cfg.d_ff - drop_ch,
        head_dim=attn.head_dim if drop_groups else cfg.head_dim)
    small = GPT(new_cfg)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for i, _ in enumerate(model.blocks):
        a, m = f"blocks.{i}.attn.", f"blocks.{i}.mlp."
        rows = torch.cat([head_group_rows(model, int(g)) for g in keep_groups[i]])
        # q rows of the kept groups, then their k rows, then their v rows: the fused layout again.
        q_rows, kv_rows = rows.view(len(keep_groups[i]), -1).split([per * attn.head_dim, 2 * attn.head_dim], 1)
        k_rows, v_rows = kv_rows.split(attn.head_dim, 1)
        ordered = torch.cat([q_rows.flatten(), k_rows.flatten(), v_rows.flatten()])
        cols = torch.cat([head_group_cols(model, int(g)) for g in keep_groups[i]])
        sd[a + "qkv.weight"] = _rows(sd[a + "qkv.weight"], ordered)
        if a + "qkv.bias" in sd:
            sd[a + "qkv.bias"] = sd[a + "qkv.bias"][ordered]
        sd[a + "proj.weight"] = sd[a + "proj.weight"][:, cols]
        ch = keep_ch[i]
        for name in ("fc_in", "fc_gate"):
            if m + name + ".weight" in sd:
                sd[m + name + ".weight"] = _rows(sd[m + name + ".weight"], ch)
            if m + name + ".bias" in sd:
                sd[m + name + ".bias"] = sd[m + name + ".bias"][ch]
        sd[m + "fc_out.weight"] = sd[m + "fc_out.weight"][:, ch]
    small.load_state_dict({k: v.contiguous() for k, v in sd.items()}, strict=True)
    small.eval()
    return {"model": small, "kept_head_groups": [g.tolist() for g in keep_groups],
            "kept_channels_per_layer": new_cfg.d_ff, "removed_head_groups_per_layer": drop_groups,
            "removed_channels_per_layer": drop_ch}

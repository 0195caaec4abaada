"""Unstructured magnitude pruning of the transformer blocks' linear weights.

Prunable: the weight matrix of every ``nn.Linear`` inside ``blocks`` (qkv, proj, fc_in, fc_gate,
fc_out). Not pruned: embeddings, norms, biases and the LM head (tied to the token embedding in the
gpt2 preset, an output embedding in llama). The target is met exactly: ``round(sparsity * N)``
smallest-magnitude entries are zeroed (ties broken by a stable sort), globally over all prunable
weights or per matrix. Masks (True = kept) are returned so a fine-tune can keep the zeros.
"""
from __future__ import annotations

from typing import Dict

import torch
from torch import nn

from dist_llm.config.compress_schema import PruneScope

Masks = Dict[str, torch.Tensor]


def prunable_weights(model: nn.Module) -> Dict[str, nn.Parameter]:
    """``{"blocks.0.attn.qkv.weight": param, ...}`` in module order."""
    return {f"{name}.weight": mod.weight for name, mod in model.named_modules()
            if isinstance(mod, nn.Linear) and name.startswith("blocks.")}


def _smallest(values: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` smallest entries of a flat tensor (stable, so ties prune deterministically)."""
    return torch.sort(values, stable=True).indices[:k]


def magnitude_masks(model: nn.Module, sparsity: float, scope: PruneScope) -> Masks:
    weights = prunable_weights(model)
    masks: Masks = {}
    if scope == PruneScope.PER_LAYER:
        for name, w in weights.items():
            flat = torch.ones(w.numel(), dtype=torch.bool)
            flat[_smallest(w.detach().abs().flatten(), round(sparsity * w.numel()))] = False
            masks[name] = flat.view_as(w)
        return masks
    magnitudes = torch.cat([w.detach().abs().flatten() for w in weights.values()])
    keep = torch.ones(magnitudes.numel(), dtype=torch.bool)
    keep[_smallest(magnitudes, round(sparsity * magnitudes.numel()))] = False
    offset = 0
    for name, w in weights.items():
        masks[name] = keep[offset:offset + w.numel()].view_as(w).clone()
        offset += w.numel()
    return masks


@torch.no_grad()
def apply_masks(model: nn.Module, masks: Masks) -> None:
    weights = prunable_weights(model)
    for name, mask in masks.items():
        weights[name].mul_(mask.to(weights[name].device, weights[name].dtype))


def sparsity_of(model: nn.Module) -> Dict[str, float]:
    """Zeros among the prunable weights (overall and per matrix); counts, not masks, so it checks
    what is really in the tensors."""
    weights = prunable_weights(model)
    per = {name: float((w == 0).sum()) / w.numel() for name, w in weights.items()}
    zeros = sum(int((w == 0).sum()) for w in weights.values())
    total = sum(w.numel() for w in weights.values())
    return {"prunable_params": total, "zeros": zeros, "sparsity": zeros / total, "per_matrix": per}


def masks_to_tensors(masks: Masks) -> Dict[str, torch.Tensor]:
    """uint8 for safetensors (it has no bool in every version we meet)."""
    return {name: m.to(torch.uint8) for name, m in masks.items()}

"""TEMPORARY (removed when wt-dec's generate_batch lands): the agreed generate_batch API,
implemented naively (one row at a time, no KV cache) so the server can be tested before then."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

import importlib

G = importlib.import_module("dist_llm.models.generate")  # the module (the package re-exports a function of that name)


@dataclass
class SamplingParams:
    max_new_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: Optional[int] = None
    stop_token_ids: Tuple[int, ...] = ()
    stop_strings: Tuple[str, ...] = ()


@dataclass
class GenerationResult:
    token_ids: List[int]
    finish_reason: str
    prompt_tokens: int


@torch.no_grad()
def generate_batch(model, prompts, params, *, pad_id=0, use_cache=True, decode=None, on_token=None):
    plist = params if isinstance(params, list) else [params] * len(prompts)
    out = []
    for row, (ids, p) in enumerate(zip(prompts, plist)):
        g = torch.Generator().manual_seed(p.seed) if p.seed is not None else None
        toks, new, reason = list(ids), [], "length"
        for _ in range(p.max_new_tokens):
            logits = model(torch.tensor([toks]))[0, -1].float()
            if p.temperature == 0:
                t = int(logits.argmax())
            else:
                t = int(torch.multinomial(torch.softmax(logits / p.temperature, -1), 1, generator=g))
            new.append(t)
            toks.append(t)
            if on_token:
                on_token(row, t)
            if t in p.stop_token_ids or (p.stop_strings and decode and any(s in decode(new) for s in p.stop_strings)):
                reason = "stop"
                break
        out.append(GenerationResult(new, reason, len(ids)))
    return out


def install() -> None:
    if not hasattr(G, "generate_batch"):
        G.SamplingParams, G.GenerationResult, G.generate_batch = SamplingParams, GenerationResult, generate_batch

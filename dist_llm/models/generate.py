"""Autoregressive generation from a :class:`~dist_llm.models.gpt.GPT`, with or without a KV cache.

:func:`generate_batch` is the serving-facing API: prompts of different lengths are left-padded
into one batch (a key-padding mask hides the padding and per-row position ids start each
prompt at 0, for learned positions and RoPE alike), every row has its own
:class:`SamplingParams` and finishes on its own, and ``on_token`` streams tokens as they come.
With ``use_cache=False`` each step re-runs the whole padded prefix instead of one token
through the cache; both give the same tokens (the benchmark in ``bench/generation.py`` checks
it while timing them).

:func:`generate` is the older tensor-in, tensor-out helper used for end-of-run samples; it runs
on the same decoders and may run past the model's window by cropping the context.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from dist_llm.models.kv_cache import KVCache
from dist_llm.models.sampling import GenerationResult, RowState, SamplingParams, sample_rows

__all__ = ["GenerationResult", "SamplingParams", "generate", "generate_batch"]


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Run ``model`` in eval mode (no dropout), restoring its train/eval mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


class CachedDecoder:
    """Prefill the prompts into a :class:`KVCache` once, then feed one token per step."""

    def __init__(self, model: nn.Module, ids: torch.Tensor, key_mask: torch.Tensor,
                 positions: torch.Tensor, capacity: int) -> None:
        self.model, self.ids, self.key_mask, self.positions = model, ids, key_mask, positions
        self.cache = KVCache.for_model(model, ids.shape[0], capacity)
        self.next_pos = positions[:, -1] + 1

    def start(self) -> torch.Tensor:
        """Logits [B, V] for the token after each prompt."""
        return self.model(self.ids, kv_cache=self.cache, positions=self.positions, attn_mask=self.key_mask,
                          last_only=True)[:, -1]

    def step(self, tokens: torch.Tensor, advance: torch.Tensor) -> torch.Tensor:
        """Feed ``tokens`` [B]; rows where ``advance`` [B] is False (finished) keep their
        position, so a finished row never runs past the model's window."""
        self.key_mask = torch.cat([self.key_mask, self.key_mask.new_ones(len(tokens), 1)], dim=1)
        logits = self.model(tokens[:, None], kv_cache=self.cache, positions=self.next_pos[:, None],
                            attn_mask=self.key_mask, last_only=True)[:, -1]
        self.next_pos = self.next_pos + advance.long()
        return logits


class RecomputeDecoder:
    """No cache: every step runs the whole sequence so far (the baseline the cache beats).

    Without padding the plain causal path is used, with the context cropped to its last
    ``window`` tokens (positions then restart at 0, as :func:`generate` always did)."""

    def __init__(self, model: nn.Module, ids: torch.Tensor, key_mask: torch.Tensor,
                 positions: torch.Tensor, window: Optional[int] = None) -> None:
        self.model, self.ids, self.key_mask, self.positions = model, ids, key_mask, positions
        self.padded = not bool(key_mask.all())
        self.window = window or model.cfg.max_seq_len
        self.next_pos = positions[:, -1] + 1

    def start(self) -> torch.Tensor:
        if self.padded:
            return self.model(self.ids, positions=self.positions, attn_mask=self.key_mask, last_only=True)[:, -1]
        return self.model(self.ids[:, -self.window:], last_only=True)[:, -1]

    def step(self, tokens: torch.Tensor, advance: torch.Tensor) -> torch.Tensor:
        self.ids = torch.cat([self.ids, tokens[:, None]], dim=1)
        if self.padded:
            self.key_mask = torch.cat([self.key_mask, self.key_mask.new_ones(len(tokens), 1)], dim=1)
            self.positions = torch.cat([self.positions, self.next_pos[:, None]], dim=1)
            self.next_pos = self.next_pos + advance.long()
        return self.start()


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int,
             device: torch.device) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids [B, P] (left-padded with ``pad_id``), key mask [B, P] (False = padding) and
    position ids [B, P] that start every prompt at 0."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    key_mask = torch.zeros((len(prompts), width), dtype=torch.bool)
    for i, prompt in enumerate(prompts):
        if prompt:
            ids[i, width - len(prompt):] = torch.tensor(list(prompt), dtype=torch.long)
            key_mask[i, width - len(prompt):] = True
    positions = (key_mask.long().cumsum(dim=1) - 1).clamp(min=0)
    return ids.to(device), key_mask.to(device), positions.to(device)


def _row_params(model: nn.Module, prompts: Sequence[Sequence[int]],
                params: Union[SamplingParams, Sequence[SamplingParams]], pad_id: int,
                has_decode: bool) -> List[SamplingParams]:
    """One checked SamplingParams per prompt; ValueError naming the row and the numbers."""
    if not prompts:
        raise ValueError("prompts is empty: pass at least one prompt (a list of token ids)")
    rows = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
    if len(rows) != len(prompts):
        raise ValueError(f"got {len(rows)} SamplingParams for {len(prompts)} prompts: pass one per prompt "
                         f"or a single SamplingParams for all")
    vocab, max_len = model.cfg.vocab_size, model.cfg.max_seq_len
    if not 0 <= pad_id < vocab:
        raise ValueError(f"pad_id={pad_id} is outside the vocabulary [0, {vocab})")
    for i, (prompt, row) in enumerate(zip(prompts, rows)):
        row.check(f"params[{i}]", has_decode)
        if len(prompt) == 0:
            raise ValueError(f"prompts[{i}] is empty: a prompt needs at least one token (e.g. BOS)")
        bad = [t for t in prompt if not 0 <= int(t) < vocab]
        if bad:
            raise ValueError(f"prompts[{i}] has token ids outside the vocabulary [0, {vocab}): {bad[:5]}")
        if len(prompt) + row.max_new_tokens > max_len:
            raise ValueError(f"prompts[{i}]: prompt length {len(prompt)} + max_new_tokens {row.max_new_tokens} "
                             f"= {len(prompt) + row.max_new_tokens} exceeds model.max_seq_len={max_len}; "
                             f"shorten the prompt or lower max_new_tokens")
    return rows


@torch.no_grad()
def generate_batch(model: nn.Module, prompts: List[List[int]],
                   params: Union[SamplingParams, List[SamplingParams]], *, pad_id: int = 0,
                   use_cache: bool = True, decode: Optional[Callable[[List[int]], str]] = None,
                   on_token: Optional[Callable[[int, int], None]] = None) -> List[GenerationResult]:
    """Generate for every prompt (lists of token ids, any lengths) in one batch.

    ``params`` is one :class:`SamplingParams` for all rows or one per row. ``decode`` (token ids
    -> text) is needed for stop strings and fills ``GenerationResult.text``. ``on_token(row,
    token_id)`` is called for each new token as soon as no stop string can still claim it (at
    once when the row has none); the tokens streamed are exactly the ``token_ids`` returned.
    """
    rows = _row_params(model, prompts, params, pad_id, decode is not None)
    device = next(model.parameters()).device
    states = [RowState(i, row, len(prompt), decode, on_token) for i, (prompt, row) in enumerate(zip(prompts, rows))]
    max_new = max(row.max_new_tokens for row in rows)
    if max_new == 0:
        return [s.result() for s in states]
    temperature = torch.tensor([r.temperature for r in rows], dtype=torch.float32, device=device)
    top_k = torch.tensor([r.top_k for r in rows], dtype=torch.long, device=device)
    top_p = torch.tensor([r.top_p for r in rows], dtype=torch.float32, device=device)
    generators = [None if r.seed is None else torch.Generator(device=device).manual_seed(r.seed) for r in rows]
    ids, key_mask, positions = left_pad(prompts, pad_id, device)
    with eval_mode(model):
        if use_cache:
            decoder = CachedDecoder(model, ids, key_mask, positions, capacity=ids.shape[1] + max_new)
        else:
            decoder = RecomputeDecoder(model, ids, key_mask, positions)
        logits = decoder.start()
        while True:
            active = [s.active for s in states]
            tokens = sample_rows(logits, temperature, top_k, top_p, generators, active)
            for state, token, was_active in zip(states, tokens, active):
                if was_active:
                    state.push(token)
            still = [s.active for s in states]
            if not any(still):
                break
            fed = torch.tensor([t if a else pad_id for t, a in zip(tokens, active)], device=device)
            logits = decoder.step(fed, torch.tensor(still, device=device))
    return [s.result() for s in states]


@torch.no_grad()
def generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    eos_id: Optional[int] = None,
) -> torch.Tensor:
    """Extend ``input_ids`` [B, T] by up to ``max_new_tokens`` sampled tokens; returns
    [B, T + n] (prompt included).

    Uses the KV cache when ``T + max_new_tokens`` fits the model's window; otherwise the
    context fed to the model is cropped to its last ``model.cfg.max_seq_len`` tokens, so
    generation can run past the window. ``temperature=0`` is greedy (argmax); ``top_k`` keeps
    only the k most likely tokens; ``generator`` makes sampling reproducible. With ``eos_id``, a
    row that has produced it keeps emitting ``eos_id`` (padding) and generation stops early once
    every row has. The model runs in eval mode and its train/eval mode is restored afterwards.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    batch, seq = input_ids.shape
    device = input_ids.device
    key_mask = torch.ones_like(input_ids, dtype=torch.bool)
    positions = torch.arange(seq, device=device).expand(batch, seq)
    temperatures = torch.full((batch,), float(temperature), device=device)
    top_ks = torch.full((batch,), top_k or 0, dtype=torch.long, device=device)
    top_ps = torch.ones(batch, device=device)
    tokens = input_ids
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    with eval_mode(model):
        if max_new_tokens == 0:
            return tokens
        if seq + max_new_tokens <= model.cfg.max_seq_len:
            decoder = CachedDecoder(model, input_ids, key_mask, positions, capacity=seq + max_new_tokens)
        else:
            decoder = RecomputeDecoder(model, input_ids, key_mask, positions)
        logits = decoder.start()
        for step in range(max_new_tokens):
            active = (~finished).tolist()
            next_token = torch.tensor(sample_rows(logits, temperatures, top_ks, top_ps, [generator] * batch, active),
                                      device=device)
            if eos_id is not None:
                next_token = next_token.masked_fill(finished, eos_id)
                finished |= next_token == eos_id
            tokens = torch.cat([tokens, next_token[:, None]], dim=1)
            if (eos_id is not None and bool(finished.all())) or step == max_new_tokens - 1:
                break
            logits = decoder.step(next_token, torch.ones(batch, dtype=torch.bool, device=device))
    return tokens

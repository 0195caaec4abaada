"""A GPT decoder as a plain ``nn.Module``, in two flavours picked by ``ModelConfig.preset``.

* ``gpt2``: learned positions, pre-LN LayerNorm blocks, GELU MLP, LM head tied to the token
  embedding.
* ``llama``: rotary positions (RoPE), RMSNorm, SwiGLU MLP, no biases, untied LM head.

The module knows nothing about distribution: engines in ``dist_llm.parallel`` wrap it, and a
later adapter maps its parameter names onto Megatron-core's layout. That is why the names are
kept plain and stable (``tok_emb``, ``pos_emb``, ``blocks[i].attn.qkv`` / ``.proj``,
``blocks[i].mlp.fc_in`` / ``fc_gate`` / ``fc_out``, ``norm1`` / ``norm2``, ``final_norm``,
``lm_head``) and why q, k and v live in one fused ``qkv`` Linear whose output rows are
``[q (n_heads*hd); k (n_kv_heads*hd); v (n_kv_heads*hd)]``, each with its heads contiguous (head
``h`` of q is rows ``h*hd:(h+1)*hd``). With grouped-query attention (``n_kv_heads < n_heads``)
query head ``h`` reads key/value head ``h // (n_heads // n_kv_heads)``, as in Hugging Face Llama.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from dist_llm.config.choices import Preset
from dist_llm.config.schema import ModelConfig
from dist_llm.models.kv_cache import KVCache

PRESETS = Preset.values()
IGNORE_INDEX = -100

# (cos, sin), each [T, head_dim]; None for the gpt2 preset, which has learned positions.
Rope = Optional[Tuple[torch.Tensor, torch.Tensor]]


def swiglu_hidden_size(d_model: int, multiple_of: int = 16) -> int:
    """The SwiGLU width: 8/3 * d_model keeps the 3-matrix MLP at the 2-matrix MLP's parameter
    count (LLaMA), rounded up to ``multiple_of`` so the matmuls stay on friendly tile sizes."""
    hidden = int(8 * d_model / 3)
    return multiple_of * math.ceil(hidden / multiple_of)


def resolve_model_config(cfg: ModelConfig) -> ModelConfig:
    """Return a copy of ``cfg`` with the preset's defaults filled in for fields left ``None``.

    Resolving once, up front, means the model, the FLOP count and any checkpoint adapter all
    agree on the same concrete sizes instead of each re-deriving the defaults.
    """
    if cfg.preset not in PRESETS:
        raise ValueError(
            f"model.preset={cfg.preset!r} is not a known preset; allowed values: {', '.join(PRESETS)}"
        )
    if cfg.head_dim is None and cfg.d_model % cfg.n_heads != 0:
        raise ValueError(
            f"model.d_model={cfg.d_model} must be divisible by model.n_heads={cfg.n_heads}"
        )
    n_kv_heads = cfg.n_heads if cfg.n_kv_heads is None else cfg.n_kv_heads
    if n_kv_heads < 1 or cfg.n_heads % n_kv_heads != 0:
        raise ValueError(
            f"model.n_kv_heads={cfg.n_kv_heads} must be >= 1 and divide model.n_heads={cfg.n_heads}; "
            f"or leave it null for plain multi-head attention"
        )
    is_gpt2 = cfg.preset == "gpt2"
    if not is_gpt2 and (cfg.head_dim or cfg.d_model // cfg.n_heads) % 2 != 0:
        raise ValueError(
            f"the llama preset's rotary embedding needs an even head size, got "
            f"model.d_model/model.n_heads = {cfg.d_model}/{cfg.n_heads}"
        )
    return dataclasses.replace(
        cfg,
        n_kv_heads=n_kv_heads,
        bias=is_gpt2 if cfg.bias is None else cfg.bias,
        tie_embeddings=is_gpt2 if cfg.tie_embeddings is None else cfg.tie_embeddings,
        d_ff=cfg.d_ff
        if cfg.d_ff is not None
        else (4 * cfg.d_model if is_gpt2 else swiglu_hidden_size(cfg.d_model)),
    )


class RMSNorm(nn.Module):
    """Root-mean-square norm (no mean subtraction, no bias), computed in float32 so bf16
    activations do not lose precision in the sum of squares."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_float = x.float()
        normed = x_float * torch.rsqrt(x_float.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def rope_tables(head_dim: int, max_seq_len: int, theta: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [max_seq_len, head_dim] for the rotate-half RoPE convention (the one used
    by Hugging Face LLaMA and Megatron-core), so weights port without permuting q/k rows."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [B, H, T, hd] by position: x*cos + rotate_half(x)*sin."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.preset == "llama":
        return RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=bool(cfg.bias))


def repeat_kv(x: torch.Tensor, repeats: int) -> torch.Tensor:
    """[B, Hkv, T, hd] -> [B, Hkv*repeats, T, hd], each key/value head repeated for its group of
    query heads (head ``h`` of the result is head ``h // repeats`` of ``x``)."""
    return x if repeats == 1 else x.repeat_interleave(repeats, dim=1)


def grouped_cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
                             repeats: int) -> torch.Tensor:
    """Attention of ``q`` [B, H, T, hd] over cached ``k``/``v`` [B, Hkv, L, hd] (inference).

    Instead of repeating every cached key/value head for its ``repeats`` query heads (a copy of
    the whole cache per layer per decoding step), the query heads of a group are folded into the
    query axis: [B, Hkv, repeats*T, hd] attends to the group's one key/value head, and the mask
    [B, 1, T, L] is tiled to match. Same maths, a ``repeats``-times smaller copy."""
    batch, heads, seq, head_dim = q.shape
    # a strided view of the cache is many times slower in SDPA on CPU: one contiguous copy
    k, v = k.contiguous(), v.contiguous()
    if repeats == 1:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    grouped = q.reshape(batch, heads // repeats, repeats * seq, head_dim)  # head h -> group h // repeats
    if mask is not None:
        mask = mask.repeat(1, 1, repeats, 1)
    out = F.scaled_dot_product_attention(grouped, k, v, attn_mask=mask)
    return out.reshape(batch, heads, seq, head_dim)


class CausalSelfAttention(nn.Module):
    """Multi-head (or grouped-query) causal attention through SDPA (flash / memory-efficient
    kernels when present)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        assert cfg.n_kv_heads is not None, "resolve_model_config() first"
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.n_kv_heads
        self.head_dim = cfg.head_dim or cfg.d_model // cfg.n_heads  # head_dim: set by head pruning
        self.dropout = cfg.dropout
        self.qkv_sizes = [d * self.head_dim for d in (self.n_heads, self.n_kv_heads, self.n_kv_heads)]
        self.qkv = nn.Linear(cfg.d_model, sum(self.qkv_sizes), bias=bool(cfg.bias))
        self.proj = nn.Linear(self.n_heads * self.head_dim, cfg.d_model, bias=bool(cfg.bias))
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, rope: Rope = None, mask: Optional[torch.Tensor] = None,
                cache: Optional[KVCache] = None, layer: int = 0) -> torch.Tensor:
        """``mask``: a boolean [B, 1, T, past+T] mask (True = attend), or None for plain causal
        attention over ``x`` (training) or, with a ``cache``, for one new token that sees every
        cached position."""
        batch, seq, d_model = x.shape
        # [B, T, (H+2*Hkv)*hd] -> [B, H|Hkv, T, hd]; rows are [q; k; v], heads contiguous in each.
        q, k, v = (
            t.view(batch, seq, -1, self.head_dim).transpose(1, 2)
            for t in self.qkv(x).split(self.qkv_sizes, dim=-1)
        )
        if rope is not None:
            cos, sin = rope
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        repeats = self.n_heads // self.n_kv_heads
        if cache is not None:
            k, v = cache.append(layer, k, v)
            out = grouped_cached_attention(q, k, v, mask, repeats)
        else:
            k, v = repeat_kv(k, repeats), repeat_kv(v, repeats)
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=mask is None,
                dropout_p=self.dropout if self.training else 0.0,
            )
        out = out.transpose(1, 2).reshape(batch, seq, self.n_heads * self.head_dim)
        return self.resid_dropout(self.proj(out))


class MLP(nn.Module):
    """GELU MLP (gpt2) or SwiGLU MLP (llama): ``fc_out(silu(fc_gate(x)) * fc_in(x))``.

    GELU uses the tanh approximation, as GPT-2 and its Hugging Face port do.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        assert cfg.d_ff is not None, "resolve_model_config() first"
        self.swiglu = cfg.preset == "llama"
        bias = bool(cfg.bias)
        self.fc_in = nn.Linear(cfg.d_model, cfg.d_ff, bias=bias)
        self.fc_gate = nn.Linear(cfg.d_model, cfg.d_ff, bias=bias) if self.swiglu else None
        self.fc_out = nn.Linear(cfg.d_ff, cfg.d_model, bias=bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fc_gate is not None:
            hidden = F.silu(self.fc_gate(x)) * self.fc_in(x)
        else:
            hidden = F.gelu(self.fc_in(x), approximate="tanh")
        return self.dropout(self.fc_out(hidden))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.norm1 = make_norm(cfg)
        self.attn = CausalSelfAttention(cfg)
        self.norm2 = make_norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, rope: Rope = None, mask: Optional[torch.Tensor] = None,
                cache: Optional[KVCache] = None, layer: int = 0) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rope, mask, cache, layer)
        return x + self.mlp(self.norm2(x))


def decoding_mask(key_mask: Optional[torch.Tensor], batch: int, seq: int, past: int,
                  device: torch.device) -> torch.Tensor:
    """Boolean attention mask [B, 1, T, past+T] for ``seq`` new queries after ``past`` cached
    positions: causal, minus padding keys (``key_mask`` [B, past+T], False = padding). A query
    always sees itself, so a padding row's softmax stays finite (its output is never used)."""
    keys = torch.arange(past + seq, device=device)
    queries = torch.arange(past, past + seq, device=device).unsqueeze(1)
    causal = keys <= queries  # [T, past+T]
    if key_mask is None:
        return causal.expand(batch, 1, seq, past + seq)
    if key_mask.shape != (batch, past + seq):
        raise ValueError(
            f"attn_mask must be [batch, cached + new positions] = [{batch}, {past + seq}], "
            f"got {tuple(key_mask.shape)}"
        )
    mask = causal & key_mask.bool()[:, None, :]
    return (mask | (keys == queries)).unsqueeze(1)


class GPT(nn.Module):
    """Decoder-only language model. ``forward(ids)`` gives logits; ``forward(ids, targets)``
    gives the mean next-token cross-entropy (targets already shifted by the caller)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        cfg = resolve_model_config(cfg)
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = (
            nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.preset == "gpt2" else None
        )
        self.emb_dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.final_norm = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.preset == "llama":
            cos, sin = rope_tables(cfg.head_dim or cfg.d_model // cfg.n_heads, cfg.max_seq_len, cfg.rope_theta)
            # Non-persistent: derived from the config, so not part of checkpoints.
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        else:
            self.rope_cos = None
            self.rope_sin = None
        self.reset_parameters()
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight

    def reset_parameters(self) -> None:
        """normal(0, init_std) weights, zero biases, unit norm gains; the projections that write
        into the residual stream get init_std / sqrt(2 * n_layers) (GPT-2), so the residual
        variance does not grow with depth (each block adds two such writes)."""
        std = self.cfg.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.LayerNorm, RMSNorm)):
                nn.init.ones_(module.weight)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        residual_std = std / math.sqrt(2 * self.cfg.n_layers)
        for block in self.blocks:
            nn.init.normal_(block.attn.proj.weight, mean=0.0, std=residual_std)
            nn.init.normal_(block.mlp.fc_out.weight, mean=0.0, std=residual_std)

    def forward(
        self,
        input_ids: torch.Tensor,
        targets: Optional[torch.Tensor] = None,
        *,
        kv_cache: Optional[KVCache] = None,
        positions: Optional[torch.Tensor] = None,
        attn_mask: Optional[torch.Tensor] = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Logits [B, T, V] (float32) when ``targets`` is None, else the scalar mean
        cross-entropy over positions whose target is not -100.

        Decoding hooks (all None in training, which then runs exactly as without them):
        ``kv_cache`` holds the keys/values of earlier positions and receives these;
        ``positions`` [B, T] are the position ids (default: consecutive after the cache);
        ``attn_mask`` [B, past+T] marks the real (True) and padding (False) keys of the
        cache and this input (None: no padding); ``last_only`` computes logits for the last
        position only.
        """
        seq = input_ids.shape[1]
        past = 0 if kv_cache is None else kv_cache.length
        self._check_positions(seq, past, positions)
        x = self.tok_emb(input_ids)
        if self.pos_emb is not None:
            pos = positions if positions is not None else torch.arange(past, past + seq, device=x.device)
            x = x + self.pos_emb(pos)
        x = self.emb_dropout(x)
        rope: Rope = None
        if self.rope_cos is not None and self.rope_sin is not None:
            if positions is not None:  # per-row positions: [B, 1, T, hd] broadcasts over heads
                rope = (self.rope_cos[positions].unsqueeze(1), self.rope_sin[positions].unsqueeze(1))
            else:
                rope = (self.rope_cos[past:past + seq], self.rope_sin[past:past + seq])
        mask = None
        if attn_mask is not None or (kv_cache is not None and seq > 1):
            mask = decoding_mask(attn_mask, input_ids.shape[0], seq, past, x.device)
        use_checkpointing = self.cfg.activation_checkpointing and self.training
        for i, block in enumerate(self.blocks):
            if use_checkpointing:
                # Recompute the block in backward instead of storing its activations.
                x = checkpoint(block, x, rope, mask, kv_cache, i, use_reentrant=False)
            else:
                x = block(x, rope, mask, kv_cache, i)
        if kv_cache is not None:
            kv_cache.advance(seq)
        if last_only:
            x = x[:, -1:]
        logits = self.lm_head(self.final_norm(x)).float()
        if targets is None:
            return logits
        return F.cross_entropy(
            logits.view(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX
        )

    def _check_positions(self, seq: int, past: int, positions: Optional[torch.Tensor]) -> None:
        if positions is None:
            if past + seq > self.cfg.max_seq_len:
                raise ValueError(
                    f"input length {past + seq} exceeds model.max_seq_len={self.cfg.max_seq_len}; "
                    f"raise model.max_seq_len or lower train.seq_len"
                )
        elif positions.numel() and int(positions.max()) >= self.cfg.max_seq_len:
            raise ValueError(
                f"position {int(positions.max())} is beyond model.max_seq_len={self.cfg.max_seq_len}"
            )

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameter count, shared (tied) tensors counted once.

        ``exclude_embeddings`` drops the vocabulary- and position-sized tables (token and position
        embeddings and an untied LM head), leaving the count that scales compute per token and so
        does not change with weight tying (Kaplan et al.'s non-embedding N).
        """
        params = {id(p): p for p in self.parameters()}
        if exclude_embeddings:
            tables = [self.tok_emb.weight, self.lm_head.weight]
            if self.pos_emb is not None:
                tables.append(self.pos_emb.weight)
            for table in tables:
                params.pop(id(table), None)
        return sum(p.numel() for p in params.values())

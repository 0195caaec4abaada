"""Training FLOPs per token, for throughput and MFU reporting.

Lives beside the model (not in ``observability/``) because it must follow the model's exact
shapes: it reads the same resolved config the model is built from.
"""
from __future__ import annotations

from dist_llm.config.schema import ModelConfig
from dist_llm.models.gpt import resolve_model_config


def matmul_params_per_layer(cfg: ModelConfig) -> int:
    """Weights of one block that take part in a matmul (biases and norm gains excluded):
    attention q + proj = 2*d^2 and k + v = 2*d*n_kv_heads*head_dim (4*d^2 without grouped-query
    attention); MLP 2*d*d_ff (GELU) or 3*d*d_ff (SwiGLU's extra gate)."""
    resolved = resolve_model_config(cfg)
    assert resolved.d_ff is not None and resolved.n_kv_heads is not None
    d = resolved.d_model
    head_dim = resolved.head_dim or d // resolved.n_heads  # head_dim: set by structured head pruning
    kv_width = resolved.n_kv_heads * head_dim
    mlp_matrices = 3 if resolved.preset == "llama" else 2
    return 2 * d * resolved.n_heads * head_dim + 2 * d * kv_width + mlp_matrices * d * resolved.d_ff


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training (forward + backward) FLOPs per token, PaLM appendix B style::

        6 * N + 12 * n_layers * d_model * seq_len + 6 * d_model * vocab_size

    where ``N = n_layers * matmul_params_per_layer`` counts the non-embedding matmul weights
    (2 FLOPs per weight per token forward, 4 backward), the middle term is attention's QK^T and
    AV matmuls (no discount for the causal mask, as in PaLM; grouped-query attention does not
    shrink it: every query head still attends), and the last term is the LM-head
    matmul, which is a matmul whether or not its weight is tied to the token embedding. The
    embedding lookup itself costs no FLOPs.
    """
    resolved = resolve_model_config(cfg)
    non_embedding = resolved.n_layers * matmul_params_per_layer(resolved)
    attention = 12 * resolved.n_layers * resolved.d_model * seq_len
    lm_head = 6 * resolved.d_model * resolved.vocab_size
    return float(6 * non_embedding + attention + lm_head)

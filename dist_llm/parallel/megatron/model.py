"""Our GPT presets as Megatron-core ``GPTModel``s, and the state-dict adapter plain <-> Megatron.

The adapter works on three layouts of the same weights:

* *plain*: :class:`dist_llm.models.gpt.GPT` names (``tok_emb``, ``blocks.{i}.attn.qkv`` ...);
* *Megatron full*: Megatron-core names with global layer numbers, every tensor whole (what a
  tp=1 pp=1 model holds) - :func:`plain_to_megatron` / :func:`megatron_to_plain`;
* *Megatron local*: one tensor-parallel slice of a Megatron-full tensor -
  :func:`tp_slice` / :func:`tp_merge`.

Two layouts differ beyond renaming, and both are why the adapter exists:

* attention: our fused ``qkv`` rows are ``[q; k; v]`` (heads contiguous in each); Megatron's
  ``linear_qkv`` interleaves per query group ``g`` (one key/value head and the ``n_heads /
  n_kv_heads`` query heads that read it) ``[q_g...; k_g; v_g]``, so that a contiguous
  tensor-parallel split of the rows gives each rank whole groups (n_kv_heads % tp == 0);
* SwiGLU: Megatron's ``linear_fc1`` is ``[gate; up]`` and a TP rank holds ``[gate_r; up_r]``
  (not a contiguous row block of the full tensor).

This module never touches process groups: ranks and sizes arrive as ints, and the Megatron
objects it builds read ``megatron.core.parallel_state``, which the layout initialises.
"""
from __future__ import annotations

import re
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

from dist_llm.config.schema import ModelConfig
from dist_llm.models.gpt import resolve_model_config

Tensors = Dict[str, torch.Tensor]


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """The GPT-2 GELU (tanh approximation); Megatron's default activation is the exact GELU."""
    return F.gelu(x, approximate="tanh")


# --- building ---------------------------------------------------------------------------------
def transformer_config(mcfg: ModelConfig, tp: int = 1, pp: int = 1, vpp: int = 1, sp: bool = False,
                       dtype: torch.dtype = torch.float32):
    from megatron.core.transformer.transformer_config import TransformerConfig

    m = resolve_model_config(mcfg)
    llama = m.preset == "llama"
    recompute = {}
    if m.activation_checkpointing:
        recompute = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    return TransformerConfig(
        num_layers=m.n_layers, hidden_size=m.d_model, num_attention_heads=m.n_heads, ffn_hidden_size=m.d_ff,
        num_query_groups=m.n_kv_heads, kv_channels=m.head_dim or m.d_model // m.n_heads,  # head_dim: head pruning
        hidden_dropout=m.dropout, attention_dropout=m.dropout, layernorm_epsilon=m.norm_eps,
        normalization="RMSNorm" if llama else "LayerNorm",
        add_bias_linear=bool(m.bias), add_qkv_bias=bool(m.bias),
        gated_linear_unit=llama, activation_func=F.silu if llama else gelu_tanh,
        init_method_std=m.init_std,
        # Weights are then overwritten from our plain model (adapter), but Megatron's init is also
        # what marks tensor-parallel parameters (partition_dim ...), so it must run.
        perform_initialization=True, use_cpu_initialization=not torch.cuda.is_available(),
        # Fusions need Apex/TE or CUDA kernels, and change numerics; parity tests want plain ops.
        bias_activation_fusion=False, bias_dropout_fusion=False, masked_softmax_fusion=False,
        apply_rope_fusion=False, persist_layer_norm=False, gradient_accumulation_fusion=False,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp if vpp > 1 else None, sequence_parallel=sp,
        params_dtype=dtype, pipeline_dtype=dtype, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        # Batched isend/irecv with interleaved pp=2 is silently wrong on gloo (the previous and the
        # next stage are the same process); plain p2p is exact everywhere.
        batch_p2p_comm=False,
        **recompute,
    )


class SPNorm(torch.nn.Module):
    """LayerNorm or RMSNorm (``config.normalization``) for the local spec, same math as ours.

    Megatron's local ``WrappedTorchNorm`` refuses sequence parallelism (Apex's fused norm is
    CUDA-only). Under SP each TP rank normalises its own sequence slice, so the norm's weight
    gradients are partial sums: marking the parameters ``sequence_parallel`` makes Megatron's
    ``finalize_model_grads`` (and our DeepSpeed hook) all-reduce them over the TP group.
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.rms = config.normalization == "RMSNorm"
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        has_bias = not self.rms and config.add_bias_linear
        self.bias = torch.nn.Parameter(torch.zeros(hidden_size, dtype=config.params_dtype)) if has_bias else None
        for p in self.parameters():
            p.sequence_parallel = config.sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rms:  # float32 sum of squares, as dist_llm.models.gpt.RMSNorm
            xf = x.float()
            return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)


def have_transformer_engine() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available()


def layer_spec(config, vp_stage: Optional[int] = None, use_te: Optional[bool] = None):
    """Transformer Engine spec on GPUs with TE installed, else the local spec with :class:`SPNorm`."""
    from megatron.core.models.gpt import gpt_layer_specs as specs
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    use_te = have_transformer_engine() if use_te is None else use_te
    if use_te:
        return specs.get_gpt_layer_with_transformer_engine_spec(normalization=config.normalization)
    spec = specs.get_gpt_layer_local_spec(normalization=config.normalization)
    spec.submodules.input_layernorm = SPNorm
    spec.submodules.pre_mlp_layernorm = SPNorm
    n = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[spec] * n, layer_norm=SPNorm)


def build_chunks(mcfg: ModelConfig, config, vpp: int = 1) -> List[torch.nn.Module]:
    """One ``GPTModel`` per virtual pipeline stage held by this rank (one without interleaving)."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt.gpt_model import GPTModel

    m = resolve_model_config(mcfg)
    chunks = []
    for i in range(vpp):
        kw = dict(vp_stage=i) if vpp > 1 else {}
        chunks.append(GPTModel(
            config=config, transformer_layer_spec=layer_spec(config, vp_stage=i if vpp > 1 else None),
            vocab_size=m.vocab_size, max_sequence_length=m.max_seq_len,
            pre_process=ps.is_pipeline_first_stage(ignore_virtual=vpp == 1, **kw),
            post_process=ps.is_pipeline_last_stage(ignore_virtual=vpp == 1, **kw),
            share_embeddings_and_output_weights=bool(m.tie_embeddings),
            position_embedding_type="rope" if m.preset == "llama" else "learned_absolute",
            rotary_base=m.rope_theta, **kw))
    return chunks


# --- plain <-> Megatron full ------------------------------------------------------------------
_BLOCK = {  # plain name inside blocks.{i} -> Megatron name inside decoder.layers.{i}
    "norm1": "input_layernorm", "norm2": "pre_mlp_layernorm",
    "attn.qkv": "self_attention.linear_qkv", "attn.proj": "self_attention.linear_proj",
    "mlp.fc_in": "mlp.linear_fc1", "mlp.fc_out": "mlp.linear_fc2",
}
_TOP = {"tok_emb.weight": "embedding.word_embeddings.weight",
        "pos_emb.weight": "embedding.position_embeddings.weight",
        "final_norm.weight": "decoder.final_layernorm.weight", "final_norm.bias": "decoder.final_layernorm.bias",
        "lm_head.weight": "output_layer.weight"}
_TOP_INV = {v: k for k, v in _TOP.items()}


def _qkv_to_megatron(t: torch.Tensor, heads: int, groups: int) -> torch.Tensor:
    # rows [q (heads*hd); k (groups*hd); v (groups*hd)] -> groups x [q_g (heads/groups*hd); k_g; v_g]
    rest = t.shape[1:]
    hd = t.shape[0] // (heads + 2 * groups)
    q, k, v = t.split([heads * hd, groups * hd, groups * hd])
    per_group = [q.reshape(groups, -1, *rest), k.reshape(groups, hd, *rest), v.reshape(groups, hd, *rest)]
    return torch.cat(per_group, dim=1).reshape(t.shape).contiguous()


def _qkv_to_plain(t: torch.Tensor, heads: int, groups: int) -> torch.Tensor:
    rest = t.shape[1:]
    hd = t.shape[0] // (heads + 2 * groups)
    q, k, v = t.reshape(groups, -1, *rest).split([heads // groups * hd, hd, hd], dim=1)
    return torch.cat([q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)]).contiguous()


def plain_to_megatron(sd: Tensors, mcfg: ModelConfig) -> Tensors:
    """Plain GPT state dict -> Megatron-full state dict (global layer numbers, whole tensors)."""
    m = resolve_model_config(mcfg)
    out: Tensors = {}
    for name, t in sd.items():
        if name == "lm_head.weight" and m.tie_embeddings:
            continue  # tied: Megatron's output layer uses (a synchronised copy of) the embedding
        if name in _TOP:
            out[_TOP[name]] = t
            continue
        mt = re.fullmatch(r"blocks\.(\d+)\.(.+)\.(weight|bias)", name)
        if not mt:
            raise KeyError(f"no Megatron name for plain parameter {name!r}")
        i, mod, kind = mt.groups()
        pre = f"decoder.layers.{i}."
        if mod == "mlp.fc_gate":
            continue  # folded into linear_fc1 together with fc_in below
        if mod == "attn.qkv":
            t = _qkv_to_megatron(t, m.n_heads, m.n_kv_heads)
        elif mod == "mlp.fc_in" and m.preset == "llama":
            t = torch.cat([sd[f"blocks.{i}.mlp.fc_gate.{kind}"], t], dim=0)  # [gate; up]
        out[pre + _BLOCK[mod] + "." + kind] = t
    return out


def megatron_to_plain(sd: Tensors, mcfg: ModelConfig) -> Tensors:
    """Inverse of :func:`plain_to_megatron` (extra Megatron keys, e.g. ``_extra_state``, are dropped)."""
    m = resolve_model_config(mcfg)
    inv = {v: k for k, v in _BLOCK.items()}
    out: Tensors = {}
    for name, t in sd.items():
        if name.endswith("_extra_state") or (name == "output_layer.weight" and m.tie_embeddings):
            continue
        if name in _TOP_INV:
            out[_TOP_INV[name]] = t
            continue
        mt = re.fullmatch(r"decoder\.layers\.(\d+)\.(.+)\.(weight|bias)", name)
        if not mt:
            raise KeyError(f"no plain name for Megatron parameter {name!r}")
        i, mod, kind = mt.groups()
        plain = inv[mod]
        if plain == "attn.qkv":
            t = _qkv_to_plain(t, m.n_heads, m.n_kv_heads)
        elif plain == "mlp.fc_in" and m.preset == "llama":
            gate, up = t.chunk(2, dim=0)
            out[f"blocks.{i}.mlp.fc_gate.{kind}"] = gate.contiguous()
            t = up.contiguous()
        out[f"blocks.{i}.{plain}.{kind}"] = t
    if m.tie_embeddings and "tok_emb.weight" in out:  # (a partial dict may lack it)
        out["lm_head.weight"] = out["tok_emb.weight"].clone()  # separate storage (safetensors)
    return out


# --- one parameter at a time (elastic resume: optimizer state moves per parameter) ------------
def megatron_holder(plain: str, mcfg: ModelConfig) -> str:
    """The Megatron-full parameter that holds plain parameter ``plain`` (SwiGLU's ``fc_gate`` and
    ``fc_in`` share ``linear_fc1``; a tied ``lm_head`` is the word embedding)."""
    m = resolve_model_config(mcfg)
    if plain == "lm_head.weight" and m.tie_embeddings:
        return _TOP["tok_emb.weight"]
    if plain in _TOP:
        return _TOP[plain]
    mt = re.fullmatch(r"blocks\.(\d+)\.(.+)\.(weight|bias)", plain)
    if not mt:
        raise KeyError(f"no Megatron name for plain parameter {plain!r}")
    i, mod, kind = mt.groups()
    return f"decoder.layers.{i}.{_BLOCK['mlp.fc_in' if mod == 'mlp.fc_gate' else mod]}.{kind}"


def plain_sources(megatron: str, mcfg: ModelConfig) -> List[str]:
    """The plain parameters Megatron-full parameter ``megatron`` is made of (inverse of
    :func:`megatron_holder`; the last stage's tied output layer is the token embedding)."""
    m = resolve_model_config(mcfg)
    if megatron == "output_layer.weight" and m.tie_embeddings:
        return ["tok_emb.weight"]
    if megatron in _TOP_INV:
        return [_TOP_INV[megatron]]
    mt = re.fullmatch(r"decoder\.layers\.(\d+)\.(.+)\.(weight|bias)", _from_te(megatron))
    if not mt:
        raise KeyError(f"no plain name for Megatron parameter {megatron!r}")
    i, mod, kind = mt.groups()
    plain = {v: k for k, v in _BLOCK.items()}[mod]
    if plain == "mlp.fc_in" and m.preset == "llama":
        return [f"blocks.{i}.mlp.fc_gate.{kind}", f"blocks.{i}.mlp.fc_in.{kind}"]
    return [f"blocks.{i}.{plain}.{kind}"]


def megatron_full_from_plain(megatron: str, plain: Tensors, mcfg: ModelConfig) -> torch.Tensor:
    """Megatron-full tensor ``megatron`` from its :func:`plain_sources` (``plain``: name -> tensor)."""
    if megatron == "output_layer.weight" and resolve_model_config(mcfg).tie_embeddings:
        return plain["tok_emb.weight"]
    (t,) = plain_to_megatron(plain, mcfg).values()
    return t


def plain_from_megatron_full(plain: str, megatron: torch.Tensor, mcfg: ModelConfig) -> torch.Tensor:
    """Plain parameter ``plain`` cut from the Megatron-full tensor of its :func:`megatron_holder`."""
    return megatron_to_plain({megatron_holder(plain, mcfg): megatron}, mcfg)[plain]


# --- Megatron full <-> one tensor-parallel rank -----------------------------------------------
def _is_glu_fc1(name: str, gated: bool) -> bool:
    return gated and ".mlp.linear_fc1." in name


def tp_slice(name: str, full: torch.Tensor, partition_dim: Optional[int], rank: int, size: int,
             gated: bool) -> torch.Tensor:
    """This TP rank's part of a Megatron-full tensor (``partition_dim`` None: replicated)."""
    if partition_dim is None or size == 1:
        return full
    if _is_glu_fc1(name, gated):
        gate, up = full.chunk(2, dim=partition_dim)
        return torch.cat([gate.chunk(size, partition_dim)[rank], up.chunk(size, partition_dim)[rank]],
                         dim=partition_dim)
    return full.chunk(size, dim=partition_dim)[rank]


def tp_merge(name: str, parts: List[torch.Tensor], partition_dim: Optional[int], gated: bool) -> torch.Tensor:
    """Inverse of :func:`tp_slice`: the TP ranks' parts, in rank order, to the full tensor."""
    if partition_dim is None or len(parts) == 1:
        return parts[0]
    if _is_glu_fc1(name, gated):
        halves = [p.chunk(2, dim=partition_dim) for p in parts]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=partition_dim)
    return torch.cat(parts, dim=partition_dim)


def partition_dim(param: torch.Tensor) -> Optional[int]:
    """Megatron marks tensor-parallel parameters with ``tensor_model_parallel``/``partition_dim``."""
    return param.partition_dim if getattr(param, "tensor_model_parallel", False) else None


def local_params(chunk: torch.nn.Module) -> Dict[str, torch.nn.Parameter]:
    """This chunk's parameters under their Megatron-full names (global layer numbers)."""
    offsets = {j: layer.layer_number - 1 for j, layer in enumerate(chunk.decoder.layers)}
    out = {}
    for name, p in chunk.named_parameters():
        mt = re.match(r"decoder\.layers\.(\d+)\.(.*)", name)
        if mt:
            name = f"decoder.layers.{offsets[int(mt.group(1))]}.{mt.group(2)}"
        out[_from_te(name)] = p
    return out


# TE fuses the pre-attention / pre-MLP norms into the following linear layers.
_TE_NORMS = {"self_attention.linear_qkv.layer_norm_": "input_layernorm.",
             "mlp.linear_fc1.layer_norm_": "pre_mlp_layernorm."}


def _from_te(name: str) -> str:
    for te, local in _TE_NORMS.items():
        if te in name:
            return name.replace(te, local)
    return name

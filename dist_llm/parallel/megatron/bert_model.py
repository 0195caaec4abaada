"""Our BERT as Megatron-core's ``BertModel``, and the state-dict adapter plain <-> Megatron.

Megatron-core 0.16.1's ``BertModel`` is Megatron-BERT: a *pre*-LN encoder (``x + f(LN(x))``, a
final LayerNorm after the last layer, no LayerNorm after the embeddings). Our plain
:class:`~dist_llm.models.bert.Bert` is the original *post*-LN BERT (``LN(x + f(x))``, LayerNorm
after the embeddings), as Hugging Face's is; the two are different functions of their weights,
so no renaming maps one onto the other. The Megatron model is therefore Megatron's own
``BertModel`` built from ``bert_layer_local_spec`` with the norms moved to where BERT has them:

* each layer's ``input_layernorm`` / ``pre_mlp_layernorm`` are identities, and its two
  bias-dropout-add ops are :class:`PostNormBDA` (``LN(residual + dropout(out + bias))``), so
  ``encoder.layers.{i}.self_attn_bda.norm`` is our ``layers.{i}.attn_norm`` and
  ``...mlp_bda.norm`` our ``layers.{i}.mlp_norm``;
* the encoder's final LayerNorm is removed (the last layer's MLP norm already normalised);
* the embedding's dropout becomes :class:`NormThenDropout` (our ``emb_norm``, then dropout).

Everything else is Megatron's: vocab-parallel word embeddings tied to the column-parallel LM
output layer (its bias is our ``mlm_bias``), learned position and token-type embeddings, the
LM-head transform (``lm_head.dense`` + exact GELU + ``lm_head.layer_norm``), pooler and binary
(NSP) head. Padding is masked with Megatron's ``b1ss`` padding mask.

Layouts of the weights, as in :mod:`~dist_llm.parallel.megatron.model`: *plain* (our names),
*Megatron full* (whole tensors, :func:`plain_to_megatron` / :func:`megatron_to_plain`) and
*Megatron local* (one TP slice: :func:`~dist_llm.parallel.megatron.model.tp_slice`, with
``gated=False``). The fused QKV rows are re-interleaved per head exactly as for GPT.
"""
from __future__ import annotations

import copy
import re
from typing import Dict

import torch
import torch.nn.functional as F

from dist_llm.config.schema import EncoderConfig
from dist_llm.models.encoder import ff_width
from dist_llm.parallel.megatron.model import _qkv_to_megatron, _qkv_to_plain

Tensors = Dict[str, torch.Tensor]


# --- building ---------------------------------------------------------------------------------
def transformer_config(ecfg: EncoderConfig, tp: int = 1, dtype: torch.dtype = torch.float32):
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=ecfg.n_layers, hidden_size=ecfg.d_model, num_attention_heads=ecfg.n_heads,
        ffn_hidden_size=ff_width(ecfg), kv_channels=ecfg.d_model // ecfg.n_heads,
        hidden_dropout=ecfg.dropout, attention_dropout=ecfg.dropout, layernorm_epsilon=ecfg.norm_eps,
        normalization="LayerNorm", add_bias_linear=True, add_qkv_bias=bool(ecfg.qkv_bias),
        activation_func=F.gelu,  # exact (erf) GELU, as HF BERT and ours
        init_method_std=ecfg.init_std,
        # Megatron's init marks the tensor-parallel parameters; the weights are then ours.
        perform_initialization=True, use_cpu_initialization=not torch.cuda.is_available(),
        bias_activation_fusion=False, bias_dropout_fusion=False, masked_softmax_fusion=False,
        persist_layer_norm=False, gradient_accumulation_fusion=False,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=1,
        params_dtype=dtype, pipeline_dtype=dtype, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
    )


class PostNormBDA(torch.nn.Module):
    """Megatron's bias-dropout-add followed by a LayerNorm: original BERT's post-LN residual.

    ``TransformerLayer`` calls its bda as ``bda(training, fused)(out_with_bias, residual, p)``;
    as a module it owns the norm's parameters (``.norm``), which Megatron's default sharded
    state dict saves replicated over TP like any other norm."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.norm = torch.nn.LayerNorm(hidden_size, eps=eps)

    def forward(self, training: bool, fused: bool):
        from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add

        bda = get_bias_dropout_add(training, False)  # unfused: the fused kernel is CUDA-only

        def bda_norm(x_with_bias, residual, prob):
            return self.norm(bda(x_with_bias, residual, prob))

        return bda_norm


class NormThenDropout(torch.nn.Module):
    """BERT's embedding LayerNorm then dropout, in place of Megatron's embedding dropout."""

    def __init__(self, hidden_size: int, eps: float, p: float):
        super().__init__()
        self.norm = torch.nn.LayerNorm(hidden_size, eps=eps)
        self.dropout = torch.nn.Dropout(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.norm(x))


def layer_spec(config):
    """``bert_layer_local_spec`` with BERT's post-LN placement of the two layer norms."""
    from megatron.core.models.bert.bert_layer_specs import bert_layer_local_spec
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.spec_utils import ModuleSpec

    spec = copy.deepcopy(bert_layer_local_spec)
    sub = spec.submodules
    sub.input_layernorm = sub.pre_mlp_layernorm = IdentityOp
    post = ModuleSpec(module=PostNormBDA, params={"hidden_size": config.hidden_size, "eps": config.layernorm_epsilon})
    sub.self_attn_bda = sub.mlp_bda = post
    sub.sharded_state_dict_keys_map = {}  # the pre-norm keys it renames no longer exist
    return spec


def build_chunks(ecfg: EncoderConfig, config) -> list:
    """One ``BertModel`` (pp = 1: the whole model), in a list like the GPT builder's chunks."""
    from megatron.core.models.bert.bert_model import BertModel

    model = BertModel(config=config, num_tokentypes=ecfg.type_vocab_size, transformer_layer_spec=layer_spec(config),
                      vocab_size=ecfg.vocab_size, max_sequence_length=ecfg.max_seq_len, pre_process=True,
                      post_process=True, parallel_output=True, share_embeddings_and_output_weights=True,
                      add_binary_head=True)
    model.encoder.final_layernorm = None  # post-LN: the last layer's MLP norm is the last op
    model.embedding.embedding_dropout = NormThenDropout(config.hidden_size, config.layernorm_epsilon,
                                                        config.hidden_dropout)
    return [model]


# --- plain <-> Megatron full ------------------------------------------------------------------
_LAYER = {  # plain name inside layers.{i} -> Megatron name inside encoder.layers.{i}
    "attn.qkv": "self_attention.linear_qkv", "attn.proj": "self_attention.linear_proj",
    "attn_norm": "self_attn_bda.norm", "mlp.fc": "mlp.linear_fc1", "mlp.proj": "mlp.linear_fc2",
    "mlp_norm": "mlp_bda.norm",
}
_LAYER_INV = {v: k for k, v in _LAYER.items()}
_TOP = {
    "tok_emb.weight": "embedding.word_embeddings.weight",
    "pos_emb.weight": "embedding.position_embeddings.weight",
    "type_emb.weight": "embedding.tokentype_embeddings.weight",
    "emb_norm.weight": "embedding.embedding_dropout.norm.weight",
    "emb_norm.bias": "embedding.embedding_dropout.norm.bias",
    "pooler.weight": "pooler.dense.weight", "pooler.bias": "pooler.dense.bias",
    "mlm_dense.weight": "lm_head.dense.weight", "mlm_dense.bias": "lm_head.dense.bias",
    "mlm_norm.weight": "lm_head.layer_norm.weight", "mlm_norm.bias": "lm_head.layer_norm.bias",
    "mlm_bias": "output_layer.bias",  # the LM output weight is the (tied) word embedding
    "nsp.weight": "binary_head.weight", "nsp.bias": "binary_head.bias",
}
_TOP_INV = {v: k for k, v in _TOP.items()}


def plain_to_megatron(sd: Tensors, ecfg: EncoderConfig) -> Tensors:
    """Plain BERT state dict -> Megatron-full state dict (whole tensors)."""
    out: Tensors = {}
    for name, t in sd.items():
        if name in _TOP:
            out[_TOP[name]] = t
            continue
        mt = re.fullmatch(r"layers\.(\d+)\.(.+)\.(weight|bias)", name)
        if not mt or mt.group(2) not in _LAYER:
            raise KeyError(f"no Megatron name for plain BERT parameter {name!r}")
        i, mod, kind = mt.groups()
        if mod == "attn.qkv":
            t = _qkv_to_megatron(t, ecfg.n_heads, ecfg.n_heads)
        out[f"encoder.layers.{i}.{_LAYER[mod]}.{kind}"] = t
    return out


def megatron_to_plain(sd: Tensors, ecfg: EncoderConfig) -> Tensors:
    """Inverse of :func:`plain_to_megatron` (``_extra_state`` keys are dropped)."""
    out: Tensors = {}
    for name, t in sd.items():
        if name.endswith("_extra_state"):
            continue
        if name in _TOP_INV:
            out[_TOP_INV[name]] = t
            continue
        mt = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", name)
        if not mt or mt.group(2) not in _LAYER_INV:
            raise KeyError(f"no plain BERT name for Megatron parameter {name!r}")
        i, mod, kind = mt.groups()
        plain = _LAYER_INV[mod]
        if plain == "attn.qkv":
            t = _qkv_to_plain(t, ecfg.n_heads, ecfg.n_heads)
        out[f"layers.{i}.{plain}.{kind}"] = t
    return out


def local_params(chunk: torch.nn.Module) -> Dict[str, torch.nn.Parameter]:
    """The model's parameters under Megatron-full names (pp = 1: local names are global)."""
    return dict(chunk.named_parameters())

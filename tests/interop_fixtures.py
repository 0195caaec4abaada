"""Tiny real Hugging Face models, tokenizers and shards for the interop tests (nothing downloads)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

TEXT = "def main(argv):\n    return {'héllo': [1, 2, 3]}  # ünïcode ✓ and   spaces\n"
CORPUS = [TEXT * 3, "import os\nimport sys\nclass Foo(Bar):\n    pass\n", "for i in range(10):\n    print(i)\n"]
VOCAB = 320  # model vocabulary: >= the BPE's 300 tokens


def train_hf_tokenizer(out: Path, vocab_size: int = 300) -> Path:
    """A byte-level BPE trained with `tokenizers`, saved by transformers as a fast tokenizer dir."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 20, trainer=trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                pad_token="<pad>")
    fast.save_pretrained(out)
    return out


def hf_gpt2(vocab: int = VOCAB, tie: bool = True, positions: int = 64):
    import transformers

    cfg = transformers.GPT2Config(vocab_size=vocab, n_positions=positions, n_embd=32, n_layer=2, n_head=4,
                                  resid_pdrop=0, embd_pdrop=0, attn_pdrop=0, tie_word_embeddings=tie)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def hf_llama(vocab: int = VOCAB, kv_heads: int = 2, tie: bool = False, positions: int = 64):
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=kv_heads,
                                   max_position_embeddings=positions, rms_norm_eps=1e-5, tie_word_embeddings=tie,
                                   rope_parameters={"rope_type": "default", "rope_theta": 500.0})
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # HF inits norms to 1: perturb them so a swapped norm would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def write_shards(split_dir: Path, tok, seq_len: int, n_samples: int = 32) -> Path:
    """Real tar shards + manifest of ``tok``'s ids of the corpus (the tokenizer file next to them)."""
    from dist_llm.data.shards import ShardWriter

    ids = []
    while len(ids) < n_samples * (seq_len + 1):
        for text in CORPUS:
            ids.extend(tok.encode(text))
            if tok.eos_id is not None:
                ids.append(tok.eos_id)
    arr = np.asarray(ids[: n_samples * (seq_len + 1)], dtype=np.int64).reshape(n_samples, seq_len + 1)
    with ShardWriter(split_dir, seq_len=seq_len, vocab_size=tok.vocab_size, samples_per_shard=8,
                     eos_id=tok.eos_id, tokenizer_meta=tok.meta()) as writer:
        for row in arr:
            writer.add(row)
    return split_dir

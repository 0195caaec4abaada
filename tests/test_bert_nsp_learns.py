"""A tiny BERT learns next-sentence prediction when it is trivially learnable, through the real
task path (record decoding with MLM masking, MlmNspTask.loss and its metrics, AdamW).

Each "document" writes with its own 8 tokens (disjoint between documents): a next B uses A's
tokens, a random B another document's. A label misaligned with its pair, an NSP head that does
not read [CLS], segments that do not reach the model, or an accuracy computed over tokens would
keep validation accuracy near 0.5; in-process, ~10 s on one core.
"""
from __future__ import annotations

import numpy as np
import torch

from dist_llm.config.store import compose
from dist_llm.train.tasks import build_task

SP = {"pad": 0, "bos": 1, "eos": 2, "mask": 3, "cls": 4, "sep": 5}
VOCAB, SEQ, NDOC = 103, 48, 12


def _pair(rng: np.random.Generator) -> dict:
    d, rnd = int(rng.integers(NDOC)), int(rng.random() < 0.5)
    other = (d + 1 + int(rng.integers(NDOC - 1))) % NDOC if rnd else d
    la, lb = int(rng.integers(8, 22)), int(rng.integers(8, 22))
    a, b = 7 + 8 * d + rng.integers(0, 8, la), 7 + 8 * other + rng.integers(0, 8, lb)
    seq = [SP["cls"], *a, SP["sep"], *b, SP["sep"]]
    toks, segs = np.zeros(SEQ, np.int64), np.zeros(SEQ, np.uint8)
    toks[:len(seq)], segs[la + 2:len(seq)] = seq, 1
    return {"tokens.npy": toks, "segments.npy": segs, "nsp.cls": str(rnd).encode()}


def test_tiny_bert_learns_trivially_learnable_nsp():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: extra threads only contend on a shared machine
    try:
        _learn_and_check()
    finally:
        torch.set_num_threads(threads)


def _learn_and_check() -> None:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    cfg = compose(["task=mlm_nsp", "model=bert_tiny", "model.d_model=64", "model.d_ff=128",
                   f"model.max_seq_len={SEQ}", "model.vocab_size=128", f"train.seq_len={SEQ}"])
    task = build_task(cfg)
    task.setup_data({"special_ids": SP, "vocab_size": VOCAB})
    model = task.build_model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    val = task.decode_eval_batch([_pair(rng) for _ in range(256)], list(range(256)))
    for step in range(1, 201):  # measured: 0.87 at step 100, 0.99 at 200
        idx = list(range(step * 32, step * 32 + 32))
        loss, _ = task.loss(model, task.decode_batch([_pair(rng) for _ in idx], step, idx))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        _, m = task.loss(model, val)
    correct, pairs = (int(x) for x in m["nsp_accuracy"])
    assert pairs == 256  # per pair, not per token
    assert correct / pairs > 0.9, f"val NSP accuracy {correct / pairs:.3f} on a trivially learnable task"

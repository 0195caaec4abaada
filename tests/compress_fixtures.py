"""Tiny GPTs trained in-process on the embedded corpus and saved as our checkpoints, so the
compression tests see meaningful perplexities (a random model's would not move under pruning)."""
from __future__ import annotations

from pathlib import Path

import torch

from dist_llm.checkpoint.manager import CheckpointManager
from dist_llm.config.schema import DataConfig, DatasetSource, JobConfig, ModelConfig, TrainConfig
from dist_llm.config.store import config_to_dict
from dist_llm.data import ByteTokenizer
from dist_llm.models.gpt import GPT

SEQ_LEN = 32  # the stdlib_cache corpus is packed at 32


class SingleRank:
    rank, world_size, dp, tp, pp = 0, 1, 1, 1, 1

    def barrier(self):
        pass


class WeightsEngine:
    """What CheckpointManager.save reads from an engine: full weights and an optimizer state."""

    def __init__(self, model):
        self.model = model

    def model_state_dict(self):
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def optimizer_state(self):
        return {}


def tiny_config(preset: str) -> ModelConfig:
    kv = 2 if preset == "llama" else None  # llama: GQA, 2 query heads per kv head
    return ModelConfig(preset=preset, n_layers=2, n_heads=4, n_kv_heads=kv, d_model=64, max_seq_len=SEQ_LEN,
                       vocab_size=ByteTokenizer().vocab_size)


def train_checkpoint(root: Path, corpus: Path, preset: str, steps: int = 300, batch_size: int = 16) -> Path:
    """Train with plain AdamW for ``steps`` steps; save through the real CheckpointManager."""
    from dist_llm.compress.finetune import train_batches

    torch.manual_seed(0)
    cfg = tiny_config(preset)
    model = GPT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    batches = train_batches(str(corpus / "train"), SEQ_LEN, batch_size, seed=0)
    for _ in range(steps):
        batch = next(batches)
        loss = model(batch[:, :-1], batch[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    batches.close()
    job = JobConfig(model=cfg, data=DataConfig(train=[DatasetSource(path=str(corpus / "train"))],
                                               val=str(corpus / "val")),
                    train=TrainConfig(seq_len=SEQ_LEN))
    run_dir = root / f"run_{preset}"
    CheckpointManager(run_dir, SingleRank(), keep_last=1).save(
        steps, WeightsEngine(model), {"step": steps}, {}, config_to_dict(job))
    return run_dir

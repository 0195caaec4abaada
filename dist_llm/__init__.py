"""dist-llm: train and fine-tune LLMs on clusters (DeepSpeed ZeRO + Megatron-core, WebDataset, Slurm, Ray, W&B)."""

__version__ = "0.1.0"

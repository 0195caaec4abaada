"""Model evaluation on our shards (perplexity); shared by prune/quantize reports and `dist-llm eval`."""
from dist_llm.evaluation.lm import evaluate_lm

__all__ = ["evaluate_lm"]

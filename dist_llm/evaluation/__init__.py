"""Model evaluation on our shards (perplexity); shared by prune/quantize reports and `dist-llm eval`."""
from dist_llm.evaluation.lm import evaluate_lm

__all__ = ["evaluate_lm", "evaluate_task"]


def evaluate_task(*args, **kwargs):
    """:func:`dist_llm.evaluation.task_eval.evaluate_task` (imported lazily: it pulls in the tasks)."""
    from dist_llm.evaluation.task_eval import evaluate_task as run

    return run(*args, **kwargs)

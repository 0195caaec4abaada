"""Training objectives as objects (see :mod:`dist_llm.train.tasks.base`); importing this package
registers the built-in kinds."""
from dist_llm.train.tasks.base import Task, batch_to, build_task, register_task, registered_kinds
from dist_llm.train.tasks import pretrain  # noqa: F401  (registers "pretrain")
from dist_llm.train.tasks import distill  # noqa: F401  (registers "distill")

__all__ = ["Task", "batch_to", "build_task", "register_task", "registered_kinds"]

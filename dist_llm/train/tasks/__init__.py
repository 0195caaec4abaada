"""Training objectives as objects (see :mod:`dist_llm.train.tasks.base`); importing this package
registers the built-in kinds."""
from dist_llm.train.tasks.base import Task, batch_to, build_task, register_task, registered_kinds
from dist_llm.train.tasks import classify, mlm_nsp, pretrain  # noqa: F401  (register their kinds)

__all__ = ["Task", "batch_to", "build_task", "register_task", "registered_kinds"]

"""Megatron-core engines: tensor/pipeline parallelism with ZeRO over the data-parallel group
(``zero_engine``: pp = 1, DeepSpeed ZeRO; ``pipeline_engine``: pp > 1, Megatron schedules).

Import Megatron only through :func:`import_parallel_state` so that, on a machine without CUDA,
the compatibility layer (``cpu_compat``) is active before Megatron's first import.
"""
from __future__ import annotations


def import_parallel_state():
    import torch

    if not torch.cuda.is_available():
        from dist_llm.parallel.megatron import cpu_compat

        cpu_compat.install()
    from megatron.core import parallel_state

    return parallel_state

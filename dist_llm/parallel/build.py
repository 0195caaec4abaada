"""Engine selection: the one place that maps a job config to an engine class."""
from __future__ import annotations

from dist_llm.config.schema import JobConfig


def engine_class(cfg: JobConfig) -> type:
    """``parallel.engine=deepspeed`` -> DeepSpeedEngine; ``megatron`` with ``pp = 1`` ->
    MegatronDeepSpeedEngine (DeepSpeed ZeRO over DP around the TP model), with ``pp > 1`` ->
    MegatronPipelineEngine (Megatron-core schedules + DPShardedAdamW). Importing an engine
    module does not import DeepSpeed or Megatron; constructing the engine does."""
    engine = cfg.parallel.engine
    if engine == "deepspeed":
        from dist_llm.parallel.deepspeed_engine import DeepSpeedEngine

        return DeepSpeedEngine
    if engine == "megatron":
        if cfg.parallel.pp > 1:
            from dist_llm.parallel.megatron.pipeline_engine import MegatronPipelineEngine

            return MegatronPipelineEngine
        from dist_llm.parallel.megatron.zero_engine import MegatronDeepSpeedEngine

        return MegatronDeepSpeedEngine
    raise ValueError(f"parallel.engine={engine!r} is not available: use deepspeed or megatron")


def build_engine(cfg: JobConfig, model, layout, task=None):
    """The engine for this config around ``model`` (the plain model, same weights on every rank).

    ``task`` (a :class:`dist_llm.train.tasks.Task`) computes the loss of a batch; only the
    DeepSpeed engine takes one. Megatron engines compute the loss of their architecture
    themselves (:mod:`dist_llm.parallel.megatron.arch`): ``task=pretrain`` on GPT and
    ``task=mlm_nsp`` on BERT (``pp = 1``); validate() refuses the rest before any process group starts."""
    cls = engine_class(cfg)
    if task is not None and cfg.parallel.engine == "deepspeed":
        return cls(cfg, model, layout, task=task)
    if task is not None and task.kind not in ("pretrain", "mlm_nsp"):
        raise ValueError(f"task.kind={task.kind} is not supported by parallel.engine={cfg.parallel.engine}: "
                         f"use parallel.engine=deepspeed (parallel=zero0..zero3); see docs/parallelism.md")
    return cls(cfg, model, layout)

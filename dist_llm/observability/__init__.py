"""Observability: the metric-logger interface (wandb | console | none + JSONL), MFU/throughput/
memory metrics and the progress bar. The only package that imports wandb; it imports nothing
from train/, parallel/ or launch/."""
from dist_llm.observability.loggers import (
    ConsoleLogger,
    JsonlLogger,
    MetricLogger,
    MultiLogger,
    NoneLogger,
    WandbCredentialsError,
    WandbLogger,
    build_logger,
    format_number,
    resolve_wandb_mode,
    scrub_secrets,
)
from dist_llm.observability.metrics import (
    Throughput,
    gpu_peak_flops,
    measure_cpu_peak_flops,
    memory_stats,
    mfu,
)
from dist_llm.observability.progress import NullProgress, make_progress

__all__ = [
    "ConsoleLogger",
    "JsonlLogger",
    "MetricLogger",
    "MultiLogger",
    "NoneLogger",
    "NullProgress",
    "Throughput",
    "WandbCredentialsError",
    "WandbLogger",
    "build_logger",
    "format_number",
    "gpu_peak_flops",
    "make_progress",
    "measure_cpu_peak_flops",
    "memory_stats",
    "mfu",
    "resolve_wandb_mode",
    "scrub_secrets",
]

"""Observability: the metric-logger interface (wandb | console | none + JSONL), MFU/throughput/
memory metrics and the progress bar. The only package that imports wandb; it imports nothing
from train/, parallel/ or launch/."""
# The names below load on first use (PEP 562): the launcher's parent process imports only
# ``redact`` (no torch: metrics imports it), which saves ~1.5 s of serial start-up per launch.
_EXPORTS = {
    "loggers": ("ConsoleLogger", "JsonlLogger", "MetricLogger", "MultiLogger", "NoneLogger",
                "WandbCredentialsError", "WandbLogger", "build_logger", "format_number",
                "resolve_wandb_mode", "scrub_secrets"),
    "metrics": ("Throughput", "gpu_peak_flops", "measure_cpu_peak_flops", "memory_stats", "mfu"),
    "progress": ("NullProgress", "make_progress"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}


def __getattr__(name: str):
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


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

"""Throughput, MFU and memory numbers for the training log.

MFU (model FLOPs utilisation) needs a peak to divide by. On GPUs it comes from a small table of
vendor dense peaks; on CPU there is no meaningful datasheet number, so we measure a float32
matmul once and use that as the achievable peak. ``train.ui.peak_flops`` overrides both.
"""
from __future__ import annotations

import functools
import os
import re
import statistics
import time
from collections import deque
from typing import Any

import torch

GiB = float(2**30)

# Dense (no 2:4 sparsity) peak FLOP/s per device, from NVIDIA datasheets. Columns: bf16 (== fp16
# on Ampere and later), tf32 tensor cores, plain fp32. Rows are matched in order against the
# lower-cased torch device name, so more specific patterns come first ("a100" before "a10").
_TF = 1e12
_PEAKS: list[tuple[str, dict[str, float]]] = [
    (r"b200", {"bf16": 2250 * _TF, "fp16": 2250 * _TF, "tf32": 1100 * _TF}),
    (r"h[12]00 nvl", {"bf16": 835.5 * _TF, "fp16": 835.5 * _TF, "tf32": 417.5 * _TF, "fp32": 60 * _TF}),
    (r"h100 pcie", {"bf16": 756.5 * _TF, "fp16": 756.5 * _TF, "tf32": 378 * _TF, "fp32": 51.2 * _TF}),
    # H100 SXM (e.g. "NVIDIA H100 80GB HBM3"), H200, H800 and GH200 share the Hopper SXM peak.
    (r"gh200|h200|h100|h800", {"bf16": 989.4 * _TF, "fp16": 989.4 * _TF, "tf32": 494.7 * _TF, "fp32": 66.9 * _TF}),
    (r"a100|a800", {"bf16": 312 * _TF, "fp16": 312 * _TF, "tf32": 156 * _TF, "fp32": 19.5 * _TF}),
    (r"l40s", {"bf16": 362.05 * _TF, "fp16": 362.05 * _TF, "tf32": 183 * _TF, "fp32": 91.6 * _TF}),
    (r"l40\b", {"bf16": 181.05 * _TF, "fp16": 181.05 * _TF, "tf32": 90.5 * _TF, "fp32": 90.5 * _TF}),
    (r"\bl4\b", {"bf16": 121 * _TF, "fp16": 121 * _TF, "tf32": 60 * _TF, "fp32": 30.3 * _TF}),
    (r"\ba10\b", {"bf16": 125 * _TF, "fp16": 125 * _TF, "tf32": 62.5 * _TF, "fp32": 31.2 * _TF}),
    (r"v100.*pcie", {"fp16": 112 * _TF, "fp32": 14 * _TF}),
    (r"v100", {"fp16": 125 * _TF, "fp32": 15.7 * _TF}),  # Volta: no bf16, no tf32
]

_DTYPE_ALIASES = {
    "bf16": "bf16", "bfloat16": "bf16", "torch.bfloat16": "bf16",
    "fp16": "fp16", "float16": "fp16", "half": "fp16", "torch.float16": "fp16",
    "tf32": "tf32",
    "fp32": "fp32", "float32": "fp32", "float": "fp32", "torch.float32": "fp32",
}


def gpu_peak_flops(device_name: str, dtype: str) -> float | None:
    """Dense peak FLOP/s for a GPU (``torch.cuda.get_device_name()``) and a compute dtype.

    Returns None for unknown devices or dtypes the device has no tensor-core path for, so the
    caller can say "MFU unavailable" instead of reporting a made-up number.
    """
    kind = _DTYPE_ALIASES.get(str(dtype).strip().lower())
    if kind is None:
        return None
    name = device_name.lower()
    for pattern, peaks in _PEAKS:
        if re.search(pattern, name):
            return peaks.get(kind)
    return None


def measure_cpu_peak_flops(n: int = 512, repeats: int = 5) -> float:
    """Median FLOP/s of a float32 ``n x n`` matmul with the current torch thread count.

    This is an achievable peak, not a datasheet one: CPU MFU then reads as "fraction of what a
    plain matmul gets on this box", which is the useful comparison on shared CPU machines.
    """
    a = torch.randn(n, n, dtype=torch.float32)
    b = torch.randn(n, n, dtype=torch.float32)
    torch.matmul(a, b)  # warm up allocator and kernels
    flops = 2.0 * n * n * n
    rates: list[float] = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        torch.matmul(a, b)
        dt = time.perf_counter() - t0
        rates.append(flops / max(dt, 1e-9))
    return float(statistics.median(rates))


def mfu(tokens_per_s: float, flops_per_token: float, n_devices: int, peak_flops_per_device: float) -> float:
    """Achieved model FLOP/s over the peak of all devices (0..1, can exceed 1 if the peak is low)."""
    if n_devices <= 0 or peak_flops_per_device <= 0:
        raise ValueError(
            f"mfu needs n_devices > 0 and peak_flops_per_device > 0, got {n_devices} and {peak_flops_per_device}"
        )
    return tokens_per_s * flops_per_token / (n_devices * peak_flops_per_device)


def memory_stats(device: Any) -> dict[str, float]:
    """Memory numbers in GiB under ``mem/`` keys: process RSS always, CUDA allocator stats on GPU.

    RSS is what kills CPU jobs (OOM killer); on GPU the allocator's max_allocated is what tells
    you how close a config is to OOM, and reserved vs allocated shows fragmentation.
    """
    dev = torch.device(device)
    out = {"mem/rss_gb": _this_process(os.getpid()).memory_info().rss / GiB}
    if dev.type == "cuda" and torch.cuda.is_available():
        out["mem/allocated_gb"] = torch.cuda.memory_allocated(dev) / GiB
        out["mem/reserved_gb"] = torch.cuda.memory_reserved(dev) / GiB
        out["mem/max_allocated_gb"] = torch.cuda.max_memory_allocated(dev) / GiB
    return out


@functools.lru_cache(maxsize=1)
def _this_process(pid: int) -> Any:
    """psutil's handle on this process, made once per pid (a forked child gets its own): building
    one reads /proc every time, which showed up in a per-step profile."""
    import psutil

    return psutil.Process(pid)


class Throughput:
    """Moving-window throughput that ignores the first ``warmup`` steps.

    The first steps include compilation, allocator growth and data-loader start-up; averaging
    them in would understate steady-state speed (and MFU) for a long time. Rates are
    ``sum(tokens) / sum(time)`` over the window, which weights slow steps correctly (a mean of
    per-step rates would not). Until the window has data, the current step's own rate is returned.
    """

    def __init__(self, window: int = 20, warmup: int = 2) -> None:
        if window < 1 or warmup < 0:
            raise ValueError(f"Throughput needs window >= 1 and warmup >= 0, got {window}, {warmup}")
        self.window = window
        self.warmup = warmup
        self._seen = 0
        self._steps: deque[tuple[float, float, float]] = deque(maxlen=window)

    def reset(self) -> None:
        """Forget the window (e.g. after a resume, whose first steps are slow again)."""
        self._seen = 0
        self._steps.clear()

    def update(self, step_time_s: float, tokens: float, samples: float) -> dict[str, float]:
        """Record one step; returns tokens_per_s, samples_per_s and step_time_s (window mean)."""
        self._seen += 1
        if self._seen > self.warmup:
            self._steps.append((float(step_time_s), float(tokens), float(samples)))
        steps = list(self._steps) or [(float(step_time_s), float(tokens), float(samples))]
        t = sum(s[0] for s in steps)
        tok = sum(s[1] for s in steps)
        smp = sum(s[2] for s in steps)
        t_safe = max(t, 1e-12)
        return {
            "tokens_per_s": tok / t_safe,
            "samples_per_s": smp / t_safe,
            "step_time_s": t / len(steps),
        }

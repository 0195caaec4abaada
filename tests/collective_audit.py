"""Test-only: record every tensor handed to a torch.distributed collective in this process.

Installed in each rank of a real run through a ``sitecustomize`` the test puts on PYTHONPATH
(``DIST_LLM_COLLECTIVE_AUDIT=<dir>``). Each call is written to ``<dir>/rank-<RANK>.jsonl`` with
the collective, the devices of its tensors, the code that called it and any rule it breaks:

* our code (``dist_llm/``) calls collectives only from ``dist_llm/parallel/layout.py``, the one
  place that knows the rank's device (DeepSpeed and Megatron manage their own);
* a tensor handed over by the layout is on ``layout.device`` (read from the calling layout
  object itself), the rule NCCL enforces on GPUs;
* the process group's backend accepts the device: gloo CPU tensors, NCCL CUDA tensors.
"""
from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path

COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor",
               "broadcast", "reduce", "gather", "scatter", "all_to_all", "all_to_all_single", "barrier",
               "all_gather_object", "broadcast_object_list", "send", "recv", "isend", "irecv")
BACKEND_DEVICES = {"gloo": {"cpu"}, "nccl": {"cuda"}}


def _tensors(args, kwargs):
    import torch

    out = []
    for a in list(args) + list(kwargs.values()):
        if isinstance(a, torch.Tensor):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            out.extend(x for x in a if isinstance(x, torch.Tensor))
    return out


def _caller(frame):
    """The first frame outside torch.distributed and this module."""
    while frame is not None:
        f = frame.f_code.co_filename
        if "torch/distributed" not in f and not f.endswith("collective_audit.py") and "contextlib" not in f:
            return frame
        frame = frame.f_back
    return None


def _check(name, args, kwargs, frame, backend):
    caller = _caller(frame)
    where = f"{caller.f_code.co_filename}:{caller.f_lineno}" if caller else "?"
    problems = []
    tensors = _tensors(args, kwargs)
    ours = "/dist_llm/" in where
    if ours and "dist_llm/parallel/layout.py" not in where:
        problems.append(f"{name} called from {where}, not through the layout")
    layout = caller.f_locals.get("self") if caller is not None and ours else None
    want = getattr(layout, "device", None)
    for t in tensors:
        if want is not None and t.device != want:
            problems.append(f"{name} from {where}: tensor on {t.device}, layout.device is {want}")
        if backend in BACKEND_DEVICES and t.device.type not in BACKEND_DEVICES[backend]:
            problems.append(f"{name} from {where}: {backend} cannot move a tensor on {t.device}")
    return {"op": name, "where": where, "via_layout": want is not None,
            "devices": sorted({str(t.device) for t in tensors}), "problems": problems}


def install(out_dir: str) -> None:
    import torch.distributed as dist

    path = Path(out_dir) / f"rank-{os.environ.get('RANK', '0')}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    sink = open(path, "a", buffering=1)

    def wrap(name, fn):
        @functools.wraps(fn)
        def recorded(*args, **kwargs):
            backend = dist.get_backend() if dist.is_initialized() else None
            sink.write(json.dumps(_check(name, args, kwargs, sys._getframe(1), backend)) + "\n")
            return fn(*args, **kwargs)

        return recorded

    for name in COLLECTIVES:
        if hasattr(dist, name):
            setattr(dist, name, wrap(name, getattr(dist, name)))


def read(out_dir: Path) -> list:
    recs = []
    for p in sorted(Path(out_dir).glob("rank-*.jsonl")):
        recs += [dict(json.loads(line), rank=p.stem) for line in p.read_text().splitlines()]
    return recs

"""The layout-neutral view of a checkpoint's optimizer state, shared by every engine.

Elastic resume (another dp size, ZeRO stage, offload, or engine) goes through this one form:
the *saving* engine's reader turns a committed checkpoint directory into a
:class:`PlainOptimizerState` keyed by the **plain model's parameter names** (the names of
``model.safetensors``), and the *loading* engine takes from it exactly the slices its own
partitions hold (:meth:`dist_llm.parallel.engine.Engine.load_plain_optimizer_state`).

Tensors are produced lazily, one parameter at a time, so no rank ever holds the whole
optimizer state at once; a reader may read only the byte ranges it needs.

Readers are registered by the manifest's ``engine`` name (``Engine.checkpoint_name``).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Dict, List

import torch

# Per-parameter states, each a full fp32 tensor shaped like the plain model's parameter:
#   "master": fp32 master weights (equal to the weights in an fp32 run),
#   "exp_avg", "exp_avg_sq": AdamW moments.
STATES = ("master", "exp_avg", "exp_avg_sq")


@dataclasses.dataclass
class PlainOptimizerState:
    step: int  # AdamW step count (the same for every parameter in our runs)
    names: List[str]  # plain parameter names that have optimizer state
    get: Callable[[str], Dict[str, torch.Tensor]]  # name -> {state: full fp32 tensor}
    extra: Dict[str, Any] = dataclasses.field(default_factory=dict)  # e.g. loss-scaler state


# manifest "engine" name -> reader(checkpoint dir, manifest) -> PlainOptimizerState
PlainStateReader = Callable[[Path, Dict[str, Any]], PlainOptimizerState]
READERS: Dict[str, PlainStateReader] = {}


def register_reader(engine_name: str) -> Callable[[PlainStateReader], PlainStateReader]:
    def deco(fn: PlainStateReader) -> PlainStateReader:
        READERS[engine_name] = fn
        return fn
    return deco


def read_plain_state(path: Path, manifest: Dict[str, Any]) -> PlainOptimizerState:
    name = manifest.get("engine", "")
    if name not in READERS:
        raise ValueError(f"checkpoint {path} was saved by engine {name!r}, which has no layout-neutral "
                         f"optimizer reader (known: {sorted(READERS)}); resume it with the same engine "
                         f"and layout it was saved with")
    return READERS[name](path, manifest)

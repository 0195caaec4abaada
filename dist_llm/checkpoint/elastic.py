"""How a checkpoint is loaded into this job (the load plan), and the elastic path.

Three ways, chosen from the manifest and the loading engine:

* ``sharded``: an engine that writes ``sharded/`` (Megatron) loads its own copy, at another layout
  too when it reshards (unchanged by elastic resume);
* ``rank``: same layout and engine, and no ``elastic/`` form: each rank restores the optimizer
  partition of its own ``rank-XXXXX.pt`` (checkpoints written before the elastic form);
* ``weights``: another engine at the same layout that takes no layout-neutral state: weights and
  loader state only, a fresh optimizer (logged);
* ``elastic``: everything else that an elastic engine can take: the saving engine's reader
  (:data:`dist_llm.parallel.elastic_state.READERS`) turns the checkpoint into a layout-neutral
  optimizer state, the weights come from ``model.safetensors``, and the engine takes its own
  slices (:meth:`~dist_llm.parallel.engine.Engine.load_plain_optimizer_state`). Another dp size,
  ZeRO stage, offload setting or engine. RNG states are restored only at the same layout and
  engine (per-rank states mean nothing to another layout); the loader state is dp-independent.

The DeepSpeed engine writes its optimizer state only in the elastic form, so its own same-layout
resumes take the elastic path too (bit-exact: the slices are exact copies of the partitions).
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Dict, Optional

from dist_llm.checkpoint.compat import IncompatibleCheckpointError, check_resume_compatible
from dist_llm.checkpoint.integrity import CheckpointError
# imported for their side effect: they register the readers of their engines' checkpoints
from dist_llm.parallel import deepspeed_elastic  # noqa: F401
from dist_llm.parallel.megatron import elastic as _megatron_elastic  # noqa: F401
from dist_llm.parallel.elastic_state import READERS, read_plain_state

ELASTIC_PREFIX = "elastic/"
log = logging.getLogger("dist_llm.checkpoint")


@dataclasses.dataclass(frozen=True)
class LoadPlan:
    mode: str  # "sharded" | "rank" | "elastic" | "weights"
    same_layout: bool
    same_engine: bool
    rank_name: str  # the rank file this rank reads (RNG, loader state, optimizer in "rank" mode)

    @property
    def sharded(self) -> bool:
        return self.mode == "sharded"

    @property
    def restores_rng(self) -> bool:
        return self.same_layout and self.same_engine

    def reads(self, rel: str) -> bool:
        """Whether this rank reads ``rel`` (other ranks' rank files it does not)."""
        if rel.startswith("rank-") and rel.endswith(".pt"):
            return rel == self.rank_name
        return True


def has_elastic(manifest: Dict[str, Any]) -> bool:
    return any(rel.startswith(ELASTIC_PREFIX) for rel in manifest["files"])


def plan_load(path: Path, manifest: Dict[str, Any], layout, engine,
              job_config: Optional[Dict[str, Any]]) -> LoadPlan:
    """The load plan, or a CheckpointError saying why this job cannot take the checkpoint."""
    tp, pp = getattr(layout, "tp", 1), getattr(layout, "pp", 1)
    saved = (manifest.get("world_size"), manifest.get("tp", 1), manifest.get("pp", 1))
    same_layout = saved == (layout.world_size, tp, pp)
    saver = manifest.get("engine", engine.checkpoint_name)
    same_engine = saver == engine.checkpoint_name
    has_sharded = any(rel.startswith("sharded/") for rel in manifest["files"])
    if engine.supports_sharded and has_sharded and same_engine and (same_layout or engine.reshardable):
        mode = "sharded"
    elif same_layout and same_engine and not has_elastic(manifest):
        mode = "rank"
    elif engine.elastic and saver in READERS and (has_elastic(manifest) or has_sharded):
        mode = "elastic"
    elif same_layout and not same_engine:
        mode = "weights"  # an engine that takes no layout-neutral state: weights only, fresh optimizer
    else:
        raise CheckpointError(
            f"checkpoint {path} was saved by {saved[0]} ranks (tp={saved[1]}, pp={saved[2]}) with engine "
            f"{saver} but this job has {layout.world_size} (tp={tp}, pp={pp}) with {engine.checkpoint_name}: "
            + _why_not(saver, engine))
    rank_name = f"rank-{layout.rank:05d}.pt" if same_layout else "rank-00000.pt"
    try:
        check_resume_compatible(path, manifest, job_config, loads_rank_partitions=mode == "rank")
    except IncompatibleCheckpointError as e:
        raise CheckpointError(str(e)) from None
    return LoadPlan(mode, same_layout, same_engine, rank_name)


def _why_not(saver: str, engine) -> str:
    if not engine.elastic:
        return (f"{engine.checkpoint_name} resumes only its own checkpoints at their layout (or, if it "
                f"reshards, its sharded/ copy); use an elastic engine (parallel.engine=deepspeed) or the layout "
                f"and engine the checkpoint was saved with")
    if saver not in READERS:
        return (f"engine {saver} has no layout-neutral optimizer reader (known: {sorted(READERS)}); resume "
                f"with the same layout and engine it was saved with")
    return ("the checkpoint has no layout-neutral copy of its optimizer state (no elastic/ or sharded/ files: "
            "it was written before elastic resume existed); resume it once with the layout, engine and ZeRO "
            "stage it was saved with, and the next checkpoint resumes at any layout")


def load_elastic(path: Path, manifest: Dict[str, Any], engine, plan: LoadPlan) -> None:
    """Weights from ``model.safetensors``, then the optimizer through the saving engine's reader."""
    from safetensors.torch import load_file

    engine.load_model_state_dict(load_file(str(path / "model.safetensors")))
    engine.load_plain_optimizer_state(read_plain_state(path, manifest))
    if not plan.restores_rng:
        log.info("elastic resume of %s (saved by %s ranks with %s): optimizer state resharded; RNG states "
                 "not restored (they are per rank of the old layout)", path, manifest.get("world_size"),
                 manifest.get("engine"))

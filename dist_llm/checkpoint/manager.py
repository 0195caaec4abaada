"""Atomic, verifiable checkpoints.

Layout of a run directory::

    checkpoints/step-00000040/        one committed checkpoint
        model.safetensors            full fp32 weights (rank 0)
        rank-00000.pt ...            per rank: optimizer partition, RNG states, loader state
        sharded/                     engines that reshard (Megatron): weights + optimizer through
                                     megatron.core.dist_checkpointing, loadable at another layout
        trainer.json                 step, tokens seen, best validation loss (rank 0)
        manifest.json                sha256 of every file, the config, versions; written last
    checkpoints/latest               name of the newest committed checkpoint
    best/                            weights of the best validation loss so far (model selection)

Commit protocol: every rank writes into ``step-N.tmp/``; after a barrier rank 0 hashes the
files, writes the manifest, renames the directory to ``step-N`` and only then repoints
``latest`` (write + rename, both atomic on POSIX). A crash at any point leaves ``latest`` on the
previous committed checkpoint; stale ``*.tmp`` directories are removed at the next start.
Nothing is unpickled: weights are safetensors and rank files load with ``weights_only=True``.

Observers (:class:`SaveHook`) are told when a save passes each :class:`SaveStage`; the fault
injection of the tests (dist_llm/train/debug.py) is one such observer.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import sys
from enum import Enum
from pathlib import Path
from typing import Any, Dict, Optional, Protocol, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from dist_llm.fileio import fsync_dir, sha256_file, write_atomic
from dist_llm.parallel.layout import ParallelLayout

STEP_RE = re.compile(r"^step-(\d{8})$")


class CheckpointError(RuntimeError):
    pass


class SaveStage(str, Enum):
    """Named points of :meth:`CheckpointManager.save`, in order. The first two are passed on every
    rank; the last two on rank 0 only (it alone writes the manifest and commits)."""

    after_rank_files = "after_rank_files"  # this rank's files are in step-N.tmp (before the barrier)
    after_all_files = "after_all_files"  # every rank's files are written (after the barrier)
    after_manifest = "after_manifest"  # manifest.json written, step-N.tmp not yet renamed
    before_latest = "before_latest"  # step-N committed, ``latest`` not yet repointed


class SaveHook(Protocol):
    def on_stage(self, stage: SaveStage, step: int) -> None: ...


def capture_rng() -> Dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Dict[str, Any]) -> None:
    random.setstate(tuple(v if not isinstance(v, list) else tuple(v) for v in state["python"]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def versions() -> Dict[str, str]:
    out = {"python": sys.version.split()[0], "torch": torch.__version__}
    for mod in ("deepspeed", "dist_llm"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # pragma: no cover - version is informational
            pass
    return out


class CheckpointManager:
    def __init__(self, run_dir: str | Path, layout: ParallelLayout, keep_last: int,
                 hooks: Sequence[SaveHook] = ()):
        self.run_dir = Path(run_dir)
        self.root = self.run_dir / "checkpoints"
        self.layout = layout
        self.keep_last = keep_last
        self.hooks = list(hooks)

    def _stage(self, stage: SaveStage, step: int) -> None:
        for hook in self.hooks:
            hook.on_stage(stage, step)

    # --- discovery ---
    def committed(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        dirs = [p for p in self.root.iterdir() if STEP_RE.match(p.name) and (p / "manifest.json").is_file()]
        return sorted(dirs, key=lambda p: int(STEP_RE.match(p.name).group(1)))

    def latest(self) -> Optional[Path]:
        pointer = self.root / "latest"
        if not pointer.is_file():
            return None
        path = self.root / pointer.read_text().strip()
        if not (path / "manifest.json").is_file():
            raise CheckpointError(f"{pointer} points at {path.name}, which is not a committed checkpoint "
                                  f"(no manifest.json). Resume from an older one with train.checkpoint.resume=<path>.")
        return path

    def remove_stale(self) -> None:
        """Rank 0, at start-up: drop directories of saves that never committed."""
        if self.layout.rank == 0 and self.root.is_dir():
            for p in self.root.glob("*.tmp"):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        self.layout.barrier()

    # --- save ---
    def save(self, step: int, engine, trainer_state: Dict[str, Any], loader_state: Dict[str, Any],
             config: Dict[str, Any]) -> Path:
        name = f"step-{step:08d}"
        final, tmp = self.root / name, self.root / f"{name}.tmp"
        rank = self.layout.rank
        if rank == 0:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        self.layout.barrier()
        weights = engine.model_state_dict()  # collective under ZeRO-3
        if rank == 0:
            save_file(weights, str(tmp / "model.safetensors"), metadata={"step": str(step)})
        rank_file = tmp / f"rank-{rank:05d}.pt"
        torch.save({"optimizer": engine.optimizer_state(), "rng": capture_rng(), "loader": loader_state},
                   rank_file)
        with open(rank_file, "rb") as f:
            os.fsync(f.fileno())
        if hasattr(engine, "save_sharded"):  # collective; inside tmp, so it commits with the rest
            engine.save_sharded(tmp / "sharded")
        self._stage(SaveStage.after_rank_files, step)
        self.layout.barrier()
        self._stage(SaveStage.after_all_files, step)
        if rank == 0:
            write_atomic(tmp / "trainer.json", json.dumps(trainer_state, indent=1, sort_keys=True))
            files = {p.relative_to(tmp).as_posix(): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
            manifest = {"format": "dist-llm-checkpoint/1", "step": step, "world_size": self.layout.world_size,
                        "dp": self.layout.dp, "tp": getattr(self.layout, "tp", 1), "pp": getattr(self.layout, "pp", 1),
                        "engine": type(engine).__name__, "files": files, "config": config, "versions": versions()}
            write_atomic(tmp / "manifest.json", json.dumps(manifest, indent=1, sort_keys=True))
            fsync_dir(tmp)
            self._stage(SaveStage.after_manifest, step)
            if final.exists():  # re-saving the same step (e.g. preemption right after a periodic save)
                shutil.rmtree(final)
            os.rename(tmp, final)
            fsync_dir(self.root)
            self._stage(SaveStage.before_latest, step)
            write_atomic(self.root / "latest", name + "\n")
            self._prune(keep=final)
        self.layout.barrier()
        return final

    def _prune(self, keep: Path) -> None:
        done = self.committed()
        for old in done[:-self.keep_last]:
            if old != keep:
                shutil.rmtree(old, ignore_errors=True)

    def save_best(self, engine, step: int, val_loss: float) -> None:
        weights = engine.model_state_dict()
        if self.layout.rank == 0:
            best, tmp, old = self.run_dir / "best", self.run_dir / "best.tmp", self.run_dir / "best.old"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            save_file(weights, str(tmp / "model.safetensors"), metadata={"step": str(step)})
            write_atomic(tmp / "info.json", json.dumps({"step": step, "val_loss": val_loss}))
            if best.exists():
                os.rename(best, old)
            os.rename(tmp, best)
            shutil.rmtree(old, ignore_errors=True)
        self.layout.barrier()

    # --- load ---
    def resolve(self, resume: str) -> Optional[Path]:
        """``auto``: this run's latest (or None); ``never``: None; else a checkpoint or run dir."""
        if resume == "never":
            return None
        if resume == "auto":
            return self.latest()
        path = Path(resume)
        if (path / "manifest.json").is_file():
            return path
        if (path / "checkpoints" / "latest").is_file():
            return CheckpointManager(path, self.layout, self.keep_last).latest()
        raise CheckpointError(f"train.checkpoint.resume={resume!r} is neither a committed checkpoint (a step-N directory "
                              f"with manifest.json) nor a run directory with checkpoints/latest")

    def load(self, path: Path, engine) -> tuple[Dict[str, Any], Dict[str, Any]]:
        """Restore engine + RNG; return (trainer state, this rank's loader state)."""
        manifest = json.loads((path / "manifest.json").read_text())
        lay = self.layout
        tp, pp = getattr(lay, "tp", 1), getattr(lay, "pp", 1)
        same_layout = (manifest.get("world_size"), manifest.get("tp", 1), manifest.get("pp", 1)) == (lay.world_size, tp, pp)
        same_engine = manifest.get("engine", type(engine).__name__) == type(engine).__name__
        sharded = hasattr(engine, "load_sharded") and (path / "sharded").is_dir() and same_engine
        if not same_layout and not (sharded and getattr(engine, "reshardable", False)):
            raise CheckpointError(
                f"checkpoint {path} was saved by {manifest.get('world_size')} ranks (tp={manifest.get('tp', 1)}, "
                f"pp={manifest.get('pp', 1)}) but this job has {lay.world_size} (tp={tp}, pp={pp}): resume "
                f"with the same layout (optimizer partitions are per rank), or use the megatron engine, whose "
                f"checkpoints reshard")
        # Same layout: this rank's own file (optimizer partition, RNG). Resharding: the loader state,
        # which is the same on every rank and independent of dp, from rank 0's file.
        rank_name = f"rank-{lay.rank:05d}.pt" if same_layout else "rank-00000.pt"
        for name in (("model.safetensors",) if not sharded else ()) + (rank_name, "trainer.json"):
            want = manifest["files"].get(name)
            if want is None or sha256_file(path / name) != want:
                raise CheckpointError(f"checkpoint file {path / name} is missing or does not match its sha256 in "
                                      f"manifest.json (corrupt or partially copied); resume from another "
                                      f"checkpoint with train.checkpoint.resume=<path>")
        if sharded:
            engine.load_sharded(path / "sharded")
        else:
            engine.load_model_state_dict(load_file(str(path / "model.safetensors")))
        blob = torch.load(path / rank_name, map_location="cpu", weights_only=True)
        if same_layout and same_engine:
            engine.load_optimizer_state(blob["optimizer"])
            restore_rng(blob["rng"])
        trainer_state = json.loads((path / "trainer.json").read_text())
        return trainer_state, blob["loader"]

"""Atomic, verifiable checkpoints.

Layout of a run directory::

    checkpoints/step-00000040/        one committed checkpoint
        model.safetensors            full fp32 weights (rank 0)
        rank-00000.pt ...            per rank: RNG states, loader state (and, for engines without an
                                     elastic form, the rank's optimizer partition)
        elastic/                     DeepSpeed: each rank's optimizer slices, layout-neutral
                                     (dist_llm/parallel/deepspeed_elastic.py); resumable at
                                     any dp size, ZeRO stage, offload setting or elastic engine
        sharded/                     engines that reshard (Megatron): weights + optimizer through
                                     megatron.core.dist_checkpointing, loadable at another layout
        trainer.json                 step, tokens seen, best validation loss (rank 0)
        manifest.json                sha256 of every file, the config, versions; written last
                                     (+ ``provenance``: the attempts that trained it)
    checkpoints/latest               name of the newest committed checkpoint
    best/                            weights of the best validation loss so far (model selection)

Commit protocol: every rank writes into ``step-N.tmp/``; after a barrier rank 0 hashes the
files, writes the manifest, renames the directory to ``step-N`` and only then repoints
``latest`` (write + rename, both atomic on POSIX). A crash at any point leaves ``latest`` on the
previous committed checkpoint; stale ``*.tmp`` directories are removed at the next start.
Re-saving a step that exists (resume from an older checkpoint into the same run) moves the old
``step-N`` aside to ``step-N.old`` first and deletes it only after ``latest`` is written; a crash
in between is repaired at the next start (a lone ``step-N.old`` is renamed back).

Before anything in a checkpoint is read, :meth:`CheckpointManager.verify` checks the whole
directory against its manifest: every entry is a plain relative path inside it, no symlinks,
no file the manifest does not list, and the sha256 of every file this rank will read (including
``sharded/`` and torch DCP's pickled ``.metadata``). Weights are safetensors and rank files load
with ``weights_only=True``; the remaining trust boundary is the manifest itself (README).

Nothing is unpickled: weights are safetensors and rank files load with ``weights_only=True``.

Observers (:class:`SaveHook`) are told when a save passes each :class:`SaveStage`; the fault
injection of the tests (dist_llm/train/debug.py) is one such observer.
"""
from __future__ import annotations

import json
import logging
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

from dist_llm.checkpoint.elastic import LoadPlan, load_elastic, plan_load
from dist_llm.checkpoint.integrity import CheckpointError, check_sharded, join_inside, read_manifest, verify_tree
from dist_llm.fileio import fsync_dir, sha256_file, write_atomic
from dist_llm.observability.redact import redact
from dist_llm.parallel.layout import ParallelLayout

STEP_RE = re.compile(r"^step-(\d{8})$")
OLD_SUFFIX = ".old"
log = logging.getLogger("dist_llm.checkpoint")




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


def _save_lora_adapter(directory: Path, weights: Dict[str, torch.Tensor], config: Dict[str, Any]) -> None:
    """With ``task.lora.rank > 0``: the adapter alone (adapter.safetensors + adapter_config.json),
    taken from the gathered full weights, so it is real under ZeRO-3 too."""
    lora = ((config or {}).get("task") or {}).get("lora") or {}
    if int(lora.get("rank") or 0) <= 0:
        return
    from dist_llm.models.lora import LoraSpec, adapter_state_dict, save_adapter

    spec = LoraSpec(**{k: lora[k] for k in ("rank", "alpha", "dropout", "target_modules", "train_also") if k in lora})
    save_adapter(directory, adapter_state_dict(weights, spec), spec)


class CheckpointManager:
    def __init__(self, run_dir: str | Path, layout: ParallelLayout, keep_last: int,
                 hooks: Sequence[SaveHook] = ()):
        self.run_dir = Path(run_dir)
        self.root = self.run_dir / "checkpoints"
        self.layout = layout
        self.keep_last = keep_last
        self._verified: Optional[Path] = None  # the checkpoint resolve_verified just checked
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
        """The checkpoint ``latest`` names; None only when this run never committed one."""
        pointer = self.root / "latest"
        if not pointer.is_file():
            done = self.committed()
            if done:  # a crash between the rename and the pointer write: the newest is complete
                log.warning("%s is missing but %s is committed (a save stopped before repointing latest): "
                            "resuming from it", pointer, done[-1].name)
                return done[-1]
            return None
        try:
            name = pointer.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            raise CheckpointError(f"cannot read {pointer}: {e}; set train.checkpoint.resume=<path> or "
                                  f"train.checkpoint.resume_fallback=true") from e
        if not STEP_RE.match(name):
            raise CheckpointError(f"{pointer} holds {name[:80]!r}, not the name of a checkpoint (step-NNNNNNNN): "
                                  f"it is empty or corrupt; set train.checkpoint.resume=<path> or train.checkpoint.resume_fallback=true")
        path = self._join(self.root, name, str(pointer))
        if not (path / "manifest.json").is_file():
            raise CheckpointError(f"{pointer} points at {path.name}, which is not a committed checkpoint "
                                  f"(no manifest.json). Resume from an older one with train.checkpoint.resume=<path>.")
        return path

    @staticmethod
    def _join(root: Path, rel: str, what: str) -> Path:
        return join_inside(root, rel, what)

    def remove_stale(self) -> None:
        """Rank 0, at start-up: drop directories of saves that never committed."""
        if self.layout.rank == 0 and self.root.is_dir():
            for p in self.root.glob("*.tmp"):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            self.recover_resave()
        self.layout.barrier()

    def recover_resave(self) -> None:
        """Finish or undo a re-save a crash interrupted: ``step-N.old`` without ``step-N`` is the
        committed checkpoint (the new one never got renamed in): rename it back; with ``step-N``
        present the re-save committed and the old copy is garbage."""
        for old in self.root.glob(f"step-*{OLD_SUFFIX}"):
            final = old.with_name(old.name[: -len(OLD_SUFFIX)])
            if not STEP_RE.match(final.name):
                continue
            if (final / "manifest.json").is_file():
                shutil.rmtree(old, ignore_errors=True)
            else:
                if final.exists():
                    shutil.rmtree(final)
                os.rename(old, final)
                fsync_dir(self.root)
                log.warning("recovered %s from an interrupted re-save", final)

    # --- save ---
    def save(self, step: int, engine, trainer_state: Dict[str, Any], loader_state: Dict[str, Any],
             config: Dict[str, Any], extra_manifest: Optional[Dict[str, Any]] = None) -> Path:
        """``extra_manifest``: more top-level manifest entries from the trainer (``provenance``)."""
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
            _save_lora_adapter(tmp, weights, config)
        rank_file = tmp / f"rank-{rank:05d}.pt"
        torch.save({"optimizer": engine.optimizer_state(), "rng": capture_rng(), "loader": loader_state},
                   rank_file)
        with open(rank_file, "rb") as f:
            os.fsync(f.fileno())
        engine.save_elastic(tmp / "elastic")  # this rank's optimizer slices (engines that write them)
        if engine.supports_sharded:  # collective; inside tmp, so it commits with the rest
            engine.save_sharded(tmp / "sharded")
        self._stage(SaveStage.after_rank_files, step)
        self.layout.barrier()
        self._stage(SaveStage.after_all_files, step)
        if rank == 0:
            write_atomic(tmp / "trainer.json", json.dumps(trainer_state, indent=1, sort_keys=True))
            files = {p.relative_to(tmp).as_posix(): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
            manifest = {"format": "dist-llm-checkpoint/1", "step": step, "world_size": self.layout.world_size,
                        "dp": self.layout.dp, "tp": getattr(self.layout, "tp", 1), "pp": getattr(self.layout, "pp", 1),
                        "engine": engine.checkpoint_name, "files": files, "config": redact(config),
                        "versions": versions()}
            clash = set(extra_manifest or {}) & set(manifest)
            if clash:
                raise ValueError(f"extra_manifest may not replace the manifest's own entries {sorted(clash)}")
            manifest.update(extra_manifest or {})
            write_atomic(tmp / "manifest.json", json.dumps(manifest, indent=1, sort_keys=True))
            os.chmod(tmp / "manifest.json", 0o600)  # the config may hold site details
            fsync_dir(tmp)
            self._stage(SaveStage.after_manifest, step)
            self.commit(tmp, final, step)
            self._prune(keep=final)
        self.layout.barrier()
        return final

    def commit(self, tmp: Path, final: Path, step: int) -> None:
        """Rename ``tmp`` to ``final`` and point ``latest`` at it. Every crash point leaves a
        committed checkpoint named: an existing ``final`` (re-saving a step, e.g. after resuming
        from an older checkpoint) is moved aside and deleted only after ``latest`` is written;
        :meth:`recover_resave` repairs the window between the two renames."""
        old = final.with_name(final.name + OLD_SUFFIX)
        if final.exists():
            if old.exists():
                shutil.rmtree(old)
            os.rename(final, old)
        os.rename(tmp, final)
        fsync_dir(self.root)
        self._stage(SaveStage.before_latest, step)
        write_atomic(self.root / "latest", final.name + "\n")
        fsync_dir(self.root)
        if old.exists():
            shutil.rmtree(old)

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
            _save_lora_adapter(tmp, weights, getattr(self, "config", None) or {})
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
        found = CheckpointManager(path, self.layout, self.keep_last).latest() if (path / "checkpoints").is_dir() else None
        if found is not None:
            return found
        raise CheckpointError(f"train.checkpoint.resume={resume!r} is neither a committed checkpoint (a step-N directory "
                              f"with manifest.json) nor a run directory with checkpoints/latest")

    def resolve_verified(self, resume: str, engine, fallback: bool = False,
                         config: Optional[Dict[str, Any]] = None) -> Optional[Path]:
        """The checkpoint to resume from, verified on every rank before any engine reads it.

        A checkpoint that fails (garbage ``latest``, a flipped byte, a missing or unlisted file, an
        escaping path) raises a CheckpointError naming the file; with ``fallback`` the newest older
        committed checkpoint that verifies on every rank is used instead (logged). Never None
        when checkpoints exist, so a damaged run never silently starts afresh. With ``config``
        (this job's config dict) a checkpoint of another model shape, precision or ZeRO stage
        is refused first (:mod:`dist_llm.checkpoint.compat`), never loaded.
        """
        self._job_config = config
        path, err = None, None
        try:
            path = self.resolve(resume)
            if path is not None:
                self._verify_for(path, engine)
        except CheckpointError as e:
            err = e
        if not self._any_rank(err is not None):
            return path
        if not fallback:
            raise err or CheckpointError(f"checkpoint {path} failed verification on another rank (its log names "
                                         f"the file); set train.checkpoint.resume_fallback=true to use an older one")
        root = path.parent if path is not None else self._resume_root(resume)
        limit = int(STEP_RE.match(path.name).group(1)) if path is not None and STEP_RE.match(path.name) else None
        log.warning("checkpoint unusable (%s); train.checkpoint.resume_fallback: trying older committed checkpoints in %s",
                    err or "failed on another rank", root)
        for cand in reversed(self._committed_in(root)):
            if cand == path or (limit is not None and int(STEP_RE.match(cand.name).group(1)) >= limit):
                continue
            cerr = None
            try:
                self._verify_for(cand, engine)
            except CheckpointError as e:
                cerr = e
                log.warning("fallback candidate %s is unusable too: %s", cand, e)
            if not self._any_rank(cerr is not None):
                log.warning("train.checkpoint.resume_fallback: resuming from %s", cand)
                return cand
        raise CheckpointError(f"no committed checkpoint in {root} verifies (first error: {err}); "
                              f"start afresh explicitly with train.checkpoint.resume=never") from err

    def _resume_root(self, resume: str) -> Path:
        if resume == "auto":
            return self.root
        path = Path(resume)
        return path / "checkpoints" if (path / "checkpoints").is_dir() else path.parent

    @staticmethod
    def _committed_in(root: Path) -> list[Path]:
        if not root.is_dir():
            return []
        dirs = [p for p in root.iterdir() if STEP_RE.match(p.name) and (p / "manifest.json").is_file()]
        return sorted(dirs, key=lambda p: int(STEP_RE.match(p.name).group(1)))

    def _any_rank(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any (one all-reduce), so all ranks take the
        same branch and none waits in a collective the others skipped."""
        if getattr(self.layout, "world_size", 1) == 1:
            return flag
        return self.layout.agree(flag)

    # --- integrity ---
    read_manifest = staticmethod(read_manifest)

    def verify(self, path: Path, manifest: Optional[Dict[str, Any]] = None,
               skip: Callable[[str], bool] = lambda rel: False) -> Dict[str, Any]:
        """:func:`dist_llm.checkpoint.integrity.verify_tree` (whole directory against its manifest)."""
        return verify_tree(path, manifest or read_manifest(path), skip)

    def _plan(self, path: Path, manifest: Dict[str, Any], engine) -> LoadPlan:
        """:func:`dist_llm.checkpoint.elastic.plan_load` (sharded, per-rank or elastic)."""
        return plan_load(path, manifest, self.layout, engine, getattr(self, "_job_config", None))

    def _verify_for(self, path: Path, engine) -> LoadPlan:
        """Verify everything this rank will read from ``path`` (``elastic/`` included); returns the load plan."""
        manifest = self.read_manifest(path)
        plan = self._plan(path, manifest, engine)
        self.verify(path, manifest, skip=lambda rel: not plan.reads(rel))
        check_sharded(path, manifest, loads_sharded=plan.sharded, engine_name=engine.checkpoint_name)
        self._verified = path
        return plan

    def load(self, path: Path, engine) -> tuple[Dict[str, Any], Dict[str, Any]]:
        """Restore engine + RNG; return (trainer state, this rank's loader state). The whole
        checkpoint is verified first (unless :meth:`resolve_verified` just did)."""
        if getattr(self, "_verified", None) == path:
            plan = self._plan(path, self.read_manifest(path), engine)
        else:
            plan = self._verify_for(path, engine)
        self._verified = None
        if plan.sharded:
            engine.load_sharded(path / "sharded")
        elif plan.mode == "elastic":
            load_elastic(path, self.read_manifest(path), engine, plan)
        else:
            engine.load_model_state_dict(load_file(str(path / "model.safetensors")))
            if plan.mode == "weights":
                log.warning("%s was saved by engine %s, which %s cannot take optimizer state from: weights "
                            "loaded, optimizer starts fresh", path, self.read_manifest(path).get("engine"),
                            engine.checkpoint_name)
        blob = torch.load(path / plan.rank_name, map_location="cpu", weights_only=True)
        if plan.mode == "rank" or (plan.sharded and plan.same_layout):
            engine.load_optimizer_state(blob["optimizer"])
        if plan.restores_rng:
            restore_rng(blob["rng"])
        trainer_state = json.loads((path / "trainer.json").read_text())
        return trainer_state, blob["loader"]

"""Checkpoint integrity, checked before any byte of a checkpoint is read: the manifest (JSON),
every path in it, the directory tree against it (no symlinks, no unlisted files), sha256s, and a
static scan of the pickles torch DCP would unpickle. Only reads; nothing here loads a tensor."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Dict

from dist_llm.checkpoint.pickle_scan import forbidden_globals, is_pickle
from dist_llm.fileio import UnsafePathError, safe_join, sha256_file


class CheckpointError(RuntimeError):
    pass


def join_inside(root: Path, rel: str, what: str) -> Path:
    """:func:`dist_llm.fileio.safe_join`, failing with a CheckpointError."""
    try:
        return safe_join(root, rel, what)
    except UnsafePathError as e:
        raise CheckpointError(str(e)) from None


def read_manifest(path: Path) -> Dict[str, Any]:
    """The manifest (JSON, never a pickle), checked for shape; CheckpointError names the file."""
    mpath = path / "manifest.json"
    if mpath.is_symlink() or not mpath.is_file():
        raise CheckpointError(f"{mpath} is missing or a symlink: {path} is not a committed checkpoint")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{mpath} is not valid JSON ({e}): the checkpoint is corrupt; resume from "
                              f"another with train.checkpoint.resume=<path> or train.checkpoint.resume_fallback=true") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
        raise CheckpointError(f"{mpath} has no valid 'files' table (name -> sha256): the checkpoint is corrupt")
    return manifest


def verify_tree(path: Path, manifest: Dict[str, Any], skip: Callable[[str], bool] = lambda rel: False) -> Dict[str, Any]:
    """Check ``path`` against its manifest before any file in it is read (or unpickled).

    Refused, naming the file: a manifest entry that is absolute, has ``..`` or resolves outside
    ``path``; any symlink; a file on disk the manifest does not list; a listed file that is
    missing; a sha256 mismatch. Files for which ``skip(rel)`` is true (other ranks' partitions)
    are not hashed, only checked for presence.
    """
    mpath = path / "manifest.json"
    files: Dict[str, str] = manifest["files"]
    for rel in files:
        join_inside(path, rel, f"{mpath} entry")
    for dirpath, dirnames, filenames in os.walk(path, followlinks=False):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = p.relative_to(path).as_posix()
            if p.is_symlink():
                raise CheckpointError(f"checkpoint {path} holds a symlink {p} -> {os.readlink(p)}; dist-llm "
                                      f"never writes symlinks into a checkpoint: replace it with the real file")
            if name in filenames and rel != "manifest.json" and rel not in files:
                raise CheckpointError(f"checkpoint file {p} is not listed in {mpath}: it was added after the "
                                      f"save; remove it (or resume from another checkpoint)")
    for rel, want in sorted(files.items()):
        p = path / rel
        if not p.is_file():
            raise CheckpointError(f"checkpoint file {p} listed in {mpath} is missing (deleted or partially "
                                  f"copied); resume from another checkpoint with train.checkpoint.resume=<path> or "
                                  f"train.checkpoint.resume_fallback=true")
        if not skip(rel) and sha256_file(p) != want:
            raise CheckpointError(f"checkpoint file {p} does not match its sha256 in {mpath} (corrupt or "
                                  f"replaced); resume from another checkpoint with train.checkpoint.resume=<path> or "
                                  f"train.checkpoint.resume_fallback=true")
    return manifest


def check_sharded(path: Path, manifest: Dict[str, Any], loads_sharded: bool, engine_name: str) -> None:
    """``sharded/`` files: none in a checkpoint of an engine that never writes them; every pickle
    among them (DCP's ``.metadata`` above all) imports only allow-listed classes."""
    sharded_files = [rel for rel in manifest["files"] if rel.startswith("sharded/")]
    if sharded_files and not loads_sharded and manifest.get("engine") == engine_name:
        raise CheckpointError(f"checkpoint {path} lists {path / sharded_files[0]} but it was saved by "
                              f"{engine_name}, which never writes sharded/: the files were added "
                              f"after the save; remove them or resume from another checkpoint")
    for rel in sharded_files:  # torch DCP unpickles .metadata: only known classes may appear
        strict = rel.rsplit("/", 1)[-1] == ".metadata" or rel.endswith((".pkl", ".pickle"))
        data = (path / rel).read_bytes() if strict or not rel.endswith(".distcp") else b""
        if strict or (data[:1] == b"\x80" and is_pickle(data)):  # any other raw pickle too
            bad = forbidden_globals(data)
            if bad:
                raise CheckpointError(f"checkpoint file {path / rel} is a pickle that would import "
                                      f"{', '.join(sorted(set(bad))[:5])}: refused (crafted or not written by "
                                      f"torch.distributed.checkpoint)")

"""The rank side of ``dist-llm doctor``: what every rank must be able to do before a real job.

Runs in each rank of a short job on the same launcher as ``train`` (local mock cluster,
torchrun, srun): start the process group with a short timeout, a barrier and an all-reduce,
read each data manifest and hash its first shard, write and remove a file in the output
directory. Each rank checks for itself; rank 0 gathers the results (one object all-gather) so
the table names the ranks that failed.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import socket
from pathlib import Path
from typing import Dict, List, Tuple

from dist_llm.config.schema import JobConfig
from dist_llm.launch.env import LaunchEnv

Row = Tuple[str, bool, str]  # (check, passed, detail)
DOCTOR_TIMEOUT_S = 60


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def data_dirs(cfg: JobConfig) -> List[Tuple[str, str, bool]]:
    """(role, directory, built by train) of every split the job reads; the embedded corpus
    (``data.build_embedded`` with no ``data.train``) is built by the first train run."""
    d = cfg.data
    embedded = not d.train and d.build_embedded
    out = [("train", s.path, False) for s in d.train] or [("train", str(Path(d.embedded_dir) / "train"), embedded)]
    val = d.val or (str(Path(d.embedded_dir) / "val") if embedded else None)
    if val and cfg.train.eval_every:
        out.append(("val", val, embedded and not d.val))
    return out


def check_shards(cfg: JobConfig) -> Row:
    """Manifest readable (paths inside the split, checksums present) and the first shard's
    sha256 equal to the manifest's, for every split this job reads."""
    from dist_llm.data.shards import check_checksums, sha256_bytes
    from dist_llm.data.sources import FetchOptions, location, read_split_manifest, remote_bytes

    fetch = FetchOptions.from_config(cfg.data)

    seen = []
    for role, d, built_by_train in data_dirs(cfg):
        if built_by_train and not (Path(d) / "manifest.json").is_file():
            seen.append(f"{role}: {d} (built by the first train run)")
            continue
        try:
            m = read_split_manifest(d, opts=fetch)  # a directory or a URL prefix
            check_checksums(d, m, cfg.data.require_checksums)
            shards = [s for s in m["shards"] if s.get("num_samples", 1) > 0]
            if not shards:
                return "shards", False, f"{role}: {d}/manifest.json lists no non-empty shard"
            first = location(d, shards[0]["file"])
            want = shards[0].get("sha256")
            data = remote_bytes(first, None, fetch)  # None: a local file
            got = _sha256(Path(first)) if data is None else sha256_bytes(data)
            if want and got != want:
                return "shards", False, f"{role}: {first} sha256 {got[:12]}... != manifest {want[:12]}..."
            seen.append(f"{role}: {len(shards)} shards, first verified" if want else
                        f"{role}: {len(shards)} shards (manifest has no sha256)")
        except Exception as e:  # noqa: BLE001 - every problem becomes the check's detail
            return "shards", False, f"{role}: {d}: {type(e).__name__}: {e}"
    return "shards", True, "; ".join(seen)


def check_output_dir(cfg: JobConfig, rank: int) -> Row:
    out = Path(cfg.output_dir)
    probe = out / f".doctor-{socket.gethostname()}-{rank}-{os.getpid()}"
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        return "output dir", False, f"{out}: cannot write ({e.strerror or e}): set output_dir to a writable directory"
    return "output dir", True, f"{out} writable"


def run_rank_checks(cfg: JobConfig, le: LaunchEnv) -> Tuple[List[Row], bool]:
    """This rank's checks merged with every other rank's: (rows, every rank passed). Collective."""
    from dist_llm.parallel.layout import init_layout, shutdown

    short = min(cfg.parallel.timeout_s, DOCTOR_TIMEOUT_S)  # the start-up allowance too: a missing rank fails fast
    par = dataclasses.replace(cfg.parallel, timeout_s=short, first_step_timeout_s=short)
    try:
        layout = init_layout(par, le)
    except Exception as e:  # noqa: BLE001
        return [("ranks reach each other", False, f"rank {le.rank}: {type(e).__name__}: {e}")], False
    try:
        layout.barrier()
        total = layout.all_reduce_scalar(1.0)
        reach: Row = ("ranks reach each other", total == layout.world_size,
                      f"{layout.world_size} ranks, barrier + all_reduce over {layout.backend} on {layout.device}")
        mine = [reach, check_shards(cfg), check_output_dir(cfg, layout.rank)]
        rows = merge_rows(layout.all_gather_object(mine))  # the same rows on every rank
        return rows, all(r[1] for r in rows)
    finally:
        shutdown()


def merge_rows(per_rank: List[List[Row]]) -> List[Row]:
    """One row per check: PASS when every rank passed; else the failing ranks and their detail."""
    merged: Dict[str, List[Tuple[int, bool, str]]] = {}
    for rank, rows in enumerate(per_rank):
        for name, ok, detail in rows:
            merged.setdefault(name, []).append((rank, ok, detail))
    out = []
    for name, results in merged.items():
        bad = [(r, d) for r, ok, d in results if not ok]
        if bad:
            out.append((name, False, "; ".join(f"rank {r}: {d}" for r, d in bad)))
        else:
            out.append((name, True, f"all {len(results)} ranks: {results[0][2]}"))
    return out

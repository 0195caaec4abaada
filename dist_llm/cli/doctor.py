"""``dist-llm doctor <overrides>``: check a job before an allocation is spent on it.

Takes the same overrides as ``dist-llm train`` and prints a table of checks (PASS/FAIL), exit
code 0 only when all pass:

* config: composes and validates (the same errors train would give);
* memory per rank: the planner's peak estimate for the layout (tp, pp, ZeRO stage, offload);
* ranks reach each other, every rank sees its shards, the output directory is writable from
  every rank: a short job on the same launcher as train (the local mock cluster starts the ranks
  here; under torchrun or srun every rank runs ``dist-llm doctor`` itself, see
  slurm/doctor.sbatch). ``launcher=ray`` checks config and memory only (the rank checks need the
  job submitted to the cluster).
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Tuple

Row = Tuple[str, bool, str]


def estimate_memory_per_rank(cfg, world: int) -> Dict[str, float]:
    """Peak bytes on the busiest rank per component (:func:`dist_llm.planner.estimate_peak_memory`):
    params, grads, optimizer, activations, ..., ``device_total``; ``host`` is what is offloaded."""
    from dist_llm.planner.memory import estimate_peak_memory

    return estimate_peak_memory(cfg, world).as_dict()


def _gib(x: float) -> str:
    return f"{x / 2**30:.3f} GiB" if x >= 2**27 else f"{x / 2**20:.1f} MiB"


def print_table(rows: List[Row]) -> None:
    width = max([22, *(len(r[0]) for r in rows)])
    for name, ok, detail in rows:
        print(f"{'PASS' if ok else 'FAIL'}  {name:<{width}}  {detail}", flush=True)


def _static_checks(overrides: List[str]):
    """(rows, the typed config or None when it does not validate)."""
    from dist_llm.config.store import compose
    from dist_llm.config.validate import ConfigError, planned_world_size, validate

    try:
        cfg = compose(overrides)
        world = planned_world_size(cfg)
        validate(cfg, world)
    except (ConfigError, ValueError, Exception) as e:  # noqa: BLE001 - Hydra errors too: all go in the table
        return [("config", False, f"{type(e).__name__}: {e}")], None
    rows: List[Row] = [("config", True, f"valid for {world} rank(s), launcher {cfg.launcher.kind}")]
    try:
        m = estimate_memory_per_rank(cfg, world)
        rows.append(("memory per rank", True, f"{_gib(m['device_total'])} peak on the busiest rank (weights "
                     f"{_gib(m['params'])}, grads {_gib(m['grads'])}, optimizer {_gib(m['optimizer'])}, "
                     f"activations {_gib(m['activations'] + m['logits'])}; host {_gib(m['host'])})"))
    except Exception as e:  # noqa: BLE001
        rows.append(("memory per rank", False, f"{type(e).__name__}: {e}"))
    return rows, cfg


def main(args: List[str]) -> int:
    if args and args[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    rank_env = "RANK" in os.environ
    rows, cfg = _static_checks(args)
    is_printer = os.environ.get("RANK", "0") == "0"
    if cfg is None:
        if is_printer:
            print_table(rows)
        return 2
    kind = cfg.launcher.kind
    if kind == "ray" and not rank_env:
        print_table(rows + [("ranks", True, "skipped for launcher=ray: submit the job to check the ranks")])
        return 0 if all(r[1] for r in rows) else 1
    if kind == "local" and not rank_env:
        print_table(rows)
        return _spawn_local(cfg)
    return _rank_main(cfg, rows if is_printer else [])


def _spawn_local(cfg) -> int:
    """The local mock cluster: start the ranks here; they print the rank checks."""
    from dist_llm.config.store import save_job_config
    from dist_llm.launch.local import spawn_local

    with tempfile.TemporaryDirectory(prefix="dist-llm-doctor-") as tmp:
        path = Path(tmp) / "config.yaml"
        save_job_config(cfg, str(path))
        code = spawn_local(cfg.launcher.nproc, ["-m", "dist_llm.cli.main", "doctor-rank", str(path)],
                           cfg.launcher.master_port)
    if code != 0:
        print(f"dist-llm doctor: FAILED (exit {code})", file=sys.stderr)
    return code


def _rank_main(cfg, rows: List[Row]) -> int:
    from dist_llm.launch.env import read_launch_env
    from dist_llm.train.doctor import run_rank_checks

    le = read_launch_env()
    rank_rows, ok = run_rank_checks(cfg, le)
    if le.rank == 0:
        print_table(rows + rank_rows)
    elif not ok and rank_rows and rank_rows[0][0] == "ranks reach each other" and len(rank_rows) == 1:
        print_table(rank_rows)  # this rank could not join: nobody else can report it
    ok = ok and all(r[1] for r in rows)
    return 0 if ok else 1


def rank_main(args: List[str]) -> int:
    """``dist-llm doctor-rank <config.yaml>``: one rank of the local mock cluster's doctor job."""
    from dist_llm.config.store import job_config_from_yaml

    return _rank_main(job_config_from_yaml(args[0]), [])

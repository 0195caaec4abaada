"""``dist-llm submit slurm|ray [--dry-run] [--address URL] <hydra overrides>``.

Composes the same Hydra config the ranks will compose (``conf/config.yaml`` + the overrides +
``launcher=slurm|ray``), validates it for the planned world size, then renders and submits an
sbatch script or submits a Ray job. The overrides travel to the job unchanged, so every rank
composes exactly this config.
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

USAGE = """usage: dist-llm submit slurm|ray [--dry-run] [--address URL] [hydra overrides...]

  slurm   render an sbatch script from launcher=slurm (launcher.nodes, launcher.tasks_per_node,
          launcher.slurm.partition, ...) and submit it with sbatch; --dry-run prints the script
  ray     submit `python -m dist_llm.cli.main train <overrides> launcher=ray` to a Ray cluster
          through the job submission API (address: --address, launcher.ray.address or RAY_ADDRESS)

examples:
  dist-llm submit slurm --dry-run launcher.nodes=2 launcher.slurm.partition=gpu experiment=demo
  dist-llm submit ray --address http://127.0.0.1:8265 launcher.ray.num_workers=2 experiment=smoke
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dist-llm submit", usage=USAGE, add_help=False)
    p.add_argument("scheduler", nargs="?")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--address", default=None)
    p.add_argument("-h", "--help", action="store_true")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args, overrides = _parser().parse_known_args(argv)
    if args.help or args.scheduler is None:
        print(USAGE)
        return 0 if args.help else 2
    if args.scheduler not in ("slurm", "ray"):
        print(f"dist-llm submit: unknown scheduler {args.scheduler!r} (slurm or ray)\n\n{USAGE}", file=sys.stderr)
        return 2
    bad = [o for o in overrides if o.startswith("-")]
    if bad:
        print(f"dist-llm submit: unknown option(s) {bad}\n\n{USAGE}", file=sys.stderr)
        return 2

    from dist_llm.config.store import compose
    from dist_llm.config.validate import ConfigError, planned_world_size, validate
    from dist_llm.submit.slurm import SbatchValueError, training_overrides

    try:
        cfg = compose(training_overrides(overrides, args.scheduler))
        validate(cfg, planned_world_size(cfg, env={}))
    except SbatchValueError as e:
        print(f"dist-llm submit: {e}", file=sys.stderr)
        return 2
    except ConfigError as e:
        print(f"dist-llm submit: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # Hydra composition errors: name the override
        print(f"dist-llm submit: cannot compose the config: {e}", file=sys.stderr)
        return 2

    try:
        if args.scheduler == "slurm":
            from dist_llm.submit.slurm import submit_slurm

            job = submit_slurm(cfg, overrides, dry_run=args.dry_run)
            if not args.dry_run:
                print(job)
        else:
            from dist_llm.submit.ray_job import submit_ray_job

            sid = submit_ray_job(cfg, overrides, address=args.address, dry_run=args.dry_run)
            if not args.dry_run:
                print(sid)
    except (SbatchValueError, ValueError) as e:
        print(f"dist-llm submit: {e}", file=sys.stderr)
        return 2
    except (RuntimeError, OSError) as e:
        print(f"dist-llm submit: submission failed: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

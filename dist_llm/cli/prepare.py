"""``dist-llm prepare``: compose conf/prepare.yaml, validate it, run the data pipeline.

Exit codes: 0 done (or already complete), 2 bad config or input (the message names the field or
file and the fix), 1 any other failure.
"""
from __future__ import annotations

import json
import sys
from typing import List

from dist_llm.config.prepare_schema import PrepareConfigError
from dist_llm.config.store import (default_config_dir, prepare_searchpath_override, register_prepare_configs,
                                   to_prepare_config)

_exit_code = 0


def _task(dcfg) -> None:
    global _exit_code
    from dist_llm.data.sources import ShardFetchError
    from dist_llm.launch.ray_connect import RayUnreachableError
    from dist_llm.prepare import BadInputError, InputError, run_prepare

    try:
        cfg = to_prepare_config(dcfg)
        result = run_prepare(cfg)
    except (PrepareConfigError, InputError, BadInputError) as e:
        print(f"dist-llm prepare: {e}", file=sys.stderr)
        _exit_code = 2
        return
    except (ShardFetchError, RayUnreachableError) as e:  # `destination` failed after retries; no Ray cluster
        print(f"dist-llm prepare: {e}", file=sys.stderr)
        _exit_code = 1
        return
    st = result["stats"]
    brief = {"output_dir": cfg.output_dir, "skipped": result.get("skipped", False),
             "records": st["records"], "malformed": st["malformed"], "dropped": st["dropped"],
             "dedup_rate": round(st["dedup_rate"], 4), "splits": result["splits"],
             "seconds": result.get("seconds"), "throughput_mb_s": result.get("throughput_mb_s")}
    if cfg.destination:
        brief["destination"] = cfg.destination
    print(json.dumps(brief, indent=1))
    for line in st["malformed_examples"][:10]:
        print(f"dist-llm prepare: skipped malformed input {line}", file=sys.stderr)


def main(argv: List[str]) -> int:
    """Entry point; ``argv`` are Hydra overrides, e.g. ``input=files input.paths='[a.jsonl]'``."""
    import hydra

    global _exit_code
    _exit_code = 0
    register_prepare_configs()
    sys.argv = ["dist-llm prepare", prepare_searchpath_override(), *argv]
    run = hydra.main(version_base="1.3", config_path=default_config_dir(), config_name="prepare")(_task)
    run()
    return _exit_code

"""Helper of `make gpu-wheels` (stdlib only).

    wheel_list.py requirements pyproject.toml   runtime deps except torch and deepspeed
    wheel_list.py deepspeed pyproject.toml      the deepspeed requirement (built as a wheel)
    wheel_list.py pins report.json              name==version of a pip install report, minus what
                                                the GPU machine already has (torch, CUDA, triton)
"""
from __future__ import annotations

import json
import re
import sys
import tomllib

PREINSTALLED = re.compile(r"^(torch|triton|nvidia-.*|pytorch-triton.*)$")


def _name(req: str) -> str:
    return re.split(r"[\s<>=!~\[;]", req, maxsplit=1)[0].lower()


def main(cmd: str, path: str) -> None:
    if cmd in ("requirements", "deepspeed"):
        deps = tomllib.load(open(path, "rb"))["project"]["dependencies"]
        if cmd == "deepspeed":
            print(next(d for d in deps if _name(d) == "deepspeed"))
            return
        print("\n".join(d for d in deps if _name(d) not in ("torch", "deepspeed")))
    elif cmd == "pins":
        items = json.load(open(path))["install"]
        for it in items:
            meta = it["metadata"]
            name = meta["name"].lower().replace("_", "-")
            if not PREINSTALLED.match(name):
                print(f"{name}=={meta['version']}")
    else:
        raise SystemExit(f"unknown command {cmd!r}: use requirements, deepspeed or pins")


if __name__ == "__main__":
    main(*sys.argv[1:3])

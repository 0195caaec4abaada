"""``destination``: copy a finished ``dist-llm prepare`` output to where training reads it.

``output_dir`` stays the local working copy (phase work, resume, skip-when-complete); after a
successful run (or a skipped, already complete one) every file of it is written to the
destination through WebDataset's opener (:func:`dist_llm.data.sources.write_url`):

* a local directory or ``file:///abs/dir``: ``<dir>/<name>``, written atomically;
* ``pipe:<command>``: the command reads the file on stdin; ``{name}`` in it is replaced by the
  file's path relative to the dataset (``train/shard-000000.tar``, ``train/manifest.json``,
  ``tokenizer.json``, ``manifest.json``), e.g. ``pipe:aws s3 cp - s3://bucket/web/{name}``.

Order makes a reader never see a manifest before its shards: each split's shards, then its
``manifest.json``; then the other top-level files; the dataset ``manifest.json`` last. Every
write is retried like a fetch (``FetchOptions`` defaults) and a failing command names itself.
Training then reads ``data.train='[{path: "pipe:aws s3 cp s3://bucket/web/train/{name} -"}]'``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

from dist_llm.data.shards import MANIFEST, is_url
from dist_llm.fileio import write_atomic
from dist_llm.data.sources import FetchOptions, check_name, location, write_url


def dataset_files(out_dir: Path, splits: List[str]) -> List[str]:
    """The output's files (relative names) in publishing order."""
    names: List[str] = []
    for split in splits:
        m = json.loads((out_dir / split / MANIFEST).read_text(encoding="utf-8"))
        names += [f"{split}/{s['file']}" for s in m["shards"]] + [f"{split}/{MANIFEST}"]
    names += sorted(p.name for p in out_dir.iterdir()
                    if p.is_file() and p.name != MANIFEST and not p.name.startswith(".") and not p.name.endswith(".tmp"))
    return names + [MANIFEST]


def publish(out_dir: Path, destination: str, splits: List[str], opts: Optional[FetchOptions] = None) -> List[str]:
    """Write every file of the finished ``out_dir`` to ``destination``; returns where each went."""
    written = []
    for name in dataset_files(out_dir, splits):
        check_name(name, str(out_dir / MANIFEST))
        data = (out_dir / name).read_bytes()
        if is_url(destination):
            target = location(destination, name)
            write_url(target, data, opts)
        else:
            target = str(Path(destination) / name)
            Path(target).parent.mkdir(parents=True, exist_ok=True)
            write_atomic(target, data)
        written.append(target)
    return written

"""Find the tokenizer a run of ours used, from its stored job config (checkpoint manifest).

Order: the Hugging Face directory the run was initialised from (``model.init_from`` with a
``tokenizer.json``), else the first training source's shard manifest (``tokenizer`` meta), else
the embedded corpus's. Relative data paths are taken from the working directory, as in training.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional


def manifest_tokenizer(split_dir: Path):
    from dist_llm.data.tokenizer import load_tokenizer

    manifest = split_dir / "manifest.json"
    if not manifest.is_file():
        return None
    meta = json.loads(manifest.read_text()).get("tokenizer") or {"kind": "byte"}
    return load_tokenizer(meta, split_dir.parent)


def tokenizer_for_run_config(config: Dict[str, Any]) -> Optional[Any]:
    from dist_llm.interop.tokenizer import has_hf_tokenizer, tokenizer_from_hf_dir

    init_from = (config.get("model") or {}).get("init_from")
    if init_from and has_hf_tokenizer(init_from):
        return tokenizer_from_hf_dir(init_from)
    data = config.get("data") or {}
    for source in data.get("train") or []:
        tok = manifest_tokenizer(Path(source["path"]))
        if tok is not None:
            return tok
    if data.get("build_embedded") and data.get("embedded_dir"):
        return manifest_tokenizer(Path(data["embedded_dir"]) / "train")
    return None

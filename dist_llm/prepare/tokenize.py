"""Build the run's tokenizer before tokenizing: byte, a trained BPE or char vocabulary, or a
user's ``tokenizer.json``. Saved as ``<output_dir>/tokenizer.json`` next to the splits.

Training reads the first ``tokenizer.train_max_bytes`` of *cleaned, filtered* text (the same
workers as the main pass, without tokenizing), so the vocabulary reflects what is kept. On a
resumed run an already trained tokenizer is reused (its sha256 is in ``.work/tokenizer.meta``)
rather than retrained, so the parts already written stay valid.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable, Dict, Iterator

from dist_llm.data.tokenizer import ByteTokenizer, CharTokenizer, HFTokenizer, train_bpe


def build_tokenizer(cfg: Any, out: Path, work: Path, sample: Callable[[int], Iterator[str]]) -> Dict[str, Any]:
    """Return the tokenizer ``meta`` (what the manifests store); ``sample(max_bytes)`` yields texts."""
    tc = cfg.tokenizer
    file = out / "tokenizer.json"
    saved = work / "tokenizer.meta"
    if saved.is_file() and file.is_file():
        meta = json.loads(saved.read_text())
        if meta.get("kind") != "hf" or HFTokenizer(file).sha256 == meta.get("sha256"):
            return meta
    if tc.kind == "byte":
        meta = ByteTokenizer().meta()
        file.write_text(json.dumps(meta, sort_keys=True, indent=1) + "\n")
    elif tc.kind == "char":
        meta = CharTokenizer.train(sample(tc.train_max_bytes)).meta()
        file.write_text(json.dumps(meta, sort_keys=True, indent=1) + "\n")
    elif tc.kind == "bpe":
        meta = train_bpe(sample(tc.train_max_bytes), tc.vocab_size, file, tc.min_frequency).meta()
    else:  # file
        if Path(tc.path).resolve() != file.resolve():
            shutil.copyfile(tc.path, file)
        meta = HFTokenizer(file, eos_token=tc.eos_token).meta()
    if cfg.pack.kind == "bert":
        missing = [k for k in ("cls", "sep", "pad", "mask") if k not in meta.get("special_ids", {})]
        if missing:
            raise ValueError(f"pack.kind=bert needs the special tokens {missing}, which the tokenizer "
                             f"({tc.kind}) lacks; use tokenizer=bpe or tokenizer=char")
    saved.write_text(json.dumps(meta, sort_keys=True))
    return meta


def special_ids(meta: Dict[str, Any]) -> Dict[str, int]:
    if meta["kind"] == "byte":
        return dict(ByteTokenizer.special_ids)
    return {k: int(v) for k, v in meta.get("special_ids", {}).items()}


def vocab_size(meta: Dict[str, Any]) -> int:
    return ByteTokenizer.vocab_size if meta["kind"] == "byte" else int(meta["vocab_size"])

"""Tokenizers that the shard writer and the trainer agree on via a small ``meta`` dict.

The manifest and ``tokenizer.json`` store ``meta()``; :func:`load_tokenizer` rebuilds the same
tokenizer from it, so sampling/decoding after training needs no extra configuration.
Only the byte tokenizer exists so far (no training, no files, works on any text).
"""
from __future__ import annotations

import os
from typing import Any, Dict, Iterable, List, Union


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, plus ``eos_id=256`` and ``pad_id=257`` (``vocab_size=258``)."""

    kind = "byte"
    eos_id = 256
    pad_id = 257
    vocab_size = 258

    def encode(self, text: str) -> List[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        """Bytes back to text; specials are skipped and broken UTF-8 becomes U+FFFD, never an error."""
        data = bytes(int(i) for i in ids if 0 <= int(i) < 256)
        return data.decode("utf-8", errors="replace")

    def meta(self) -> Dict[str, Any]:
        return {"kind": self.kind}


def load_tokenizer(meta: Dict[str, Any], base_dir: Union[str, "os.PathLike[str]", None] = None) -> ByteTokenizer:
    """The tokenizer described by ``meta`` (from a manifest or ``tokenizer.json``).

    ``base_dir`` is where tokenizer files (vocabularies, merges) live for kinds that need them.
    """
    kind = (meta or {}).get("kind")
    if kind == "byte":
        return ByteTokenizer()
    raise NotImplementedError(
        f"tokenizer kind {kind!r} (meta {meta!r}, dir {base_dir}) is not supported yet; only 'byte' is: "
        f"re-prepare the data with the byte tokenizer"
    )

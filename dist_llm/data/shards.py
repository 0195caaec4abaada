"""On-disk format of pre-tokenized WebDataset shards: writer, manifest and shard readers.

A *split directory* (e.g. ``data/stdlib/train/``) holds ``manifest.json`` and tar shards
``shard-000000.tar``, ``shard-000001.tar``, ... Each tar member is one sample named
``{global_index:010d}.tokens.npy`` whose content is the ``np.save`` bytes of a 1-D array of
``sample_len = seq_len + 1`` token ids (``uint16`` when ``vocab_size <= 65536``, else ``uint32``).
The extra token lets the trainer shift inputs/targets without crossing sample boundaries.

Why tars of ``.npy`` members: any WebDataset tool (``webdataset.WebDataset``, ``tar tf``) can
read the shards, while our loader reads a shard whole and keeps it in memory. Tars are written
deterministically (USTAR, mtime 0, uid/gid 0, empty owner names, mode 0o644, members in index
order) so re-running ``prepare`` on the same input gives byte-identical shards and checksums.

``manifest.json`` is written last and atomically: a directory without one is incomplete.

Other sample kinds (``dist-llm prepare pack.kind=bert|image``) use the same tar layout with
more fields per key, and their own ``format`` so the causal-LM loader refuses them clearly:

* ``dist-llm-pairs/1`` (BERT sentence pairs, ``sample_len = seq_len``):
  ``{key}.tokens.npy`` ``[CLS] A [SEP] B [SEP]`` padded with PAD to ``seq_len`` ids (vocab dtype),
  ``{key}.segments.npy`` uint8 segment ids (0 for ``[CLS] A [SEP]``, 1 for ``B [SEP]``, 0 for
  padding), ``{key}.nsp.cls`` ASCII ``0`` (B follows A) or ``1`` (B is from a random document).
  Masked-LM masking happens at load time, so one prepared set serves every masking seed.
* ``dist-llm-images/1``: ``{key}.npy`` a uint8 ``HxWxC`` image, ``{key}.cls`` its ASCII label id;
  the manifest adds ``image_shape`` and ``classes``.

:func:`write_shard` and :func:`write_manifest` are the one place that writes tars and manifests,
so the prepare pipeline can write shards in parallel (one process per shard) and still produce
exactly the bytes :class:`ShardWriter` would.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import numpy as np

from dist_llm.fileio import UnsafePathError, safe_join, sha256_file, write_atomic  # noqa: F401 - re-exported

FORMAT = "dist-llm-tokens/1"
PAIRS_FORMAT = "dist-llm-pairs/1"
IMAGES_FORMAT = "dist-llm-images/1"
CLASSIFY_FORMAT = "dist-llm-classify/1"
SFT_FORMAT = "dist-llm-sft/1"
_OTHER_FORMATS = {PAIRS_FORMAT: "BERT sentence pairs", IMAGES_FORMAT: "(image, label) samples",
                  CLASSIFY_FORMAT: "(text, label) samples", SFT_FORMAT: "SFT examples with loss masks"}
MANIFEST = "manifest.json"
SAMPLE_SUFFIX = ".tokens.npy"

PathLike = Union[str, "os.PathLike[str]"]


def dtype_for_vocab(vocab_size: int) -> str:
    """The narrowest unsigned dtype holding every id (halves disk and memory for small vocabs)."""
    return "uint16" if vocab_size <= 65536 else "uint32"


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _tar_bytes(members: List[tuple]) -> bytes:
    """A deterministic USTAR tar of ``(name, bytes)`` members, in the given order."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mode = 0o644
            info.type = tarfile.REGTYPE
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def sample_key(index: int) -> str:
    """The tar member stem of the ``index``-th sample of a split (global over its shards)."""
    return f"{index:010d}"


def token_members(samples: np.ndarray, first_index: int, dtype: str) -> List[tuple]:
    """``(name, npy bytes)`` members for rows of ``samples``, numbered from ``first_index``."""
    return [(f"{sample_key(first_index + i)}{SAMPLE_SUFFIX}", _npy_bytes(np.asarray(row).astype(dtype)))
            for i, row in enumerate(samples)]


def write_shard(split_dir: PathLike, index: int, members: List[tuple], num_samples: int) -> Dict[str, Any]:
    """Atomically write shard ``index`` of ``split_dir``; returns its manifest entry."""
    file = shard_name(index)
    data = _tar_bytes(members)
    write_atomic(Path(split_dir) / file, data)
    return {"file": file, "num_samples": int(num_samples), "sha256": sha256_bytes(data)}


def write_manifest(split_dir: PathLike, manifest: Dict[str, Any]) -> None:
    """Write ``manifest.json`` last and atomically; delete shard files it does not list."""
    d = Path(split_dir)
    keep = {s["file"] for s in manifest["shards"]}
    for old in d.glob("shard-*.tar"):
        if old.name not in keep:
            old.unlink()
    text = json.dumps(manifest, sort_keys=True, indent=1) + "\n"
    write_atomic(d / MANIFEST, text.encode("utf-8"))


def token_manifest(seq_len: int, vocab_size: int, eos_id: Optional[int], shards: List[Dict[str, Any]],
                   tokenizer_meta: Optional[Dict[str, Any]] = None,
                   extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The causal-LM manifest body (what :meth:`ShardWriter.close` writes)."""
    count = sum(int(s["num_samples"]) for s in shards)
    return {
        "format": FORMAT, "seq_len": int(seq_len), "sample_len": int(seq_len) + 1,
        "dtype": dtype_for_vocab(vocab_size), "vocab_size": int(vocab_size), "eos_id": eos_id,
        "num_samples": count, "num_tokens": count * (int(seq_len) + 1), "shards": list(shards),
        "tokenizer": dict(tokenizer_meta or {}), "extra": dict(extra or {}),
    }


class ShardWriter:
    """Writes fixed-length token samples into deterministic tar shards plus a manifest.

    Usage::

        with ShardWriter("data/x/train", seq_len=32, vocab_size=258, samples_per_shard=256) as w:
            for sample in samples:        # each a 1-D array of seq_len + 1 ids
                w.add(sample)
        manifest = w.manifest

    Any existing ``manifest.json`` is removed first, so an interrupted rewrite never looks
    complete; shard files of an earlier, larger write that the new manifest does not list are
    deleted at :meth:`close`.
    """

    def __init__(
        self,
        split_dir: PathLike,
        seq_len: int,
        vocab_size: int,
        samples_per_shard: int,
        eos_id: Optional[int] = None,
        tokenizer_meta: Optional[Dict[str, Any]] = None,
        extra: Optional[Dict[str, Any]] = None,
    ) -> None:
        if seq_len < 1:
            raise ValueError(f"ShardWriter: seq_len must be >= 1, got {seq_len}")
        if vocab_size < 1:
            raise ValueError(f"ShardWriter: vocab_size must be >= 1, got {vocab_size}")
        if samples_per_shard < 1:
            raise ValueError(f"ShardWriter: samples_per_shard must be >= 1, got {samples_per_shard}")
        if eos_id is not None and not 0 <= eos_id < vocab_size:
            raise ValueError(f"ShardWriter: eos_id {eos_id} is outside the vocabulary [0, {vocab_size})")
        self.split_dir = Path(split_dir)
        self.seq_len = int(seq_len)
        self.sample_len = self.seq_len + 1
        self.vocab_size = int(vocab_size)
        self.dtype = dtype_for_vocab(self.vocab_size)
        self.samples_per_shard = int(samples_per_shard)
        self.eos_id = eos_id
        self.tokenizer_meta = dict(tokenizer_meta or {})
        self.extra = dict(extra or {})
        self.manifest: Optional[Dict[str, Any]] = None
        self._pending: List[tuple] = []
        self._shards: List[Dict[str, Any]] = []
        self._count = 0
        self._closed = False
        self.split_dir.mkdir(parents=True, exist_ok=True)
        stale = self.split_dir / MANIFEST
        if stale.exists():
            stale.unlink()

    def add(self, sample: np.ndarray) -> None:
        """Append one sample of ``seq_len + 1`` ids in ``[0, vocab_size)``."""
        if self._closed:
            raise RuntimeError(f"ShardWriter for {self.split_dir} is closed; create a new one")
        arr = np.asarray(sample)
        if arr.ndim != 1 or arr.shape[0] != self.sample_len:
            raise ValueError(
                f"ShardWriter({self.split_dir}): sample {self._count} has shape {tuple(arr.shape)}, "
                f"expected ({self.sample_len},) = seq_len + 1 (seq_len={self.seq_len}); cut the "
                f"token stream into windows of seq_len + 1 ids"
            )
        if arr.size and not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(
                f"ShardWriter({self.split_dir}): sample {self._count} has dtype {arr.dtype}, "
                f"expected integer token ids"
            )
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= self.vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(
                f"ShardWriter({self.split_dir}): sample {self._count} holds token id {bad} outside "
                f"[0, vocab_size={self.vocab_size}); check the tokenizer's vocab_size"
            )
        self._pending.extend(token_members(arr[None], self._count, self.dtype))
        self._count += 1
        if len(self._pending) >= self.samples_per_shard:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        self._shards.append(write_shard(self.split_dir, len(self._shards), self._pending, len(self._pending)))
        self._pending = []

    def close(self) -> Dict[str, Any]:
        """Flush the last (possibly short) shard, write the manifest last, return it."""
        if self._closed:
            assert self.manifest is not None
            return self.manifest
        self._flush()
        manifest = token_manifest(self.seq_len, self.vocab_size, self.eos_id, self._shards,
                                  self.tokenizer_meta, self.extra)
        write_manifest(self.split_dir, manifest)
        self.manifest = manifest
        self._closed = True
        return manifest

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        # On an exception leave the split without a manifest: it stays visibly incomplete.
        if exc_type is None:
            self.close()
        else:
            self._closed = True


_REQUIRED = ("seq_len", "sample_len", "dtype", "vocab_size", "num_samples", "shards")


# A split is a directory or a URL prefix (dist_llm/data/sources.py opens the URLs).
URL_PREFIXES = ("file://", "http://", "https://", "pipe:")


def is_url(split: PathLike) -> bool:
    """Whether ``split`` names shards by URL (``file://``, ``http(s)://``, ``pipe:``), not a directory."""
    return isinstance(split, str) and split.startswith(URL_PREFIXES)


def manifest_where(split: PathLike) -> str:
    """Where a split's manifest is, for messages: ``<dir>/manifest.json`` or the URL/command."""
    if not is_url(split):
        return str(Path(split) / MANIFEST)
    s = str(split)
    if "{name}" in s:
        return s.replace("{name}", MANIFEST)
    return s.rstrip("/") + "/" + MANIFEST


def read_manifest(split_dir: PathLike, expect: str = FORMAT) -> Dict[str, Any]:
    """Load and sanity-check ``split_dir/manifest.json``; ``expect`` names the format wanted."""
    d = Path(split_dir)
    if not d.is_dir():
        raise FileNotFoundError(
            f"token dataset directory {d} does not exist; run `dist-llm prepare` to create it "
            f"(or set data.build_embedded=true for the embedded stdlib corpus), or fix the path"
        )
    path = d / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"no manifest.json in {d}: the split is incomplete or not a dist-llm token dataset; "
            f"run `dist-llm prepare` (again) to write it"
        )
    manifest = parse_manifest(path.read_bytes(), str(path), expect)
    for entry in manifest["shards"]:
        shard_path(d, entry)
    return manifest


def parse_manifest(text: bytes, where: str, expect: str = FORMAT) -> Dict[str, Any]:
    """Parse and sanity-check a split manifest's bytes (read from ``where``, named in errors);
    shard file names are checked by the caller, who knows where they are read from."""
    path = where
    try:
        manifest = json.loads(text.decode("utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); re-run `dist-llm prepare`") from e
    fmt = manifest.get("format") if isinstance(manifest, dict) else None
    if fmt in _OTHER_FORMATS and fmt != expect:
        raise ValueError(
            f"{path} holds {_OTHER_FORMATS[fmt]} (format {fmt!r}), not causal-LM token windows "
            f"({expect!r}); point this at a split prepared with pack.kind=causal"
        )
    if fmt in _OTHER_FORMATS:
        return manifest
    if fmt != FORMAT:
        raise ValueError(
            f"{path} has format {fmt!r}, expected {FORMAT!r}; it was written by another tool or "
            f"an incompatible version: re-run `dist-llm prepare`"
        )
    missing = [k for k in _REQUIRED if k not in manifest]
    if missing:
        raise ValueError(f"{path} lacks the field(s) {missing}; re-run `dist-llm prepare`")
    if manifest["sample_len"] != manifest["seq_len"] + 1:
        raise ValueError(f"{path}: sample_len {manifest['sample_len']} != seq_len + 1 ({manifest['seq_len']} + 1)")
    if sum(s["num_samples"] for s in manifest["shards"]) != manifest["num_samples"]:
        raise ValueError(f"{path}: the shards' num_samples do not add up to num_samples; re-run `dist-llm prepare`")
    return manifest


def shard_path(split_dir: PathLike, entry: Dict[str, Any]) -> Path:
    """The file of one manifest shard entry, refused unless it stays inside ``split_dir``."""
    return safe_join(split_dir, str(entry.get("file", "")), f"shard entry in {Path(split_dir) / MANIFEST}")


def check_checksums(split_dir: PathLike, manifest: Dict[str, Any], require: bool = True) -> None:
    """Refuse a manifest whose non-empty shards lack a sha256 (unless ``require`` is false):
    without it a replaced or corrupt shard would be read silently."""
    if not require:
        return
    missing = [s.get("file") for s in manifest["shards"] if s.get("num_samples") and not s.get("sha256")]
    if missing:
        raise ValueError(f"{manifest_where(split_dir)} lists shard(s) without a sha256 ({', '.join(map(str, missing[:3]))}"
                         f"{', ...' if len(missing) > 3 else ''}): re-run `dist-llm prepare`, or accept unchecked "
                         f"shards with data.require_checksums=false")


def verify_shard(path: PathLike, sha256: str) -> None:
    """Raise ValueError when the shard's SHA-256 differs from the manifest's."""
    got = sha256_file(path)
    if got != sha256:
        raise ValueError(
            f"checksum mismatch for {path}: manifest says {sha256}, file has {got}; the shard is "
            f"corrupt or was rewritten without its manifest: re-run `dist-llm prepare`"
        )


def _iter_members(data: bytes, path: PathLike):
    """``(name, bytes)`` of every regular tar member, via WebDataset's own tar iteration."""
    try:
        from webdataset.tariterators import tar_file_iterator
    except ImportError:  # pragma: no cover - webdataset is a declared dependency
        with tarfile.open(fileobj=io.BytesIO(data), mode="r|") as tar:
            for info in tar:
                if info.isreg():
                    f = tar.extractfile(info)
                    assert f is not None
                    yield info.name, f.read()
        return
    for item in tar_file_iterator(io.BytesIO(data)):
        yield item["fname"], item["data"]


def read_records(path: PathLike) -> List[Dict[str, bytes]]:
    """Every sample of a shard as ``{"__key__": key, field: bytes}``, in member order.

    Fields are the member name after the key (``tokens.npy``, ``segments.npy``, ``nsp.cls``,
    ``npy``, ``cls``), as ``webdataset.WebDataset`` groups them.
    """
    p = Path(path)
    out: List[Dict[str, bytes]] = []
    for name, blob in _iter_members(p.read_bytes(), p):
        key, _, field = name.partition(".")
        if not out or out[-1]["__key__"] != key.encode():
            out.append({"__key__": key.encode()})
        out[-1][field] = blob
    return out

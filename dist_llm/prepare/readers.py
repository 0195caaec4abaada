"""Input discovery and chunked, deterministic reading of raw records.

Why raw records: the reader only splits files into records (bytes of a line, a whole file, a
parquet cell, an image path) and leaves decoding, JSON parsing and validation to the workers,
so the single reading process stays I/O-bound and malformed input is reported where it is
parsed, with its file and line.

Work is planned as *units* (a group of small files, or one large file) without reading any
content, and a unit is cut into *chunks* while it is read. Chunk ``(unit, k)`` is the same in
every engine, so local and Ray runs produce the same intermediate parts and the same shards.
"""
from __future__ import annotations

import glob
import gzip
import io
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, List, Optional, Sequence, Tuple

TEXT_SUFFIXES = {".txt": "txt", ".jsonl": "jsonl", ".ndjson": "jsonl", ".jsonl.gz": "jsonl",
                 ".jsonl.zst": "jsonl", ".parquet": "parquet"}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".pgm", ".ppm")

# A record: (file index, record index in its file, 1-based line or row, payload)
Record = Tuple[int, int, int, Any]


class InputError(FileNotFoundError):
    """An input path is missing or holds nothing we can read; the message names it and the fix."""


@dataclass(frozen=True)
class InputFile:
    path: str
    format: str  # txt | jsonl | parquet | image | npy | stdlib
    label: int = -1  # image class id
    size: int = 0


def _suffix_format(path: str) -> Optional[str]:
    low = path.lower()
    for suf in sorted(TEXT_SUFFIXES, key=len, reverse=True):
        if low.endswith(suf):
            return TEXT_SUFFIXES[suf]
    return None


def _expand(path: str) -> List[str]:
    if glob.has_magic(path):
        hits = sorted(glob.glob(path, recursive=True))
        if not hits:
            raise InputError(f"input.paths glob {path!r} matches nothing (cwd {os.getcwd()}); fix the pattern")
        return hits
    if not os.path.exists(path):
        raise InputError(f"input path {path!r} does not exist (cwd {os.getcwd()}); fix input.paths")
    return [path]


def discover(paths: Sequence[str], fmt: str = "auto") -> List[InputFile]:
    """Every input file, sorted within each path; directories are searched recursively.

    ``fmt=images`` treats each path as a folder-per-class tree (class ids = sorted folder names).
    """
    files: List[InputFile] = []
    for raw in paths:
        for p in _expand(raw):
            if fmt == "images":
                files.extend(_image_tree(p))
                continue
            cands = sorted(str(q) for q in Path(p).rglob("*") if q.is_file()) if os.path.isdir(p) else [p]
            for c in cands:
                f = _suffix_format(c) if fmt == "auto" else fmt
                if f is None:
                    if os.path.isdir(p):
                        continue  # unrelated files in a directory are skipped
                    raise InputError(f"cannot tell the format of {c!r} from its name; set input.format="
                                     f"txt|jsonl|parquet or rename it (.txt, .jsonl[.gz|.zst], .parquet)")
                files.append(InputFile(c, f, size=os.path.getsize(c)))
    if not files:
        raise InputError(f"input.paths {list(paths)} hold no readable files (format={fmt}); known suffixes: "
                         f"{sorted(TEXT_SUFFIXES)}")
    return files


def _image_tree(root: str) -> List[InputFile]:
    if not os.path.isdir(root):
        raise InputError(f"input.format=images needs a folder-per-class directory, got {root!r}")
    classes = sorted(d.name for d in Path(root).iterdir() if d.is_dir())
    if not classes:
        raise InputError(f"{root!r} has no class sub-folders; lay images out as {root}/<class>/<file>.png")
    out = []
    for label, cls in enumerate(classes):
        for f in sorted(Path(root, cls).rglob("*")):
            if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES:
                out.append(InputFile(str(f), "image", label=label, size=f.stat().st_size))
    return out


def image_classes(paths: Sequence[str]) -> List[str]:
    return sorted(d.name for p in paths for d in Path(p).iterdir() if d.is_dir())


_STDLIB_SKIP_DIRS = {"site-packages", "test", "tests", "idlelib", "__pycache__"}


def stdlib_documents(max_bytes: int, stdlib_dir: Optional[str] = None) -> List[Tuple[str, bytes]]:
    """``(relative path, UTF-8 bytes)`` of stdlib ``.py`` files in sorted path order, up to ``max_bytes``.

    The embedded default corpus (see :mod:`dist_llm.prepare.embedded`): real text on every machine
    that runs us, no download; sorted paths make it deterministic for a given interpreter.
    """
    root = Path(stdlib_dir or sysconfig.get_paths()["stdlib"])
    paths: List[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _STDLIB_SKIP_DIRS)
        rel = Path(dirpath).relative_to(root)
        paths.extend((rel / f).as_posix() for f in filenames if f.endswith(".py"))
    docs: List[Tuple[str, bytes]] = []
    total = 0
    for rel in sorted(paths):
        try:
            data = (root / rel).read_bytes()
            data.decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if not data:
            continue
        if total + len(data) > max_bytes:
            break
        docs.append((rel, data))
        total += len(data)
    return docs


def stdlib_files(max_bytes: int) -> List[InputFile]:
    """The embedded corpus' files (:func:`stdlib_documents`) as inputs."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return [InputFile(str(root / rel), "txt", size=len(data)) for rel, data in stdlib_documents(max_bytes)]


def plan_units(files: Sequence[InputFile], chunk_records: int, chunk_bytes: int) -> List[List[int]]:
    """Group file indices into units: whole-file records (txt file mode, images) are grouped up to
    ``chunk_records``/``chunk_bytes``; every other file is a unit of its own. Uses sizes only."""
    units: List[List[int]] = []
    cur: List[int] = []
    size = 0
    for i, f in enumerate(files):
        if f.format in ("jsonl", "parquet", "npy") or f.format == "txt-line":
            if cur:
                units.append(cur)
                cur, size = [], 0
            units.append([i])
            continue
        if cur and (len(cur) >= chunk_records or size + f.size > chunk_bytes):
            units.append(cur)
            cur, size = [], 0
        cur.append(i)
        size += f.size
    if cur:
        units.append(cur)
    return units


def _open_bytes(path: str) -> io.BufferedIOBase:
    low = path.lower()
    if low.endswith(".gz"):
        return gzip.open(path, "rb")  # type: ignore[return-value]
    if low.endswith(".zst"):
        try:
            import zstandard
        except ImportError as e:
            raise InputError(f"{path} is zstd-compressed; install zstandard (pip install zstandard)") from e
        # BufferedReader adds the readline() that zstandard's stream reader lacks
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))
    return open(path, "rb")


def _file_records(fi: int, f: InputFile, text_field: str, npy_labels: Optional[str]) -> Iterator[Record]:
    """Records of one file. An empty file yields one record with payload ``None`` (malformed)."""
    if f.format in ("txt", "image"):
        if f.format == "image":
            yield (fi, 0, 1, (f.path, f.label))
            return
        with open(f.path, "rb") as fh:
            yield (fi, 0, 1, fh.read() or None)
        return
    if f.format in ("jsonl", "txt-line"):
        n = 0
        with _open_bytes(f.path) as fh:
            for lineno, line in enumerate(fh, 1):
                if line.strip():
                    yield (fi, n, lineno, line)
                    n += 1
        if n == 0:
            yield (fi, 0, 0, None)
        return
    if f.format == "parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(f.path)
        if text_field not in pf.schema_arrow.names:
            yield (fi, 0, 0, ("missing-column", f"no column {text_field!r} (has {pf.schema_arrow.names})"))
            return
        row = 0
        for batch in pf.iter_batches(columns=[text_field], batch_size=4096):
            for value in batch.column(0).to_pylist():
                yield (fi, row, row + 1, ("value", value))
                row += 1
        if row == 0:
            yield (fi, 0, 0, None)
        return
    if f.format == "npy":
        import numpy as np

        arr = np.load(f.path, mmap_mode="r")
        labels = np.load(npy_labels) if npy_labels else np.zeros(len(arr), dtype=np.int64)
        if len(labels) != len(arr):
            raise InputError(f"{npy_labels} holds {len(labels)} labels but {f.path} holds {len(arr)} images; "
                             f"they must match one to one")
        for i in range(len(arr)):
            yield (fi, i, i + 1, (np.array(arr[i]), int(labels[i])))
        return
    raise InputError(f"unknown input format {f.format!r} for {f.path}")


def read_unit(unit: Sequence[int], files: Sequence[InputFile], chunk_records: int, chunk_bytes: int,
              text_field: str = "text", npy_labels: Optional[str] = None) -> Iterator[Tuple[int, List[Record]]]:
    """``(chunk index, records)`` of one unit, cut at ``chunk_records`` records or ``chunk_bytes``."""
    chunk: List[Record] = []
    size, k = 0, 0
    for fi in unit:
        for rec in _file_records(fi, files[fi], text_field, npy_labels):
            payload = rec[3]
            chunk.append(rec)
            size += len(payload) if isinstance(payload, (bytes, bytearray)) else 64
            if len(chunk) >= chunk_records or size >= chunk_bytes:
                yield k, chunk
                chunk, size, k = [], 0, k + 1
    if chunk or k == 0:
        yield k, chunk

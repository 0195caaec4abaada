"""Phase A, the parallel part: decode, clean, filter and hash one chunk of records; and, once
dedup has decided (phase B), tokenize the documents a part keeps (phase A2).

A worker is a pure function of (config, tokenizer, chunk): it writes one *part* to
``<output_dir>/.work/parts/<unit>-<chunk>`` and returns small counters. Because parts are
named by their place in the input, not by who made them, any number of local processes or
Ray tasks produce the same parts, and a re-run skips parts that exist (``.meta.npz`` is
written last, atomically, so its presence means the part is complete).

Part layout (one row per record, in input order):
``rec, line, status, exact, bands[n, B], nbytes, text_off`` in ``.meta.npz`` and the
candidates' cleaned text (UTF-8, concatenated, ``text_off`` cuts it) in ``.text.npy``; images
instead keep ``shape, label, ntok`` in the meta and their pixels (uint8) in ``.images.npy``.
``status``: 0 = kept so far (dedup decides later), 1 = malformed, 2 + k = dropped by filter k.

Tokenizing after dedup, not before, means exact and near duplicates (often a third of a web
crawl) are never tokenized. Phase A2 writes, per part, the kept documents' token ids (uint32)
in ``.tokens.npy`` and ``ntok`` (+ ``nsent, sent_len`` for BERT) in ``.tok.npz``, last.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from dist_llm.prepare.clean import make_cleaner
from dist_llm.prepare.dedup import MinHasher, chunk_shingles, exact_hash, word_table
from dist_llm.prepare.filters import QualityFilter
from dist_llm.prepare.readers import InputFile, Record, read_unit

CANDIDATE, MALFORMED, FILTERED0 = 0, 1, 2
_EOS_TEXT = "<|eos|>"  # stands for the EOS id in rendered chats (see labelled.encode_segments)
_SENTENCE = re.compile(r"(?<=[.!?])\s+|\n+")


def part_name(unit: int, chunk: int) -> str:
    return f"{unit:06d}-{chunk:05d}"


def part_done(work: Path, name: str) -> bool:
    return (work / "parts" / f"{name}.meta.npz").is_file()


def part_tokenized(work: Path, name: str) -> bool:
    return (work / "parts" / f"{name}.tok.npz").is_file()


def _atomic_np(path: Path, save) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        save(f)
    os.replace(tmp, path)


@dataclass
class PartSource:
    """Where phase A's parts come from: the input files cut into units and chunks (see
    :mod:`dist_llm.prepare.readers`). Picklable: a Ray actor reads its own units with it."""

    files: Sequence[InputFile]
    units: Sequence[Sequence[int]]
    labels: Optional[str]  # npy: the labels file
    chunk_records: int
    chunk_bytes: int
    text_field: str
    work: Path

    @property
    def paths(self) -> List[str]:
        return [f.path for f in self.files]

    def unit_chunks(self, u: int) -> Iterator[Tuple[str, List[Record]]]:
        """``(part name, records)`` of unit ``u``."""
        for k, records in read_unit(self.units[u], self.files, self.chunk_records, self.chunk_bytes,
                                    self.text_field, self.labels):
            yield part_name(u, k), records

    def chunks(self, skip_done: bool = True) -> Iterator[Tuple[str, Optional[List[Record]]]]:
        """``(part name, records)`` of every part in input order; records are None for a part
        already on disk (with ``skip_done``)."""
        for u in range(len(self.units)):
            for name, records in self.unit_chunks(u):
                yield name, None if skip_done and part_done(self.work, name) else records


@dataclass
class WorkerContext:
    """Everything a worker needs; picklable (sent once per process / Ray actor)."""

    cfg: Any  # PrepareConfig
    work_dir: str
    tokenizer_meta: Optional[Dict[str, Any]]  # None while sampling text to train a tokenizer
    tokenizer_dir: str
    filter_rules: Tuple[str, ...] = ()


class Worker:
    def __init__(self, ctx: WorkerContext) -> None:
        from dist_llm.data.tokenizer import load_tokenizer

        self.ctx, cfg = ctx, ctx.cfg
        self.cfg = cfg
        self.clean = make_cleaner(cfg.clean.steps)
        self.filter = QualityFilter(cfg.filter)
        dd = cfg.dedup
        self.minhash = MinHasher(dd.num_perm, dd.bands, dd.threshold, dd.seed) if dd.near else None
        self.tok = load_tokenizer(ctx.tokenizer_meta, ctx.tokenizer_dir) if ctx.tokenizer_meta else None
        self.parts = Path(ctx.work_dir) / "parts"
        self.parts.mkdir(parents=True, exist_ok=True)

    # -- decoding -----------------------------------------------------------------------------
    def _text(self, payload: Any, path: str) -> Tuple[Optional[str], str]:
        """``(text, "")`` or ``(None, reason)`` for one raw record."""
        if payload is None:
            return None, "empty file"
        fmt_json = path.lower().endswith((".jsonl", ".ndjson", ".jsonl.gz", ".jsonl.zst"))
        if isinstance(payload, tuple):  # parquet
            kind, value = payload
            if kind != "value":
                return None, value
            if not isinstance(value, str):
                return None, f"field {self.cfg.input.text_field!r} is {type(value).__name__}, not text"
            return value, ""
        try:
            text = payload.decode("utf-8")
        except UnicodeDecodeError as e:
            return None, f"invalid UTF-8 at byte {e.start}"
        if fmt_json or self.cfg.input.format == "jsonl":
            try:
                obj = json.loads(text)
            except ValueError as e:
                return None, f"broken JSON ({e.msg} at column {e.colno})"
            field = self.cfg.input.text_field
            if not isinstance(obj, dict) or field not in obj:
                return None, f"missing text field {field!r}"
            if not isinstance(obj[field], str):
                return None, f"field {field!r} is {type(obj[field]).__name__}, not text"
            return obj[field], ""
        return text, ""

    def texts(self, records: Sequence[Record], paths: Sequence[str]) -> List[Tuple[Optional[str], str]]:
        """Cleaned text (or None and the reason) per record; used for tokenizer training too."""
        out = []
        structured = self.cfg.pack.kind in ("classify", "sft")
        for fi, _, _, payload in records:
            text, why = self._row(payload, paths[fi]) if structured else self._text(payload, paths[fi])
            out.append((None, why) if text is None else (text if structured else self.clean(text), ""))
        return out

    def _row(self, payload: Any, path: str) -> Tuple[Optional[str], str]:
        """A classify/sft JSONL row as one canonical JSON document (fields cleaned), or the reason."""
        from dist_llm.prepare.labelled import parse_row, serialize

        if payload is None:
            return None, "empty file"
        try:
            obj = json.loads(payload.decode("utf-8"))
        except UnicodeDecodeError as e:
            return None, f"invalid UTF-8 at byte {e.start}"
        except ValueError as e:
            return None, f"broken JSON ({e.msg} at column {e.colno})"
        row, why = parse_row(obj, self.cfg)
        return (None, why) if row is None else (serialize(row, self.clean), "")

    # -- one chunk ----------------------------------------------------------------------------
    def run_text(self, name: str, records: Sequence[Record], paths: Sequence[str]) -> Dict[str, Any]:
        n = len(records)
        status = np.zeros(n, dtype=np.int8)
        exact = np.zeros(n, dtype=np.uint64)
        nbytes = np.array([len(r[3]) if isinstance(r[3], (bytes, bytearray)) else 0 for r in records], np.int64)
        malformed: List[Tuple[str, int, str]] = []
        rules = {r: i for i, r in enumerate(self.filter.rules)}
        ok: List[int] = []
        ok_text: List[str] = []
        for i, (text, why) in enumerate(self.texts(records, paths)):
            if text is None:
                status[i] = MALFORMED
                fi, _, line, _ = records[i]
                malformed.append((paths[fi], line, why))
            else:
                ok.append(i)
                ok_text.append(text)
        # Words, filters and shingles for the whole chunk at once (vectorised across documents).
        words = word_table(ok_text)
        verdicts = self.filter.check_many(ok_text, words) if self.filter.enabled else [None] * len(ok)
        cand_idx: List[int] = []
        cand_text: List[str] = []
        cand_rows: List[int] = []
        for j, (i, text, bad) in enumerate(zip(ok, ok_text, verdicts)):
            if bad is None and not text:
                bad = "empty_after_clean"
                rules.setdefault(bad, len(rules))
            if bad is not None:
                status[i] = FILTERED0 + rules[bad]
                continue
            exact[i] = exact_hash(text)
            cand_idx.append(i)
            cand_text.append(text)
            cand_rows.append(j)
        bands = np.zeros((n, self.minhash.bands if self.minhash else 0), dtype=np.uint64)
        if self.minhash is not None and cand_idx:
            hv, starts = chunk_shingles(words.take(np.array(cand_rows, np.int64)), self.cfg.dedup.shingle_words)
            bands[cand_idx] = self.minhash.band_keys(self.minhash.signatures_flat(hv, starts))
        encoded = [t.encode("utf-8", "surrogatepass") for t in cand_text]
        blob = b"".join(encoded)
        text_off = np.zeros(len(cand_text) + 1, np.int64)
        np.cumsum(list(map(len, encoded)), out=text_off[1:])
        meta = dict(rec=np.array([r[1] for r in records], np.int64), line=np.array([r[2] for r in records], np.int64),
                    fidx=np.array([r[0] for r in records], np.int64), status=status, exact=exact, bands=bands,
                    nbytes=nbytes, text_off=text_off,
                    malformed=np.array(json.dumps(malformed)), rules=np.array(json.dumps(list(rules))))
        self._save(name, "text", np.frombuffer(blob, np.uint8) if blob else np.zeros(0, np.uint8), meta)
        return {"records": n, "bytes": int(nbytes.sum()), "candidates": len(cand_idx)}

    def run_tokenize(self, name: str, keep: np.ndarray) -> Dict[str, Any]:
        """Phase A2: tokenize the candidates ``keep`` (indices among the part's candidates, ascending)."""
        assert self.tok is not None
        parts = self.parts
        self.current = name
        with np.load(parts / f"{name}.meta.npz") as z:
            off = z["text_off"]
        blob = np.load(parts / f"{name}.text.npy").tobytes()
        o = off.tolist()
        texts = [blob[o[k]:o[k + 1]].decode("utf-8", "surrogatepass") for k in keep.tolist()]
        arrays: Dict[str, np.ndarray] = {}
        if self.cfg.pack.kind == "bert":
            nsent = np.zeros(len(texts), dtype=np.int64)
            sents_all: List[str] = []
            for j, t in enumerate(texts):
                sents = [x for x in _SENTENCE.split(t) if x.strip()] or [t]
                nsent[j] = len(sents)
                sents_all.extend(sents)
            flat, sent_len = _flatten(self.tok.encode_batch(sents_all))
            bounds = np.zeros(len(texts) + 1, np.int64)
            np.cumsum(nsent, out=bounds[1:])
            csum = np.zeros(len(sent_len) + 1, np.int64)
            np.cumsum(sent_len, out=csum[1:])
            ntok = csum[bounds[1:]] - csum[bounds[:-1]]
            arrays.update(nsent=nsent, sent_len=sent_len)
        elif self.cfg.pack.kind in ("classify", "sft"):
            flat, ntok = self._tokenize_rows(texts, arrays)
        else:
            flat, ntok = _flatten(self.tok.encode_batch(texts))
        _atomic_np(parts / f"{name}.tokens.npy", lambda f: np.save(f, flat, allow_pickle=False))
        _atomic_np(parts / f"{name}.tok.npz", lambda f: np.savez(f, ntok=ntok, **arrays))
        return {"documents": len(texts), "tokens": int(ntok.sum())}

    def _tokenize_rows(self, texts: Sequence[str], arrays: Dict[str, np.ndarray]) -> Tuple[np.ndarray, np.ndarray]:
        """classify: the text's ids (+ ``label`` strings in ``arrays``); sft: the rendered chat's
        ids (+ its loss mask, written as ``<part>.mask.npy`` beside the tokens)."""
        from dist_llm.prepare import labelled

        rows = [json.loads(t) for t in texts]
        if self.cfg.pack.kind == "classify":
            arrays["label"] = labelled.label_array([r["label"] for r in rows])
            return _flatten(self.tok.encode_batch([r["text"] for r in rows]))
        tc = self.cfg.tokenizer
        template = labelled.chat_template(tc.path if tc.kind == "file" else None)
        eos = getattr(self.tok, "eos_id", None)
        if eos is None:
            eos = getattr(self.tok, "special_ids", {}).get("eos")
        enc, masks = [], []
        for r in rows:
            ids, mask = labelled.encode_segments(
                self.tok, labelled.render_segments(r["messages"], template, _EOS_TEXT), _EOS_TEXT, eos)
            enc.append(ids)
            masks.append(mask)
        flat, ntok = _flatten(enc)
        mflat = np.array([x for m in masks for x in m], dtype=np.uint8)
        _atomic_np(self.parts / f"{self.current}.mask.npy", lambda f: np.save(f, mflat, allow_pickle=False))
        return flat, ntok

    def run_images(self, name: str, records: Sequence[Record], paths: Sequence[str]) -> Dict[str, Any]:
        n = len(records)
        status = np.zeros(n, dtype=np.int8)
        exact = np.zeros(n, dtype=np.uint64)
        shape = np.zeros((n, 3), dtype=np.int64)
        label = np.full(n, -1, dtype=np.int64)
        pixels: List[np.ndarray] = []
        malformed: List[Tuple[str, int, str]] = []
        size = self.cfg.pack.image_size
        for i, (fi, _, line, payload) in enumerate(records):
            try:
                img, lab = payload if not isinstance(payload[0], str) else (_load_image(payload[0]), payload[1])
                img = _as_hwc(np.asarray(img), size)
            except Exception as e:  # any decoder failure is one malformed record, not a crash
                status[i] = MALFORMED
                malformed.append((paths[fi], line, f"unreadable image ({type(e).__name__}: {e})"))
                continue
            shape[i], label[i] = img.shape, int(lab)
            exact[i] = int.from_bytes(hashlib.blake2b(img.tobytes(), digest_size=8).digest(), "little")
            pixels.append(img.reshape(-1))
        flat = np.concatenate(pixels) if pixels else np.zeros(0, np.uint8)
        meta = dict(fidx=np.array([r[0] for r in records], np.int64), rec=np.array([r[1] for r in records], np.int64),
                    line=np.array([r[2] for r in records], np.int64), status=status, exact=exact,
                    bands=np.zeros((n, 0), np.uint64), shape=shape, label=label,
                    ntok=shape.prod(axis=1) * (status == 0), nbytes=np.zeros(n, np.int64),
                    malformed=np.array(json.dumps(malformed)), rules=np.array("[]"))
        self._save(name, "images", flat, meta)
        return {"records": n, "bytes": 0, "candidates": int((status == 0).sum())}

    def _save(self, name: str, kind: str, flat: np.ndarray, meta: Dict[str, np.ndarray]) -> None:
        _atomic_np(self.parts / f"{name}.{kind}.npy", lambda f: np.save(f, flat, allow_pickle=False))
        _atomic_np(self.parts / f"{name}.meta.npz", lambda f: np.savez(f, **meta))


def _flatten(enc: List[List[int]]) -> Tuple[np.ndarray, np.ndarray]:
    """Token id lists as one uint32 array and their lengths (array.extend: a C loop per list)."""
    buf = array("I") if array("I").itemsize == 4 else array("L")
    lens = np.zeros(len(enc), np.int64)
    for k, ids in enumerate(enc):
        buf.extend(ids)
        lens[k] = len(ids)
    flat = np.frombuffer(buf, dtype=np.uint32) if len(buf) else np.zeros(0, np.uint32)
    return flat, lens


def _load_image(path: str) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        return np.asarray(im.convert("RGB") if im.mode not in ("L", "RGB") else im)


def _as_hwc(img: np.ndarray, size: int) -> np.ndarray:
    if img.ndim == 2:
        img = img[:, :, None]
    if img.ndim != 3 or img.shape[0] == 0 or img.shape[1] == 0:
        raise ValueError(f"expected an HxW or HxWxC array, got shape {img.shape}")
    if img.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels, got {img.dtype}")
    if size and img.shape[:2] != (size, size):
        from PIL import Image

        mode = "L" if img.shape[2] == 1 else "RGB"
        im = Image.fromarray(img[:, :, 0] if mode == "L" else img, mode).resize((size, size), Image.BILINEAR)
        img = np.asarray(im).reshape(size, size, -1)
    return np.ascontiguousarray(img)


_WORKER: Optional[Worker] = None


def init_worker(ctx: WorkerContext) -> None:
    """Pool initializer: one Worker (tokenizer, MinHash tables) per process."""
    global _WORKER
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # processes are the parallelism
    _WORKER = Worker(ctx)


def run_tokenize(args: Tuple[str, np.ndarray]) -> Dict[str, Any]:
    assert _WORKER is not None, "init_worker was not called in this process"
    return _WORKER.run_tokenize(*args)


def run_chunk(args: Tuple[str, Sequence[Record], Sequence[str]]) -> Dict[str, Any]:
    name, records, paths = args
    assert _WORKER is not None, "init_worker was not called in this process"
    if _WORKER.cfg.pack.kind == "image":
        return _WORKER.run_images(name, records, paths)
    return _WORKER.run_text(name, records, paths)


def clean_chunk(args: Tuple[str, Sequence[Record], Sequence[str]]) -> List[str]:
    """Cleaned, filter-passing texts of a chunk (tokenizer training input)."""
    _, records, paths = args
    w = _WORKER
    assert w is not None, "init_worker was not called in this process"
    texts = [text for text, _ in w.texts(records, paths) if text]
    if not w.filter.enabled:
        return texts
    return [text for text, bad in zip(texts, w.filter.check_many(texts, word_table(texts))) if bad is None]


def load_part(work: Path, name: str) -> Dict[str, Any]:
    with np.load(work / "parts" / f"{name}.meta.npz") as z:
        out = {k: z[k] for k in z.files}
    out["malformed"] = json.loads(str(out["malformed"]))
    out["rules"] = json.loads(str(out["rules"]))
    return out


__all__ = ["PartSource", "WorkerContext", "Worker", "init_worker", "run_chunk", "run_tokenize", "clean_chunk",
           "load_part", "part_name", "part_done", "part_tokenized"]

"""Phase C, one class per pack kind: how a split is cut into shard jobs, how one shard is built
from the plan, and what its split manifest says.

A packer is built on the driver once the plan exists and is sent (pickled) to every writer
process or Ray actor, where :meth:`Packer.write` builds shards independently of each other.
Adding a pack kind means adding one class here and one entry in :data:`PACKERS` (plus the
enum member in :class:`dist_llm.config.prepare_schema.PackKind`).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, ClassVar, Dict, Iterator, List, Protocol, Tuple, Type

import numpy as np

from dist_llm.config.prepare_schema import PackKind, PrepareConfig
from dist_llm.data.shards import (CLASSIFY_FORMAT, IMAGES_FORMAT, SFT_FORMAT, PAIRS_FORMAT, _npy_bytes, dtype_for_vocab, sample_key, sha256_bytes,
                                  sha256_file, token_manifest, token_members, write_shard)
from dist_llm.prepare.plan import BadInputError, ShardJob, ShardSource, doc_jobs
from dist_llm.prepare.tokenize import build_tokenizer, special_ids, vocab_size


class Packer(Protocol):
    """What the driver and the writers need of a pack kind."""

    tokenizes: ClassVar[bool]  # text: build a tokenizer and tokenize the kept documents (phase A2)

    def __init__(self, cfg: PrepareConfig, tok_meta: Dict[str, Any], classes: List[str], src: ShardSource) -> None:
        """Built on the driver once the plan (``src``) exists."""

    @classmethod
    def vocabulary(cls, cfg: PrepareConfig, out: Path, work: Path, sample: Callable[[int], Iterator[str]],
                   classes: List[str]) -> Dict[str, Any]:
        """The ``tokenizer`` meta of the manifests (a trained/loaded tokenizer, or image classes)."""

    def jobs(self, split: str) -> List[ShardJob]:
        """The shards of a split, each buildable on its own."""

    def write(self, job: ShardJob) -> Dict[str, Any]:
        """Build and write one shard; its manifest entry."""

    def manifest(self, split: str, shards: List[Dict[str, Any]], extra: Dict[str, Any]) -> Dict[str, Any]:
        """The split manifest for the written ``shards``."""

    def dataset_fields(self) -> Dict[str, Any]:
        """Extra fields of the dataset manifest (``<output_dir>/manifest.json``)."""


class _TextPacker:
    """Common to the token kinds: the tokenizer, its dtype and special ids."""

    tokenizes: ClassVar[bool] = True

    def __init__(self, cfg: PrepareConfig, tok_meta: Dict[str, Any], classes: List[str], src: ShardSource) -> None:
        self.src, self.docs, self.tok_meta = src, src.docs, tok_meta
        self.seq_len, self.per_shard = cfg.pack.seq_len, cfg.pack.samples_per_shard
        self.vocab = vocab_size(tok_meta)
        self.dtype = dtype_for_vocab(self.vocab)
        self.sp = special_ids(tok_meta)

    @classmethod
    def vocabulary(cls, cfg: PrepareConfig, out: Path, work: Path, sample: Callable[[int], Iterator[str]],
                   classes: List[str]) -> Dict[str, Any]:
        return build_tokenizer(cfg, out, work, sample)

    def dataset_fields(self) -> Dict[str, Any]:
        if self.tok_meta["kind"] != "byte":
            return {"tokenizer_sha256": sha256_file(self.src.out / "tokenizer.json")}
        return {"tokenizer_sha256": sha256_bytes(json.dumps(self.tok_meta, sort_keys=True).encode())}


class CausalPacker(_TextPacker):
    """Documents joined with EOS, cut into ``seq_len + 1`` windows; shard ``s`` holds windows
    ``[s*S, (s+1)*S)`` of the split's token stream."""

    def __init__(self, cfg: PrepareConfig, tok_meta: Dict[str, Any], classes: List[str], src: ShardSource) -> None:
        super().__init__(cfg, tok_meta, classes, src)
        self._cum = {s: np.concatenate([[0], np.cumsum(d["ntok"] + 1)]) for s, d in self.docs.items()}

    def jobs(self, split: str) -> List[ShardJob]:
        d = self.docs[split]
        total = int((d["ntok"] + 1).sum()) if len(d["ntok"]) else 0
        nwin, per = total // (self.seq_len + 1), self.per_shard
        return [ShardJob(split, s, s * per, min((s + 1) * per, nwin)) for s in range(math.ceil(nwin / per))]

    def write(self, job: ShardJob) -> Dict[str, Any]:
        L, cum = self.seq_len + 1, self._cum[job.split]
        a, b = job.lo * L, job.hi * L
        d0 = int(np.searchsorted(cum, a, side="right")) - 1
        d1 = int(np.searchsorted(cum, b, side="left"))
        eos = np.array([self.sp["eos"]], dtype=np.uint32)
        buf = np.concatenate([x for d in range(d0, d1) for x in (self.src.doc_tokens(job.split, d), eos)])
        rows = buf[a - int(cum[d0]): b - int(cum[d0])].reshape(-1, L)
        starts = int(((cum[:-1] >= a) & (cum[:-1] < b)).sum())
        entry = write_shard(self.src.out / job.split, job.index, token_members(rows, job.lo, self.dtype), len(rows))
        return {**entry, "num_documents": starts, "num_tokens": int(rows.size)}

    def manifest(self, split: str, shards: List[Dict[str, Any]], extra: Dict[str, Any]) -> Dict[str, Any]:
        return token_manifest(self.seq_len, self.vocab, self.sp.get("eos"), shards, self.tok_meta, extra)


class BertPacker(_TextPacker):
    """``[CLS] A [SEP] B [SEP]`` sentence pairs with next-sentence labels (see :mod:`.bert`)."""

    def __init__(self, cfg: PrepareConfig, tok_meta: Dict[str, Any], classes: List[str], src: ShardSource) -> None:
        super().__init__(cfg, tok_meta, classes, src)
        self.seed, self.p_random = cfg.seed, cfg.pack.random_next_prob

    def sentences(self, split: str, d: int) -> List[np.ndarray]:
        return self.src.sentences(split, d)

    def jobs(self, split: str) -> List[ShardJob]:
        from dist_llm.prepare.bert import max_pairs

        d, seq = self.docs[split], self.seq_len
        est = np.minimum(max_pairs(d, seq), d["ntok"] // max(seq - 3, 1) + 1) if len(d["ntok"]) else d["ntok"]
        return doc_jobs(split, d, self.per_shard, est)

    def write(self, job: ShardJob) -> Dict[str, Any]:
        from dist_llm.prepare.bert import pairs_for_document

        members, n = [], 0
        first = int(self._offsets(job.split)[job.lo])
        for d in range(job.lo, job.hi):
            for toks, segs, nsp in pairs_for_document(self, job.split, d):
                key = sample_key(first + n)
                members += [(f"{key}.tokens.npy", _npy_bytes(toks.astype(self.dtype))),
                            (f"{key}.segments.npy", _npy_bytes(segs)), (f"{key}.nsp.cls", str(nsp).encode())]
                n += 1
        entry = write_shard(self.src.out / job.split, job.index, members, n)
        return {**entry, "num_documents": job.hi - job.lo, "num_tokens": n * self.seq_len}

    def _offsets(self, split: str) -> np.ndarray:
        """Sample-key offset of each document: the sum of estimated pairs before it (stable)."""
        from dist_llm.prepare.bert import max_pairs

        return np.concatenate([[0], np.cumsum(max_pairs(self.docs[split], self.seq_len))])

    def manifest(self, split: str, shards: List[Dict[str, Any]], extra: Dict[str, Any]) -> Dict[str, Any]:
        n = sum(s["num_samples"] for s in shards)
        return {"format": PAIRS_FORMAT, "num_samples": n, "shards": shards, "extra": extra, "seq_len": self.seq_len,
                "sample_len": self.seq_len, "dtype": self.dtype, "vocab_size": self.vocab,
                "tokenizer": self.tok_meta, "num_tokens": n * self.seq_len, "special_ids": self.sp}


class ImagePacker:
    """``(image, label)`` samples, whole images per shard; all images must share one size."""

    tokenizes: ClassVar[bool] = False

    def __init__(self, cfg: PrepareConfig, tok_meta: Dict[str, Any], classes: List[str], src: ShardSource) -> None:
        self.src, self.docs, self.classes = src, src.docs, classes
        self.per_shard = cfg.pack.samples_per_shard
        self._check_shapes()

    @classmethod
    def vocabulary(cls, cfg: PrepareConfig, out: Path, work: Path, sample: Callable[[int], Iterator[str]],
                   classes: List[str]) -> Dict[str, Any]:
        return {"kind": "image", "classes": classes}

    def _check_shapes(self) -> None:
        shapes = np.concatenate([d["shape"] for d in self.docs.values() if len(d.get("shape", []))]
                                or [np.zeros((0, 3))])
        if len(shapes) and (shapes != shapes[0]).any():
            i = int(np.nonzero((shapes != shapes[0]).any(axis=1))[0][0])
            raise BadInputError(f"images differ in size ({tuple(shapes[0])} vs {tuple(shapes[i])}); set "
                                f"pack.image_size=N to resize them all to NxN")

    def jobs(self, split: str) -> List[ShardJob]:
        d = self.docs[split]
        return doc_jobs(split, d, self.per_shard, np.ones(len(d["ntok"]), np.int64))

    def write(self, job: ShardJob) -> Dict[str, Any]:
        D, members = self.docs[job.split], []
        for d in range(job.lo, job.hi):
            shape = tuple(int(x) for x in D["shape"][d])
            o = int(D["off"][d])
            img = np.asarray(self.src.array(int(D["part"][d]), "images")[o:o + int(np.prod(shape))]).reshape(shape)
            key = sample_key(d)  # keys continue across shards
            members += [(f"{key}.npy", _npy_bytes(img)), (f"{key}.cls", str(int(D["label"][d])).encode())]
        n = job.hi - job.lo
        entry = write_shard(self.src.out / job.split, job.index, members, n)
        return {**entry, "num_documents": n, "num_tokens": 0}

    def manifest(self, split: str, shards: List[Dict[str, Any]], extra: Dict[str, Any]) -> Dict[str, Any]:
        shp = self.docs[split]["shape"]
        return {"format": IMAGES_FORMAT, "num_samples": sum(s["num_samples"] for s in shards), "shards": shards,
                "extra": extra, "image_shape": [int(x) for x in shp[0]] if len(shp) else None,
                "classes": self.classes, "dtype": "uint8"}

    def dataset_fields(self) -> Dict[str, Any]:
        return {}


class ClassifyPacker(_TextPacker):
    """``(tokens[seq_len], length, label id)`` per labelled row. Tokens are the text's ids, with
    ``[CLS] ... [SEP]`` around them when the tokenizer has those (BERT reads ``[CLS]``; a GPT
    reads the last real token, ``length - 1``), truncated to ``seq_len`` and padded with pad.
    Label ids index ``classes``: ``pack.labels`` when given, else the sorted labels of both splits."""

    def __init__(self, cfg: PrepareConfig, tok_meta: Dict[str, Any], classes: List[str], src: ShardSource) -> None:
        super().__init__(cfg, tok_meta, classes, src)
        seen = sorted({str(x) for d in self.docs.values() for x in d.get("label", np.zeros(0, str)).tolist()})
        self.classes = [str(x) for x in cfg.pack.labels] or seen
        self.index = {c: i for i, c in enumerate(self.classes)}
        self.wrap = "cls" in self.sp and "sep" in self.sp

    def jobs(self, split: str) -> List[ShardJob]:
        d = self.docs[split]
        return doc_jobs(split, d, self.per_shard, np.ones(len(d["ntok"]), np.int64))

    def encode(self, toks: np.ndarray) -> Tuple[np.ndarray, int, bool]:
        """Padded ids, real length, whether the text was truncated."""
        L = self.seq_len
        room = L - 2 if self.wrap else L
        body = toks[:room].tolist()
        ids = [self.sp["cls"], *body, self.sp["sep"]] if self.wrap else body
        n = len(ids)
        return np.array(ids + [self.sp["pad"]] * (L - n), dtype=self.dtype), n, len(toks) > room

    def write(self, job: ShardJob) -> Dict[str, Any]:
        D, members, cut = self.docs[job.split], [], 0
        counts = np.zeros(len(self.classes), np.int64)
        for d in range(job.lo, job.hi):
            ids, n, trunc = self.encode(self.src.doc_tokens(job.split, d))
            label = self.index[str(D["label"][d])]
            counts[label] += 1
            cut += trunc
            key = sample_key(d)
            members += [(f"{key}.tokens.npy", _npy_bytes(ids)), (f"{key}.len", str(n).encode()),
                        (f"{key}.cls", str(label).encode())]
        entry = write_shard(self.src.out / job.split, job.index, members, job.hi - job.lo)
        return {**entry, "num_documents": job.hi - job.lo, "num_tokens": int(D["ntok"][job.lo:job.hi].sum()),
                "num_truncated": cut, "label_counts": counts.tolist()}

    def manifest(self, split: str, shards: List[Dict[str, Any]], extra: Dict[str, Any]) -> Dict[str, Any]:
        counts = np.sum([s["label_counts"] for s in shards], axis=0).tolist() if shards else [0] * len(self.classes)
        return {"format": CLASSIFY_FORMAT, "num_samples": sum(s["num_samples"] for s in shards), "shards": shards,
                "extra": extra, "seq_len": self.seq_len, "dtype": self.dtype, "vocab_size": self.vocab,
                "tokenizer": self.tok_meta, "special_ids": self.sp, "classes": self.classes,
                "label_counts": dict(zip(self.classes, counts)), "cls_token": self.wrap,
                "num_tokens": sum(s["num_tokens"] for s in shards),
                "num_truncated": sum(s["num_truncated"] for s in shards)}


class SftPacker(_TextPacker):
    """One example per ``seq_len + 1`` window: ``tokens`` (padded with pad) and ``mask`` (1 =
    a response token, the only targets trained on). One example per window, never several, so
    no example attends to another (see docs/model-path.md for why not block-diagonal packing).
    An example longer than the window is cut at its end; one left without any response token
    is dropped and counted (``num_dropped_too_long``)."""

    def jobs(self, split: str) -> List[ShardJob]:
        d = self.docs[split]
        return doc_jobs(split, d, self.per_shard, np.ones(len(d["ntok"]), np.int64))

    def write(self, job: ShardJob) -> Dict[str, Any]:
        D, L, members = self.docs[job.split], self.seq_len + 1, []
        cut = dropped = n = resp = 0
        pad = self.sp.get("pad", self.sp.get("eos", 0))
        for d in range(job.lo, job.hi):
            o, k = int(D["off"][d]), int(D["ntok"][d])
            toks = self.src.doc_tokens(job.split, d)[:L]
            mask = np.asarray(self.src.array(int(D["part"][d]), "mask")[o:o + k])[:L]
            cut += k > L
            if not mask[1:].any():  # position 0 is never a target
                dropped += 1
                continue
            ids = np.full(L, pad, dtype=self.dtype)
            ids[:len(toks)] = toks
            m = np.zeros(L, np.uint8)
            m[:len(mask)] = mask
            resp += int(m[1:].sum())
            key = sample_key(d)
            members += [(f"{key}.tokens.npy", _npy_bytes(ids)), (f"{key}.mask.npy", _npy_bytes(m))]
            n += 1
        entry = write_shard(self.src.out / job.split, job.index, members, n)
        return {**entry, "num_documents": job.hi - job.lo, "num_tokens": n * L, "num_truncated": cut,
                "num_dropped_too_long": dropped, "num_response_tokens": resp}

    def manifest(self, split: str, shards: List[Dict[str, Any]], extra: Dict[str, Any]) -> Dict[str, Any]:
        total = {k: sum(s[k] for s in shards) for k in ("num_samples", "num_tokens", "num_truncated",
                                                         "num_dropped_too_long", "num_response_tokens")}
        return {"format": SFT_FORMAT, "shards": shards, "extra": extra, "seq_len": self.seq_len,
                "sample_len": self.seq_len + 1, "dtype": self.dtype, "vocab_size": self.vocab,
                "tokenizer": self.tok_meta, "special_ids": self.sp, **total}


PACKERS: Dict[PackKind, Type[Packer]] = {
    PackKind.causal: CausalPacker,
    PackKind.bert: BertPacker,
    PackKind.image: ImagePacker,
    PackKind.classify: ClassifyPacker,
    PackKind.sft: SftPacker,
}


def packer_class(kind: Any) -> Type[Packer]:
    """The packer of ``pack.kind`` (an enum member or its string)."""
    return PACKERS[PackKind(kind)]


__all__ = ["Packer", "CausalPacker", "BertPacker", "ImagePacker", "ClassifyPacker", "SftPacker", "PACKERS",
           "packer_class"]

"""Tokenizers that the shard writer and the trainer agree on via a small ``meta`` dict.

The manifest stores ``meta()``; :func:`load_tokenizer` rebuilds the same tokenizer from it, so
sampling/decoding after training needs no extra configuration. Three kinds:

* ``byte``: UTF-8 bytes, no training, no files, works on any text (the embedded demo corpus).
* ``hf``: a Hugging Face ``tokenizers`` file (``tokenizer.json`` next to the split directories):
  either a byte-level BPE trained by ``dist-llm prepare`` (:func:`train_bpe`) or an existing
  file the user brought. ``meta`` names the file and its sha256, so a swapped file is caught.
* ``char``: every distinct character of the training text is one token (the classic char-level
  language-model baseline); the vocabulary lives in ``meta`` itself.

Special tokens (BOS/EOS/PAD/MASK/CLS/SEP, and UNK for ``char``) come first, ids ``0..5``, for
the kinds we train; ``byte`` keeps its historical ``eos_id=256, pad_id=257``.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Union

PathLike = Union[str, "os.PathLike[str]"]

# Order fixes the ids of trained tokenizers: pad=0, bos=1, eos=2, mask=3, cls=4, sep=5.
SPECIAL_TOKENS: Dict[str, str] = {
    "pad": "<|pad|>", "bos": "<|bos|>", "eos": "<|eos|>", "mask": "<|mask|>", "cls": "<|cls|>", "sep": "<|sep|>",
}
CHAR_UNK = "<|unk|>"


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, plus ``eos_id=256`` and ``pad_id=257`` (``vocab_size=258``)."""

    kind = "byte"
    eos_id = 256
    pad_id = 257
    vocab_size = 258
    special_ids: Dict[str, int] = {"eos": 256, "pad": 257}

    def encode(self, text: str) -> List[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return [list(t.encode("utf-8")) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        """Bytes back to text; specials are skipped and broken UTF-8 becomes U+FFFD, never an error."""
        data = bytes(int(i) for i in ids if 0 <= int(i) < 256)
        return data.decode("utf-8", errors="replace")

    def meta(self) -> Dict[str, Any]:
        return {"kind": self.kind}


class CharTokenizer:
    """One id per distinct character; specials first, then ``<|unk|>``, then ``chars`` in order.

    Characters never seen while building the vocabulary map to ``<|unk|>`` (a sample of the
    corpus builds it, so a rare character later on must not crash the run).
    """

    kind = "char"

    def __init__(self, chars: str) -> None:
        if len(set(chars)) != len(chars):
            raise ValueError("CharTokenizer: the vocabulary string repeats a character")
        self.chars = chars
        self.specials = list(SPECIAL_TOKENS.values()) + [CHAR_UNK]
        self.special_ids = {k: i for i, k in enumerate(SPECIAL_TOKENS)}
        self.unk_id = len(SPECIAL_TOKENS)
        self.eos_id, self.pad_id = self.special_ids["eos"], self.special_ids["pad"]
        off = len(self.specials)
        self._to_id = {c: off + i for i, c in enumerate(chars)}
        self.vocab_size = off + len(chars)

    @classmethod
    def train(cls, texts: Iterable[str]) -> "CharTokenizer":
        seen: set = set()
        for t in texts:
            seen.update(t)
        return cls("".join(sorted(seen)))

    def encode(self, text: str) -> List[int]:
        get, unk = self._to_id.get, self.unk_id
        return [get(c, unk) for c in text]

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        off, chars = len(self.specials), self.chars
        return "".join(chars[i - off] for i in map(int, ids) if off <= i < self.vocab_size)

    def meta(self) -> Dict[str, Any]:
        return {"kind": self.kind, "chars": self.chars, "vocab_size": self.vocab_size,
                "special_ids": dict(self.special_ids), "unk_id": self.unk_id}


class HFTokenizer:
    """A Hugging Face ``tokenizers`` file. Specials found in the data are encoded as plain text
    (``encode_special_tokens``), so a document containing ``<|eos|>`` cannot forge a boundary."""

    kind = "hf"

    def __init__(self, path: PathLike, eos_token: Optional[str] = None) -> None:
        from tokenizers import Tokenizer

        self.path = Path(path)
        try:
            self._tok = Tokenizer.from_file(str(self.path))
        except Exception as e:  # tokenizers raises a bare Exception on a bad file
            raise ValueError(f"cannot load the tokenizer file {self.path}: {e}; pass a Hugging Face "
                             f"tokenizers JSON file (tokenizer.json)") from e
        self._tok.encode_special_tokens = True
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        self.special_ids = {k: i for k, t in SPECIAL_TOKENS.items()
                            if (i := self._tok.token_to_id(t)) is not None}
        if eos_token:
            eid = self._tok.token_to_id(eos_token)
            if eid is None:
                raise ValueError(f"tokenizer {self.path} has no token {eos_token!r} (tokenizer.eos_token); "
                                 f"set tokenizer.eos_token to one of its special tokens, e.g. '</s>' or "
                                 f"'<|endoftext|>'")
            self.special_ids["eos"] = eid
        self.eos_id: Optional[int] = self.special_ids.get("eos")
        self.pad_id: Optional[int] = self.special_ids.get("pad")
        self.sha256 = hashlib.sha256(self.path.read_bytes()).hexdigest()

    def encode(self, text: str) -> List[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        # encode_batch_fast skips character offsets we never use (tokenizers >= 0.20)
        enc = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        return [e.ids for e in enc(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def save(self, path: PathLike) -> None:
        self._tok.save(str(path))

    def meta(self) -> Dict[str, Any]:
        return {"kind": self.kind, "file": self.path.name, "sha256": self.sha256,
                "vocab_size": self.vocab_size, "special_ids": dict(self.special_ids)}


AnyTokenizer = Union[ByteTokenizer, CharTokenizer, HFTokenizer]


def train_bpe(texts: Iterator[str], vocab_size: int, out_file: PathLike, min_frequency: int = 2) -> HFTokenizer:
    """Train a byte-level BPE (GPT-2 style: lossless on any text) and save it to ``out_file``.

    The 256 byte symbols are always in the vocabulary, so no text ever needs an unknown token.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    floor = 256 + len(SPECIAL_TOKENS)
    if vocab_size < floor:
        raise ValueError(f"tokenizer.vocab_size={vocab_size} is below {floor} (256 byte symbols + "
                         f"{len(SPECIAL_TOKENS)} specials); raise it, e.g. tokenizer.vocab_size=8192")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
        special_tokens=list(SPECIAL_TOKENS.values()), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.save(str(out_file))
    return HFTokenizer(out_file)


def load_tokenizer(meta: Dict[str, Any], base_dir: Optional[PathLike] = None) -> AnyTokenizer:
    """The tokenizer described by ``meta`` (from a manifest or ``tokenizer.json``).

    ``base_dir`` is where tokenizer files live for kinds that need them (``hf``): the dataset
    directory that holds the ``train``/``val`` split directories.
    """
    kind = (meta or {}).get("kind")
    if kind == "byte":
        return ByteTokenizer()
    if kind == "char":
        return CharTokenizer(meta["chars"])
    if kind == "hf":
        from dist_llm.fileio import safe_join

        path = safe_join(Path(base_dir or "."), str(meta.get("file", "")), "tokenizer 'file' in the manifest's tokenizer meta")
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file {path} (from the manifest's tokenizer meta) is missing; "
                                    f"copy it back next to the split directories or re-run `dist-llm prepare`")
        tok = HFTokenizer(path)
        if meta.get("sha256") and tok.sha256 != meta["sha256"]:
            raise ValueError(f"tokenizer file {path} has sha256 {tok.sha256} but the manifest expects "
                             f"{meta['sha256']}: it was replaced; restore it or re-run `dist-llm prepare`")
        tok.special_ids.update(meta.get("special_ids", {}))
        tok.eos_id, tok.pad_id = tok.special_ids.get("eos"), tok.special_ids.get("pad")
        return tok
    raise NotImplementedError(
        f"tokenizer kind {kind!r} (meta {meta!r}, dir {base_dir}) is not supported; known kinds: "
        f"'byte', 'hf', 'char': re-prepare the data with `dist-llm prepare`"
    )

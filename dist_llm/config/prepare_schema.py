"""Typed schemas and cross-field checks for ``dist-llm prepare`` (conf/prepare.yaml).

Kept apart from :mod:`dist_llm.config.schema` because preparing data is a separate job with its
own primary config; the trainer never sees these. Imports nothing of ours.
"""
from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass, field
from typing import List, Optional

from dist_llm.config.choices import Choice


class InputFormat(Choice):
    auto = "auto"  # by file extension
    txt = "txt"
    jsonl = "jsonl"
    parquet = "parquet"
    images = "images"  # folder-per-class image tree
    npy = "npy"


class TxtMode(Choice):
    file = "file"  # one document per .txt file
    line = "line"  # one document per non-empty line


class EmbeddedInput(Choice):
    none = "none"
    stdlib = "stdlib"  # the interpreter's standard-library sources
    digits = "digits"  # scikit-learn's bundled 8x8 digits
    stdlib_classify = "stdlib_classify"  # labelled stdlib snippets: which top-level package (classify)


class CleanStep(Choice):
    nfc = "nfc"
    strip_control = "strip_control"
    normalize_whitespace = "normalize_whitespace"
    strip_html = "strip_html"


class TokenizerKind(Choice):
    byte = "byte"
    bpe = "bpe"  # train a byte-level BPE
    char = "char"  # train a character vocabulary
    file = "file"  # load an existing tokenizer.json


class PackKind(Choice):
    causal = "causal"  # EOS-joined seq_len+1 windows
    bert = "bert"  # sentence pairs + next-sentence labels
    image = "image"  # (image, label) samples
    classify = "classify"  # (text tokens, label id) from labelled JSONL rows
    sft = "sft"  # prompt/response (or messages) rows, one example per window, loss mask on responses


class PrepareEngine(Choice):
    local = "local"  # multiprocessing on this machine
    ray = "ray"  # Ray Data on ray_address


class Progress(Choice):
    auto = "auto"  # a bar when stderr is a terminal
    on = "on"
    off = "off"


@dataclass
class PrepareInputConfig:
    # Files, directories (searched recursively) or globs. Sorted, so the order is deterministic.
    paths: List[str] = field(default_factory=list)
    format: InputFormat = InputFormat.auto
    txt_mode: TxtMode = TxtMode.file
    text_field: str = "text"  # jsonl / parquet column holding the document
    label_field: str = "label"  # pack=classify: the field holding the row's class (a string or int)
    prompt_field: str = "prompt"  # pack=sft: prompt/response rows ...
    response_field: str = "response"
    messages_field: str = "messages"  # ... or a list of {role, content} messages (roles user/assistant/system)
    # npy: paths name image arrays [N,H,W] or [N,H,W,C]; labels come from this .npy ([N] ints)
    npy_labels: Optional[str] = None
    embedded: EmbeddedInput = EmbeddedInput.none
    embedded_max_bytes: int = 3_000_000
    # Malformed records (bad UTF-8, broken JSON, missing field, empty file, unreadable image) are
    # counted and reported; the run fails only when their fraction of all records exceeds this.
    max_bad_fraction: float = 0.01
    chunk_records: int = 2000  # work unit: at most this many records ...
    chunk_bytes: int = 4_000_000  # ... or bytes of one file per task


@dataclass
class CleanConfig:
    # Applied in this order.
    steps: List[CleanStep] = field(
        default_factory=lambda: [CleanStep.nfc, CleanStep.strip_control, CleanStep.normalize_whitespace])


@dataclass
class FilterConfig:
    """Quality rules in the spirit of Gopher (Rae et al. 2021). 0 / 1.0 / [] disables a rule."""

    enabled: bool = True
    min_chars: int = 0
    max_chars: int = 0  # 0 = no limit
    min_words: int = 0
    max_words: int = 0  # 0 = no limit
    min_alpha_fraction: float = 0.0  # alphabetic share of non-space characters
    max_dup_line_fraction: float = 1.0  # share of lines that repeat an earlier line
    top_ngram_n: List[int] = field(default_factory=list)  # e.g. [2, 3, 4]
    top_ngram_max: List[float] = field(default_factory=list)  # e.g. [0.20, 0.18, 0.16]
    dup_ngram_n: List[int] = field(default_factory=list)  # e.g. [5, 6, 7, 8, 9, 10]
    dup_ngram_max: List[float] = field(default_factory=list)  # e.g. [0.15, 0.14, ..., 0.10]
    blocklist: List[str] = field(default_factory=list)  # whole words, case-insensitive
    blocklist_regex: List[str] = field(default_factory=list)


@dataclass
class DedupConfig:
    exact: bool = True  # hash of the lower-cased, whitespace-collapsed text
    near: bool = True  # MinHash + LSH over word shingles
    threshold: float = 0.8  # Jaccard similarity above which two documents are near duplicates
    num_perm: int = 128
    shingle_words: int = 5
    bands: int = 0  # 0 = chosen from threshold and num_perm (minimises false positives + negatives)
    # rows per band = num_perm // bands
    seed: int = 1


@dataclass
class TokenizerPrepConfig:
    kind: TokenizerKind = TokenizerKind.byte
    vocab_size: int = 8192  # bpe only
    min_frequency: int = 2  # bpe only
    path: Optional[str] = None  # kind=file: an existing Hugging Face tokenizer.json
    eos_token: Optional[str] = None  # kind=file: its end-of-document token, e.g. '</s>'
    train_max_bytes: int = 50_000_000  # bpe/char learn from the first this-many cleaned bytes


@dataclass
class PackConfig:
    kind: PackKind = PackKind.causal
    seq_len: int = 128
    samples_per_shard: int = 1024
    random_next_prob: float = 0.5  # bert: share of pairs whose B comes from another document
    image_size: int = 0  # image: resize to image_size x image_size; 0 keeps the size (must agree)
    # classify: a fixed label list (ids = positions); empty = the sorted labels seen in the input.
    # With a fixed list a row with another label is malformed input.
    labels: List[str] = field(default_factory=list)


@dataclass
class SplitConfig:
    val_fraction: float = 0.01  # by a hash of the document: stable whatever the order or engine
    val_every: int = 0  # >0: every val_every-th input document instead (the embedded corpus' rule)


@dataclass
class PrepareDebugConfig:
    """Test-only fault injection (never changes the output; not part of its fingerprint)."""

    # Raise Interrupted (a simulated crash) after this many *new* parts (phase A) or shards
    # (phase C) of this run; 0 = off. Tests use it to check a resumed run equals an uninterrupted one.
    stop_after_parts: int = 0
    stop_after_shards: int = 0


@dataclass
class PrepareConfig:
    output_dir: str = "data/prepared"
    engine: PrepareEngine = PrepareEngine.local
    workers: int = 0  # local processes; 0 = all cores
    ray_address: Optional[str] = None  # None = start or join a local Ray
    seed: int = 1234
    progress: Progress = Progress.auto
    keep_work: bool = False  # keep output_dir/.work (intermediate parts) after success
    # Driver memory for what grows with the corpus (dedup index, plan); past it they go to files
    # under output_dir/.work. Never changes the output. 0 = no limit (all in memory).
    memory_budget_mb: float = 64.0
    # Also write the finished output here (docs/data-sources.md): a directory, file:///abs/dir, or
    # pipe:<command reading the file on stdin, {name} = its path in the dataset>, e.g.
    # 'pipe:aws s3 cp - s3://bucket/web/{name}'. None = output_dir only.
    destination: Optional[str] = None
    input: PrepareInputConfig = field(default_factory=PrepareInputConfig)
    clean: CleanConfig = field(default_factory=CleanConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    tokenizer: TokenizerPrepConfig = field(default_factory=TokenizerPrepConfig)
    pack: PackConfig = field(default_factory=PackConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    debug: PrepareDebugConfig = field(default_factory=PrepareDebugConfig)


class PrepareConfigError(ValueError):
    """A prepare config that cannot run; ``problems`` lists every failed check."""

    def __init__(self, problems: List[str]):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"invalid prepare configuration ({len(problems)} problem(s)):\n{lines}")


def _path_exists(p: str) -> bool:
    return os.path.exists(p) or bool(glob.has_magic(p) and glob.glob(p, recursive=True))


def validate_prepare(cfg: PrepareConfig) -> None:
    """Raise :class:`PrepareConfigError` naming every bad field, its value and a fix."""
    p: List[str] = []
    for check in (_check_choices, _check_input, _check_pack_tokenizer, _check_filter_dedup, _check_run):
        check(cfg, p)
    if p:
        raise PrepareConfigError(p)


def _check_choices(cfg: PrepareConfig, p: List[str]) -> None:
    inp, tok, pack = cfg.input, cfg.tokenizer, cfg.pack
    # Hydra rejects a bad choice while composing; this catches configs built in Python.
    for name, value, kind in (("input.format", inp.format, InputFormat), ("input.txt_mode", inp.txt_mode, TxtMode),
                              ("input.embedded", inp.embedded, EmbeddedInput),
                              ("tokenizer.kind", tok.kind, TokenizerKind), ("pack.kind", pack.kind, PackKind),
                              ("engine", cfg.engine, PrepareEngine), ("progress", cfg.progress, Progress),
                              *(("clean.steps entry", s, CleanStep) for s in cfg.clean.steps)):
        allowed = [k.value for k in kind]
        if value not in allowed:
            p.append(f"{name}='{value}' is not one of {allowed}")


def _check_input(cfg: PrepareConfig, p: List[str]) -> None:
    inp, pack = cfg.input, cfg.pack
    if inp.embedded == "none" and not inp.paths:
        p.append("input.paths is empty and input.embedded=none: name files, directories or globs, e.g. "
                 "input.paths='[corpus/*.jsonl]', or use input=stdlib / input=digits")
    if inp.embedded != "none" and inp.paths:
        p.append(f"input.embedded='{inp.embedded}' and input.paths={list(inp.paths)} are both set: use one "
                 f"(set input.embedded=none to read your files)")
    for path in inp.paths:
        if not _path_exists(path):
            p.append(f"input.paths entry {path!r} does not exist (cwd {os.getcwd()}): fix the path or glob")
    image_input = inp.format in ("images", "npy") or inp.embedded == "digits"
    if inp.embedded == "stdlib_classify" and pack.kind != "classify":
        p.append(f"input.embedded=stdlib_classify is a labelled task: use pack=classify (got pack.kind='{pack.kind}')")
    if pack.kind in ("classify", "sft") and inp.format not in ("auto", "jsonl"):
        p.append(f"pack.kind='{pack.kind}' reads JSONL rows: set input.format=jsonl (got '{inp.format}')")
    if image_input != (pack.kind == "image"):
        p.append(f"pack.kind='{pack.kind}' does not fit the input (format='{inp.format}', "
                 f"embedded='{inp.embedded}'): image inputs need pack.kind=image and text inputs "
                 f"pack.kind=causal, bert, classify or sft")
    if inp.format == "npy" and not inp.npy_labels:
        p.append("input.format=npy needs input.npy_labels, a .npy file of integer labels")
    if inp.npy_labels and not os.path.isfile(inp.npy_labels):
        p.append(f"input.npy_labels={inp.npy_labels!r} is not a file: fix the path")
    if not 0.0 <= inp.max_bad_fraction <= 1.0:
        p.append(f"input.max_bad_fraction={inp.max_bad_fraction} must be in [0, 1]")
    if inp.chunk_records < 1 or inp.chunk_bytes < 1:
        p.append(f"input.chunk_records={inp.chunk_records} and input.chunk_bytes={inp.chunk_bytes} must be >= 1")


def _check_pack_tokenizer(cfg: PrepareConfig, p: List[str]) -> None:
    tok, pack = cfg.tokenizer, cfg.pack
    if pack.seq_len < 2:
        p.append(f"pack.seq_len={pack.seq_len} must be >= 2")
    if pack.samples_per_shard < 1:
        p.append(f"pack.samples_per_shard={pack.samples_per_shard} must be >= 1")
    if not 0.0 <= pack.random_next_prob <= 1.0:
        p.append(f"pack.random_next_prob={pack.random_next_prob} must be in [0, 1]")
    if pack.kind == "bert" and tok.kind == "byte":
        p.append("pack.kind=bert needs [CLS]/[SEP]/[MASK] tokens, which tokenizer.kind=byte lacks: use "
                 "tokenizer=bpe or tokenizer=char")
    if pack.kind == "bert" and pack.seq_len < 8:
        p.append(f"pack.seq_len={pack.seq_len} is too short for a sentence pair: use >= 8")
    if tok.kind == "file":
        if not tok.path:
            p.append("tokenizer.kind=file needs tokenizer.path, an existing tokenizer.json")
        elif not os.path.isfile(tok.path):
            p.append(f"tokenizer.path={tok.path!r} is not a file: fix the path")
        if pack.kind == "causal" and not tok.eos_token:
            p.append("tokenizer.kind=file with pack.kind=causal needs tokenizer.eos_token (the token that "
                     "ends a document in that vocabulary, e.g. '</s>' or '<|endoftext|>')")
    if tok.kind == "bpe" and tok.vocab_size < 262:
        p.append(f"tokenizer.vocab_size={tok.vocab_size} must be >= 262 (256 bytes + 6 specials) for bpe")
    if tok.train_max_bytes < 1:
        p.append(f"tokenizer.train_max_bytes={tok.train_max_bytes} must be >= 1")


def _check_filter_dedup(cfg: PrepareConfig, p: List[str]) -> None:
    flt, dd = cfg.filter, cfg.dedup
    if not 0.0 < dd.threshold < 1.0:
        p.append(f"dedup.threshold={dd.threshold} must be in (0, 1), e.g. 0.8")
    if dd.num_perm < 2 or dd.shingle_words < 1:
        p.append(f"dedup.num_perm={dd.num_perm} must be >= 2 and dedup.shingle_words={dd.shingle_words} >= 1")
    if dd.bands < 0 or dd.bands > dd.num_perm:
        p.append(f"dedup.bands={dd.bands} must be in [1, dedup.num_perm={dd.num_perm}] (or 0 = automatic)")
    for a, b in (("top_ngram_n", "top_ngram_max"), ("dup_ngram_n", "dup_ngram_max")):
        na, nb = getattr(flt, a), getattr(flt, b)
        if len(na) != len(nb):
            p.append(f"filter.{a}={list(na)} and filter.{b}={list(nb)} must have the same length "
                     f"(one limit per n)")
        if any(n < 1 for n in na):
            p.append(f"filter.{a}={list(na)} must hold n >= 1")
    for name in ("min_chars", "max_chars", "min_words", "max_words"):
        if getattr(flt, name) < 0:
            p.append(f"filter.{name}={getattr(flt, name)} must be >= 0 (0 disables it)")
    if flt.max_chars and flt.max_chars < flt.min_chars:
        p.append(f"filter.max_chars={flt.max_chars} is below filter.min_chars={flt.min_chars}")
    if flt.max_words and flt.max_words < flt.min_words:
        p.append(f"filter.max_words={flt.max_words} is below filter.min_words={flt.min_words}")
    for rx in flt.blocklist_regex:
        try:
            re.compile(rx)
        except re.error as e:
            p.append(f"filter.blocklist_regex entry {rx!r} is not a valid regex ({e})")


def _check_run(cfg: PrepareConfig, p: List[str]) -> None:
    sp = cfg.split
    if not 0.0 <= sp.val_fraction < 1.0:
        p.append(f"split.val_fraction={sp.val_fraction} must be in [0, 1)")
    if sp.val_every < 0:
        p.append(f"split.val_every={sp.val_every} must be 0 (off) or >= 1 (every n-th document to val)")
    if cfg.debug.stop_after_parts < 0 or cfg.debug.stop_after_shards < 0:
        p.append(f"debug.stop_after_parts={cfg.debug.stop_after_parts} and debug.stop_after_shards="
                 f"{cfg.debug.stop_after_shards} must be >= 0 (0 = off)")
    if cfg.workers < 0:
        p.append(f"workers={cfg.workers} must be >= 0 (0 = all cores)")
    if not cfg.memory_budget_mb >= 0:
        p.append(f"memory_budget_mb={cfg.memory_budget_mb} must be >= 0 (MB of driver memory for the dedup "
                 f"index and the plan before they spill to disk; 0 = no limit), e.g. memory_budget_mb=256")
    if not cfg.output_dir:
        p.append("output_dir is empty: name the dataset directory, e.g. output_dir=data/web")
    _check_destination(cfg.destination, p)


def _check_destination(dest: Optional[str], p: List[str]) -> None:
    if not dest:
        return
    if dest.startswith("pipe:") and "{name}" not in dest:
        p.append(f"destination={dest!r}: a pipe: destination needs {{name}} (the file's path in the dataset), "
                 f"e.g. 'pipe:aws s3 cp - s3://bucket/web/{{name}}'")
    elif dest.startswith("file://") and not dest[7:].startswith(("/", "localhost/")):
        p.append(f"destination={dest!r}: a file: URL needs an absolute path, file:///abs/dir")
    elif "://" in dest and not dest.startswith("file://"):
        p.append(f"destination={dest!r}: write to a directory, file:///abs/dir or a pipe: command; for "
                 f"object storage or HTTP use a command, e.g. 'pipe:aws s3 cp - s3://bucket/web/{{name}}' or "
                 f"'pipe:curl -sf -T - https://host/web/{{name}}'")

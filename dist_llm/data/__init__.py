"""Data layer: token shard format, tokenizers, the embedded corpus and the stateful loader.

Imports nothing from parallel/, train/ or launch/; ranks arrive as plain ints.
"""
from dist_llm.data.embedded import build_stdlib_corpus, stdlib_documents
from dist_llm.data.loader import BlendSchedule, TrainLoader, ValLoader
from dist_llm.data.shard_scan import read_shard
from dist_llm.data.shards import (
    FORMAT,
    ShardWriter,
    dtype_for_vocab,
    read_manifest,
    verify_shard,
)
from dist_llm.data.tokenizer import ByteTokenizer, load_tokenizer

__all__ = [
    "FORMAT",
    "BlendSchedule",
    "ByteTokenizer",
    "ShardWriter",
    "TrainLoader",
    "ValLoader",
    "build_stdlib_corpus",
    "dtype_for_vocab",
    "load_tokenizer",
    "read_manifest",
    "read_shard",
    "stdlib_documents",
    "verify_shard",
]

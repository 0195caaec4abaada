"""Data layer: token shard format, tokenizers and the stateful loader.

Imports nothing from parallel/, train/, launch/ or prepare/ (the pipeline that writes the shards,
including the embedded corpus, is :mod:`dist_llm.prepare`); ranks arrive as plain ints.
"""
from dist_llm.data.lanes import BlendSchedule
from dist_llm.data.loader import TrainLoader, ValLoader
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
    "dtype_for_vocab",
    "load_tokenizer",
    "read_manifest",
    "read_shard",
    "verify_shard",
]

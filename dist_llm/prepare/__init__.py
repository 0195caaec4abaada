"""``dist-llm prepare``: raw text/images to clean, deduplicated, tokenized WebDataset shards.

Depends only on the shard format and tokenizers of :mod:`dist_llm.data` and on the config;
the trainer's data package never imports this one. Modules: readers (inputs, the embedded
stdlib corpus), clean, filters, dedup, process (phase A/A2 workers), plan (phase B), packers
(phase C, one class per pack kind; bert holds the sentence-pair rules), tokenize (build the
tokenizer), engines (the engine interface and the local engine), ray_engine (the same on Ray
Data), debug (test-only fault hooks), pipeline (the driver), embedded (the default corpus).
See docs/prepare.md.
"""
from dist_llm.prepare.debug import Interrupted
from dist_llm.prepare.embedded import build_stdlib_corpus
from dist_llm.prepare.engines import LocalEngine
from dist_llm.prepare.pipeline import DATASET_FORMAT, run_prepare
from dist_llm.prepare.plan import BadInputError
from dist_llm.prepare.readers import InputError, stdlib_documents

__all__ = ["run_prepare", "Interrupted", "LocalEngine", "BadInputError", "InputError", "DATASET_FORMAT",
           "build_stdlib_corpus", "stdlib_documents"]

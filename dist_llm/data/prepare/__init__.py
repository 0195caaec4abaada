"""``dist-llm prepare``: raw text/images to clean, deduplicated, tokenized WebDataset shards.

Modules: readers (inputs), clean, filters, dedup, process (phase A worker), pack + bert
(phase B plan, phase C shards), tokenize (build the tokenizer), pipeline (local engine and the
driver), ray_engine (the same phases on Ray Data). See docs/prepare.md.
"""
from dist_llm.data.prepare.pipeline import DATASET_FORMAT, Interrupted, LocalEngine, run_prepare
from dist_llm.data.prepare.pack import BadInputError
from dist_llm.data.prepare.readers import InputError

__all__ = ["run_prepare", "Interrupted", "LocalEngine", "BadInputError", "InputError", "DATASET_FORMAT"]

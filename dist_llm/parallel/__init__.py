"""Parallel layouts and the training engines; :func:`build_engine` picks the engine for a config."""
from dist_llm.parallel.build import build_engine, engine_class

__all__ = ["build_engine", "engine_class"]

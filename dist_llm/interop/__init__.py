"""Hugging Face import/export adapters, one module per architecture (only this package imports transformers)."""

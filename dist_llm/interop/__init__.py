"""Hugging Face interop: one adapter module per architecture (the only package that imports
``transformers``).

Each adapter module exposes ``config_from_hf(dict) -> ModelConfig``, ``config_to_hf(ModelConfig)
-> dict``, ``state_dict_from_hf(sd, cfg)``, ``state_dict_to_hf(sd, cfg)`` and the names
``MODEL_TYPE`` / ``ARCHITECTURE`` (the ``transformers`` class written into exported configs).
The registries map a Hugging Face ``model_type`` and one of our ``model.preset`` values to the
module; modules are imported lazily so importing this package stays cheap. Extend both
dictionaries to add an architecture.
"""
from __future__ import annotations

import importlib
from types import ModuleType

# Hugging Face config.json "model_type" -> adapter module.
HF_ADAPTERS = {
    "gpt2": "dist_llm.interop.gpt2",
    "llama": "dist_llm.interop.llama",
    "bert": "dist_llm.interop.bert",
    "vit": "dist_llm.interop.vit",
}
# our ModelConfig.preset -> adapter module (export direction).
PRESET_ADAPTERS = {
    "gpt2": "dist_llm.interop.gpt2",
    "llama": "dist_llm.interop.llama",
    "bert": "dist_llm.interop.bert",
    "vit": "dist_llm.interop.vit",
}


class InteropError(ValueError):
    """A Hugging Face file or config we cannot map; the message names the file/field and the fix."""


def adapter_for_model_type(model_type: str, source: str = "config.json") -> ModuleType:
    if model_type not in HF_ADAPTERS:
        raise InteropError(f"{source}: model_type={model_type!r} is not supported; supported model types: "
                           f"{', '.join(sorted(HF_ADAPTERS))}")
    return importlib.import_module(HF_ADAPTERS[model_type])


def adapter_for_preset(preset: str) -> ModuleType:
    if preset not in PRESET_ADAPTERS:
        raise InteropError(f"model.preset={preset!r} has no Hugging Face adapter; supported presets: "
                           f"{', '.join(sorted(PRESET_ADAPTERS))}")
    return importlib.import_module(PRESET_ADAPTERS[preset])

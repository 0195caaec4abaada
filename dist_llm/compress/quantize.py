"""Post-training int8 quantization of every ``nn.Linear`` with torchao, saved without pickle.

* ``weight_only``: ``Int8WeightOnlyConfig`` (int8 weights, per-output-row symmetric scales;
  activations stay float).
* ``dynamic``: ``Int8DynamicActivationInt8WeightConfig`` (the same int8 weights, and activations
  quantized per token at run time).

Tied LM head (gpt2 preset): the head is untied from the token embedding first and quantized like
every other linear; the embedding table stays float32 (it is a lookup, not a matmul). So every
``nn.Linear`` is int8, at the cost of storing the vocabulary matrix twice (float + int8).

Some tools skip layers silently (size thresholds, filters); here every ``nn.Linear`` is counted
before and after, and a layer left in float is an error naming it.

On disk (``quantized.safetensors`` + ``quantization.json``): per linear ``<name>.weight.qdata``
(int8) and ``<name>.weight.scale``; zero points are not stored because the scheme is symmetric
(checked to be all zero). Everything else (embeddings, norms, biases) as float. The loader
rebuilds the float GPT from the stored config, applies the same torchao config and copies the
stored int8 data and scales in, so the rebuilt model computes exactly what the saved one did.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Dict, List

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from dist_llm.compress import CompressError
from dist_llm.compress.source import commit_out, prepare_out
from dist_llm.config.compress_schema import QuantMode
from dist_llm.interop.init_from import model_config_from_dict
from dist_llm.models.gpt import GPT

FORMAT = "dist-llm-int8/1"


def _torchao_config(mode: QuantMode):
    import torchao

    try:  # Int8Tensor (qdata + per-row scale) is the layout this module saves and loads
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8Tensor, Int8WeightOnlyConfig  # noqa: F401
    except ImportError as e:
        raise CompressError(f"torchao {torchao.__version__} lacks Int8Tensor ({e}); dist-llm quantize is tested "
                            f"with torchao 0.18: pip install 'torchao>=0.18,<0.20'") from e

    return Int8WeightOnlyConfig() if mode == QuantMode.WEIGHT_ONLY else Int8DynamicActivationInt8WeightConfig()


def linear_names(model: nn.Module) -> List[str]:
    return [name for name, mod in model.named_modules() if isinstance(mod, nn.Linear)]


def is_int8(weight: torch.Tensor) -> bool:
    qdata = getattr(weight, "qdata", None)
    return isinstance(qdata, torch.Tensor) and qdata.dtype == torch.int8


def untie_head(model: GPT) -> None:
    """Give the LM head its own copy of the tied embedding matrix (so it can be quantized alone)."""
    if model.lm_head.weight is model.tok_emb.weight:
        model.lm_head.weight = nn.Parameter(model.tok_emb.weight.detach().clone())


def quantize_model(model: GPT, mode: QuantMode) -> Dict[str, Any]:
    """Quantize ``model`` in place; every linear converted or a CompressError naming the rest."""
    from torchao.quantization import quantize_

    untie_head(model)
    names = linear_names(model)
    quantize_(model, _torchao_config(mode))
    modules = dict(model.named_modules())
    left = [n for n in names if not is_int8(modules[n].weight)]
    if left or len(linear_names(model)) != len(names):
        raise CompressError(f"torchao left {len(left)} of {len(names)} linear layers in float: {', '.join(left)}; "
                            f"refusing to save a partly quantized model")
    return {"linears": len(names), "converted": len(names) - len(left), "names": names}


def linear_weight_bytes(model: nn.Module) -> int:
    """Bytes of the linear weights as stored: float numel*itemsize, or int8 data + scales (+ nonzero zero points)."""
    total = 0
    for name in linear_names(model):
        w = dict(model.named_modules())[name].weight
        if is_int8(w):
            total += w.qdata.numel() + w.scale.numel() * w.scale.element_size()
            if w.zero_point is not None and bool((w.zero_point != 0).any()):
                total += w.zero_point.numel() * w.zero_point.element_size()
        else:
            total += w.numel() * w.element_size()
    return total


def quantized_tensors(model: GPT) -> Dict[str, torch.Tensor]:
    modules = dict(model.named_modules())
    out: Dict[str, torch.Tensor] = {}
    linear_weights = {f"{n}.weight" for n in linear_names(model)}
    for name in linear_names(model):
        w = modules[name].weight
        if w.zero_point is not None and bool((w.zero_point != 0).any()):
            raise CompressError(f"{name}: nonzero zero points from an asymmetric scheme; this format stores none")
        out[f"{name}.weight.qdata"] = w.qdata.detach().contiguous().clone()
        out[f"{name}.weight.scale"] = w.scale.detach().contiguous().clone()
    for name, p in model.named_parameters():
        if name not in linear_weights:
            out[name] = p.detach().contiguous().clone()
    return out


def save_quantized(model: GPT, mode: QuantMode, out: str, run_config: Dict[str, Any], extra: Dict[str, Any],
                   overwrite: bool = False) -> Path:
    import torchao

    final, tmp = prepare_out(out, overwrite)
    save_file(quantized_tensors(model), str(tmp / "quantized.safetensors"), metadata={"format": FORMAT})
    w = model.lm_head.weight
    meta = {"format": FORMAT, "library": "torchao", "torchao_version": torchao.__version__, "mode": mode.value,
            "scheme": "int8 symmetric, one scale per output row", "block_size": list(w.block_size),
            "linears": linear_names(model), "lm_head": "untied from the embedding and quantized",
            "model": dataclasses.asdict(model.cfg), "config": run_config, **extra}
    (tmp / "quantization.json").write_text(json.dumps(meta, indent=1, default=str))
    return commit_out(final, tmp)


def load_quantized(path: str) -> GPT:
    """Rebuild the int8 model saved by :func:`save_quantized` (no pickle: safetensors + JSON)."""
    root = Path(path)
    meta_file = root / "quantization.json"
    if not meta_file.is_file():
        raise CompressError(f"{root} has no quantization.json; it is not a directory written by dist-llm quantize")
    meta = json.loads(meta_file.read_text())
    if meta.get("format") != FORMAT:
        raise CompressError(f"{meta_file}: format {meta.get('format')!r}, expected {FORMAT!r}")
    model = GPT(model_config_from_dict(meta["model"]))
    quantize_model(model, QuantMode(meta["mode"]))
    tensors = load_file(str(root / "quantized.safetensors"))
    modules = dict(model.named_modules())
    expected = set()
    with torch.no_grad():
        for name in linear_names(model):
            w = modules[name].weight
            for field in ("qdata", "scale"):
                key = f"{name}.weight.{field}"
                expected.add(key)
                getattr(w, field).copy_(tensors[key])
        linear_weights = {f"{n}.weight" for n in linear_names(model)}
        for name, p in model.named_parameters():
            if name not in linear_weights:
                expected.add(name)
                p.copy_(tensors[name])
    unexpected = set(tensors) - expected
    if unexpected:
        raise CompressError(f"{root / 'quantized.safetensors'} holds tensors this model has no place for: "
                            f"{sorted(unexpected)[:5]}; was it written for another architecture?")
    return model.eval()

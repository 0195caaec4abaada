"""Elastic resume for the Megatron engines: their checkpoints in the layout-neutral form
(:mod:`dist_llm.parallel.elastic_state`), and that form back into either Megatron optimizer path.

**Reading** (registered for the manifest engine name ``MegatronEngine``): a Megatron checkpoint's
``sharded/`` directory is torch DCP written by ``megatron.core.dist_checkpointing``. Its global
tensors are already the *Megatron-full* tensors of :mod:`~dist_llm.parallel.megatron.model`:
dist_checkpointing reassembles the TP slices (SwiGLU's ``linear_fc1`` is stored as its gate and
up halves, i.e. ``[gate; up]`` whole) and stacks a stage's layers on a leading layer axis at their
global layer numbers (PP and VPP offsets resolved), so for each plain parameter the reader reads
one box (one layer of one key) per state, with no process group and at any world size, and maps
it with the weight adapter (``_qkv_to_plain`` for the per-query-group QKV interleaving, the
``[gate; up]`` split). Keys: ``optimizer.{exp_avg,exp_avg_sq}.<key>`` for the moments, and
``optimizer.master.<key>`` (bf16 runs) or the weight ``<key>`` itself (fp32) for the masters;
layer norms appear under Transformer Engine's names (``linear_qkv.layer_norm_weight``), which
Megatron's local spec maps to as well. The step count is ``engine.json``'s ``optimizer_step``.

**Loading** (:func:`local_slices`): for each of this rank's parameters (Megatron-full name), its
plain sources' full tensors are turned into the Megatron-full tensor (QKV interleave, ``[gate;
up]``, the last stage's tied output layer from the token embedding) and cut to this TP rank's
slice; the engine then installs masters, moments and step its own way
(:meth:`~dist_llm.parallel.megatron.base.MegatronEngineBase.install_plain_state`).
"""
from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner

from dist_llm.config.choices import DECODER_PRESETS
from dist_llm.config.schema import ModelConfig
from dist_llm.parallel.elastic_state import STATES, PlainOptimizerState, register_reader
from dist_llm.parallel.megatron import model as mm
from dist_llm.parallel.megatron.checkpoint import FORMAT, read_meta

ENGINE_NAME = "MegatronEngine"  # MegatronEngineBase.checkpoint_name
GPT_PRESETS = DECODER_PRESETS  # the presets whose names this module maps (BERT: not yet)
LAYERS = "decoder.layers."
# Megatron-full (local spec) name part -> the name dist_checkpointing stores (TE's fused norms)
_STORED = {"input_layernorm.": "self_attention.linear_qkv.layer_norm_",
           "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"}

Box = Tuple[str, Optional[int]]  # (DCP key, layer index on the leading axis or None)


def model_config(manifest: Dict[str, Any]) -> ModelConfig:
    """The saving job's model config (recorded in the manifest)."""
    raw = ((manifest.get("config") or {}).get("model")) or {}
    if not raw:
        raise ValueError("checkpoint manifest records no model config: it cannot be read layout-neutrally "
                         "(resume it with the engine and layout it was saved with)")
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    return ModelConfig(**{k: v for k, v in raw.items() if k in known})


class ShardedReader:
    """Boxes of the tensors of a ``sharded/`` directory, read without a process group."""

    def __init__(self, directory: Path):
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        class _Reader(FileSystemReader):  # the metadata is unpickled once, not per parameter
            def read_metadata(self, *args, **kwargs):
                if not hasattr(self, "_md"):
                    self._md = super().read_metadata(*args, **kwargs)
                return self._md

        self.directory = Path(directory)
        self.storage = _Reader(str(directory))
        md = self.storage.read_metadata().state_dict_metadata
        self.shapes = {k: v.size for k, v in md.items() if isinstance(v, TensorStorageMetadata)}

    def locate(self, megatron: str, prefix: str = "") -> Box:
        """The stored key (``prefix`` + Megatron's key) and layer index of a Megatron-full name."""
        if not megatron.startswith(LAYERS):
            return self._exists(prefix + megatron, megatron), None
        layer, rest = megatron[len(LAYERS):].split(".", 1)
        for local, stored in _STORED.items():
            if rest.startswith(local):
                rest = stored + rest[len(local):]
        return self._exists(prefix + LAYERS + rest, megatron), int(layer)

    def _exists(self, key: str, megatron: str) -> str:
        if key not in self.shapes:
            raise KeyError(f"{self.directory} has no tensor {key!r} (for Megatron parameter {megatron}): "
                           f"not a complete checkpoint of this model")
        return key

    def read(self, boxes: Dict[str, Box]) -> Dict[str, torch.Tensor]:
        """``{name: (key, layer)}`` -> ``{name: fp32 tensor}`` (the layer's slab, or the whole tensor)."""
        import torch.distributed.checkpoint as dcp

        dests: Dict[str, Tuple[Tuple[int, ...], torch.Tensor]] = {}
        for key, layer in boxes.values():
            shape = tuple(self.shapes[key])
            if layer is None:
                dests[key] = ((0,) * len(shape), torch.empty(shape, dtype=torch.float32))
            else:
                dests[key] = ((layer,) + (0,) * (len(shape) - 1), torch.empty((1, *shape[1:]), dtype=torch.float32))
        with warnings.catch_warnings():  # it is a single-process load, as the warning assumes
            warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
            dcp.load({k: t for k, (_, t) in dests.items()}, storage_reader=self.storage,
                     planner=_BoxPlanner(dests), no_dist=True)
        return {n: dests[key][1][0] if layer is not None else dests[key][1] for n, (key, layer) in boxes.items()}


class _BoxPlanner(DefaultLoadPlanner):
    """Reads exactly one box (offsets, destination tensor) of each key, not the whole tensor."""

    def __init__(self, boxes: Dict[str, Tuple[Tuple[int, ...], torch.Tensor]]):
        super().__init__()
        self.boxes = boxes

    def create_local_plan(self):
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
        from torch.distributed.checkpoint.planner import LoadPlan
        from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

        items = []
        for key, (offsets, dest) in self.boxes.items():
            chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=dest.shape)
            items += create_read_items_for_chunk_list(key, self.metadata.state_dict_metadata[key], [chunk])
        return LoadPlan(items)

    def lookup_tensor(self, index):
        return self.boxes[index.fqn][1]


@register_reader(ENGINE_NAME)
def read_plain_state(path: Path, manifest: Dict[str, Any]) -> PlainOptimizerState:
    """A Megatron checkpoint (``step-N/``) as plain-name full fp32 tensors, one parameter at a time."""
    sharded = Path(path) / "sharded"
    meta = read_meta(sharded)
    if meta is None or meta.get("format") != FORMAT:
        raise ValueError(f"{sharded} is not a {FORMAT} checkpoint (engine.json missing or of another format)")
    mcfg = model_config(manifest)
    if mcfg.preset not in GPT_PRESETS:
        raise ValueError(f"{path}: moving a Megatron {mcfg.preset} checkpoint to another engine is not supported "
                         f"(only gpt2/llama); resume it with parallel.engine=megatron (any tp), or start a new "
                         f"run from its weights with model.init_from={path}")
    reader = ShardedReader(sharded)
    master_prefix = "optimizer.master." if meta.get("master_weights") else ""  # fp32 runs: the weights
    prefixes = {"master": master_prefix, "exp_avg": "optimizer.exp_avg.", "exp_avg_sq": "optimizer.exp_avg_sq."}
    cache: Dict[str, Dict[str, torch.Tensor]] = {}  # the last holder read (SwiGLU: gate and up share one)

    def get(name: str) -> Dict[str, torch.Tensor]:
        holder = mm.megatron_holder(name, mcfg)
        if holder not in cache:
            cache.clear()
            cache[holder] = reader.read({s: reader.locate(holder, prefixes[s]) for s in STATES})
        return {s: mm.plain_from_megatron_full(name, t, mcfg).float().contiguous() for s, t in cache[holder].items()}

    return PlainOptimizerState(step=int(meta["optimizer_step"]), names=_plain_names(Path(path), mcfg), get=get,
                               extra={"tp": meta.get("tp"), "pp": meta.get("pp"), "dp": meta.get("dp")})


def _plain_names(path: Path, mcfg: ModelConfig):
    """The plain model's trainable names: ``model.safetensors``' keys, a tied LM head once (as the
    token embedding, the name ``named_parameters`` gives it)."""
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    tied = bool(mm.resolve_model_config(mcfg).tie_embeddings)
    return [k for k in keys if not (tied and k == "lm_head.weight")]


# --- loading: the plain state -> this rank's Megatron shards -------------------------------------
Slices = Dict[str, Dict[str, torch.Tensor]]  # Megatron-full name -> {state: this rank's slice}


def local_slices(engine, state: PlainOptimizerState) -> Slices:
    """Every local parameter's master and moments as this TP rank holds them (fp32)."""
    lay, have = engine.layout, set(state.names)
    out: Slices = {}
    for name, p in engine.local_params().items():
        if not p.requires_grad:
            continue
        sources = mm.plain_sources(name, engine.mcfg)
        missing = [s for s in sources if s not in have]
        if missing:
            raise KeyError(f"the checkpoint's optimizer state has no entry for plain parameter {missing[0]} "
                           f"(needed by Megatron parameter {name}): it was saved from another model")
        got = {s: state.get(s) for s in sources}
        out[name] = {}
        for k in STATES:
            full = mm.megatron_full_from_plain(name, {s: got[s][k] for s in sources}, engine.mcfg)
            t = mm.tp_slice(name, full, mm.partition_dim(p), lay.tp_rank, lay.tp, engine.gated)
            if tuple(t.shape) != tuple(p.shape):
                raise ValueError(f"optimizer state {k} of {name}: this rank's slice has shape {tuple(t.shape)}, "
                                 f"the parameter {tuple(p.shape)} (the checkpoint is of another model shape)")
            out[name][k] = t.float().contiguous().to(p.device)
    return out

"""The DeepSpeed engine's layout-neutral optimizer state: written by every rank at save time, read
at any dp size, ZeRO stage (0-3) and offload setting, or by another engine.

On disk, inside a checkpoint::

    elastic/rank-XXXXX.safetensors   1-D fp32 slices, key "<param>::<state>::<start>"
    elastic/rank-XXXXX.json          index: step, every parameter's full shape, this rank's
                                     slices as (param, start, numel), loss-scaler state

``<state>`` is ``master`` / ``exp_avg`` / ``exp_avg_sq`` (:data:`~dist_llm.parallel.elastic_state.STATES`)
and ``start`` is the slice's offset in the flattened parameter. Each rank writes only what it
owns, straight from its partitions: ZeRO-1/2 the fragments of its flat fp32 partition (DeepSpeed's
``param._hp_mapping`` gives each fragment's offset in the parameter and in the partition); ZeRO-3
its partition of every parameter (padding dropped); ZeRO-0 (replicated state) every ``world``-th
parameter. Nothing is gathered at save time, so a save costs what today's per-rank
``torch.save`` of the partition cost, and every rank writes in parallel.

Why our own format and not DeepSpeed's universal checkpoint: the universal form is produced
offline (``ds_to_universal``) from DeepSpeed's own checkpoint files, which are pickles loaded with
``weights_only=False`` (we never load those), and the conversion reads every rank's partition in
one process. This format is written directly by each rank in parallel, is safetensors + JSON (no
code can run on load), and the reader assembles one parameter at a time.

Why it *replaces* the optimizer part of ``rank-XXXXX.pt`` instead of sitting beside it: optimizer
state is ~3x the fp32 weights; storing it twice would double the bytes a save writes. The slices
are exact fp32 copies of the partitions (masters, moments) plus the step and the loss-scaler
state, so a same-layout resume through this form is bit-exact as well (the rank file keeps RNG
and loader state only). Checkpoints written before this format still resume at their own
layout from the rank file's DeepSpeed state_dict.

Only torch, safetensors and duck typing on DeepSpeed's optimizer objects here: this module is
imported by the checkpoint manager to register the reader, before DeepSpeed may be imported.
"""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Tuple

import torch
from torch import nn

from dist_llm.parallel.elastic_state import STATES, PlainOptimizerState, register_reader

FORMAT = "dist-llm-elastic/1"
ELASTIC_DIR = "elastic"
ENGINE_NAME = "DeepSpeedEngine"  # DeepSpeedEngine.checkpoint_name
MOMENTS = ("exp_avg", "exp_avg_sq")
INDEX_RE = re.compile(rf"^{ELASTIC_DIR}/rank-(\d{{5}})\.json$")
_SCALER_FIELDS = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")

# (plain name, start in the flattened parameter, {state: 1-D fp32 tensor of the slice})
Fragment = Tuple[str, int, Dict[str, torch.Tensor]]


def trainable_names(module: nn.Module) -> Dict[int, str]:
    """id(parameter) -> its plain name (the first name of a tied parameter), trainable only."""
    out: Dict[int, str] = {}
    for name, p in module.named_parameters():
        if p.requires_grad and id(p) not in out:
            out[id(p)] = name
    return out


def _aliases(module: nn.Module) -> Dict[str, List[str]]:
    """First name -> every name of that parameter (tied weights have several)."""
    ids: Dict[int, List[str]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        ids.setdefault(id(p), []).append(name)
    return {names[0]: names for names in ids.values()}


# --- this rank's fragments, per optimizer kind -------------------------------------------------
def _flat_groups(opt) -> Optional[Tuple[list, list]]:
    """(low-precision params per group, flat fp32 partition per group) of a partitioned optimizer
    linked by ``_hp_mapping``: ZeRO-1/2, or DeepSpeed's bf16 optimizer at stage 0; else None."""
    if hasattr(opt, "single_partition_of_fp32_groups"):
        return opt.bit16_groups, opt.single_partition_of_fp32_groups
    if hasattr(opt, "fp32_groups_flat_partition"):
        return opt.bf16_groups, opt.fp32_groups_flat_partition
    return None


def _is_zero3(opt) -> bool:
    return hasattr(opt, "fp32_partitioned_groups_flat")


def _check_no_swap(opt) -> None:
    if getattr(opt, "swap_optimizer", False) or getattr(opt, "optimizer_swapper", None) is not None:
        raise ValueError("elastic checkpoints do not support ZeRO-3 NVMe optimizer swapping "
                         "(zero_optimization.offload_optimizer.device=nvme): use parallel.offload_optimizer "
                         "(CPU) instead")


def _zero3_slot(opt, p) -> Tuple[torch.Tensor, Dict[str, Any], int, int, int]:
    """(flat fp32 sub-group, its optimizer state, offset of ``p``'s partition in it, start of the
    partition in the flattened parameter, valid elements (padding dropped))."""
    group, offset, numel = opt.grad_position[opt.get_param_id(p)]
    flat = opt.fp32_partitioned_groups_flat[group]
    start = opt._get_param_partition_rank(p) * numel
    valid = max(0, min(numel, p.ds_numel - start))
    return flat, opt.optimizer.state.get(flat, {}), offset, start, valid


def _local_fragments(opt, names: Dict[int, str], rank: int, world: int) -> Iterator[Fragment]:
    """Views (not copies) of what this rank's optimizer holds, slice by slice."""
    if _is_zero3(opt):
        _check_no_swap(opt)
        for group in opt.fp16_groups:
            for p in group:
                if id(p) not in names:
                    continue
                flat, st, off, start, valid = _zero3_slot(opt, p)
                if valid > 0:
                    yield names[id(p)], start, _slices(flat, st, off, valid)
        return
    flat_groups = _flat_groups(opt)
    if flat_groups is not None:
        inner = opt.optimizer
        for params, flat in zip(*flat_groups):
            st = inner.state.get(flat, {})
            for p in params:
                m = getattr(p, "_hp_mapping", None)
                if m is None or id(p) not in names:
                    continue
                hp, lp = m.hp_fragment_address, m.lp_fragment_address
                yield names[id(p)], lp.start, _slices(flat, st, hp.start, hp.numel)
        return
    # ZeRO-0, fp32: a torch optimizer keyed by the parameters (replicated); split by parameter
    params = [p for g in opt.param_groups for p in g["params"] if id(p) in names]
    if len(params) != len(names):  # e.g. DeepSpeed's fp16 optimizer: flat copies we do not map
        raise ValueError(f"{type(opt).__name__} holds {len(params)} of the model's {len(names)} trainable "
                         f"parameters directly: its state cannot be written in the elastic form; use "
                         f"parallel.precision=fp32/bf16 or parallel.zero_stage >= 1")
    for i, p in enumerate(params):
        if i % world == rank:
            st = opt.state.get(p, {})
            yield names[id(p)], 0, _slices(p.data.reshape(-1), {k: v.reshape(-1) for k, v in st.items()
                                                                 if torch.is_tensor(v) and v.dim() > 0},
                                           0, p.numel())


def _slices(flat: torch.Tensor, st: Dict[str, Any], offset: int, numel: int) -> Dict[str, torch.Tensor]:
    out = {"master": flat.narrow(0, offset, numel)}
    for k in MOMENTS:  # before the first step there is no state: the moments are zeros
        out[k] = st[k].narrow(0, offset, numel) if k in st else torch.zeros(numel, dtype=torch.float32)
    return out


def optimizer_step(opt) -> int:
    """The AdamW step count of this rank's optimizer (0 before the first step); every group's."""
    inner = opt.optimizer if (_is_zero3(opt) or _flat_groups(opt) is not None) else opt
    steps = {int(float(st["step"])) for st in inner.state.values() if "step" in st}
    if len(steps) > 1:
        raise ValueError(f"optimizer groups are at different steps {sorted(steps)}: the elastic form "
                         f"stores one step count")
    return steps.pop() if steps else 0


def _scaler_state(opt) -> Dict[str, Any]:
    scaler = getattr(opt, "loss_scaler", None)
    return {k: getattr(scaler, k) for k in _SCALER_FIELDS if isinstance(getattr(scaler, k, None), (int, float))}


# --- save ---------------------------------------------------------------------------------------
def save_rank_state(directory: Path, opt, module: nn.Module, rank: int, world: int, zero_stage: int) -> None:
    """Write this rank's slices of ``opt`` (a DeepSpeed optimizer of ``module``) into ``directory``."""
    names = trainable_names(module)
    # ZeRO-3 parameters are empty placeholders outside a gather: their full shape is ds_shape
    shapes = {names[id(p)]: list(getattr(p, "ds_shape", p.shape)) for p in module.parameters() if id(p) in names}
    write_rank_files(directory, rank, world, shapes, _local_fragments(opt, names, rank, world),
                     {"step": optimizer_step(opt), "zero_stage": zero_stage, "loss_scaler": _scaler_state(opt)})


def write_rank_files(directory: Path, rank: int, world: int, shapes: Dict[str, List[int]],
                     fragments: Iterable[Fragment], meta: Dict[str, Any]) -> None:
    """``rank-XXXXX.safetensors`` (the slices, copied to CPU fp32) and ``rank-XXXXX.json`` (the
    index; ``meta`` holds ``step`` and what else the reader returns in ``extra``)."""
    from safetensors.torch import save_file

    tensors: Dict[str, torch.Tensor] = {}
    slices: List[List[Any]] = []
    for name, start, states in fragments:
        slices.append([name, int(start), int(states["master"].numel())])
        for k in STATES:
            # views of the partitions when they are CPU fp32 already (no copy: safetensors writes
            # non-overlapping views of one buffer as they are); a device copy otherwise
            tensors[f"{name}::{k}::{start}"] = states[k].detach().to("cpu", torch.float32).contiguous()
    directory.mkdir(parents=True, exist_ok=True)
    stem = directory / f"rank-{rank:05d}"
    save_file(tensors, str(stem) + ".safetensors", metadata={"format": FORMAT})
    index = {**meta, "format": FORMAT, "rank": rank, "world": world, "names": list(shapes), "shapes": shapes,
             "slices": slices}
    Path(str(stem) + ".json").write_text(json.dumps(index, sort_keys=True), encoding="utf-8")
    for suffix in (".safetensors", ".json"):  # durable before the manager's barrier and commit
        with open(str(stem) + suffix, "rb") as f:
            os.fsync(f.fileno())


# --- read ---------------------------------------------------------------------------------------
def _load_index(path: Path, rel: str) -> Dict[str, Any]:
    try:
        index = json.loads((path / rel).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path / rel} is not a readable elastic index ({e})") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise ValueError(f"{path / rel} is not a {FORMAT} index (format {index.get('format') if isinstance(index, dict) else None!r})")
    return index


class _SliceReader:
    """Assembles full parameters from every rank's slices, one parameter per call."""

    def __init__(self, path: Path, indexes: List[Tuple[str, Dict[str, Any]]]):
        self.path = path
        self.shapes: Dict[str, List[int]] = indexes[0][1]["shapes"]
        self.where: Dict[str, List[Tuple[str, int, int]]] = {}
        for rel, index in indexes:
            for name, start, numel in index["slices"]:
                self.where.setdefault(name, []).append((rel[: -len(".json")] + ".safetensors", int(start), int(numel)))
        self._open: Dict[str, Any] = {}

    def _file(self, rel: str):
        from safetensors import safe_open

        if rel not in self._open:
            self._open[rel] = safe_open(str(self.path / rel), framework="pt", device="cpu")
        return self._open[rel]

    def get(self, name: str) -> Dict[str, torch.Tensor]:
        if name not in self.shapes:
            raise KeyError(f"{self.path}: no optimizer state for parameter {name!r}")
        shape = self.shapes[name]
        total = math.prod(shape)
        out = {k: torch.empty(total, dtype=torch.float32) for k in STATES}
        covered = 0
        for rel, start, numel in sorted(self.where.get(name, []), key=lambda w: w[1]):
            if start != covered or start + numel > total:
                break
            f = self._file(rel)
            for k in STATES:
                out[k][start:start + numel] = f.get_tensor(f"{name}::{k}::{start}")
            covered += numel
        if covered != total:
            raise ValueError(f"{self.path}/{ELASTIC_DIR}: the slices of {name!r} cover {covered} of its "
                             f"{total} elements (a rank's elastic file is missing or from another save)")
        return {k: v.reshape(shape) for k, v in out.items()}


@register_reader(ENGINE_NAME)
def read_plain_state(path: Path, manifest: Dict[str, Any]) -> PlainOptimizerState:
    """The reader for checkpoints of :class:`~dist_llm.parallel.deepspeed_engine.DeepSpeedEngine`."""
    rels = sorted(rel for rel in manifest["files"] if INDEX_RE.match(rel))
    if not rels:
        raise ValueError(f"checkpoint {path} has no {ELASTIC_DIR}/ files (written before elastic resume "
                         f"existed): resume it with the layout and ZeRO stage it was saved with")
    indexes = [(rel, _load_index(path, rel)) for rel in rels]
    world = indexes[0][1]["world"]
    steps = {ix["step"] for _, ix in indexes}
    if len(indexes) != world or len(steps) != 1:
        raise ValueError(f"checkpoint {path}: {len(indexes)} elastic index files for a world of {world}, "
                         f"steps {sorted(steps)}: the elastic/ directory is incomplete or mixed")
    reader = _SliceReader(path, indexes)
    first = indexes[0][1]
    return PlainOptimizerState(step=int(first["step"]), names=list(first["names"]), get=reader.get,
                               extra={"loss_scaler": first.get("loss_scaler", {}),
                                      "zero_stage": first.get("zero_stage"), "world": world})


# --- load ---------------------------------------------------------------------------------------
class _Source:
    """The plain state by this model's names: tied aliases resolved, each parameter read once."""

    def __init__(self, state: PlainOptimizerState, module: nn.Module):
        self.state, self.aliases = state, _aliases(module)
        self.have = set(state.names)

    def get(self, name: str, shape: torch.Size) -> Dict[str, torch.Tensor]:
        found = next((a for a in self.aliases.get(name, [name]) if a in self.have), None)
        if found is None:
            raise ValueError(f"the checkpoint's optimizer state has no parameter {name!r} (it has "
                             f"{len(self.have)}, e.g. {sorted(self.have)[:3]}): the model differs from the saved one")
        got = self.state.get(found)
        for k in STATES:
            if tuple(got[k].shape) != tuple(shape):
                raise ValueError(f"optimizer state {k} of {name!r} has shape {tuple(got[k].shape)}, the model's "
                                 f"parameter {tuple(shape)}")
        return {k: got[k].reshape(-1).float() for k in STATES}


def _step_value(inner, step: int) -> Any:
    """torch optimizers keep the step as a tensor; DeepSpeed's CPU Adam as an int."""
    return torch.tensor(float(step)) if type(inner).__module__.startswith("torch.optim") else int(step)


def _ensure_state(inner, flat: torch.Tensor, step: int) -> Dict[str, Any]:
    st = inner.state[flat]
    for k in MOMENTS:
        if k not in st:
            st[k] = torch.zeros_like(flat, dtype=torch.float32)
    st["step"] = _step_value(inner, step)
    return st


def _copy(dst_flat: torch.Tensor, st: Dict[str, Any], offset: int, numel: int,
          full: Dict[str, torch.Tensor], start: int) -> None:
    with torch.no_grad():
        dst_flat.narrow(0, offset, numel).copy_(full["master"].narrow(0, start, numel))
        for k in MOMENTS:
            st[k].narrow(0, offset, numel).copy_(full[k].narrow(0, start, numel))


def load_rank_state(opt, module: nn.Module, state: PlainOptimizerState) -> None:
    """Set this rank's partitions (fp32 masters, moments) and step from ``state``. The weights must
    be loaded already. Purely local: each rank takes its own slices, no collective."""
    names, src, step = trainable_names(module), _Source(state, module), int(state.step)
    if _is_zero3(opt):
        _check_no_swap(opt)
        for group in opt.fp16_groups:
            for p in group:
                if id(p) in names:
                    flat, _, off, start, valid = _zero3_slot(opt, p)
                    st = _ensure_state(opt.optimizer, flat, step)
                    if valid > 0:
                        _copy(flat, st, off, valid, src.get(names[id(p)], p.ds_shape), start)
    elif _flat_groups(opt) is not None:
        for params, flat in zip(*_flat_groups(opt)):
            st = _ensure_state(opt.optimizer, flat, step)
            for p in params:
                m = getattr(p, "_hp_mapping", None)
                if m is not None and id(p) in names:
                    _copy(flat, st, m.hp_fragment_address.start, m.hp_fragment_address.numel,
                          src.get(names[id(p)], p.shape), m.lp_fragment_address.start)
        if hasattr(opt, "_hp_optimizer_states_linked"):
            opt._hp_optimizer_states_linked = False  # relink the fragments' views to these tensors
    else:
        for g in opt.param_groups:
            for p in g["params"]:
                if id(p) in names:
                    full = src.get(names[id(p)], p.shape)
                    with torch.no_grad():
                        p.data.copy_(full["master"].reshape(p.shape))
                    opt.state[p] = {"step": _step_value(opt, step),
                                    **{k: full[k].reshape(p.shape).clone().to(p.device) for k in MOMENTS}}
    _set_scaler(opt, state.extra.get("loss_scaler") or {})


def _set_scaler(opt, saved: Dict[str, Any]) -> None:
    scaler = getattr(opt, "loss_scaler", None)
    if scaler is not None and getattr(scaler, "dynamic", False):
        for k, v in saved.items():
            if k in _SCALER_FIELDS and hasattr(scaler, k):
                setattr(scaler, k, v)

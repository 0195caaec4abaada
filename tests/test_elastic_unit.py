"""The DeepSpeed engine's layout-neutral optimizer form, in process (no process group): slices cut
like ZeRO-1/2 partitions of a flat buffer reassemble exactly, missing or mixed pieces are named
errors, a real torch AdamW round-trips bit-exactly (tied weights included), and the checkpoint
manager's load plan and verification cover ``elastic/``."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from dist_llm.checkpoint.elastic import plan_load
from dist_llm.checkpoint.manager import CheckpointError, CheckpointManager
from dist_llm.parallel.deepspeed_elastic import (ENGINE_NAME, load_rank_state, save_rank_state,
                                                 write_rank_files)
from dist_llm.parallel.elastic_state import READERS, STATES, read_plain_state
from dist_llm.parallel.engine import Engine

SHAPES = {"emb": [7, 5], "w": [5, 5], "b": [5], "head": [3, 5]}


def _full_states(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return {n: {k: torch.randn(*s, generator=g) for k in STATES} for n, s in SHAPES.items()}


def _zero12_fragments(full, world: int):
    """Per rank, the fragments ZeRO-1/2 would own: every parameter flattened into one buffer, the
    buffer cut into ``world`` equal partitions (the last padded), each parameter's overlap with a
    partition one fragment at its offset in the parameter."""
    total = sum(torch.Size(s).numel() for s in SHAPES.values())
    size = -(-total // world)
    out = {r: [] for r in range(world)}
    offset = 0
    for name, shape in SHAPES.items():
        numel = torch.Size(shape).numel()
        for r in range(world):
            lo, hi = max(offset, r * size), min(offset + numel, (r + 1) * size)
            if lo < hi:
                s = lo - offset
                out[r].append((name, s, {k: full[name][k].reshape(-1)[s:s + hi - lo] for k in STATES}))
        offset += numel
    return out


def _write(directory: Path, frags, world: int, step=lambda r: 12):
    for r in range(world):
        write_rank_files(directory / "elastic", r, world, SHAPES, frags[r], {"step": step(r), "zero_stage": 2})
    return {"engine": ENGINE_NAME, "files": {p.relative_to(directory).as_posix(): "-"
                                             for p in sorted((directory / "elastic").iterdir())}}


def test_zero12_slices_reassemble_exactly(tmp_path):
    full = _full_states()
    frags = _zero12_fragments(full, world=3)
    assert any(len({f[0] for f in frags[r]} & {f[0] for f in frags[r + 1]}) for r in range(2)), \
        "no parameter is split across ranks; the test would not exercise assembly"
    state = read_plain_state(tmp_path, _write(tmp_path, frags, 3))
    assert READERS[ENGINE_NAME] is not None and state.step == 12 and state.names == list(SHAPES)
    for name in SHAPES:
        got = state.get(name)
        for k in STATES:
            assert torch.equal(got[k], full[name][k]), (name, k)


def test_a_missing_slice_or_rank_file_or_mixed_steps_are_named_errors(tmp_path):
    full = _full_states()
    frags = _zero12_fragments(full, world=3)
    split = next(f for f in frags[1] if f[1] > 0)  # a fragment that does not start its parameter
    frags[1] = [f for f in frags[1] if f is not split]
    state = read_plain_state(tmp_path / "a", _write(tmp_path / "a", frags, 3))
    with pytest.raises(ValueError, match=rf"slices of '{split[0]}' cover \d+ of its"):
        state.get(split[0])
    manifest = _write(tmp_path / "b", _zero12_fragments(full, 3), 3)
    manifest["files"] = {k: v for k, v in manifest["files"].items() if "rank-00002" not in k}
    with pytest.raises(ValueError, match="2 elastic index files for a world of 3"):
        read_plain_state(tmp_path / "b", manifest)
    with pytest.raises(ValueError, match=r"steps \[12, 13\]"):
        read_plain_state(tmp_path / "c", _write(tmp_path / "c", _zero12_fragments(full, 3), 3,
                                                step=lambda r: 13 if r == 2 else 12))


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.mid = nn.Linear(6, 6)
        self.head = nn.Linear(6, 11, bias=False)
        self.head.weight = self.emb.weight  # tied: one parameter, two names

    def forward(self, x):
        return self.head(torch.tanh(self.mid(self.emb(x))))


def _trained(seed: int, steps: int):
    torch.manual_seed(seed)
    model = _Tied()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    for i in range(steps):
        _step(model, opt, i)
    return model, opt


def _step(model, opt, i):
    x = torch.arange(8).reshape(2, 4) + i % 3
    opt.zero_grad()
    nn.functional.cross_entropy(model(x).reshape(-1, 11), (x.reshape(-1) + 1) % 11).backward()
    opt.step()


def test_zero0_round_trip_through_the_files_is_bit_exact(tmp_path):
    """ZeRO-0 keeps a plain torch AdamW: 2 ranks each write every other parameter; a fresh model
    and optimizer take the state back and the next step is bit-identical."""
    src, src_opt = _trained(0, steps=3)
    for rank in range(2):
        save_rank_state(tmp_path / "elastic", src_opt, src, rank, 2, zero_stage=0)
    manifest = {"engine": ENGINE_NAME, "files": {f"elastic/{p.name}": "-" for p in (tmp_path / "elastic").iterdir()}}
    state = read_plain_state(tmp_path, manifest)
    assert state.step == 3 and state.names == ["emb.weight", "mid.weight", "mid.bias"]
    dst, dst_opt = _trained(1, steps=0)
    dst.load_state_dict(src.state_dict())
    load_rank_state(dst_opt, dst, state)
    _step(src, src_opt, 3)
    _step(dst, dst_opt, 3)
    for (n, a), b in zip(src.named_parameters(), dst.parameters()):
        assert torch.equal(a, b), n
        for k in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(src_opt.state[a][k], dst_opt.state[b][k]), (n, k)
        assert float(dst_opt.state[b]["step"]) == 4.0


def test_loading_a_state_without_a_parameter_names_it(tmp_path):
    src, src_opt = _trained(0, steps=1)
    save_rank_state(tmp_path / "elastic", src_opt, src, 0, 1, zero_stage=0)
    manifest = {"engine": ENGINE_NAME, "files": {f"elastic/{p.name}": "-" for p in (tmp_path / "elastic").iterdir()}}
    state = read_plain_state(tmp_path, manifest)
    state.names.remove("mid.bias")
    dst, dst_opt = _trained(1, steps=0)
    with pytest.raises(ValueError, match="no parameter 'mid.bias'"):
        load_rank_state(dst_opt, dst, state)


# --- the manager: plan and verification -------------------------------------------------------
class _Layout:
    rank, dp, local_rank = 0, 1, 0

    def __init__(self, world_size: int = 1):
        self.world_size = world_size

    def barrier(self):
        pass


class _ElasticEngine(Engine):
    """A real single-process engine that saves and loads through the DeepSpeed engine's elastic
    form (ZeRO-0 layout: a torch AdamW), under the DeepSpeed engine's checkpoint name."""

    elastic = True
    checkpoint_name = ENGINE_NAME

    def __init__(self, seed: int, steps: int):
        self.model, self.opt = _trained(seed, steps)

    def model_state_dict(self):
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def load_model_state_dict(self, state):
        self.model.load_state_dict(state)

    def optimizer_state(self):
        return {}

    def save_elastic(self, directory):
        save_rank_state(directory, self.opt, self.model, 0, 1, zero_stage=0)

    def load_plain_optimizer_state(self, state):
        load_rank_state(self.opt, self.model, state)


class _PlainEngine(_ElasticEngine):
    elastic = False


def test_manager_resumes_through_elastic_and_verifies_its_files(tmp_path):
    src = _ElasticEngine(0, steps=2)
    path = CheckpointManager(tmp_path, _Layout(), keep_last=2).save(2, src, {"step": 2}, {"lane": 0}, config={})
    manifest = json.loads((path / "manifest.json").read_text())
    assert {"elastic/rank-00000.json", "elastic/rank-00000.safetensors"} <= set(manifest["files"])
    dst = _ElasticEngine(1, steps=0)
    plan = plan_load(path, manifest, _Layout(), dst, None)
    assert plan.mode == "elastic" and plan.restores_rng
    assert plan_load(path, manifest, _Layout(4), dst, None).rank_name == "rank-00000.pt"
    CheckpointManager(tmp_path, _Layout(), keep_last=2).load(path, dst)
    for a, b in zip(src.model.parameters(), dst.model.parameters()):
        assert torch.equal(src.opt.state[a]["exp_avg_sq"], dst.opt.state[b]["exp_avg_sq"])
    with pytest.raises(CheckpointError, match="saved by 1 ranks .* with engine DeepSpeedEngine .* resumes only"):
        plan_load(path, manifest, _Layout(2), _PlainEngine(0, 0), None)
    blob = bytearray((path / "elastic" / "rank-00000.safetensors").read_bytes())
    blob[-1] ^= 1
    (path / "elastic" / "rank-00000.safetensors").write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match=r"elastic/rank-00000\.safetensors does not match its sha256"):
        CheckpointManager(tmp_path, _Layout(4), keep_last=2).load(path, _ElasticEngine(1, 0))


def test_a_checkpoint_without_a_layout_neutral_copy_needs_its_own_layout(tmp_path):
    manifest = {"engine": ENGINE_NAME, "world_size": 2, "files": {"rank-00000.pt": "-", "rank-00001.pt": "-"}}
    assert plan_load(tmp_path, manifest, _Layout(2), _ElasticEngine(0, 0), None).mode == "rank"
    with pytest.raises(CheckpointError, match="no layout-neutral copy"):
        plan_load(tmp_path, manifest, _Layout(1), _ElasticEngine(0, 0), None)
    manifest["engine"] = "SomeOtherEngine"
    with pytest.raises(CheckpointError, match="SomeOtherEngine has no layout-neutral optimizer reader"):
        plan_load(tmp_path, manifest, _Layout(1), _ElasticEngine(0, 0), None)


def test_engine_base_refuses_a_plain_state_naming_the_engine():
    with pytest.raises(NotImplementedError, match="_PlainEngine cannot load a layout-neutral"):
        Engine.load_plain_optimizer_state(_PlainEngine(0, 0), None)


def test_another_non_elastic_engine_at_the_same_layout_takes_the_weights_only(tmp_path):
    class _Other(_PlainEngine):
        checkpoint_name = "OtherEngine"

    manifest = {"engine": ENGINE_NAME, "world_size": 2, "files": {"rank-00000.pt": "-", "elastic/rank-00000.json": "-"}}
    plan = plan_load(tmp_path, manifest, _Layout(2), _Other(0, 0), None)
    assert plan.mode == "weights" and not plan.restores_rng
    with pytest.raises(CheckpointError, match="OtherEngine resumes only its own checkpoints"):
        plan_load(tmp_path, manifest, _Layout(1), _Other(0, 0), None)

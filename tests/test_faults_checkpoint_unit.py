"""Checkpoint faults in one process (the manager with a world-1 layout): damaged ``latest``, a
flipped byte, a missing or unlisted file, escaping paths and symlinks, crafted pickles, and a
crash at every point of a re-save. The engine is a plain torch model + AdamW implementing the
engine interface the manager uses; ``ShardedEngine`` saves and loads ``sharded/`` through the
real ``torch.distributed.checkpoint`` (whose ``.metadata`` is a pickle)."""
from __future__ import annotations

import json
import os
import pickle
import shutil
import stat
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

import dist_llm.checkpoint.manager as manager_mod
from dist_llm.checkpoint.manager import CheckpointError, CheckpointManager
from dist_llm.parallel.engine import Engine

SECRET = "SENTINELVALUE123"


class _Layout:
    rank, world_size, dp = 0, 1, 1

    def barrier(self):
        pass


class TinyEngine(Engine):
    def __init__(self, seed: int = 0):
        torch.manual_seed(seed)
        self.model = torch.nn.Linear(4, 3)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=0.1)
        self.model(torch.ones(2, 4)).sum().backward()
        self.opt.step()

    def model_state_dict(self):
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def optimizer_state(self):
        return self.opt.state_dict()

    def load_model_state_dict(self, sd):
        self.model.load_state_dict(sd)

    def load_optimizer_state(self, sd):
        self.opt.load_state_dict(sd)


class ShardedEngine(TinyEngine):
    supports_sharded = True
    reshardable = True

    def save_sharded(self, d: Path):
        dcp.save({"model": self.model.state_dict()}, checkpoint_id=str(d), no_dist=True)

    def load_sharded(self, d: Path):
        sd = {"model": self.model.state_dict()}
        dcp.load(sd, checkpoint_id=str(d), no_dist=True)
        self.model.load_state_dict(sd["model"])


class Evil:
    """Creates the sentinel file when unpickled."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _save(mgr: CheckpointManager, step: int, engine=None, config=None) -> Path:
    engine = engine or TinyEngine(seed=step)
    return mgr.save(step, engine, {"step": step}, {"steps": step}, config or {"name": "t"})


@pytest.fixture
def run(tmp_path):
    mgr = CheckpointManager(tmp_path / "run", _Layout(), keep_last=5)
    for step in (10, 20, 30):
        _save(mgr, step)
    return mgr


def _update_manifest(ckpt: Path, rel: str) -> None:
    from dist_llm.fileio import sha256_file

    m = json.loads((ckpt / "manifest.json").read_text())
    m["files"][rel] = sha256_file(ckpt / rel)
    (ckpt / "manifest.json").write_text(json.dumps(m))


def _weights(path: Path) -> torch.Tensor:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))["weight"]


# ----------------------------------------------------------------------------- latest


@pytest.mark.parametrize("content", ["", "garbage\n", "../../etc\n", "step-00000030/../../x", "\x00\xff"])
def test_garbage_latest_is_a_named_error_and_fallback_takes_the_newest(run, content):
    (run.root / "latest").write_bytes(content.encode("utf-8", "surrogatepass") if content != "\x00\xff" else b"\xff\x00")
    with pytest.raises(CheckpointError, match=str(run.root / "latest")):
        run.resolve_verified("auto", TinyEngine())
    assert run.resolve_verified("auto", TinyEngine(), fallback=True).name == "step-00000030"


def test_latest_missing_with_committed_checkpoints_is_not_a_fresh_start(run):
    (run.root / "latest").unlink()
    assert run.resolve_verified("auto", TinyEngine()).name == "step-00000030"


def test_no_checkpoint_is_a_fresh_start(tmp_path):
    assert CheckpointManager(tmp_path, _Layout(), 2).resolve_verified("auto", TinyEngine()) is None


# ----------------------------------------------------------------------------- damaged files


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, what", [
    (lambda c: _flip(c / "model.safetensors"), "model.safetensors"),
    (lambda c: _flip(c / "rank-00000.pt"), "rank-00000.pt"),
    (lambda c: (c / "trainer.json").unlink(), "trainer.json"),
    (lambda c: (c / "extra.pt").write_bytes(b"x"), "extra.pt"),
])
def test_damaged_checkpoint_names_the_file_and_falls_back(run, damage, what):
    latest = run.root / "step-00000030"
    damage(latest)
    engine = TinyEngine(seed=99)
    with pytest.raises(CheckpointError, match=str(latest / what)):
        run.resolve_verified("auto", engine)
    with pytest.raises(CheckpointError, match=str(latest / what)):
        run.load(latest, engine)  # load() verifies on its own too
    path = run.resolve_verified("auto", engine, fallback=True)
    assert path.name == "step-00000020"
    state, loader = run.load(path, engine)
    assert state == {"step": 20} and loader == {"steps": 20}
    assert torch.equal(engine.model.weight.detach(), _weights(path))


def test_fallback_gives_up_when_nothing_verifies(run):
    for c in run.committed():
        _flip(c / "model.safetensors")
    with pytest.raises(CheckpointError, match="no committed checkpoint"):
        run.resolve_verified("auto", TinyEngine(), fallback=True)


@pytest.mark.parametrize("entry", ["../../outside.bin", "/etc/passwd", "sub/../../x"])
def test_manifest_entries_that_escape_are_refused(run, entry, tmp_path):
    c = run.root / "step-00000030"
    m = json.loads((c / "manifest.json").read_text())
    m["files"][entry] = "0" * 64
    (c / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match="manifest.json entry") as e:
        run.load(c, TinyEngine())
    assert entry in str(e.value)


def test_symlink_to_a_file_outside_is_refused(run, tmp_path):
    c = run.root / "step-00000030"
    outside = tmp_path / "outside.pt"
    shutil.copy(c / "rank-00000.pt", outside)  # same bytes: the sha256 alone would not catch it
    (c / "rank-00000.pt").unlink()
    os.symlink(outside, c / "rank-00000.pt")
    with pytest.raises(CheckpointError, match="symlink"):
        run.load(c, TinyEngine())


# ----------------------------------------------------------------------------- crafted pickles


def test_crafted_rank_file_does_not_run(run, tmp_path):
    c = run.root / "step-00000030"
    sentinel = tmp_path / "SENTINEL"
    torch.save({"optimizer": Evil(sentinel), "rng": {}, "loader": {}}, c / "rank-00000.pt")
    with pytest.raises(CheckpointError, match="rank-00000.pt"):
        run.load(c, TinyEngine())
    _update_manifest(c, "rank-00000.pt")  # manifest rewritten too: weights_only refuses it
    with pytest.raises(pickle.UnpicklingError):
        run.load(c, TinyEngine())
    assert not sentinel.exists()


@pytest.fixture
def sharded(tmp_path):
    mgr = CheckpointManager(tmp_path / "srun", _Layout(), keep_last=5)
    _save(mgr, 10, ShardedEngine(seed=1))
    return mgr, mgr.root / "step-00000010"


def test_real_dcp_checkpoint_loads_and_reshards(sharded):
    mgr, c = sharded
    assert (c / "sharded" / ".metadata").is_file()
    engine = ShardedEngine(seed=5)
    mgr.load(c, engine)
    assert torch.equal(engine.model.weight.detach(), _weights(c))


@pytest.mark.parametrize("update_manifest", [False, True])
@pytest.mark.parametrize("rel", ["sharded/.metadata", "sharded/evil.pt"])
def test_crafted_pickle_under_sharded_does_not_run(sharded, tmp_path, rel, update_manifest):
    mgr, c = sharded
    sentinel = tmp_path / "SENTINEL"
    (c / rel).write_bytes(pickle.dumps(Evil(sentinel), protocol=4))
    if update_manifest:
        _update_manifest(c, rel)
    with pytest.raises(CheckpointError, match=str(c / rel) if not update_manifest or rel.endswith("metadata")
                       else "sharded"):
        mgr.load(c, ShardedEngine())
    assert not sentinel.exists()


def test_sharded_files_in_a_checkpoint_of_an_engine_that_writes_none_are_refused(run, tmp_path):
    c = run.root / "step-00000030"
    (c / "sharded").mkdir()
    (c / "sharded" / "evil.pt").write_bytes(pickle.dumps(Evil(tmp_path / "S")))
    _update_manifest(c, "sharded/evil.pt")
    with pytest.raises(CheckpointError, match="never writes sharded"):
        run.load(c, TinyEngine())
    assert not (tmp_path / "S").exists()


# ----------------------------------------------------------------------------- re-save crash windows


class _Crash(BaseException):
    pass


def _crash_at(monkeypatch, n: int) -> list:
    """Make the n-th file-system step of a commit (rename, latest write, delete) die."""
    calls = []
    for name, real in (("os.rename", os.rename), ("write_atomic", manager_mod.write_atomic),
                       ("shutil.rmtree", shutil.rmtree)):
        def wrapper(*a, _real=real, _name=name, **k):
            calls.append(_name)
            if len(calls) == n:
                raise _Crash(_name)
            return _real(*a, **k)
        if name == "os.rename":
            monkeypatch.setattr(manager_mod.os, "rename", wrapper)
        elif name == "shutil.rmtree":
            monkeypatch.setattr(manager_mod.shutil, "rmtree", wrapper)
        else:
            monkeypatch.setattr(manager_mod, "write_atomic", wrapper)
    return calls


def test_resave_of_an_existing_step_always_leaves_a_committed_checkpoint(tmp_path, monkeypatch):
    """Resume from step 10 into a run that already has step 20, then save step 20 again: a crash at
    every step of the commit leaves ``latest`` naming a checkpoint that verifies (old or new)."""
    n = 1
    while True:
        mgr = CheckpointManager(tmp_path / f"r{n}", _Layout(), keep_last=5)
        _save(mgr, 10)
        old = _weights(_save(mgr, 20, TinyEngine(seed=1)))
        new_engine = TinyEngine(seed=2)
        new = new_engine.model_state_dict()["weight"]
        calls = _crash_at(monkeypatch, n)
        tmp = mgr.root / "step-00000020.tmp"
        tmp.mkdir()
        for f in (mgr.root / "step-00000020").iterdir():  # a complete new save, as save() builds it
            shutil.copy(f, tmp / f.name)
        from safetensors.torch import save_file
        save_file(new_engine.model_state_dict(), str(tmp / "model.safetensors"))
        _update_manifest(tmp, "model.safetensors")
        crashed = True
        try:
            mgr.commit(tmp, mgr.root / "step-00000020", 20)
            crashed = False
        except _Crash:
            pass
        monkeypatch.undo()
        restarted = CheckpointManager(tmp_path / f"r{n}", _Layout(), keep_last=5)
        restarted.remove_stale()  # start-up recovery
        path = restarted.resolve_verified("auto", TinyEngine())
        assert path is not None and path.name == "step-00000020", (n, calls)
        got = _weights(path)
        assert torch.equal(got, old) or torch.equal(got, new), (n, calls)
        assert not list(restarted.root.glob("*.old")) and not list(restarted.root.glob("*.tmp"))
        if not crashed:
            assert torch.equal(got, new)
            break
        n += 1
    assert n >= 4  # rename aside, rename in, latest, delete old: each point was hit


# ----------------------------------------------------------------------------- secrets


def test_manifest_config_is_redacted_and_private(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", SECRET)
    mgr = CheckpointManager(tmp_path, _Layout(), keep_last=2)
    cfg = {"launcher": {"setup": [f"export HF_TOKEN={SECRET}", "module load cuda"],
                        "srun_args": ["--container-env=AWS_SECRET_ACCESS_KEY=abcdefgh12345678"]},
           "logging": {"api_key": "k"}}
    c = _save(mgr, 5, config=cfg)
    text = (c / "manifest.json").read_text()
    assert SECRET not in text and "abcdefgh12345678" not in text and '"k"' not in text
    assert "module load cuda" in text
    assert stat.S_IMODE((c / "manifest.json").stat().st_mode) == 0o600

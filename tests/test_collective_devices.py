"""Issue 9, Fix 1: every tensor our code hands to a collective is on the rank's device.

NCCL moves only CUDA tensors on the rank's own GPU; gloo only CPU tensors. A ``torch.tensor(...)``
without a device works on the CPU mock cluster and fails at the first step on GPUs. All our
collectives go through :class:`~dist_llm.parallel.layout.ParallelLayout`, which owns the device:

* in-process: with a "cuda-like" layout device (``meta``: not CPU, so a tensor created without
  the layout's device is caught) every helper that builds a tensor builds it there, and a tensor
  on another device is refused with an error naming both;
* source: no module of ``dist_llm`` outside layout.py calls a ``torch.distributed`` collective;
* 2 real gloo ranks (DeepSpeed ZeRO-0, Megatron tp=2 with sequence parallelism, pp=2; eval,
  checkpoint, resume agreement, preemption agreement): a recording shim (tests/collective_audit.py,
  installed in each rank through ``sitecustomize``) records every collective call; ours all come
  from the layout with tensors on ``layout.device`` (read from the calling layout object) and
  every tensor suits the backend. Run under the shared lock.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from dist_llm.parallel.layout import CollectiveDeviceError, ParallelLayout
from helpers import REPO, TINY, run_cli

META = torch.device("meta")


class _Recorded(Exception):
    pass


def _layout(device=META) -> ParallelLayout:
    return ParallelLayout(rank=0, world_size=2, local_rank=0, dp=2, tp=1, pp=1, device=device, backend="nccl")


@pytest.fixture
def recorder(monkeypatch):
    """Replace the collectives by a recorder that stops the call (nothing to talk to in-process)."""
    seen = []

    def record(name):
        def fn(*args, **kwargs):
            seen.append((name, [a.device for a in args if isinstance(a, torch.Tensor)]))
            raise _Recorded()
        return fn

    for name in ("all_reduce", "broadcast", "all_gather"):
        monkeypatch.setattr(dist, name, record(name))
    return seen


@pytest.mark.parametrize("call", [
    lambda lay: lay.agree(True),
    lambda lay: lay.all_reduce_scalar(3.0),
    lambda lay: lay.all_reduce_max(torch.zeros(1, device=lay.device)),
    lambda lay: lay.all_reduce_sum(torch.zeros(2, device=lay.device)),
    lambda lay: lay.broadcast(torch.zeros(2, device=lay.device), src=0),
    lambda lay: lay.all_gather([torch.zeros(1, device=lay.device)] * 2, torch.zeros(1, device=lay.device)),
], ids=["agree", "all_reduce_scalar", "all_reduce_max", "all_reduce_sum", "broadcast", "all_gather"])
def test_layout_collectives_use_the_layout_device(recorder, call):
    with pytest.raises(_Recorded):
        call(_layout())
    assert len(recorder) == 1 and recorder[0][1] and all(d == META for d in recorder[0][1]), recorder


def test_a_tensor_on_another_device_is_refused_naming_both(recorder):
    lay = _layout()
    for call in (lambda: lay.all_reduce_sum(torch.zeros(1)), lambda: lay.broadcast(torch.zeros(1), 0),
                 lambda: lay.all_gather([torch.zeros(1, device=META)] * 2, torch.zeros(1))):
        with pytest.raises(CollectiveDeviceError, match=r"tensor on cpu .* run on meta"):
            call()
    assert recorder == []  # refused before any collective started


def test_preemption_and_checkpoint_agreement_go_through_the_layout(recorder):
    from dist_llm.checkpoint.manager import CheckpointManager
    from dist_llm.train.preempt import PreemptionFlag

    with pytest.raises(_Recorded):
        PreemptionFlag().agreed(_layout())
    with pytest.raises(_Recorded):
        PreemptionFlag().ask(_layout())  # the trainer's per-step form (all-reduce issued, answer later)
    with pytest.raises(_Recorded):
        CheckpointManager("/nonexistent-run", _layout(), keep_last=1)._any_rank(True)
    assert [r[1] for r in recorder] == [[META], [META], [META]]


COLLECTIVE_CALL = re.compile(r"\bdist\.(all_reduce|all_gather\w*|broadcast\w*|reduce_scatter\w*|reduce|barrier|"
                             r"gather\w*|scatter\w*|all_to_all\w*|send|recv|isend|irecv)\(")


def test_no_collective_outside_the_layout_in_the_source():
    offenders = []
    for path in (REPO / "dist_llm").rglob("*.py"):
        if path.name == "layout.py" and path.parent.name == "parallel":
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if COLLECTIVE_CALL.search(line) and not line.lstrip().startswith("#"):
                offenders.append(f"{path.relative_to(REPO)}:{n}: {line.strip()}")
    assert not offenders, "collectives must go through ParallelLayout:\n" + "\n".join(offenders)


RUNS = {
    "zero0": ["parallel=zero0", "train.max_steps=6", "train.eval_every=3", "train.checkpoint.every=3"],
    "tp2sp": ["parallel=tp2_sp", "train.max_steps=4", "train.eval_every=2", "train.checkpoint.every=2"],
    "pp2": ["parallel=pp2", "train.max_steps=4", "train.eval_every=2", "train.checkpoint.every=2"],
}


@pytest.mark.slow
def test_every_collective_of_a_real_run_is_on_the_layout_device(tmp_path, stdlib_cache):
    from collective_audit import read

    shutil.copytree(stdlib_cache, tmp_path / "data" / "stdlib")
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import os\nif os.environ.get('DIST_LLM_COLLECTIVE_AUDIT') and os.environ.get('RANK'):\n"
        "    import collective_audit\n    collective_audit.install(os.environ['DIST_LLM_COLLECTIVE_AUDIT'])\n")
    pythonpath = f"{REPO}:{site}:{REPO / 'tests'}"
    for name, extra in RUNS.items():
        audit = tmp_path / "audit" / name
        run_cli(["train", *TINY, f"name={name}", "launcher.nproc=2", *extra], cwd=tmp_path,
                env={"PYTHONPATH": pythonpath, "DIST_LLM_COLLECTIVE_AUDIT": str(audit)})
        # Resume: the checkpoint agreement (_any_rank) and the preemption agreement run again.
        run_cli(["train", *TINY, f"name={name}", "launcher.nproc=2", *extra, "train.max_steps=8" if name == "zero0"
                 else "train.max_steps=5"], cwd=tmp_path,
                env={"PYTHONPATH": pythonpath, "DIST_LLM_COLLECTIVE_AUDIT": str(audit)})
        recs = read(audit)
        assert {r["rank"] for r in recs} == {"rank-0", "rank-1"}, name
        problems = [p for r in recs for p in r["problems"]]
        assert not problems, f"{name}:\n" + "\n".join(sorted(set(problems))[:20])
        ours = [r for r in recs if r["via_layout"]]
        # The layout issued the loss, preemption and checkpoint agreements with tensors on its device.
        assert sum(r["op"] == "all_reduce" for r in ours) >= 2 * 6, (name, len(ours))
        assert all(r["devices"] in ([], ["cpu"]) for r in ours), name
        if name == "tp2sp":  # the TP all-gather of the checkpoint save and the SP gradient hook
            assert any(r["op"] == "all_gather" for r in ours), name
        if name == "pp2":
            assert any(r["op"] == "all_gather_object" for r in ours), name

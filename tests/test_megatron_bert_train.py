"""Megatron BERT end to end through the real CLI on gloo ranks: task=mlm_nsp at tp=2 (2 ranks,
DeepSpeed ZeRO-1 over dp=1) against the single-device DeepSpeed ZeRO-0 run on the same data.

Tolerances: both runs do the same fp32 math in another order (TP splits the QKV/MLP/vocabulary
matmuls and all-reduces partial sums; Megatron's attention and vocab-parallel cross entropy vs
torch's), which moves losses by ~1e-7 relative per step and compounds through 6 AdamW updates:
1e-4 relative on the losses and 1e-5 absolute on the weights leave headroom while a wrong
mapping (norm, head, QKV order, NSP labels) would be off by > 1e-2 from step 1. Accuracies are
counts of argmax hits, equal unless a near-tie flips: they must agree to one masked token.
A same-layout resume from the sharded checkpoint repeats the same operations (1e-6 relative:
exact in practice); a resume at tp=1 reshards weights and Adam moments (1e-5 relative).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file

from helpers import max_rel_diff, metrics, run_cli

pytestmark = pytest.mark.slow

STEPS = range(1, 7)
COMMON = ["experiment=bert_stdlib", "logging=none", "train.ui.progress_bar=off", "train.log_every=1",
          "train.max_steps=6", "train.micro_batch_size=4", "train.global_batch_size=8", "data.lanes=2", "optim.warmup_steps=2", "optim.lr=1e-3",
          "train.eval_every=6", "train.eval_batches=1", "train.checkpoint.every=3",
          "train.checkpoint.save_at_end=true", "train.checkpoint.keep_last=5"]
RUNS = {"ds": ["parallel=zero0", "launcher.nproc=1"], "mg": ["parallel=tp2", "launcher.nproc=2"]}
KEYS = ("loss", "mlm_loss", "nsp_loss")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    from dist_llm.prepare.embedded import build_embedded_set

    root = tmp_path_factory.mktemp("megatron_bert")
    build_embedded_set(root / "data" / "stdlib_bert", "stdlib_bert", 128, max_bytes=400_000)  # 4 train shards: 2 lanes
    for name, extra in RUNS.items():
        run_cli(["train", *COMMON, f"name={name}", *extra], cwd=root)
    return root / "runs"


def test_bert_tp2_equals_one_device_zero0(runs):
    for key in KEYS:
        ref, got = metrics(runs / "ds", f"train/{key}"), metrics(runs / "mg", f"train/{key}")
        assert sorted(got) == list(STEPS), got
        diff = max_rel_diff(got, ref, STEPS)
        print(f"{key}: max relative difference tp2 vs zero0 over 6 steps = {diff:.2e}")
        assert diff < 1e-4, (key, got, ref)
    ref_loss = metrics(runs / "ds")
    # 0.2: BPE-512 pairs at lr 1e-3 fall ~0.29 in 6 steps (char pairs fell more)
    assert ref_loss[6] < ref_loss[1] - 0.2, "the model did not learn; the comparison would be vacuous"
    for key in ("train/mlm_accuracy", "train/nsp_accuracy", "val/mlm_accuracy", "val/nsp_accuracy",
                "val/mlm_loss"):
        ref, got = metrics(runs / "ds", key), metrics(runs / "mg", key)
        assert ref and sorted(got) == sorted(ref), (key, got, ref)
        tol = 1e-4 * abs(ref[6]) if key.endswith("loss") else 1 / 64  # >= 64 masked tokens a step
        assert all(abs(got[s] - ref[s]) <= tol for s in ref), (key, got, ref)


def test_bert_tp2_checkpoint_has_plain_weights(runs):
    """model.safetensors of the tp=2 run: plain BERT names (export/eval read it), gathered over
    TP, equal to the one-device run's weights."""
    step = "checkpoints/step-00000006/model.safetensors"
    got, ref = load_file(str(runs / "mg" / step)), load_file(str(runs / "ds" / step))
    assert set(got) == set(ref) and "mlm_bias" in got and "layers.1.attn.qkv.weight" in got
    diff = max((got[k] - ref[k]).abs().max().item() for k in ref)
    print(f"tp2 vs zero0 weights after 6 steps: max abs difference {diff:.2e}")
    assert diff < 1e-5


@pytest.mark.parametrize("name,layout,tol", [
    ("mg-resume", RUNS["mg"], 1e-6),  # same layout: the same operations again
    ("mg-reshard-tp1", ["parallel=megatron", "launcher.nproc=1"], 1e-5),  # tp=2 -> tp=1: another summation order
])
def test_bert_tp2_resumes_from_the_sharded_checkpoint(runs, name, layout, tol):
    ckpt = runs / "mg" / "checkpoints" / "step-00000003"
    assert (ckpt / "sharded").is_dir()
    run_cli(["train", *COMMON, f"name={name}", *layout, f"train.checkpoint.resume={ckpt}",
             "train.checkpoint.every=0", "train.checkpoint.save_at_end=false"], cwd=runs.parent)
    got, full = metrics(runs / name), metrics(runs / "mg")
    assert sorted(got) == [4, 5, 6], got
    for s in (4, 5, 6):
        assert abs(got[s] - full[s]) <= tol * abs(full[s]), (s, got[s], full[s])
    shutil.rmtree(runs / name)

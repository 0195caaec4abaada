"""``dist-llm eval``: figures against direct computation, rank slicing, sources, bad input.

In-process tests run the CLI's ``main`` (one rank); the 2-rank test runs the local mock cluster on
gloo and must give the 1-rank figures: count ratios (accuracies) exactly, losses to 1e-6 relative
(the tasks return float32 per-batch means; the batches differ between 1 and 2 ranks).
"""
from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dist_llm.cli.eval import main as eval_main
from dist_llm.config.store import compose, config_to_dict
from dist_llm.data.shards import read_manifest
from dist_llm.evaluation.task_eval import _read_samples, evaluate_task, rank_slice
from dist_llm.prepare.embedded import build_embedded_set
from dist_llm.train.tasks import build_task


def _checkpoint(tmp_path: Path, experiment: str, extra=()) -> tuple:
    """A run dir in the checkpoint layout (manifest with the job config + model.safetensors) of a
    seeded random model of ``experiment``, and its config."""
    data = tmp_path / "data"
    cfg = compose([f"experiment={experiment}", f"data.embedded_dir={data}", "logging=none", *extra])
    build_embedded_set(str(data), str(cfg.data.embedded), cfg.train.seq_len, max_bytes=cfg.data.embedded_max_bytes)
    torch.manual_seed(3)
    task = build_task(cfg)
    model = task.build_model(cfg)
    step = tmp_path / "run" / "checkpoints" / "step-5"
    step.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(step / "model.safetensors"))
    (step / "manifest.json").write_text(json.dumps({"config": config_to_dict(cfg), "step": 5}))
    (step.parent / "latest").write_text("step-5")
    return tmp_path / "run", cfg, model


def _last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_vit_eval_matches_direct_accuracy_and_writes_outputs(tmp_path, capsys):
    run, cfg, model = _checkpoint(tmp_path, "vit_digits")
    assert eval_main([str(run), "eval.batch_size=50"]) == 0
    res = _last_json(capsys)
    val = Path(cfg.data.embedded_dir) / "val"
    task = build_task(cfg)
    m = read_manifest(val, expect=task.sample_format)
    recs = _read_samples(str(val), m, task.sample_format, 0, m["num_samples"])
    batch = task.decode_eval_batch(recs, list(range(len(recs))))
    with torch.no_grad():
        logits = model.eval()(batch["pixel_values"])
    pred = logits.argmax(-1)
    assert res["samples"] == 360 and res["task"] == "classify"
    assert res["accuracy"] == int((pred == batch["labels"]).sum()) / 360
    f1s = []
    for c in range(10):
        tp = float(((pred == c) & (batch["labels"] == c)).sum())
        denom = float((pred == c).sum() + (batch["labels"] == c).sum())
        if denom:
            f1s.append(2 * tp / denom)
    assert res["macro_f1"] == pytest.approx(sum(f1s) / len(f1s), abs=1e-9)
    ce = torch.nn.functional.cross_entropy(logits, batch["labels"]).item()
    assert res["loss"] == pytest.approx(ce, rel=1e-5)
    assert sum(map(sum, res["confusion"])) == 360
    out = run / "checkpoints" / "step-5" / "eval.json"
    assert json.loads(out.read_text())["accuracy"] == res["accuracy"]
    png = Path(res["confusion_png"])
    assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG"
    assert (run / "checkpoints" / "step-5" / "eval-logs" / "metrics.jsonl").read_text().count("eval/accuracy") == 1


def test_rank_slices_are_disjoint_and_cover():
    for total, world in ((360, 2), (7, 3), (2, 4)):
        spans = [rank_slice(total, r, world) for r in range(world)]
        assert spans[0][0] == 0 and spans[-1][1] == total
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))


def _threaded_ranks(world: int, fn):
    """Run ``fn(rank, all_reduce)`` as ``world`` threads whose all_reduce sums their tensors."""
    barrier, slots, out = threading.Barrier(world), [None] * world, [None] * world

    def reducer(rank):
        def all_reduce(t):
            slots[rank] = t.clone()
            barrier.wait()
            t.copy_(sum(slots))
            barrier.wait()
        return all_reduce

    threads = [threading.Thread(target=lambda r=r: out.__setitem__(r, fn(r, reducer(r)))) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def test_bert_two_slices_give_one_rank_figures(tmp_path, capsys):
    """MLM masks depend on the global sample index, so slices see the 1-rank masks."""
    run, cfg, model = _checkpoint(tmp_path, "bert_stdlib", ["data.embedded_max_bytes=200000"])
    val = str(Path(cfg.data.embedded_dir) / "val")
    one = evaluate_task(build_task(cfg), model, val, max_samples=45, batch_size=8)
    two = _threaded_ranks(2, lambda r, red: evaluate_task(build_task(cfg), model, val, r, 2, 45, 8,
                                                          all_reduce=red))
    assert two[0] == two[1]
    for k in ("mlm_accuracy", "nsp_accuracy"):  # ratios of integer counts: exact
        assert two[0][k] == one[k], k
    for k in ("mlm_loss", "nsp_loss", "loss"):  # float32 per-batch means over other batches: 1e-6
        assert two[0][k] == pytest.approx(one[k], rel=1e-6), k
    assert one["samples"] == 45 and 0.0 <= one["mlm_accuracy"] <= 1.0
    # the CLI on the saved checkpoint (weights through load_source_weights) gives the same figures
    assert eval_main([str(run), "eval.max_samples=45", "eval.batch_size=8"]) == 0
    cli = _last_json(capsys)
    assert cli["nsp_accuracy"] == one["nsp_accuracy"] and cli["mlm_loss"] == pytest.approx(one["mlm_loss"], rel=1e-9)


def test_bad_sources_exit_2(tmp_path, capsys):
    assert eval_main([str(tmp_path / "nope")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    assert eval_main([str(tmp_path)]) == 2
    assert "found neither config.json" in capsys.readouterr().err
    assert eval_main([]) == 2
    run, _, _ = _checkpoint(tmp_path, "vit_digits")
    assert eval_main([str(run), "eval.nope=1"]) == 2
    assert "eval.nope: unknown" in capsys.readouterr().err
    assert eval_main([str(run), "data.val=" + str(tmp_path / "missing")]) == 2
    assert "no manifest.json" in capsys.readouterr().err


def test_hf_llama_dir_perplexity_matches_transformers(tmp_path, capsys):
    pytest.importorskip("transformers")
    from interop_fixtures import VOCAB, hf_llama, train_hf_tokenizer, write_shards

    from dist_llm.data import read_shard
    from dist_llm.interop.tokenizer import tokenizer_from_hf_dir

    hf = hf_llama(kv_heads=2, tie=False)
    hf_dir = tmp_path / "hf"
    hf.save_pretrained(hf_dir)
    train_hf_tokenizer(hf_dir)
    split = write_shards(tmp_path / "data" / "val", tokenizer_from_hf_dir(hf_dir), 16, n_samples=24)
    assert eval_main([str(hf_dir), f"data.val={split}", "eval.batch_size=5"]) == 0
    res = _last_json(capsys)
    m = read_manifest(split)
    batch = torch.cat([torch.from_numpy(read_shard(Path(split) / s["file"], 17, m["dtype"]).astype("int64"))
                       for s in m["shards"]])
    with torch.no_grad():
        logits = hf(batch[:, :-1]).logits
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), batch[:, 1:].reshape(-1)).item()
    assert res["task"] == "pretrain" and res["tokens"] == batch[:, 1:].numel()
    assert res["loss"] == pytest.approx(ref, rel=1e-4)  # fp32, different kernels: 1e-4
    assert (hf_dir / "eval.json").is_file()


@pytest.mark.slow
def test_two_gloo_ranks_give_one_rank_figures(tmp_path):
    """The CLI on the local mock cluster (launcher.nproc=2, gloo) = the CLI on one rank."""
    import os
    import subprocess
    import sys

    run, _, _ = _checkpoint(tmp_path, "bert_stdlib", ["data.embedded_max_bytes=200000"])
    env = dict(os.environ, OMP_NUM_THREADS="1")
    outs = []
    for n in (1, 2):
        p = subprocess.run([sys.executable, "-m", "dist_llm.cli.main", "eval", str(run), f"launcher.nproc={n}",
                            "eval.max_samples=45", "eval.batch_size=8", f"eval.out={tmp_path}/eval{n}.json"],
                           env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path)
        assert p.returncode == 0, p.stderr[-2000:]
        outs.append(json.loads(p.stdout.strip().splitlines()[-1]))
    one, two = outs
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert two["samples"] == one["samples"] == 45
    assert two["mlm_accuracy"] == one["mlm_accuracy"] and two["nsp_accuracy"] == one["nsp_accuracy"]
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-6)
    assert json.loads((tmp_path / "eval2.json").read_text())["world_size"] == 2

"""Distillation figure (issue 11): does a student trained with a teacher beat the same student
trained alone, for the same steps and data?

* teacher: a gpt2-preset GPT trained in-process on the embedded stdlib corpus (byte tokens);
* student: half the layers and a narrower width (at most half the teacher's parameters, checked), trained for
  ``--student-steps`` on a smaller slice of the same corpus (the data a student gets), from the
  same seeded init, twice per seed: with ``task=distill``'s loss (the function the engines call,
  :meth:`DistillTask.loss`, teacher frozen) and with the plain next-token CE (``task=pretrain``);
* all three are scored on the same held-out validation windows (perplexity); the student rows
  are means over ``--seeds`` seeds, and "gap recovered" is
  ``(ppl_alone - ppl_distilled) / (ppl_alone - ppl_teacher)``.

    python -m bench.distill [--teacher-steps 600] [--student-steps 200] [--seeds 3] [--out bench/distill.json]

Runs on CPU in a few minutes; figures on a shared machine are provisional.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def _train(model, batches, steps: int, lr: float, loss_fn) -> float:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    for _ in range(steps):
        loss, _metrics = loss_fn(model, next(batches))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return float(loss.detach())


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher-steps", type=int, default=600)
    ap.add_argument("--student-steps", type=int, default=200)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--teacher-bytes", type=int, default=1_000_000)
    ap.add_argument("--student-bytes", type=int, default=150_000)
    ap.add_argument("--temperature", type=float, default=2.0)
    ap.add_argument("--alpha", type=float, default=0.9)
    ap.add_argument("--out", default=str(REPO / "bench" / "distill.json"))
    args = ap.parse_args()

    from dist_llm.compress.finetune import train_batches
    from dist_llm.config.schema import DistillTaskConfig, JobConfig, ModelConfig, TaskConfig
    from dist_llm.data import ByteTokenizer
    from dist_llm.prepare.embedded import build_stdlib_corpus
    from dist_llm.evaluation.lm import evaluate_lm
    from dist_llm.models import build_model
    from dist_llm.train.tasks.distill import DistillTask
    from dist_llm.train.tasks.pretrain import PretrainTask

    torch.set_num_threads(2)
    t_start = time.perf_counter()
    base = dict(preset="gpt2", n_heads=4, d_model=128, max_seq_len=args.seq_len,
                vocab_size=ByteTokenizer().vocab_size, tie_embeddings=True)
    teacher_cfg = ModelConfig(n_layers=4, **base)
    student_cfg = ModelConfig(n_layers=2, **{**base, "d_model": 112})  # <= half: embeddings count too
    with tempfile.TemporaryDirectory() as tmp:
        big, small = Path(tmp) / "big", Path(tmp) / "small"
        build_stdlib_corpus(big, args.seq_len, max_bytes=args.teacher_bytes)
        build_stdlib_corpus(small, args.seq_len, max_bytes=args.student_bytes)
        val = str(big / "val")

        def ppl(model) -> float:
            return evaluate_lm(model, val, args.seq_len, batch_size=32, max_batches=16)["ppl"]

        torch.manual_seed(0)
        teacher = build_model(teacher_cfg)
        pretrain = PretrainTask(JobConfig(model=teacher_cfg))
        _train(teacher, train_batches(str(big / "train"), args.seq_len, args.batch, seed=0), args.teacher_steps,
               3e-3, pretrain.loss)
        teacher.eval().requires_grad_(False)
        result = {"args": vars(args), "provisional": "shared 2-core CPU machine",
                  "teacher": {"params": _params(teacher), "ppl": ppl(teacher), "train_bytes": args.teacher_bytes},
                  "student_params": _params(build_model(student_cfg)), "runs": []}
        assert result["student_params"] * 2 <= result["teacher"]["params"], "the student must be <= half the teacher"
        print(f"teacher: {result['teacher']['params']} params, ppl {result['teacher']['ppl']:.3f} "
              f"({time.perf_counter() - t_start:.0f}s)", flush=True)

        job = JobConfig(model=student_cfg, task=TaskConfig(kind="distill", distill=DistillTaskConfig(
            temperature=args.temperature, alpha=args.alpha)))
        distill = DistillTask(job, teacher=teacher)
        plain = PretrainTask(dataclasses.replace(job, task=TaskConfig()))
        for seed in range(args.seeds):
            row = {"seed": seed}
            for name, task in (("alone", plain), ("distilled", distill)):
                torch.manual_seed(100 + seed)
                student = build_model(student_cfg)
                batches = train_batches(str(small / "train"), args.seq_len, args.batch, seed=seed)
                _train(student, batches, args.student_steps, 3e-3, task.loss)
                row[name] = ppl(student)
            result["runs"].append(row)
            print(f"seed {seed}: alone ppl {row['alone']:.3f}, distilled ppl {row['distilled']:.3f} "
                  f"({time.perf_counter() - t_start:.0f}s)", flush=True)
    alone = statistics.mean(r["alone"] for r in result["runs"])
    distilled = statistics.mean(r["distilled"] for r in result["runs"])
    t_ppl = result["teacher"]["ppl"]
    result["summary"] = {"teacher_ppl": t_ppl, "student_alone_ppl_mean": alone,
                         "student_distilled_ppl_mean": distilled,
                         "gap_recovered": (alone - distilled) / (alone - t_ppl) if alone != t_ppl else float("nan"),
                         "seconds": time.perf_counter() - t_start}
    print(json.dumps(result["summary"], indent=1))
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

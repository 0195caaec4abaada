"""Distillation figure (issue 11): does a student trained with a teacher beat the same student
trained alone, for the same steps and data?

The data is a random first-order Markov chain over a small vocabulary (a source whose
distribution is known, so it runs in minutes on a CPU and the teacher can really learn it):

* teacher: a 4-layer gpt2-preset GPT trained in-process on plenty of sequences from the source;
* student: 2 layers, narrower (at most half the teacher's parameters, checked), trained for
  ``--student-steps`` on only ``--student-samples`` sequences (the data a student gets), from the
  same seeded init and the same batches, twice per seed: with ``task=distill``'s loss (the
  function the engines call, :meth:`DistillTask.loss`, teacher frozen) and with the plain
  next-token CE (``task=pretrain``'s :meth:`PretrainTask.loss`);
* all are scored on the same held-out sequences (perplexity); student rows are means over
  ``--seeds`` seeds, and "gap recovered" is ``(ppl_alone - ppl_distilled) / (ppl_alone - ppl_teacher)``.

    python -m bench.distill [--teacher-steps 250] [--student-steps 80] [--seeds 3] [--out bench/distill.json]

Figures on a shared machine are provisional (timings); the perplexities are deterministic.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
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


def markov_source(vocab: int, concentration: float, seed: int) -> torch.Tensor:
    """A random first-order Markov chain over ``vocab`` tokens: row i = P(next | i), drawn from a
    Dirichlet(``concentration``) so each token has a few likely successors (a known entropy)."""
    g = torch.Generator().manual_seed(seed)
    gamma = torch._standard_gamma(torch.full((vocab, vocab), concentration), generator=g)
    return gamma / gamma.sum(-1, keepdim=True)


def sample(trans: torch.Tensor, n: int, length: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    out = torch.empty(n, length, dtype=torch.long)
    out[:, 0] = torch.randint(0, trans.shape[0], (n,), generator=g)
    for t in range(1, length):
        out[:, t] = torch.multinomial(trans[out[:, t - 1]], 1, generator=g).squeeze(1)
    return out


def batches_from(pool: torch.Tensor, batch: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    while True:
        yield pool[torch.randint(0, pool.shape[0], (batch,), generator=g)]


def perplexity(model, data: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        loss = float(model(data[:, :-1], data[:, 1:]))
    model.train()
    return math.exp(loss)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher-steps", type=int, default=250)
    ap.add_argument("--student-steps", type=int, default=80)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--vocab", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=32)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--student-samples", type=int, default=24, help="sequences the students train on")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--alpha", type=float, default=0.9)
    ap.add_argument("--out", default=str(REPO / "bench" / "distill.json"))
    args = ap.parse_args()

    from dist_llm.config.schema import DistillTaskConfig, JobConfig, ModelConfig, TaskConfig
    from dist_llm.models import build_model
    from dist_llm.train.tasks.distill import DistillTask
    from dist_llm.train.tasks.pretrain import PretrainTask

    torch.set_num_threads(2)
    t_start = time.perf_counter()
    trans = markov_source(args.vocab, 0.1, seed=1234)
    floor = math.exp(float(-(trans * trans.clamp_min(1e-30).log()).sum(-1).mean()))  # uniform-start approx.
    length = args.seq_len + 1
    teacher_pool = sample(trans, 8192, length, seed=1)
    student_pool = sample(trans, args.student_samples, length, seed=2)
    val = sample(trans, 512, length, seed=3)
    base = dict(preset="gpt2", n_heads=4, max_seq_len=args.seq_len, vocab_size=args.vocab, tie_embeddings=True)
    teacher_cfg = ModelConfig(n_layers=4, d_model=64, **base)
    student_cfg = ModelConfig(n_layers=2, d_model=48, **base)

    torch.manual_seed(0)
    teacher = build_model(teacher_cfg)
    _train(teacher, batches_from(teacher_pool, args.batch, 0), args.teacher_steps, 3e-3,
           PretrainTask(JobConfig(model=teacher_cfg)).loss)
    teacher.eval().requires_grad_(False)
    result = {"args": vars(args), "provisional": "shared 2-core CPU machine",
              "source": {"kind": "random first-order Markov chain", "vocab": args.vocab,
                         "approx_entropy_ppl": floor},
              "teacher": {"params": _params(teacher), "ppl": perplexity(teacher, val),
                          "train_sequences": teacher_pool.shape[0]},
              "student_params": _params(build_model(student_cfg)), "runs": []}
    assert result["student_params"] * 2 <= result["teacher"]["params"], "the student must be <= half the teacher"
    print(f"teacher: {result['teacher']['params']} params, ppl {result['teacher']['ppl']:.3f} "
          f"(source ~{floor:.3f}; {time.perf_counter() - t_start:.0f}s)", flush=True)

    job = JobConfig(model=student_cfg, task=TaskConfig(kind="distill", distill=DistillTaskConfig(
        temperature=args.temperature, alpha=args.alpha)))
    distill = DistillTask(job, teacher=teacher)
    plain = PretrainTask(dataclasses.replace(job, task=TaskConfig()))
    for seed in range(args.seeds):
        row = {"seed": seed}
        for name, task in (("alone", plain), ("distilled", distill)):
            torch.manual_seed(100 + seed)  # same init and same batches for both
            student = build_model(student_cfg)
            _train(student, batches_from(student_pool, args.batch, seed), args.student_steps, 3e-3, task.loss)
            row[name] = perplexity(student, val)
        result["runs"].append(row)
        print(f"seed {seed}: alone ppl {row['alone']:.3f}, distilled ppl {row['distilled']:.3f} "
              f"({time.perf_counter() - t_start:.0f}s)", flush=True)
    alone = statistics.mean(r["alone"] for r in result["runs"])
    distilled = statistics.mean(r["distilled"] for r in result["runs"])
    t_ppl = result["teacher"]["ppl"]
    result["summary"] = {"teacher_ppl": t_ppl, "student_alone_ppl_mean": alone,
                         "student_distilled_ppl_mean": distilled,
                         "gap_recovered": (alone - distilled) / (alone - t_ppl) if alone != t_ppl else float("nan"),
                         "student_params": result["student_params"], "teacher_params": result["teacher"]["params"],
                         "seconds": time.perf_counter() - t_start}
    print(json.dumps(result["summary"], indent=1))
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

"""One rank of the pipeline engine's withheld-update check (tests/test_step_gate_engine.py runs it
on 2 ranks, pp=2, through spawn_local).

argv: out_dir. After one normal step, three withheld steps (the gate closed; a NaN gradient on
stage 0 only; a NaN gradient on stage 1 only) must leave every parameter, the AdamW moments and
the optimizer step count of BOTH stages unchanged, and report ``applied=False`` on both; a normal
step afterwards updates again. Each rank writes ``rank-<r>.json`` with what it saw.
"""
import json
import math
import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402

from dist_llm.config.store import compose  # noqa: E402
from dist_llm.launch.env import read_launch_env  # noqa: E402
from dist_llm.models import build_model  # noqa: E402
from dist_llm.parallel import build_engine  # noqa: E402
from dist_llm.parallel.engine import StepGate  # noqa: E402
from dist_llm.parallel.layout import init_layout, shutdown  # noqa: E402


class Closed(StepGate):
    def allow(self, loss, finite):
        return False


def snapshot(engine):
    params = [p.detach().clone() for p in engine.local_params().values()]
    moments = [t.detach().clone() for mom in engine.optimizer.moments().values() for t in mom.values()]
    return params, moments, engine.optimizer_step()


def unchanged(a, b) -> bool:
    same = lambda x, y: len(x) == len(y) and all(torch.equal(s, t) for s, t in zip(x, y))  # noqa: E731
    return same(a[0], b[0]) and same(a[1], b[1]) and a[2] == b[2]


def main() -> None:
    out = Path(sys.argv[1])
    cfg = compose(["model=tiny", "parallel=pp2", "parallel.device=cpu", "train.micro_batch_size=2",
                   "train.global_batch_size=4", "train.seq_len=16"])
    layout = init_layout(cfg.parallel, read_launch_env())
    try:
        torch.manual_seed(0)
        engine = build_engine(cfg, build_model(cfg.model), layout)
        gen = torch.Generator().manual_seed(1)

        def batches():  # the same draws on both ranks: stage 0 reads the ids, stage 1 the labels
            return [torch.randint(0, cfg.model.vocab_size, (2, 17), generator=gen) for _ in range(2)]

        seen = {"first_applied": engine.train_step(batches(), 1e-3).applied}  # moments exist from here on
        first_param = next(iter(engine.local_params().values()))
        for case in ("closed gate", "nan grad on stage 0", "nan grad on stage 1"):
            handle = None
            if case == "closed gate":
                engine.step_gate = Closed()
            elif case.endswith(str(layout.pp_rank)):
                handle = first_param.register_hook(lambda g: torch.full_like(g, float("nan")))
            before = snapshot(engine)
            stats = engine.train_step(batches(), 1e-3)
            if handle is not None:
                handle.remove()
            engine.step_gate = StepGate()
            seen[case] = {"applied": stats.applied, "finite": stats.finite, "unchanged": unchanged(before, snapshot(engine)),
                          "loss_finite": math.isfinite(stats.loss)}
        before = snapshot(engine)
        stats = engine.train_step(batches(), 1e-3)
        after = snapshot(engine)
        seen["after"] = {"applied": stats.applied, "params_changed": not unchanged((before[0], [], 0), (after[0], [], 0)),
                         "step_count": [before[2], after[2]]}
        (out / f"rank-{layout.rank}.json").write_text(json.dumps(seen))
    finally:
        shutdown()


if __name__ == "__main__":
    main()

"""``train.profile=<start>:<steps>``: a torch.profiler trace of a window of steps.

The window covers steps ``start+1 .. start+steps`` (the step counter as logged); each rank in
``train.profile_ranks`` writes ``<run_dir>/profile/rank<r>.json`` (chrome trace: open it in
chrome://tracing or https://ui.perfetto.dev). Outside the window nothing is recorded, so the
callback costs one integer comparison per step.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import List, Optional

from dist_llm.config.validate import parse_profile_window
from dist_llm.train.callbacks import Callback

log = logging.getLogger("dist_llm.train")


class ProfilerCallback(Callback):
    def __init__(self, spec: str, ranks: List[int], rank: int, out_dir: Path):
        window = parse_profile_window(spec)
        self.active = window is not None and rank in ranks
        self.start, self.steps = window or (0, 0)
        self.path = Path(out_dir) / "profile" / f"rank{rank}.json"
        self._prof: Optional[object] = None

    def on_step_begin(self, trainer):
        if self.active and self._prof is None and trainer.state.step == self.start:
            import torch

            acts = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available() and trainer.layout.device.type == "cuda":
                acts.append(torch.profiler.ProfilerActivity.CUDA)
            self._prof = torch.profiler.profile(activities=acts, record_shapes=False)
            self._prof.__enter__()

    def on_step_end(self, trainer, stats, step_time_s):
        if self._prof is not None and trainer.state.step >= self.start + self.steps:
            self._finish()

    def on_train_end(self, trainer):
        if self._prof is not None:  # the run ended inside the window
            self._finish()

    def _finish(self) -> None:
        prof, self._prof, self.active = self._prof, None, False
        prof.__exit__(None, None, None)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(self.path))
        log.info("profiler trace written: %s", self.path)

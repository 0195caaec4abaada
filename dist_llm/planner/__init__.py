"""Memory and layout planner: pure arithmetic over the typed configs (no torch.distributed,
no DeepSpeed). ``estimate_peak_memory`` is the one call validate/doctor use before launch."""
from dist_llm.planner.memory import (CPU_CONSTANTS, Layout, MemoryEstimate, MemoryModel, estimate_layout,
                                     estimate_peak_memory, layout_from_job)
from dist_llm.planner.params import ModelParams, count_params
from dist_llm.planner.search import Candidate, enumerate_layouts, override_line, plan
from dist_llm.planner.time import Hardware, step_time

__all__ = ["CPU_CONSTANTS", "Candidate", "Hardware", "Layout", "MemoryEstimate", "MemoryModel", "ModelParams",
           "count_params", "enumerate_layouts", "estimate_layout", "estimate_peak_memory", "layout_from_job",
           "override_line", "plan", "step_time"]

"""One rank of the elastic-load checks (run by tests/test_megatron_elastic.py through spawn_local).

argv: checkpoint out_dir engine tp pp zero_stage. Builds the engine (``megatron`` or
``deepspeed``) for the checkpoint's model at (tp, pp, dp = world / (tp * pp)), loads
``model.safetensors`` and then the checkpoint's layout-neutral optimizer state (the saving
engine's reader, :func:`dist_llm.parallel.elastic_state.read_plain_state`) through
``engine.load_plain_optimizer_state``, and at once saves a checkpoint of its own with the
checkpoint manager into the run dir ``out_dir``, so that the test can read the moved state back
through *this* engine's reader and compare it with what was saved.
"""
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import dist_llm.parallel.megatron.elastic  # noqa: E402,F401 - registers the Megatron reader
from dist_llm.checkpoint.manager import CheckpointManager  # noqa: E402
from dist_llm.config.schema import JobConfig  # noqa: E402
from dist_llm.launch.env import read_launch_env  # noqa: E402
from dist_llm.models import GPT  # noqa: E402
from dist_llm.parallel.build import build_engine  # noqa: E402
from dist_llm.parallel.elastic_state import read_plain_state  # noqa: E402
from dist_llm.parallel.layout import init_layout, shutdown  # noqa: E402
from dist_llm.parallel.megatron.elastic import model_config  # noqa: E402

try:  # the DeepSpeed reader (branch elastic-ds): registers itself on import
    import dist_llm.parallel.deepspeed_elastic  # noqa: E402,F401
except ImportError:
    pass


def main() -> None:
    src, out, kind = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    tp, pp, zero = (int(a) for a in sys.argv[4:7])
    manifest = json.loads((src / "manifest.json").read_text())
    cfg = JobConfig()
    cfg.model = model_config(manifest)
    par = cfg.parallel
    par.engine, par.tp, par.pp, par.zero_stage, par.device = kind, tp, pp, zero, "cpu"
    le = read_launch_env()
    dp = le.world_size // (tp * pp)
    cfg.train.global_batch_size, cfg.train.micro_batch_size, cfg.train.seq_len = 2 * dp, 1, 32
    layout = init_layout(par, le)
    torch.manual_seed(0)
    engine = build_engine(cfg, GPT(cfg.model), layout)
    assert engine.elastic
    engine.load_model_state_dict(load_file(str(src / "model.safetensors")))
    state = read_plain_state(src, manifest)
    engine.load_plain_optimizer_state(state)
    CheckpointManager(out, layout, keep_last=1).save(state.step, engine, {"step": state.step}, {},
                                                     manifest["config"])
    shutdown()


if __name__ == "__main__":
    main()

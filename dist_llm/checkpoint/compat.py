"""Is a checkpoint resumable by this job? Checked from the manifest alone, before any engine call.

The manifest records the saving job's (redacted) config. World size, tp, pp and engine are
checked by the manager's load plan; this module adds what it did not see:

* **model shape** (preset, layers, heads, widths, vocabulary, positions, tying, bias): the weights
  would not fit, or worse, fit with another meaning (``n_heads`` at the same ``d_model``);
* **precision**: bf16/fp16 runs keep fp32 master weights and loss-scaler state in the optimizer
  partitions, fp32 runs do not; a mixed resume loads optimizer state of the wrong kind;
* **ZeRO stage**, when this rank loads its per-rank optimizer partition from its rank file (a
  DeepSpeed checkpoint written before the ``elastic/`` form, or Megatron without a ``sharded/``
  copy): partitions of stage 1/2/3 and an unpartitioned stage-0 state are laid out differently.
  A Megatron ``sharded/`` load and an elastic load (:mod:`dist_llm.checkpoint.elastic`) move
  moments by parameter name, so a stage change is resharded there and allowed.

Each mismatch is one line of the error, naming the field, both values and the fix.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

MODEL_SHAPE_FIELDS = ("preset", "n_layers", "n_heads", "n_kv_heads", "d_model", "d_ff", "max_seq_len",
                      "vocab_size", "bias", "tie_embeddings")


class IncompatibleCheckpointError(ValueError):
    """Raised (as a CheckpointError by the manager) when a checkpoint cannot resume this job."""


def _plain(v: Any) -> Any:
    """Enum members and their values compare alike (configs may carry either)."""
    v = getattr(v, "value", v)
    return str(v) if v is not None and not isinstance(v, (bool, int, float)) else v


def _section(cfg: Optional[Dict[str, Any]], name: str) -> Dict[str, Any]:
    sec = (cfg or {}).get(name)
    return sec if isinstance(sec, dict) else {}


def resume_mismatches(saved: Optional[Dict[str, Any]], current: Dict[str, Any],
                      loads_rank_partitions: bool) -> List[str]:
    """One message per field that makes ``saved`` (manifest config) unresumable by ``current``."""
    problems: List[str] = []
    if not saved:
        return problems  # a checkpoint written before configs were recorded: nothing to compare
    sm, cm = _section(saved, "model"), _section(current, "model")
    for key in MODEL_SHAPE_FIELDS:
        if key in sm and key in cm and _plain(sm[key]) != _plain(cm[key]):
            problems.append(f"model.{key}: checkpoint {sm[key]!r}, this job {cm[key]!r} (the weights have "
                            f"another shape; set model.{key}={sm[key]} to resume it)")
    sp, cp = _section(saved, "parallel"), _section(current, "parallel")
    if "precision" in sp and "precision" in cp and _plain(sp["precision"]) != _plain(cp["precision"]):
        problems.append(f"parallel.precision: checkpoint {sp['precision']}, this job {cp['precision']} (optimizer "
                        f"state differs between precisions; resume with parallel.precision={sp['precision']}, or "
                        f"start a new run from its weights with model.init_from=<checkpoint>)")
    if loads_rank_partitions and "zero_stage" in sp and "zero_stage" in cp \
            and _plain(sp["zero_stage"]) != _plain(cp["zero_stage"]):
        problems.append(f"parallel.zero_stage: checkpoint {sp['zero_stage']}, this job {cp['zero_stage']} (each "
                        f"rank's optimizer partition in this checkpoint's rank files is laid out by stage, and it has no "
                        f"layout-neutral elastic/ copy; resume with parallel.zero_stage={sp['zero_stage']}, or start a "
                        f"new run from its weights with model.init_from=<checkpoint>)")
    return problems


def check_resume_compatible(path: Path, manifest: Dict[str, Any], current: Optional[Dict[str, Any]],
                            loads_rank_partitions: bool) -> None:
    if current is None:
        return
    problems = resume_mismatches(manifest.get("config"), current, loads_rank_partitions)
    if problems:
        raise IncompatibleCheckpointError(f"checkpoint {path} does not fit this job:\n  " + "\n  ".join(problems))

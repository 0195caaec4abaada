"""Model size figures and the before/after table the compression commands print."""
from __future__ import annotations

from typing import Any, Dict, List, Optional

from safetensors.torch import save as safetensors_bytes

from dist_llm.compress.source import plain_state_dict
from dist_llm.compress.unstructured import sparsity_of
from dist_llm.models.gpt import GPT


def model_figures(model: GPT, ppl: Optional[Dict[str, float]] = None) -> Dict[str, Any]:
    """Parameters (tied counted once), nonzeros, sparsity of the prunable weights, safetensors bytes."""
    sp = sparsity_of(model)
    params = model.num_params()
    zeros = sum(int((p == 0).sum()) for p in {id(p): p for p in model.parameters()}.values())
    out = {"params": params, "nonzero_params": params - zeros, "prunable_sparsity": sp["sparsity"],
           "safetensors_bytes": len(safetensors_bytes(plain_state_dict(model))),
           "n_heads": model.cfg.n_heads, "n_kv_heads": model.cfg.n_kv_heads, "d_ff": model.cfg.d_ff}
    if ppl is not None:
        out.update({"val_loss": ppl["loss"], "ppl": ppl["ppl"], "eval_tokens": ppl["tokens"]})
    return out


def format_table(rows: List[Dict[str, Any]], columns: List[str]) -> str:
    """A plain aligned text table; floats to 4 significant digits."""
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return "-" if v is None else str(v)
    grid = [columns] + [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in grid) for i in range(len(columns))]
    lines = ["  ".join(v.rjust(w) if j else v.ljust(w) for j, (v, w) in enumerate(zip(row, widths))) for row in grid]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)

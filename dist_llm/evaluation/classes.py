"""Classification figures from a confusion matrix: accuracy, macro-F1 and a PNG of the matrix.

The matrix (``[true, predicted]`` counts) is additive, so ranks sum theirs and every figure
derived from the sum is the same at any world size.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Sequence

import torch


def confusion_update(matrix: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
    """Add one batch's ``(true, argmax)`` counts into ``matrix`` (``[K, K]`` float64)."""
    k = matrix.shape[0]
    pred = logits.argmax(-1).reshape(-1).long().cpu()
    true = labels.reshape(-1).long().cpu()
    matrix += torch.bincount(true * k + pred, minlength=k * k).reshape(k, k).to(matrix.dtype)


def class_figures(matrix: torch.Tensor) -> Dict[str, float]:
    """Accuracy and macro-F1 (mean over classes that occur in the labels or predictions)."""
    m = matrix.double()
    tp = m.diag()
    support, predicted = m.sum(1), m.sum(0)
    present = (support + predicted) > 0
    f1 = torch.where(present, 2 * tp / (support + predicted).clamp_min(1e-12), torch.zeros_like(tp))
    total = float(m.sum())
    return {"accuracy": float(tp.sum()) / total if total else float("nan"),
            "macro_f1": float(f1[present].mean()) if bool(present.any()) else float("nan")}


def save_confusion_png(matrix: torch.Tensor, path: Path, classes: Optional[Sequence[str]] = None,
                       title: str = "confusion matrix") -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no display on cluster nodes
    import matplotlib.pyplot as plt

    m = matrix.long().numpy()
    k = m.shape[0]
    names = list(classes) if classes and len(classes) == k else [str(i) for i in range(k)]
    fig, ax = plt.subplots(figsize=(1.0 + 0.5 * k, 1.0 + 0.5 * k))
    ax.imshow(m, cmap="Blues")
    ax.set_xticks(range(k), names, rotation=90)
    ax.set_yticks(range(k), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for i in range(k):
        for j in range(k):
            if m[i, j]:
                ax.text(j, i, str(m[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if m[i, j] > m.max() / 2 else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

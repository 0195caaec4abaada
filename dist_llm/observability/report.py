"""``dist-llm report``: PNG plots and a Markdown summary from ``metrics.jsonl``.

Works from the run directory alone (no W&B, no service): the JSONL logger writes every logged
metric there. Several run directories (a ``-m`` sweep) give the same plots with one line per run,
so the points of a sweep can be compared side by side.
"""
from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

METRICS_FILE = "metrics.jsonl"


class ReportError(ValueError):
    """A run directory that cannot be reported on; the message names the path and the fix."""


@dataclass
class RunMetrics:
    """One run's metrics: per-step records (the last record of a step wins, as after a resume
    from an earlier checkpoint) and its ``summary.json`` if present."""

    name: str
    path: Path
    records: List[Dict[str, float]]
    summary: Dict[str, object] = field(default_factory=dict)

    def series(self, key: str, x_key: str = "step") -> tuple[list[float], list[float]]:
        xs, ys = [], []
        for rec in self.records:
            y, x = rec.get(key), rec.get(x_key)
            if _finite(y) and _finite(x):
                xs.append(float(x))
                ys.append(float(y))
        return xs, ys

    def keys(self) -> set[str]:
        return {k for rec in self.records for k in rec}


def _finite(v: object) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(float(v))


def find_run_dirs(paths: Sequence[str | Path]) -> List[Path]:
    """Each path is a run directory (has ``metrics.jsonl``) or a folder of run directories
    (a sweep's output dir); returns the run directories in a stable order."""
    found: List[Path] = []
    for p in map(Path, paths):
        if (p / METRICS_FILE).is_file():
            found.append(p)
            continue
        children = sorted(c for c in p.glob("*") if (c / METRICS_FILE).is_file()) if p.is_dir() else []
        if not children:
            raise ReportError(f"{p}: no {METRICS_FILE} here or in its sub-directories; pass a run "
                              f"directory (<output_dir>/<name>) written by `dist-llm train`")
        found.extend(children)
    return found


def load_run(run_dir: Path) -> RunMetrics:
    """Parse ``metrics.jsonl`` line by line; a truncated last line (a crash mid-write) is skipped,
    any other malformed line is an error naming the line."""
    by_step: Dict[int, Dict[str, float]] = {}
    lines = (run_dir / METRICS_FILE).read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines):
                break  # the last line of a crashed run may be cut short
            raise ReportError(f"{run_dir / METRICS_FILE}:{i}: not JSON ({e})") from e
        if not isinstance(rec, dict) or not isinstance(rec.get("step"), int):
            raise ReportError(f"{run_dir / METRICS_FILE}:{i}: expected an object with an integer 'step'")
        by_step.setdefault(rec["step"], {}).update(rec)
    summary: Dict[str, object] = {}
    if (run_dir / "summary.json").is_file():
        try:
            summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            summary = {}
    records = [by_step[s] for s in sorted(by_step)]
    _fill_tokens(records)
    return RunMetrics(run_dir.name, run_dir, records, summary)


def _fill_tokens(records: List[Dict[str, float]]) -> None:
    """Validation records have no ``train/tokens_seen``; give them the tokens of their step
    (interpolated from the training records) so train and val share the tokens axis."""
    known = [(r["step"], r["train/tokens_seen"]) for r in records if _finite(r.get("train/tokens_seen"))]
    if not known:
        return
    per_step = known[-1][1] / known[-1][0] if known[-1][0] else 0.0
    for r in records:
        if not _finite(r.get("train/tokens_seen")):
            r["train/tokens_seen"] = r["step"] * per_step


# y axis: "auto" (matplotlib's range), "zero" (linear from 0: rates and sizes, where an auto
# range turns a 1% wobble or 6 MB of growth into a cliff that reads as a slowdown or a leak),
# "log" (spans decades).
# (file name, title, y label, keys, x key, y axis)
PLOTS = [
    ("loss.png", "Loss", "loss", ["train/loss", "val/loss"], "train/tokens_seen", "auto"),
    ("lr.png", "Learning rate", "lr", ["train/lr"], "step", "zero"),
    ("throughput.png", "Throughput", "tokens/s", ["tokens_per_s"], "step", "zero"),
    ("mfu.png", "Model FLOPs utilisation", "MFU", ["perf/mfu"], "step", "zero"),
    ("grad_norm.png", "Gradient norm (before clipping)", "grad norm", ["train/grad_norm"], "step", "log"),
]


def _plot(runs: List[RunMetrics], keys: List[str], x_key: str, title: str, ylabel: str,
          out: Path, yaxis: str = "auto") -> Optional[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    drew, top = False, 0.0
    for run in runs:
        for key in keys:
            xs, ys = run.series(key, x_key)
            if not xs:
                continue
            label = key if len(runs) == 1 else f"{run.name}: {key}"
            style = "o-" if key.startswith("val/") else "-"
            ax.plot(xs, ys, style, label=label, markersize=3, linewidth=1.2)
            drew, top = True, max(top, *ys)
    if not drew:
        plt.close(fig)
        return None
    ax.set_title(title)
    ax.set_xlabel("tokens" if x_key == "train/tokens_seen" else x_key)
    ax.set_ylabel(ylabel)
    if yaxis == "log":
        ax.set_yscale("log")
    elif yaxis == "zero" and top > 0:
        ax.set_ylim(0, top * 1.1)  # room above the highest point, so a flat line is seen as flat
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _prefixed(runs: List[RunMetrics], prefix: str) -> List[str]:
    return sorted({k for r in runs for k in r.keys() if k.startswith(prefix)})


def write_plots(runs: List[RunMetrics], out_dir: Path) -> List[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, title, ylabel, keys, x_key, yaxis in PLOTS:
        p = _plot(runs, keys, x_key, title, ylabel, out_dir / name, yaxis)
        if p:
            written.append(p)
    extra = [("memory.png", "Memory per rank", "GiB", _prefixed(runs, "mem/")),
             ("step_time.png", "Step-time breakdown", "seconds", _prefixed(runs, "time/") or ["step_time_s"])]
    for name, title, ylabel, keys in extra:
        p = _plot(runs, keys, "step", title, ylabel, out_dir / name, "zero")
        if p:
            written.append(p)
    return written


def _median(run: RunMetrics, key: str) -> Optional[float]:
    _, ys = run.series(key)
    return statistics.median(ys) if ys else None


def run_figures(run: RunMetrics) -> Dict[str, Optional[float]]:
    """The numbers a user looks for first, computed from the records (not trusted from a summary)."""
    _, loss = run.series("train/loss")
    _, val = run.series("val/loss")
    _, mem = run.series("mem/rss_gb")
    steps = [r["step"] for r in run.records]
    return {
        "steps": float(max(steps)) if steps else None,
        "first_train_loss": loss[0] if loss else None,
        "last_train_loss": loss[-1] if loss else None,
        "first_val_loss": val[0] if val else None,
        "best_val_loss": min(val) if val else None,
        "last_val_loss": val[-1] if val else None,
        "median_tokens_per_s": _median(run, "tokens_per_s"),
        "median_step_time_s": _median(run, "step_time_s"),
        "median_mfu": _median(run, "perf/mfu"),
        "peak_rss_gb": max(mem) if mem else None,
    }


def _fmt(v: Optional[float]) -> str:
    if v is None:
        return "-"
    return f"{v:.4g}"


def write_summary(runs: List[RunMetrics], plots: List[Path], out_dir: Path) -> Path:
    figs = {r.name: run_figures(r) for r in runs}
    cols = list(next(iter(figs.values())).keys())
    lines = ["# Run report", "", f"Runs: {', '.join(f'`{r.path}`' for r in runs)}", "",
             "| run | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, f in figs.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(f[c]) for c in cols) + " |")
    for r in runs:
        best = r.summary.get("best_checkpoint")
        if best:
            lines += ["", f"`{r.name}`: best checkpoint `{best}` (step {r.summary.get('best_step')})"]
    lines += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots] + [""]
    out = out_dir / "report.md"
    out.write_text("\n".join(lines), encoding="utf-8")
    (out_dir / "report.json").write_text(json.dumps(figs, indent=2) + "\n", encoding="utf-8")
    return out


def make_report(paths: Sequence[str | Path], out_dir: Optional[str | Path] = None) -> Dict[str, object]:
    """Plots + Markdown summary for one run or a sweep; returns what was written and the figures."""
    run_dirs = find_run_dirs(paths)
    runs = [load_run(d) for d in run_dirs]
    empty = [r.path for r in runs if not r.records]
    if empty:
        raise ReportError(f"{empty[0]}/{METRICS_FILE} has no records: the run logged nothing yet")
    out = Path(out_dir) if out_dir else (run_dirs[0] / "report" if len(run_dirs) == 1
                                         else run_dirs[0].parent / "report")
    plots = write_plots(runs, out)
    summary = write_summary(runs, plots, out)
    return {"out_dir": str(out), "summary": str(summary), "plots": [str(p) for p in plots],
            "runs": {r.name: run_figures(r) for r in runs}}

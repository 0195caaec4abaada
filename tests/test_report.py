"""`dist-llm report`: plots and summary from metrics.jsonl written by the real JSONL logger."""
import json
import math
import subprocess
import sys

import pytest

from dist_llm.observability import JsonlLogger
from dist_llm.observability.report import ReportError, load_run, make_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _fake_run(run_dir, steps=20, lr=1e-3, resume_at=None):
    log = JsonlLogger(run_dir / "metrics.jsonl")
    for s in range(1, steps + 1):
        log.log({"train/loss": 5.0 / s, "train/lr": lr * min(1, s / 5), "train/grad_norm": 1.0 / s,
                 "train/tokens_seen": 256.0 * s, "tokens_per_s": 1000.0 + s, "step_time_s": 0.25,
                 "perf/mfu": 0.3, "mem/rss_gb": 1.0 + s / 100, "time/data_s": 0.01, "time/fwd_bwd_s": 0.2}, s)
        if s % 5 == 0:
            log.log({"val/loss": 6.0 / s, "val/ppl": math.exp(6.0 / s)}, s)
    if resume_at:  # a resume from an earlier checkpoint re-logs steps: the last record wins
        log.log({"train/loss": 0.123, "train/tokens_seen": 256.0 * resume_at}, resume_at)
    log.log_summary({"best_checkpoint": str(run_dir / "best"), "best_step": steps})
    log.finish()


def test_report_one_run(tmp_path):
    run = tmp_path / "demo"
    _fake_run(run, resume_at=3)
    res = make_report([run])
    names = {p.rsplit("/", 1)[-1] for p in res["plots"]}
    assert {"loss.png", "lr.png", "throughput.png", "mfu.png", "memory.png", "step_time.png"} <= names
    for p in res["plots"]:
        data = open(p, "rb").read()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000
    figs = res["runs"]["demo"]
    assert figs["steps"] == 20 and figs["best_val_loss"] == pytest.approx(6.0 / 20)
    assert figs["first_val_loss"] == pytest.approx(6.0 / 5)
    assert figs["peak_rss_gb"] == pytest.approx(1.2)
    # step 3 was re-logged after a resume: the later record wins
    rec3 = [r for r in load_run(run).records if r["step"] == 3][0]
    assert rec3["train/loss"] == pytest.approx(0.123)
    md = (run / "report" / "report.md").read_text()
    assert "| demo |" in md and "loss.png" in md and "best checkpoint" in md


def test_report_sweep_side_by_side(tmp_path):
    for i, lr in enumerate([1e-3, 3e-3]):
        _fake_run(tmp_path / "runs" / f"sweep-{i}", lr=lr)
    res = make_report([tmp_path / "runs"])
    assert set(res["runs"]) == {"sweep-0", "sweep-1"}
    assert res["out_dir"] == str(tmp_path / "runs" / "report")
    md = (tmp_path / "runs" / "report" / "report.md").read_text()
    assert "| sweep-0 |" in md and "| sweep-1 |" in md


def test_report_bad_input(tmp_path):
    with pytest.raises(ReportError, match="no metrics.jsonl"):
        make_report([tmp_path])
    run = tmp_path / "r"
    _fake_run(run, steps=3)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "train/lo')  # a crash mid-line: the last line is skipped
    assert load_run(run).records[-1]["step"] == 3
    lines = (run / "metrics.jsonl").read_text().splitlines()
    lines.insert(1, "garbage")
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ReportError, match=r"metrics.jsonl:2: not JSON"):
        load_run(run)


def test_report_cli(tmp_path):
    run = tmp_path / "demo"
    _fake_run(run)
    p = subprocess.run([sys.executable, "-m", "dist_llm.cli.main", "report", str(run)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["summary"].endswith("report.md")
    p = subprocess.run([sys.executable, "-m", "dist_llm.cli.main", "report", str(tmp_path / "nope")],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "no metrics.jsonl" in p.stderr


def test_rates_and_sizes_are_plotted_from_zero_and_loss_is_not(tmp_path, monkeypatch):
    """A flat throughput or a few MB of RSS growth must look flat: their y axis starts at 0 with
    room above the top; the loss keeps matplotlib's own range, the grad norm a log axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = {}
    real_close = plt.close

    def keep(fig=None):  # the report closes each figure after saving it: read its axes first
        if fig is not None and fig.axes:
            figures[fig.axes[0].get_title()] = (fig.axes[0].get_ylim(), fig.axes[0].get_yscale())
        real_close(fig)

    monkeypatch.setattr(plt, "close", keep)
    run = tmp_path / "flat"
    _fake_run(run)
    make_report([run])
    for title in ("Throughput", "Memory per rank", "Model FLOPs utilisation", "Step-time breakdown"):
        (low, high), _ = figures[title]
        assert low == 0, (title, low)
    (low, high), _ = figures["Throughput"]
    assert high == pytest.approx(1020 * 1.1)  # the highest point (1000 + 20) plus 10%
    (low, _), _ = figures["Loss"]
    assert low > 0  # matplotlib's range around 0.25..5 (with its margin), not pinned at 0
    assert figures["Gradient norm (before clipping)"][1] == "log"
